"""scripts/export.py --format gguf (chatglm3/checkpoint/gguf.py), checked with llama.cpp itself (llama-cpp-python):
the file's metadata and tensors, llama.cpp's greedy continuation against ours token for token (f32, f16; from raw
ids and from a chat prompt rendered by llama.cpp's chat template), q8_0's first tokens, a merged LoRA adapter,
llama.cpp's own k-quants, and one-line refusals that leave nothing behind."""
import ctypes
import json
import sys

import numpy as np
import pytest
import torch

from conftest import DATA, DEMO
from chatglm3.model import conversation
from chatglm3.checkpoint import gguf as gguf_export
from chatglm3.checkpoint.loading import load_model_and_tokenizer
from test_finetune import base_args, ok, pokemon_jsonl, run_finetune  # noqa: F401  (a fixture)

sys.path.insert(0, str(DEMO / "scripts"))
import export as export_script  # noqa: E402

N_NEW = 32
QUESTIONS = ["皮卡丘是什么属性的？", "妙蛙种子有什么特性？", "你好"]


def export(*args) -> int:
    return export_script.main(list(map(str, args)))


def gguf_of(model, out, gguf_type, *extra):
    assert export("--model", model, "--output", out, "--format", "gguf", "--gguf-type", gguf_type, *extra) == 0
    return out / f"{out.name}-{gguf_type}.gguf"


def our_greedy(model, ids, n=N_NEW) -> list:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=[])
    return out[0, len(ids):].tolist()


class LlamaCpp:
    """llama.cpp (llama-cpp-python) on a GGUF file: greedy continuation of ids, its chat template, its tokenizer."""

    def __init__(self, path):
        llama_cpp = pytest.importorskip("llama_cpp")
        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, n_threads=2, logits_all=True,
                                   verbose=False, seed=0)

    def greedy(self, ids, n=N_NEW) -> list:
        self.llm.reset()
        self.llm.eval(ids)
        new = []
        for _ in range(n):
            new.append(int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
            self.llm.eval(new[-1:])
        return new

    def chat_ids(self, messages) -> list:
        """The prompt llama.cpp's built-in chat templates render from the file's tokenizer.chat_template (C API),
        tokenised by llama.cpp with its special tokens."""
        template = self.llm.metadata["tokenizer.chat_template"].encode()
        chat = (self.lib.llama_chat_message * len(messages))(
            *[self.lib.llama_chat_message(role=m["role"].encode(), content=m["content"].encode()) for m in messages])
        buf = ctypes.create_string_buffer(1 << 16)
        n = self.lib.llama_chat_apply_template(template, chat, len(messages), True, buf, len(buf))
        assert 0 < n < len(buf), "llama.cpp did not recognise the chat template"
        return self.llm.tokenize(buf.raw[:n], add_bos=False, special=True)

    def jinja_ids(self, messages) -> list:
        """The same prompt rendered by llama-cpp-python's Jinja renderer (what LM Studio does)."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self.llm.metadata["tokenizer.chat_template"]
        prompt = Jinja2ChatFormatter(template, eos_token="</s>", bos_token="<s>")(messages=messages).prompt
        return self.llm.tokenize(prompt.encode(), add_bos=False, special=True)


def chats():
    """Conversations for the chat-prompt checks: one question, a system prompt, two turns."""
    return [
        [{"role": "user", "content": QUESTIONS[0]}],
        [{"role": "system", "content": "你是宝可梦图鉴。"}, {"role": "user", "content": QUESTIONS[1]}],
        [{"role": "user", "content": QUESTIONS[2]}, {"role": "assistant", "content": "你好！"},
         {"role": "user", "content": QUESTIONS[0]}],
    ]


@pytest.fixture(scope="module")
def finetuned(pokemon_jsonl, tmp_path_factory):
    """(full fine-tuned model, LoRA adapter on it): the quick start's shape (quickstart.sh stage 3: 4 layers, hidden
    128, 8 heads, 2 key/value groups, vocabulary 3000) fine-tuned by finetune.py, a few steps each."""
    from build_tiny_model import build_tiny_model

    work = tmp_path_factory.mktemp("gguf-ft")
    base = build_tiny_model([DATA / "data.csv", pokemon_jsonl], work / "base", layers=4, hidden=128, heads=8,
                            kv_groups=2, vocab_size=3000)
    ok(run_finetune(base_args(base, pokemon_jsonl, work / "full", "--max_steps", "12", "--learning_rate", "6e-3",
                              "--save_steps", "12")))
    full = work / "full"
    ok(run_finetune(base_args(full, pokemon_jsonl, work / "lora", "--max_steps", "6", "--learning_rate", "2e-2",
                              "--lora_rank", "4", "--save_steps", "6")))
    return full, work / "lora"


# ---- the file ---------------------------------------------------------------------------------------------------

def test_tensor_names_are_llama_cpps_chatglm_names():
    import gguf

    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == gguf_export.ARCH)
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch]}
    names = [n.rsplit(".", 1)[0] for n in gguf_export.TENSOR_NAMES.values()]
    names += ["blk.{bid}." + n.rsplit(".", 1)[0] for n in gguf_export.LAYER_TENSOR_NAMES.values()]
    assert set(names) <= allowed


def test_f32_file_holds_our_tensors_vocabulary_and_chat_settings(tiny_model, tmp_path):
    import gguf

    path = gguf_of(tiny_model, tmp_path / "tiny", "f32")
    assert sorted(p.name for p in path.parent.iterdir()) == ["Modelfile", path.name]
    model, tokenizer = load_model_and_tokenizer(tiny_model, device="cpu", dtype="float32")
    meta = gguf_export.read_metadata(path)
    config = model.config
    assert meta["general.architecture"] == "chatglm"
    assert meta["chatglm.block_count"] == config.num_layers
    assert meta["chatglm.attention.head_count_kv"] == config.multi_query_group_num
    assert meta["chatglm.rope.dimension_count"] == config.kv_channels // 2
    assert meta["tokenizer.ggml.tokens"] == config.padded_vocab_size
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert [meta["tokenizer.ggml.eos_token_id"], meta["tokenizer.ggml.eot_token_id"],
            meta["tokenizer.ggml.eom_token_id"]] == conversation.stop_token_ids(tokenizer)
    assert meta["tokenizer.chat_template"] == gguf_export.CHAT_TEMPLATE
    reader = gguf.GGUFReader(str(path))
    tokens = [bytes(reader.fields["tokenizer.ggml.tokens"].parts[i]).decode()
              for i in reader.fields["tokenizer.ggml.tokens"].data]
    assert tokens[tokenizer.get_command("<|user|>")] == "<|user|>"
    state = model.state_dict()
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == len(state) - 1  # all but the rotary inv_freq
    for key, value in state.items():
        if key not in gguf_export.SKIPPED:
            data = np.asarray(tensors[gguf_export.gguf_name(key)].data).reshape(value.shape)
            assert np.array_equal(data, value.numpy()), key
    modelfile = (path.parent / "Modelfile").read_text(encoding="utf-8")
    assert modelfile.startswith(f"FROM ./{path.name}\n") and 'PARAMETER stop "<|user|>"' in modelfile


# ---- llama.cpp against our model ---------------------------------------------------------------------------------

def check_parity(model_dir, out, gguf_type, model, tokenizer, adapter=None):
    """llama.cpp stops at our stop tokens, and its greedy continuation equals ours for N_NEW tokens, from raw ids and
    from chat prompts rendered by llama.cpp's chat template (whose ids equal conversation.prompt_ids)."""
    extra = ("--adapter", adapter) if adapter else ()
    cpp = LlamaCpp(gguf_of(model_dir, out, gguf_type, *extra))
    vocab = cpp.lib.llama_model_get_vocab(cpp.llm.model)
    end_of_generation = [i for i in range(cpp.llm.n_vocab()) if cpp.lib.llama_vocab_is_eog(vocab, i)]
    assert end_of_generation == sorted(conversation.stop_token_ids(tokenizer))  # llama.cpp stops where we stop
    raw = tokenizer.encode(QUESTIONS[0])  # [gMASK] sop + the text, no chat roles
    assert cpp.greedy(raw) == our_greedy(model, raw)
    for messages in chats():
        ids = conversation.prompt_ids(tokenizer, messages)
        assert cpp.chat_ids(messages) == ids
        assert cpp.jinja_ids(messages) == ids
        assert cpp.greedy(ids) == our_greedy(model, ids)


def rounded(model, dtype):
    """Our model with its matrices rounded to `dtype`, computing in float32: the weights an f16/bf16 file holds."""
    for name, param in model.named_parameters():
        if param.dim() == 2:
            param.data = param.data.to(dtype).float()
    return model


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", ["f32", "f16", "bf16"])
def test_llama_cpp_continues_our_tiny_model_token_for_token(tiny_model, tmp_path, gguf_type):
    model, tokenizer = load_model_and_tokenizer(tiny_model, device="cpu", dtype="float32")
    if gguf_type != "f32":
        rounded(model, torch.float16 if gguf_type == "f16" else torch.bfloat16)
    check_parity(tiny_model, tmp_path / "tiny", gguf_type, model, tokenizer)


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", ["f32", "f16"])
def test_llama_cpp_continues_a_fine_tuned_model_token_for_token(finetuned, tmp_path, gguf_type):
    full, _ = finetuned
    model, tokenizer = load_model_and_tokenizer(full, device="cpu", dtype="float32")
    if gguf_type == "f16":
        rounded(model, torch.float16)
    check_parity(full, tmp_path / "ft", gguf_type, model, tokenizer)


@pytest.mark.slow
def test_merged_lora_export_behaves_like_our_adapter_model(finetuned, tmp_path):
    full, adapter = finetuned
    model, tokenizer = load_model_and_tokenizer(full, device="cpu", dtype="float32", adapter=adapter)
    check_parity(full, tmp_path / "merged", "f32", model, tokenizer, adapter=adapter)


@pytest.mark.slow
def test_real_tokenizer_prompts_tokenise_the_same_in_llama_cpp(shared, tmp_path):
    """The real ChatGLM3 vocabulary (64,798 tokens, padded to 65,024) on the upstream-format tiny model."""
    tiny = shared / "parity" / "tiny-chatglm3"
    model, tokenizer = load_model_and_tokenizer(tiny, device="cpu", dtype="float32")
    check_parity(tiny, tmp_path / "real", "f32", model, tokenizer)


def dev_prompts(tokenizer, data_file) -> list:
    """Every user turn of the dev conversations, with the conversation before it."""
    prompts = []
    for line in data_file.read_text(encoding="utf-8").splitlines():
        messages = conversation.sample_to_messages(json.loads(line))
        for i, m in enumerate(messages):
            if m["role"] == "user":
                prompts.append(conversation.prompt_ids(tokenizer, messages[:i + 1]))
    return prompts


@pytest.mark.slow
def test_q8_0_agrees_on_the_first_greedy_token(finetuned, pokemon_jsonl, tmp_path):
    full, _ = finetuned
    model, tokenizer = load_model_and_tokenizer(full, device="cpu", dtype="float32")
    cpp = LlamaCpp(gguf_of(full, tmp_path / "q8", "q8_0"))
    prompts = dev_prompts(tokenizer, pokemon_jsonl.parent / "dev.jsonl")
    assert len(prompts) >= 20
    agree = sum(cpp.greedy(ids, 1) == our_greedy(model, ids, 1) for ids in prompts)
    print(f"q8_0 first greedy token agrees on {agree}/{len(prompts)} dev prompts")  # shown by pytest -s
    assert agree >= 0.95 * len(prompts), f"{agree}/{len(prompts)}"


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", ["q4_k_m", "q5_k_m"])
def test_llama_cpp_quantizer_writes_a_file_llama_cpp_runs(finetuned, tmp_path, gguf_type):
    full, _ = finetuned
    path = gguf_of(full, tmp_path / "k", gguf_type)
    assert sorted(p.name for p in path.parent.iterdir()) == ["Modelfile", path.name]
    assert gguf_export.read_metadata(path)["general.file_type"] == gguf_export.LLAMA_QUANTIZED[gguf_type]
    assert len(LlamaCpp(path).greedy([1, 2, 3], 4)) == 4


# ---- refusals ----------------------------------------------------------------------------------------------------

def one_line(capsys, *args) -> str:
    assert export(*args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_bad_requests_are_one_line_and_write_nothing(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    common = ("--model", tiny_model, "--output", out, "--format", "gguf")
    assert "q3_x" in one_line(capsys, *common, "--gguf-type", "q3_x")
    assert "--format gguf" in one_line(capsys, "--model", tiny_model, "--output", out, "--gguf-type", "f16")
    assert "config.json" in one_line(capsys, "--model", tmp_path, "--output", out, "--format", "gguf")
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "--force" in one_line(capsys, *common)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert export(*common, "--gguf-type", "Q8_0", "--force") == 0  # case does not matter
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "out-q8_0.gguf"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_a_p_tuning_checkpoint_is_refused_with_what_to_use(tiny_model, tmp_path, capsys):
    pt = tmp_path / "pt"
    pt.mkdir()
    config = json.loads((tiny_model / "config.json").read_text())
    (pt / "config.json").write_text(json.dumps({**config, "pre_seq_len": 8}))
    err = one_line(capsys, "--model", pt, "--output", tmp_path / "out", "--format", "gguf")
    assert "P-Tuning" in err and "--pt-checkpoint" in err
    err = one_line(capsys, "--model", tiny_model, "--adapter", pt, "--output", tmp_path / "out", "--format", "gguf")
    assert "P-Tuning" in err
    assert not (tmp_path / "out").exists()


# ---- the benchmark -----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_bench_gguf_runs_both_engines_and_refuses_an_unknown_type(tiny_model, tmp_path):
    import subprocess

    pytest.importorskip("llama_cpp")
    bench = [sys.executable, str(DEMO.parent / "benchmarks" / "bench_gguf.py"), "--model", str(tiny_model)]
    result = subprocess.run([*bench, "--types", "f16,q8_0", "--new-tokens", "4", "--repeats", "1", "--threads", "1",
                             "--work", str(tmp_path), "--json"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout.splitlines()[-1])
    assert set(rows) == {"llama.cpp f16", "llama.cpp q8_0", "ours float32"}
    assert all(r["decode_tokens_per_s"] > 0 for r in rows.values())
    assert (tmp_path / f"{tiny_model.name}-gguf-f16" / f"{tiny_model.name}-gguf-f16-f16.gguf").is_file()
    table = result.stdout.splitlines()
    assert any(line.startswith("llama.cpp  f16") and line.rstrip().endswith("yes") for line in table)
    bad = subprocess.run([*bench, "--types", "f16,q3"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "q3" in bad.stderr
