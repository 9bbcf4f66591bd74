"""scripts/export.py: LoRA merge and conversion into a complete model folder, in the ChatGLM3 layout and as
transformers' built-in GLM (loaded without remote code and compared with our model and tokenizer)."""
import json
import random
import stat
import subprocess
import sys

import pytest
import torch

from conftest import DEMO
from chatglm3.model import conversation
from chatglm3.checkpoint import hf_glm
from chatglm3.model.configuration import ChatGLMConfig
from chatglm3.checkpoint.loading import load_model_and_tokenizer
from chatglm3.output_files import new_file_mode
from chatglm3.model.modeling import ChatGLMForConditionalGeneration

sys.path.insert(0, str(DEMO / "scripts"))
import export as export_script  # noqa: E402


def export(*args) -> int:
    return export_script.main(list(map(str, args)))


def error(capsys, *args) -> str:
    """The one stderr line of a failed in-process export."""
    assert export(*args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def lora_adapter(model, out, seed=0):
    """A LoRA adapter on query_key_value with random (non-zero) updates, saved in PEFT's format."""
    from peft import LoraConfig, PeftModel

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value"], task_type="CAUSAL_LM", init_lora_weights=False)
    peft_model = PeftModel(model, config)  # the task class would need generation hooks that merging does not
    peft_model.save_pretrained(str(out))
    return peft_model


@pytest.fixture(scope="module")
def base(shared):
    """The tiny upstream-format model with the real tokenizer."""
    return shared / "parity" / "tiny-chatglm3"


@pytest.fixture(scope="module")
def golden(shared):
    return json.loads((shared / "parity" / "tokenizer_golden.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def ids(golden):
    """An 84-token conversation."""
    return torch.tensor([golden["multiturn"][0]["input_ids"]])


@pytest.fixture(scope="module")
def adapter(base, ids, tmp_path_factory):
    """(adapter folder, the adapter model's logits on `ids`)."""
    model, _ = load_model_and_tokenizer(base, device="cpu", dtype="float32")
    out = tmp_path_factory.mktemp("adapter")
    with torch.no_grad():
        logits = lora_adapter(model, out)(input_ids=ids).logits
    return out, logits


def logits_of(folder, ids):
    model, _ = load_model_and_tokenizer(folder, device="cpu", dtype="float32")
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merged_lora_gives_the_adapter_logits_in_the_full_checkpoint_layout(base, adapter, ids, tmp_path):
    adapter_dir, adapter_logits = adapter
    assert (adapter_logits - logits_of(base, ids)).abs().max() > 1e-3  # the adapter changes the model
    out = tmp_path / "merged"
    assert export("--model", base, "--adapter", adapter_dir, "--output", out, "--dtype", "float32", "--max-shard-size", "4MB") == 0
    names = {p.name for p in out.iterdir()}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and shards <= names
    assert {"config.json", "tokenizer.model", "tokenizer_config.json"} <= names
    assert not any("lora" in key for key in index["weight_map"])
    assert (logits_of(out, ids) - adapter_logits).abs().max() < 1e-5
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no staging folder left


def test_dtype_is_selectable_and_recorded(base, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "bf16"
    assert export("--model", base, "--output", out, "--dtype", "bfloat16") == 0
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "bfloat16" and config["model_type"] == "chatglm"
    expected = load_model_and_tokenizer(base, device="cpu", dtype="bfloat16")[0].state_dict()
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if not k.endswith("inv_freq")} == {torch.bfloat16}
        assert all(torch.equal(f.get_tensor(k), expected[k]) for k in f.keys())


@pytest.fixture(scope="module")
def hf_glm_export(base, adapter, tmp_path_factory):
    """The tiny model with rope_ratio 50 (so that the rope mapping matters) and the adapter merged, exported as
    GlmForCausalLM; (folder, our merged model, our tokenizer)."""
    source = tmp_path_factory.mktemp("rope50")
    for f in base.iterdir():
        (source / f.name).symlink_to(f)
    config = json.loads((base / "config.json").read_text())
    (source / "config.json").unlink()
    (source / "config.json").write_text(json.dumps({**config, "rope_ratio": 50}))
    out = tmp_path_factory.mktemp("export") / "glm"
    assert export("--model", source, "--adapter", adapter[0], "--output", out, "--format", "hf-glm", "--max-shard-size", "4MB") == 0
    from chatglm3.checkpoint.export import merge_lora

    model, tokenizer = load_model_and_tokenizer(source, device="cpu", dtype="float32")
    return out, merge_lora(model, adapter[0]), tokenizer


def test_hf_glm_loads_without_remote_code_and_gives_our_logits_and_greedy_ids(hf_glm_export, golden):
    from transformers import AutoModelForCausalLM

    out, ours, _ = hf_glm_export
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)  # float32, as exported
    assert type(model).__name__ == "GlmForCausalLM" and model.dtype == torch.float32
    assert not any(info.values()), info  # every tensor mapped, none left over
    assert model.config.rope_parameters["rope_theta"] == 500000.0
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) == 25
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.glob("*.safetensors")} == {new_file_mode()}  # not 0o600
    ids = torch.tensor([golden["multiturn"][2]["input_ids"]])  # 189 tokens: rope far from position 0
    with torch.no_grad():
        diff = (model(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-4
    prompt = ids[:, :40]
    theirs = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)[0, 40:].tolist()
    assert theirs == ours.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=[])[0, 40:].tolist()
    assert model.generation_config.eos_token_id == conversation.stop_token_ids(hf_glm_export[2])


def _literal_special(text: str) -> bool:
    return any(hf_glm.token_name(t) in text for t in conversation.SPECIAL_TOKENS)


def test_hf_glm_tokenizer_and_chat_template_give_our_ids(hf_glm_export, golden, shared):
    from transformers import AutoTokenizer

    out, _, ours = hf_glm_export
    theirs = AutoTokenizer.from_pretrained(out)
    assert set(theirs("皮卡丘")) == {"input_ids", "attention_mask"}  # what generate(**inputs) accepts
    for case in golden["texts"]:
        ids = theirs(case["text"])["input_ids"]
        if _literal_special(case["text"]):  # "<|user|>" written in text: the special token, as in any HF tokenizer
            assert ids[2:] == [golden["special"]["<|user|>"]]
            continue
        assert ids == case["ids_with_special"], case["text"]
        assert theirs.decode(case["ids"]) == case["decoded"]
    cases = json.loads((shared / "parity" / "cases.json").read_text(encoding="utf-8"))
    conversations = [conversation.sample_to_messages(c["example"]) for c in golden["multiturn"]]
    conversations += [c.get("history", []) + [{"role": c.get("role", "user"), "content": c["query"]}] for c in cases["chat"]]
    for messages in conversations:
        expected = conversation.prompt_ids(ours, messages)
        ids = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        if any(_literal_special(m["content"]) for m in messages):
            assert ids != expected
            continue
        assert ids == expected
    tools = [{"name": "pokedex_lookup", "description": "查宝可梦", "parameters": {"name": {"type": "string"}}}]
    messages = [{"role": "user", "content": "皮卡丘是什么属性？"}]
    ids = theirs.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert ids == conversation.prompt_ids(ours, [conversation.tool_system_message(tools)] + messages)
    reply = conversation.prompt_ids(ours, messages)[3:-1]  # what follows a role token: "\n" and the text
    assert theirs.decode(reply) == ours.decode(reply) == "\n " + messages[0]["content"]


def test_tokenizer_json_matches_sentencepiece_on_real_and_random_text(real_tokenizer, tiny_model, shared):
    import csv

    from chatglm3.checkpoint.loading import load_tokenizer

    with open(shared / "pokemon" / "seed_data.csv", encoding="utf-8-sig") as f:
        texts = [cell for row in csv.reader(f) for cell in row]
    rng = random.Random(0)
    alphabet = list("  \t\n▁abcXYZ019.,!?()'\"-_{}:皮卡丘的属性是电。，？《》😀é") + ["tool_call", "```python"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(2000)]
    for ours in (real_tokenizer, load_tokenizer(tiny_model)):  # the real vocabulary and a build_tiny_model.py-trained one
        tokenizer = hf_glm.build_tokenizer(ours)
        mismatches = [t for t in texts if tokenizer.encode(t, add_special_tokens=False).ids != ours.tokenizer.encode(t)]
        assert mismatches == []


def test_hf_glm_refuses_what_glm_cannot_express():
    for name, value in {"add_bias_linear": True, "rmsnorm": False, "post_layer_norm": False}.items():
        with pytest.raises(Exception, match=name):
            hf_glm.check_convertible(ChatGLMConfig(**{name: value}))


def test_bad_input_is_one_line_and_writes_nothing(base, shared, adapter, tmp_path, capsys):
    out = tmp_path / "out"
    ptuning = shared / "parity" / "tiny-ptuning"
    for flags in (["--model", ptuning], ["--model", base, "--adapter", ptuning]):
        assert "inference.py --pt-checkpoint" in error(capsys, *flags, "--output", out)
    assert "nope" in error(capsys, "--model", tmp_path / "nope", "--output", out)
    assert "nope" in error(capsys, "--model", base, "--adapter", tmp_path / "nope", "--output", out)
    assert "adapter_config.json" in error(capsys, "--model", base, "--adapter", base, "--output", out)
    assert "--adapter" in error(capsys, "--model", adapter[0], "--output", out)  # flags swapped
    other = ChatGLMForConditionalGeneration(ChatGLMConfig(num_layers=2, hidden_size=16, num_attention_heads=2, kv_channels=8,
                                                           ffn_hidden_size=24, padded_vocab_size=128))
    lora_adapter(other, tmp_path / "other-adapter")
    assert "size mismatch" in error(capsys, "--model", base, "--adapter", tmp_path / "other-adapter", "--output", out)
    bare = tmp_path / "bare"  # weights without tokenizer files
    bare.mkdir()
    for f in base.iterdir():
        if not f.name.startswith("tokenizer"):
            (bare / f.name).symlink_to(f)
    assert "--tokenizer" in error(capsys, "--model", bare, "--output", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "other-adapter"]  # nothing half-written
    assert export("--model", bare, "--tokenizer", shared / "chatglm3-tokenizer", "--output", out) == 0
    assert (out / "tokenizer.model").is_file()

    (out / "keep.txt").write_text("mine")
    assert "--force" in error(capsys, "--model", base, "--output", out)
    assert (out / "keep.txt").read_text() == "mine"
    assert "--output" in error(capsys, "--model", base, "--output", base.parent, "--force")
    assert export("--model", base, "--output", out, "--force") == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


@pytest.mark.slow
def test_cli_run_and_error(base, shared, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, str(DEMO / "scripts" / "export.py"), *map(str, args)],
                              capture_output=True, text=True, timeout=300)

    r = run("--model", base, "--output", tmp_path / "glm", "--format", "hf-glm")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "glm" / "config.json").read_text())["architectures"] == ["GlmForCausalLM"]
    r = run("--model", shared / "parity" / "tiny-ptuning", "--output", tmp_path / "x")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "api_server.py" in r.stderr
