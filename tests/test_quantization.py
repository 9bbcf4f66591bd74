"""4- and 8-bit bases through bitsandbytes on the CPU (chatglm3/checkpoint/quantization.py, --quantization_bit in finetune.py,
--quantization-bit in the other scripts), bf16 loading and the load plan: QLoRA and P-Tuning v2 over 4 bits learn;
an adapter trained over 4 bits loads on the bf16 base and merges in export; a QLoRA run killed with SIGKILL
resumes; inference, evaluation and the server load in 4 bits; bad values are one line."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import torch

import evaluate
import finetune
import inference
from chatglm3.checkpoint import loading, memory, quantization
from chatglm3.checkpoint.native import read_config
from chatglm3.model.configuration import ChatGLMConfig
from chatglm3.model.conversation import prompt_ids
from chatglm3.checkpoint.loading import load_model_and_tokenizer
from test_api_server import Server
from test_finetune import FINETUNE, base_args, kill_after_checkpoint, ok, pokemon_jsonl, run_finetune, train_losses  # noqa: F401  (a fixture)
from test_lora import adapter_tensors

REPO = Path(__file__).resolve().parents[1]
EXPORT = REPO / "finetune_chatmodel_demo" / "scripts" / "export.py"
QLORA = ["--lora_rank", "8", "--quantization_bit", "4", "--learning_rate", "2e-2", "--gradient_checkpointing"]


def one_line(code, err, *fragments):
    assert code not in (0, None) and "Traceback" not in err, err[-2000:]
    lines = err.strip().splitlines()
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, err[-2000:])


# ---- loading --------------------------------------------------------------------------------------------------
def test_quantized_load_holds_uint8_and_int8_weights_and_counts_them(tiny_model):
    model, tokenizer = load_model_and_tokenizer(str(tiny_model), device="cpu", dtype="bfloat16", quantization_bit=4)
    bnb = quantization.bitsandbytes()
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 4 * model.config.num_layers and all(m.weight.dtype == torch.uint8 for m in layers)
    assert model.transformer.output_layer.weight.dtype == torch.bfloat16  # as upstream: blocks only
    int8, _ = load_model_and_tokenizer(str(tiny_model), device="cpu", quantization_bit=8)
    assert {m.weight.dtype for m in int8.modules() if isinstance(m, bnb.nn.Linear8bitLt)} == {torch.int8}
    # The pre-check counts what is held: 4-bit < 8-bit < bf16 < float32.
    config = ChatGLMConfig.from_dict(read_config(tiny_model))
    sizes = [memory.weight_bytes(config, torch.bfloat16, 4), memory.weight_bytes(config, torch.bfloat16, 8),
             memory.weight_bytes(config, torch.bfloat16), memory.weight_bytes(config, torch.float32)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    ids = torch.tensor([prompt_ids(tokenizer, [], "皮卡丘是什么属性？")])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all() and torch.isfinite(int8(ids).logits).all()


def test_unmapped_safetensors_reader_gives_the_same_tensors(tiny_model):
    from chatglm3.checkpoint.native import iter_tensors

    mapped = dict(iter_tensors(tiny_model / "model.safetensors"))
    read = dict(iter_tensors(tiny_model / "model.safetensors", mapped=False))
    assert mapped.keys() == read.keys()
    for key, tensor in mapped.items():
        assert read[key].dtype == tensor.dtype and torch.equal(read[key], tensor), key


def test_dtype_rule_reads_the_checkpoint_on_cpu():
    assert loading.resolve_dtype(None, "cpu", "bfloat16") == torch.bfloat16
    assert loading.resolve_dtype(None, "cpu", "float16") == torch.bfloat16  # same size, no fp16 arithmetic on CPUs
    assert loading.resolve_dtype(None, "cpu", None) == torch.float32
    assert loading.resolve_dtype("auto", "cpu", "float32") == torch.float32
    assert loading.resolve_dtype("float16", "cpu", "bfloat16") == torch.float16


def test_the_plan_reads_each_name_and_config_once(tiny_model, monkeypatch):
    from chatglm3 import hub
    from chatglm3.checkpoint import native

    calls = {"resolve": 0, "config": 0}
    real_resolve, real_config = hub.resolve, native.read_config

    def counting(name):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return (real_resolve if name == "resolve" else real_config)(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(hub, "resolve", counting("resolve"))
    monkeypatch.setattr(loading, "read_config", counting("config"))
    plan = loading.make_plan(str(tiny_model), dtype="bfloat16", quantization_bit="4")
    assert calls == {"resolve": 1, "config": 1}
    assert (plan.kind, plan.dtype, plan.quantization_bit, plan.train_format) == ("base", torch.bfloat16, 4, None)


def test_memory_refusal_suggests_the_next_cheaper_option_never_the_one_in_use():
    assert memory.cheaper_option(torch.float32) == "--dtype bfloat16"
    assert memory.cheaper_option(torch.bfloat16) == "--quantization-bit 4"
    assert memory.cheaper_option(torch.bfloat16, 8) == "--quantization-bit 4"
    assert memory.cheaper_option(torch.bfloat16, 4) == ""
    assert "--quantization_bit 4" in memory.cheaper_option(torch.bfloat16, None, training=True)


def test_launcher_precision_on_the_cpu():
    import launching

    auto = launching.hardware_flags(["--pre_seq_len", "4"], "auto", gpus=0, processes=1)
    assert auto == ["--use_cpu"] + (["--bf16"] if loading.cpu_has_bf16() else [])
    assert launching.hardware_flags([], "bf16", gpus=0, processes=1) == ["--use_cpu", "--bf16"]
    assert launching.hardware_flags(["--deepspeed", "ds.json"], "auto", gpus=0, processes=1) == ["--use_cpu"]
    assert launching.hardware_flags([], "fp32", gpus=0, processes=1) == ["--use_cpu"]
    with pytest.raises(launching.LaunchError, match="PRECISION=fp16"):
        launching.hardware_flags([], "fp16", gpus=0, processes=1)


# ---- bad values: one line naming the flag ----------------------------------------------------------------------
@pytest.mark.parametrize("value", ["3", "abc"])
def test_bad_quantization_values_are_one_line(tiny_model, tmp_path, capsys, value):
    code = inference.main(["--model", str(tiny_model), "--prompt", "你好", "--quantization-bit", value])
    one_line(code, capsys.readouterr().err, "--quantization-bit", value)
    data = tmp_path / "dev.jsonl"
    data.write_text(json.dumps({"conversations": [{"role": "user", "content": "你好"},
                                                  {"role": "assistant", "content": "你好！"}]}) + "\n", encoding="utf-8")
    code = evaluate.main(["--model", str(tiny_model), "--data", str(data), "--quantization-bit", value,
                          "--output", str(tmp_path / "p.jsonl")])
    one_line(code, capsys.readouterr().err, "--quantization-bit", value)
    out = tmp_path / "out"
    try:
        code = finetune.main(base_args(tiny_model, data, out, "--lora_rank", "8", "--quantization_bit", value))
    except SystemExit as e:  # argparse's type check ("abc")
        code = e.code
    one_line(code, capsys.readouterr().err, "--quantization_bit", value)


def test_full_fine_tuning_with_quantization_is_one_line(tiny_model, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
                    + "\n", encoding="utf-8")
    code = finetune.main(base_args(tiny_model, data, tmp_path / "out", "--quantization_bit", "4"))
    one_line(code, capsys.readouterr().err, "--quantization_bit", "--lora_rank", "--pre_seq_len")


# ---- training over 4 bits ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qlora_adapter(tiny_model, pokemon_jsonl, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qlora") / "adapter"
    ok(run_finetune(base_args(tiny_model, pokemon_jsonl, out, *QLORA, "--max_steps", "10", "--save_steps", "100")))
    return out


@pytest.mark.slow
def test_qlora_learns_and_its_gradient_reaches_the_first_layer(qlora_adapter):
    losses = train_losses(qlora_adapter)
    assert losses[-1] < losses[0] - 0.05, losses
    # LoRA's B starts at zero: layer 0's is non-zero only if gradients crossed layer 1's 4-bit linears.
    tensors = adapter_tensors(qlora_adapter)
    first = [t for k, t in tensors.items() if ".layers.0." in k and "lora_B" in k]
    assert first and all(t.abs().max() > 0 for t in first)


@pytest.mark.slow
def test_ptuning_over_a_4bit_base_learns(tiny_model, pokemon_jsonl, tmp_path):
    out = tmp_path / "pt4"
    ok(run_finetune(base_args(tiny_model, pokemon_jsonl, out, "--pre_seq_len", "8", "--quantization_bit", "4",
                              "--learning_rate", "5e-2", "--max_steps", "10", "--save_steps", "100")))
    losses = train_losses(out)
    assert losses[-1] < losses[0] - 0.05, losses
    # The prefix loads on the unquantized base.
    model, _ = load_model_and_tokenizer(str(tiny_model), pt_checkpoint=str(out), device="cpu")
    assert model.config.pre_seq_len == 8


@pytest.mark.slow
def test_adapter_trained_over_4bit_loads_on_the_bf16_base_and_merges(tiny_model, qlora_adapter, tmp_path):
    bf16, tokenizer = load_model_and_tokenizer(str(tiny_model), adapter=str(qlora_adapter), device="cpu", dtype="bfloat16")
    nf4, _ = load_model_and_tokenizer(str(tiny_model), adapter=str(qlora_adapter), device="cpu", dtype="bfloat16",
                                      quantization_bit=4)
    plain, _ = load_model_and_tokenizer(str(tiny_model), device="cpu", dtype="bfloat16")
    plain_nf4, _ = load_model_and_tokenizer(str(tiny_model), device="cpu", dtype="bfloat16", quantization_bit=4)
    ids = torch.tensor([prompt_ids(tokenizer, [], "皮卡丘是什么属性的宝可梦？")])
    with torch.no_grad():
        a, b = bf16(ids).logits.float(), nf4(ids).logits.float()
        base, base_nf4 = plain(ids).logits.float(), plain_nf4(ids).logits.float()

    def rms(x):
        return x.pow(2).mean().sqrt()

    # Within quantization tolerance: the adapter on the bf16 base differs from the adapter on the 4-bit base about
    # as much as the two bases differ (NF4's rounding), and the adapter's own change is seen on either base.
    assert rms(a - b) <= 1.5 * rms(base - base_nf4), (rms(a - b), rms(base - base_nf4))
    assert rms(a - base) > 0 and rms(b - base_nf4) > 0
    merged = tmp_path / "merged"
    ok(subprocess.run([sys.executable, str(EXPORT), "--model", str(tiny_model), "--adapter", str(qlora_adapter),
                       "--output", str(merged), "--dtype", "bfloat16"], capture_output=True, text=True, timeout=600))
    exported, _ = load_model_and_tokenizer(str(merged), device="cpu")
    assert exported.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits.float(), a, atol=0.1, rtol=0.05)


@pytest.mark.slow
def test_qlora_run_killed_with_sigkill_resumes(tiny_model, pokemon_jsonl, tmp_path):
    args = [*QLORA, "--max_steps", "6", "--save_steps", "2"]
    killed = tmp_path / "killed"
    assert kill_after_checkpoint(base_args(tiny_model, pokemon_jsonl, killed, *args), tmp_path, killed / "checkpoint-2") == -signal.SIGKILL
    assert not (killed / "adapter_model.safetensors").exists(), "the run finished before it was killed"
    resumed = ok(run_finetune(base_args(tiny_model, pokemon_jsonl, killed, *args, "--resume_from_checkpoint", "true")))
    assert "Resuming from" in resumed.stdout
    state = json.loads((killed / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and (killed / "adapter_model.safetensors").is_file()


# ---- the scripts in 4 bits ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_inference_evaluation_and_a_server_request_in_4_bits(tiny_model, pokemon_jsonl, tmp_path, capsys):
    code = inference.main(["--model", str(tiny_model), "--prompt", "皮卡丘", "--greedy", "--max-new-tokens", "4",
                           "--quantization-bit", "4"])
    out, err = capsys.readouterr()
    assert code == 0 and out.startswith(inference.ANSWER_PREFIX) and "4-bit (NF4)" in err, err
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(pokemon_jsonl.read_text(encoding="utf-8").splitlines(keepends=True)[:2]), encoding="utf-8")
    code = evaluate.main(["--model", str(tiny_model), "--data", str(dev), "--quantization-bit", "8", "--max-new-tokens", "4",
                          "--output", str(tmp_path / "pred.jsonl")])
    out, err = capsys.readouterr()
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["samples"] >= 1, err
    with Server(tiny_model, "--quantization-bit", "4", log=tmp_path / "server.log") as server:
        reply = server.client().chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": "你好"}], max_tokens=4, temperature=0)
        assert reply.choices[0].message.content is not None
    assert "Failed to load" not in (tmp_path / "server.log").read_text(encoding="utf-8")  # bitsandbytes kept quiet


def test_weights_packed_for_the_cpu_kernel_at_load_are_bitsandbytes_own_bytes(monkeypatch):
    """pack_for_cpu_inference (4-bit chat on the CPU, at load, a slice of rows at a time) gives the bytes and the
    products that bitsandbytes' own conversion gives at the first product."""
    bnb = quantization.bitsandbytes()
    if not bnb.functional.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes keeps the general 4-bit kernel")
    torch.manual_seed(0)
    weight = torch.randn(96, 256, dtype=torch.bfloat16)
    layers = []
    for _ in range(2):
        layer = bnb.nn.Linear4bit(256, 96, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                                  quant_type="nf4", device="meta")
        quantization.set_weight(layer, weight, torch.device("cpu"))
        layers.append(layer.eval())
    monkeypatch.setattr(quantization, "_CHUNK_WEIGHTS", 32 * 256)  # three slices of 32 rows
    quantization.pack_for_cpu_inference(torch.nn.Sequential(layers[1]))
    assert layers[1].weight.quant_state.packing_format_for_cpu
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        lazy, eager = layers[0](x[:1]), layers[1](x[:1])  # bitsandbytes converts layers[0] at this product
    assert torch.equal(layers[0].weight.data, layers[1].weight.data)
    assert torch.equal(layers[0].weight.quant_state.absmax, layers[1].weight.quant_state.absmax)
    assert torch.equal(lazy, eager)
    with torch.no_grad():
        assert torch.equal(layers[0](x), layers[1](x))


@pytest.mark.parametrize("shape", [(96, 256), (130, 64), (7, 100)])
def test_nf4_quantized_in_slices_two_at_a_time_is_bitsandbytes_one_call(monkeypatch, shape):
    """The load's NF4 (slices of rows, two quantized side by side) gives bitsandbytes' own bytes, scales and
    double-quantized scales: several slices, a last short slice, and a partial block left in one piece."""
    bnb = quantization.bitsandbytes()
    monkeypatch.setattr(quantization, "_CHUNK_WEIGHTS", 2 * 128 * 20)  # slices of 2560 weights
    torch.manual_seed(1)
    tensor = (torch.randn(*shape) * 0.05).to(torch.bfloat16)
    data, state = quantization._nf4_in_row_chunks(tensor)
    reference, ref_state = bnb.functional.quantize_4bit(tensor, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(data.view(-1), reference.view(-1))
    assert torch.equal(state.absmax, ref_state.absmax) and torch.equal(state.offset, ref_state.offset)
    assert torch.equal(state.state2.absmax, ref_state.state2.absmax)
    assert torch.equal(bnb.functional.dequantize_4bit(data, state), bnb.functional.dequantize_4bit(reference, ref_state))
