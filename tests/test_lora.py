"""LoRA (chatglm3/checkpoint/lora.py, finetune.py --lora_rank, --adapter in the scripts): only the adapter trains, adapters
in PEFT's format with the tensor names of an adapter PEFT makes on upstream's model code, save -> load gives the
same logits, bad input is one line. End to end (slow): the launcher learns, resume after SIGKILL, DeepSpeed ZeRO-2
on two CPU processes."""
import json
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import evaluate
import finetune
import inference
from arguments import ModelArguments
from chatglm3 import ChatGLMForConditionalGeneration
from chatglm3.checkpoint import export, loading, lora
from chatglm3.data import train_format
from chatglm3.checkpoint.loading import load_model_and_tokenizer
from chatglm3.output_files import new_file_mode
from test_finetune import FINETUNE, base_args, kill_after_checkpoint, ok, pokemon_jsonl, run_finetune, train_losses  # noqa: F401  (a fixture)
from test_launchers import launch

ADAPTER_FILE = "adapter_model.safetensors"


def adapter_tensors(folder: Path) -> dict:
    with safe_open(str(folder / ADAPTER_FILE), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def adapter_keys(layers: int) -> set:
    """PEFT's tensor names for upstream's default LoRA target, as upstream's finetune_demo saves them."""
    return {f"base_model.model.transformer.encoder.layers.{i}.self_attention.query_key_value.lora_{ab}.weight"
            for i in range(layers) for ab in "AB"}


@pytest.fixture(scope="module")
def tiny(shared):
    return shared / "parity" / "tiny-chatglm3"


def wrapped(tiny_dir: Path, seed: int = 0):
    """The tiny model wrapped for LoRA with random (non-zero) B matrices, so the adapter changes the logits."""
    model = ChatGLMForConditionalGeneration.from_pretrained(tiny_dir)
    peft_model = lora.add_lora(model, 8, base_path=tiny_dir)
    generator = torch.Generator().manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.1
    return peft_model.eval()


@pytest.fixture(scope="module")
def dev_file(shared, tmp_path_factory) -> Path:
    """The reference conversations (system prompts, a tool call, a reply without loss) as a JSONL dev file."""
    path = tmp_path_factory.mktemp("dev") / "dev.jsonl"
    cases = json.loads((shared / "parity" / "cases.json").read_text(encoding="utf-8"))["multiturn"]
    path.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in cases), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("adapter") / "lora"
    wrapped(tiny).save_pretrained(str(folder))
    return folder


# ---- the upstream format ---------------------------------------------------------------------------------------
class UpstreamConfig:
    """What PEFT reads from a model's config: upstream's model_type picks PEFT's default LoRA targets."""

    def to_dict(self):
        return {"model_type": "chatglm", "tie_word_embeddings": False}


class UpstreamTree(nn.Module):
    """The module tree of upstream's remote-code ChatGLMForConditionalGeneration (modeling_chatglm.py), with the
    tiny model's shapes: only the names and shapes of what PEFT adapts matter for an adapter's tensor names."""

    def __init__(self, config):
        super().__init__()
        self.config = UpstreamConfig()
        h, qkv = config.hidden_size, (config.num_attention_heads + 2 * config.multi_query_group_num) * config.kv_channels
        block = lambda: nn.ModuleDict({  # noqa: E731
            "input_layernorm": nn.LayerNorm(h),
            "self_attention": nn.ModuleDict({"query_key_value": nn.Linear(h, qkv), "core_attention": nn.Identity(),
                                             "dense": nn.Linear(config.num_attention_heads * config.kv_channels, h, bias=False)}),
            "post_attention_layernorm": nn.LayerNorm(h),
            "mlp": nn.ModuleDict({"dense_h_to_4h": nn.Linear(h, 2 * config.ffn_hidden_size, bias=False),
                                  "dense_4h_to_h": nn.Linear(config.ffn_hidden_size, h, bias=False)}),
        })
        self.transformer = nn.ModuleDict({
            "embedding": nn.ModuleDict({"word_embeddings": nn.Embedding(config.padded_vocab_size, h)}),
            "encoder": nn.ModuleDict({"layers": nn.ModuleList([block() for _ in range(config.num_layers)]),
                                      "final_layernorm": nn.LayerNorm(h)}),
            "output_layer": nn.Linear(h, config.padded_vocab_size, bias=False),
        })

    def prepare_inputs_for_generation(self, input_ids, **kwargs):  # PEFT's CAUSAL_LM wrapper reads it
        return {"input_ids": input_ids}


def test_adapters_have_upstream_tensor_names_and_load_both_ways(tiny, adapter, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    config = ChatGLMForConditionalGeneration.from_pretrained(tiny).config
    # Upstream's finetune_demo: configs/lora.yaml's peft_config, no target_modules (PEFT's default for chatglm).
    upstream = get_peft_model(UpstreamTree(config), LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=32, lora_dropout=0.1))
    for name, param in upstream.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.1)
    upstream.save_pretrained(str(tmp_path / "upstream"))
    theirs, ours = adapter_tensors(tmp_path / "upstream"), adapter_tensors(adapter)
    assert set(theirs) == set(ours) == adapter_keys(2)
    assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in ours.items()}
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert (saved["peft_type"], saved["task_type"], saved["r"], saved["lora_alpha"], saved["lora_dropout"],
            saved["target_modules"]) == ("LORA", "CAUSAL_LM", 8, 32, 0.1, ["query_key_value"])
    assert saved["base_model_name_or_path"] == str(tiny.resolve())

    # Upstream's adapter here: each layer's query_key_value gains scaling * B @ A (alpha 32 / r 8 = 4).
    model, tokenizer = load_model_and_tokenizer(str(tiny), adapter=str(tmp_path / "upstream"), device="cpu")
    by_hand = ChatGLMForConditionalGeneration.from_pretrained(tiny).eval()
    for i, layer in enumerate(by_hand.transformer.encoder.layers):
        prefix = f"base_model.model.transformer.encoder.layers.{i}.self_attention.query_key_value"
        layer.self_attention.query_key_value.weight.data += 4 * theirs[f"{prefix}.lora_B.weight"] @ theirs[f"{prefix}.lora_A.weight"]
    ids = tokenizer.build_chat_input("皮卡丘是什么属性的宝可梦？")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, by_hand(ids).logits, atol=1e-4, rtol=0)

    # Ours there: PEFT loads it onto upstream's module tree, tensor for tensor.
    there = PeftModel.from_pretrained(UpstreamTree(config), str(adapter))
    for key, tensor in ours.items():
        name = key.removesuffix(".weight") + ".default.weight"  # PEFT names the adapter "default" in the module tree
        torch.testing.assert_close(there.get_parameter(name), tensor, atol=0, rtol=0)


# ---- training ----------------------------------------------------------------------------------------------------
def test_only_the_adapter_trains_and_save_then_load_gives_identical_logits(tiny, tmp_path):
    model = wrapped(tiny).train()
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(100, 60000, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) != (name in trainable), name

    model.eval().save_pretrained(str(tmp_path / "adapter"))
    loaded, _ = load_model_and_tokenizer(str(tiny), adapter=str(tmp_path / "adapter"), device="cpu")
    assert isinstance(loaded, ChatGLMForConditionalGeneration)  # chat(), generate() and the rest as without LoRA
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(input_ids=ids).logits)
        assert not torch.allclose(loaded(ids).logits, ChatGLMForConditionalGeneration.from_pretrained(tiny)(ids).logits)


def test_merging_folds_the_adapter_into_the_base_weights(tiny, adapter):
    model, tokenizer = load_model_and_tokenizer(str(tiny), adapter=str(adapter), device="cpu")
    ids = tokenizer.build_chat_input("皮卡丘是什么属性的宝可梦？")["input_ids"]
    with torch.no_grad():
        with_adapter = model(ids).logits
        merged = lora.merge(model)
        torch.testing.assert_close(merged(ids).logits, with_adapter, atol=1e-5, rtol=0)
    base = ChatGLMForConditionalGeneration.from_pretrained(tiny)
    assert {k: v.shape for k, v in merged.state_dict().items()} == {k: v.shape for k, v in base.state_dict().items()}
    assert all(type(m).__module__.startswith("torch.") for m in merged.modules() if "Linear" in type(m).__name__)


def test_finetune_builds_the_lora_model_from_its_flags(tiny):
    args = ModelArguments(model_name_or_path=str(tiny), lora_rank=4, lora_alpha=8, lora_dropout=0.0,
                          lora_target="query_key_value, dense_4h_to_h")
    training_args = finetune.parse_args(base_args(tiny, tiny / "x.jsonl", tiny / "out"))[2]
    plan = finetune.make_plan(args, training_args)
    tokenizer = loading.load_tokenizer(plan.tokenizer_dir)
    model = finetune.load_model(plan, args, tokenizer, training_args, gradient_checkpointing=True)
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout, set(config.target_modules)) == (4, 8, 0.0, {"query_key_value", "dense_4h_to_h"})
    trainable = sorted(name for name, param in model.named_parameters() if param.requires_grad)
    assert len(trainable) == 2 * 2 * 2 and all(".lora_" in name for name in trainable)
    assert model.get_base_model().is_gradient_checkpointing and model.training


# ---- bad input ---------------------------------------------------------------------------------------------------
def one_line_error(capsys, main, argv, *fragments) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err, err[-2000:]
    last = err.strip().splitlines()[-1]
    for fragment in fragments:
        assert fragment in last, (fragment, err[-2000:])
    return last


def test_lora_flags_that_cannot_work_are_refused(tiny, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"conversations": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]},
                               ensure_ascii=False) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    one_line_error(capsys, finetune.main, base_args(tiny, data, out, "--lora_rank", "8", "--pre_seq_len", "4"), "--lora_rank", "--pre_seq_len")
    one_line_error(capsys, finetune.main, base_args(tiny, data, out, "--lora_alpha", "16"), "--lora_alpha", "--lora_rank")
    one_line_error(capsys, finetune.main, base_args(tiny, data, out, "--lora_rank", "0"), "--lora_rank", "0")
    one_line_error(capsys, finetune.main, base_args(tiny, data, out, "--lora_rank", "8", "--quantization_bit", "3"),
                   "--quantization_bit", "4", "8")
    one_line_error(capsys, finetune.main, base_args(tiny, data, out, "--lora_rank", "8", "--lora_target", "query_key_value,qkv"),
                   "qkv", "dense, dense_4h_to_h, dense_h_to_4h, output_layer, query_key_value")
    assert not out.exists() or not any(out.iterdir())


def test_a_folder_given_to_the_wrong_flag_or_another_base_is_one_line(tiny, tiny_model, adapter, dev_file, shared, tmp_path, capsys):
    ptuning = shared / "parity" / "tiny-ptuning"
    run = ["--prompt", "你好", "--max-new-tokens", "2"]
    one_line_error(capsys, inference.main, [*run, "--model", tiny, "--pt-checkpoint", adapter], str(adapter), "--adapter")
    one_line_error(capsys, inference.main, [*run, "--model", tiny, "--adapter", ptuning], str(ptuning), "--pt-checkpoint")
    one_line_error(capsys, inference.main, [*run, "--model", tiny, "--adapter", tiny], "adapter_config.json", "--model")
    one_line_error(capsys, inference.main, [*run, "--model", tiny, "--adapter", adapter, "--pt-checkpoint", ptuning], "not both")
    # Made on a model of hidden size 32, given to one of hidden size 64.
    one_line_error(capsys, evaluate.main, ["--data", dev_file, "--model", tiny_model, "--adapter", adapter],
                   str(adapter), "does not fit", "size mismatch")
    # Made on a one-layer model: PEFT would leave the second layer's LoRA at its initial values without a word.
    one_layer = tmp_path / "one-layer"
    shutil.copytree(adapter, one_layer)
    save_file({k: v for k, v in adapter_tensors(adapter).items() if ".layers.1." not in k}, str(one_layer / ADAPTER_FILE))
    one_line_error(capsys, inference.main, [*run, "--model", tiny, "--adapter", one_layer], str(one_layer), "layers.1.")


# ---- the scripts ---------------------------------------------------------------------------------------------
def test_inference_and_batched_evaluation_use_the_adapter(tiny, adapter, dev_file, tmp_path, capsys):
    assert inference.main(["--model", str(tiny), "--adapter", str(adapter), "--prompt", "皮卡丘是什么属性？",
                           "--max-new-tokens", "4", "--greedy"]) == 0
    out, err = capsys.readouterr()
    assert f"LoRA adapter {adapter}" in err and out.startswith(inference.ANSWER_PREFIX)

    def predictions(*flags) -> list:
        output = tmp_path / "predictions.jsonl"
        assert evaluate.main(["--data", str(dev_file), "--model", str(tiny), "--max-new-tokens", "6",
                              "--output", str(output), *map(str, flags)]) == 0
        return [json.loads(line)["prediction"] for line in output.read_text(encoding="utf-8").splitlines()]

    batched = predictions("--adapter", adapter, "--batch-size", 3)
    assert batched == predictions("--adapter", adapter, "--batch-size", 1)
    assert batched != predictions("--batch-size", 3)


def test_an_input_output_adapter_is_asked_with_the_raw_prompt_and_merges_with_its_format(tiny_model, tmp_path, capsys):
    """PEFT writes no config.json, so the adapter records its training format in tokenizer_config.json: inference
    and a merged export ask it the way it was trained, not in the chat format."""
    data = tmp_path / "io.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"类型#裙*颜色#{c}", "response": f"一条{c}色的裙子。"}, ensure_ascii=False) + "\n"
                            for c in "红黄蓝绿白黑"), encoding="utf-8")
    out = tmp_path / "lora-io"
    ok(run_finetune(base_args(tiny_model, data, out, "--train_format", "input-output", "--lora_rank", "4",
                              "--max_source_length", "32", "--max_target_length", "16", "--max_steps", "2",
                              "--save_steps", "2")))
    assert not (out / "config.json").exists()
    assert train_format.recorded(None, adapter=str(out)) == "input-output"
    assert inference.main(["--model", str(tiny_model), "--adapter", str(out), "--prompt", "类型#裙*颜色#红",
                           "--max-new-tokens", "2", "--greedy"]) == 0
    assert "input-output" in capsys.readouterr().err
    merged = export.export(tiny_model, tmp_path / "merged", adapter_dir=out)
    assert json.loads((merged / "config.json").read_text())["train_format"] == "input-output"


# ---- end to end (slow) -------------------------------------------------------------------------------------------
def check_adapter_folder(folder: Path, expected_keys: set) -> None:
    assert set(adapter_tensors(folder)) == expected_keys
    assert json.loads((folder / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    assert not list(folder.glob("model*.safetensors")) and not list(folder.glob("pytorch_model*.bin"))


@pytest.mark.slow
def test_lora_launcher_learns_and_saves_only_the_adapter(tiny_model, pokemon_jsonl, tmp_path):
    """With packing and gradient checkpointing (the launcher's default). A random tiny model has little for LoRA
    on query_key_value alone to steer (about 7.57 -> 7.38 in 40 steps), so the output layer is adapted too, at a
    higher rate than the launcher's default (measured on the quick-start model, README)."""
    out = tmp_path / "out"
    ok(launch(
        "finetune_lora.sh", tmp_path, BASE_MODEL_PATH=tiny_model, DATASET_PATH=pokemon_jsonl, OUTPUT_DIR=out,
        VALIDATION_PATH=pokemon_jsonl.parent / "dev.jsonl", MAX_STEP=40, LR="2e-2", MAX_SEQ_LEN=256, DEV_BATCH_SIZE=4,
        GRAD_ACCUMULATION_STEPS=1, SAVE_INTERVAL=20, LOG_INTERVAL=5, PACKING=1,
        LORA_TARGET="query_key_value,output_layer",
    ))
    losses = train_losses(out)
    assert len(losses) == 8 and losses[-1] < losses[0] - 1.0, losses  # about 6.6 -> 3.9
    state = json.loads((out / "trainer_state.json").read_text())
    evals = [entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry]
    assert len(evals) == 2 and evals[1] < evals[0]
    output_layer = {f"base_model.model.transformer.output_layer.lora_{ab}.weight" for ab in "AB"}
    for folder in (out / "checkpoint-20", out / "checkpoint-40", out):
        check_adapter_folder(folder, adapter_keys(2) | output_layer)
        assert stat.S_IMODE((folder / ADAPTER_FILE).stat().st_mode) == new_file_mode()  # not safetensors' 0o600
    trained, tokenizer = load_model_and_tokenizer(str(tiny_model), adapter=str(out), device="cpu")
    base, _ = load_model_and_tokenizer(str(tiny_model), device="cpu")
    ids = tokenizer.build_chat_input("皮卡丘是什么属性的宝可梦？")["input_ids"]
    with torch.no_grad():
        assert not torch.allclose(trained(ids).logits, base(ids).logits, atol=1e-3)


@pytest.mark.slow
def test_lora_run_killed_with_sigkill_resumes_to_the_same_adapter(tiny_model, pokemon_jsonl, tmp_path):
    """LoRA dropout active and activations recomputed, so the data order and the RNG state must both be restored."""
    args = ["--lora_rank", "4", "--learning_rate", "1e-2", "--max_steps", "8", "--save_steps", "2", "--gradient_checkpointing"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    ok(subprocess.run([sys.executable, str(FINETUNE), *base_args(tiny_model, pokemon_jsonl, straight, *args)],
                      cwd=tmp_path, capture_output=True, text=True, timeout=600))
    assert kill_after_checkpoint(base_args(tiny_model, pokemon_jsonl, killed, *args), tmp_path, killed / "checkpoint-2") == -signal.SIGKILL
    assert not (killed / ADAPTER_FILE).exists(), "the run finished before it was killed"

    resumed = ok(subprocess.run([sys.executable, str(FINETUNE), *base_args(tiny_model, pokemon_jsonl, killed, *args,
                                                                           "--resume_from_checkpoint", "true")],
                                cwd=tmp_path, capture_output=True, text=True, timeout=600))
    assert "Resuming from" in resumed.stdout
    expected = adapter_tensors(straight)
    for key, tensor in adapter_tensors(killed).items():
        torch.testing.assert_close(tensor, expected[key], atol=1e-6, rtol=0, msg=key)
    n = len(train_losses(killed))
    assert n > 0 and train_losses(killed) == pytest.approx(train_losses(straight)[-n:], abs=1e-5)


@pytest.mark.slow
def test_lora_with_deepspeed_zero2_on_two_processes(tiny_model, pokemon_jsonl, tmp_path):
    out = tmp_path / "out"
    ok(launch(
        "finetune_lora.sh", tmp_path, NUM_GPUS=2, DS_CONFIG=FINETUNE.parent / "configs" / "deepspeed.json",
        BASE_MODEL_PATH=tiny_model, DATASET_PATH=pokemon_jsonl, OUTPUT_DIR=out, MAX_STEP=12, LR="2e-2",
        MAX_SEQ_LEN=256, DEV_BATCH_SIZE=2, GRAD_ACCUMULATION_STEPS=1, SAVE_INTERVAL=6, LOG_INTERVAL=1,
    ))
    losses = train_losses(out)
    assert len(losses) == 12 and min(losses[-3:]) < losses[0] - 0.1, losses
    assert (out / "checkpoint-6" / "global_step6").is_dir()  # DeepSpeed's own state, for resuming
    for folder in (out / "checkpoint-6", out):
        check_adapter_folder(folder, adapter_keys(2))
    load_model_and_tokenizer(str(tiny_model), adapter=str(out), device="cpu")


# ---- adapter_config.json for older PEFT ----------------------------------------------------------------------------
# PEFT 0.10.0's LoraConfig fields (peft/config.py + peft/tuners/lora/config.py of peft==0.10.0, read from its wheel):
# 0.10 passes every field of adapter_config.json to LoraConfig(**fields) and refuses any other.
PEFT_0_10_LORA_FIELDS = {
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out", "inference_mode",
    "init_lora_weights", "layer_replication", "layers_pattern", "layers_to_transform", "loftq_config", "lora_alpha",
    "lora_dropout", "megatron_config", "megatron_core", "modules_to_save", "peft_type", "r", "rank_pattern",
    "revision", "target_modules", "task_type", "use_dora", "use_rslora",
}


def test_adapter_config_holds_only_what_peft_0_10_knows_and_current_peft_loads_it(tiny, adapter):
    from peft import LoraConfig, PeftConfig

    assert lora.PEFT_0_10_FIELDS == PEFT_0_10_LORA_FIELDS
    fields = json.loads((adapter / lora.ADAPTER_CONFIG).read_text(encoding="utf-8"))
    assert set(fields) == PEFT_0_10_LORA_FIELDS  # none of ours differs from a newer field's default
    assert (fields["r"], fields["lora_alpha"], fields["lora_dropout"], fields["target_modules"], fields["task_type"],
            fields["peft_type"], fields["inference_mode"]) == (8, 32, 0.1, ["query_key_value"], "CAUSAL_LM", "LORA", True)
    # Current PEFT reads it to the configuration it was made with (every field left out is at its default) ...
    config = PeftConfig.from_pretrained(str(adapter))
    assert isinstance(config, LoraConfig) and config.r == 8 and config.target_modules == {"query_key_value"}
    made = LoraConfig(task_type="CAUSAL_LM", r=8, target_modules=["query_key_value"], lora_alpha=32, lora_dropout=0.1,
                      inference_mode=True, base_model_name_or_path=fields["base_model_name_or_path"]).to_dict()
    assert config.to_dict() == made
    # ... and the trimming keeps a newer field that is not at its default (older PEFT could not honour it anyway).
    newer = sorted(set(LoraConfig().to_dict()) - PEFT_0_10_LORA_FIELDS)
    assert newer, "current PEFT has fields 0.10 lacks (else there is nothing to trim)"
    kept = lora.portable_config({**fields, newer[0]: "not the default", "no_such_default": 1})
    assert set(kept) == PEFT_0_10_LORA_FIELDS | {newer[0], "no_such_default"}
    assert set(lora.portable_config({**LoraConfig().to_dict(), "r": 4})) == PEFT_0_10_LORA_FIELDS
