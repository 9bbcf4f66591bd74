"""Everything measured on one GPU in one run of at most 5 minutes, at chatglm3-6b's exact shape in bf16.

Training, P-Tuning v2 (upstream's recipe: pre_seq_len 128, max_seq_length 2048): upstream's way (every sample
padded to max_seq_length, float32 logits over the whole vocabulary at every position) beside this project's
dynamic padding, length-grouped batches and packing, on the Pokémon conversations (the data pipeline, real
tokenizer). Per row: useful (non-padding) tokens/s, its ratio to upstream's, step time, peak GPU memory, MFU.
LoRA (PEFT, rank 8 on query_key_value as upstream's lora.yaml; bf16 base frozen, float32 adapter), dynamic padding
and packing, on a model of its own. Generation with the KV cache, batch 1 and 16: prefill and decode tokens/s.

Then the memory rows of bench_memory.py on CUDA, each in a fresh process (MEMORY=0 skips them): load; chat in
bf16, 8-bit and 4-bit; P-Tuning v2 and LoRA in bf16, QLoRA and P-Tuning over 4-bit (2 steps of 512 tokens, batch 1,
gradient checkpointing); LoRA merge export. Peak torch.cuda.max_memory_allocated beside the host's peak RSS.

Output: header lines (#), one Markdown table docs can take as it is, the memory table, and one JSON line (the
last). Run through benchmarks/gpu_bench.sh; `--dry-run` runs a tiny shape on the CPU, one step each, and two memory
rows at bench_memory.py's tiny shape (what the tests run).
"""
import argparse
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import _common  # noqa: E402  (puts finetune_chatmodel_demo/ on sys.path)
import _docs  # noqa: E402
from _common import BenchError, ChatGLMError, progress  # noqa: E402

import torch  # noqa: E402
from _strategies import BASELINE, epoch_batches, spread, strategy_loss  # noqa: E402

from chatglm3.checkpoint import lora  # noqa: E402
from chatglm3.model.generation import generate_stream  # noqa: E402
from preprocess_utils import build_dataset  # noqa: E402

# chatglm3-6b's config.json: 28 layers, hidden 4096, 32 heads x 128, multi-query with 2 groups, ffn 13696.
SHAPE_6B = SimpleNamespace(layers=28, hidden=4096, heads=32, kv_channels=128, kv_groups=2, ffn=13696, vocab=65024)
SHAPE_DRY = SimpleNamespace(layers=2, hidden=64, heads=4, kv_channels=16, kv_groups=2, ffn=128, vocab=65024)
STRATEGIES = ("pad_to_max", "dynamic", "grouped", "packing")
LORA_STRATEGIES = ("dynamic", "packing")
# Dense bf16 tensor-core peak (TFLOP/s) by GPU name; PEAK_TFLOPS overrides, and is required for other GPUs.
PEAK_TFLOPS = {"H100": 989, "H200": 989, "H800": 989, "H20": 148, "A100": 312, "A800": 312, "L40S": 362, "4090": 165}


def settings(dry_run: bool) -> SimpleNamespace:
    """The run's settings: environment variables over the defaults (upstream's P-Tuning v2 recipe)."""
    def env(name, default, kind=int, many=False):
        try:
            values = [kind(v) for v in str(os.environ.get(name, default)).split()]
            return values if many else values[0]
        except (ValueError, IndexError):
            raise BenchError(f"错误：环境变量 {name} 应为数字 / Error: {name} must be a number, got {os.environ[name]!r}")

    defaults = dict(MAX_SEQ_LEN=256, BATCH_SIZE=2, PRE_SEQ_LEN=8, WARMUP=0, STEPS=1, PROMPT_LEN=16, NEW_TOKENS=4) if dry_run else \
        dict(MAX_SEQ_LEN=2048, BATCH_SIZE=4, PRE_SEQ_LEN=128, WARMUP=2, STEPS=5, PROMPT_LEN=512, NEW_TOKENS=64)
    defaults["LORA_RANK"] = 8
    s = SimpleNamespace(**{name.lower(): env(name, value) for name, value in defaults.items()})
    s.gen_batch_sizes = env("GEN_BATCH_SIZES", "1 16", many=True)
    s.budget_s = env("BUDGET_S", 270, float)
    s.gradient_checkpointing = os.environ.get("GRADIENT_CHECKPOINTING", "0") == "1"
    s.tokenizer = os.environ.get("TOKENIZER", str(_common.DEFAULT_TOKENIZER))
    s.data = os.environ.get("DATA")
    s.peak_tflops = os.environ.get("PEAK_TFLOPS")
    return s


def peak_tflops(s, gpu: str) -> float:
    if s.peak_tflops:
        return float(s.peak_tflops)
    for name, tflops in PEAK_TFLOPS.items():
        if name in gpu:
            return tflops
    raise BenchError(f"错误：不认识的 GPU {gpu!r}，请设置 PEAK_TFLOPS（稠密 bf16 峰值）/ Error: unknown GPU {gpu!r}: set PEAK_TFLOPS "
                     "(its dense bf16 peak, TFLOP/s) for the MFU column")


def conversations(s, tokenizer, max_seq_length: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        data = s.data or _common.pokemon_conversations(Path(tmp))
        return list(build_dataset(data, tokenizer, "multi-turn", max_seq_length=max_seq_length, verbose=False).items)


def measure_training(model, optimizer, strategy: str, batches: list[dict], s, device: str, peak: float) -> dict:
    """Warm-up then timed steps over batches spread across the epoch. MFU counts model FLOPs of the real tokens
    (_common.step_flops with padding=False: what any implementation must compute), not padding."""
    picks = spread(len(batches), s.warmup + s.steps)
    _common.reset_peak_memory(device)
    timed = []
    try:
        for n, index in enumerate(picks):
            batch = {key: value.to(device) for key, value in batches[index].items()}
            _common.synchronize(device)
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = strategy_loss(strategy, model, batch)
            loss.backward()
            optimizer.step()
            _common.synchronize(device)
            seconds = time.perf_counter() - start
            if n >= s.warmup:
                useful = int((batches[index]["attention_mask"] > 0).sum())
                timed.append((seconds, useful, _common.step_flops(model, batches[index], False, False, padding=False), loss.item()))
    except torch.cuda.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return {"oom": True, "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    return {
        "oom": False,
        "useful_tokens_per_s": round(statistics.median(useful / t for t, useful, _, _ in timed), 1),
        "step_s": round(statistics.median(t for t, _, _, _ in timed), 4),
        "peak_mem_gb": round(_common.peak_memory_mb(device) / 1024, 2),
        "mfu": round(statistics.median(flops / t for t, _, flops, _ in timed) / (peak * 1e12), 4),
        "loss": round(statistics.fmean(loss for _, _, _, loss in timed), 4),
    }


def train_rows(method: str, strategies, model, s, items, tokenizer, device: str, peak: float, started: float) -> list[dict]:
    """One row per strategy, skipped once the time budget is spent."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2 if method == "P-Tuning v2" else 5e-4)
    rows = []
    for strategy in strategies:
        row = {"method": method, "strategy": strategy}
        if time.perf_counter() - started > s.budget_s:
            rows.append({**row, "skipped": True})
            continue
        progress(f"training ({method}): {strategy} ...")
        model.train()
        batches = epoch_batches(strategy, items, tokenizer, s.batch_size, s.max_seq_len)
        rows.append({**row, **measure_training(model, optimizer, strategy, batches, s, device, peak)})
    return rows


def build(shape, s, tokenizer, device: str, pre_seq_len=None):
    model = _common.build_model(_common.model_config(shape, pre_seq_len=pre_seq_len, vocab_needed=tokenizer.vocab_size), device, torch.bfloat16)
    if s.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def measure_generation(model, batch_size: int, s, device: str, peak: float) -> dict:
    """Greedy decoding that never stops early from random prompts of PROMPT_LEN tokens: the first token's time is
    the prefill, the rest the decode. MFU counts 2 FLOPs per weight and token (prefill)."""
    generator = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(100, model.config.padded_vocab_size - 100, (batch_size, s.prompt_len), device=device, generator=generator)
    for _ in generate_stream(model, ids[:, :8], max_new_tokens=2, eos_token_id=[]):  # warm-up
        pass
    _common.reset_peak_memory(device)
    _common.synchronize(device)
    start, first = time.perf_counter(), None
    for _ in generate_stream(model, ids, max_new_tokens=s.new_tokens, eos_token_id=[]):
        if first is None:
            _common.synchronize(device)
            first = time.perf_counter()
    _common.synchronize(device)
    end = time.perf_counter()
    prefill = batch_size * s.prompt_len / (first - start)
    return {
        "prefill_tokens_per_s": round(prefill, 1),
        "decode_tokens_per_s": round(batch_size * (s.new_tokens - 1) / (end - first), 1),
        "peak_mem_gb": round(_common.peak_memory_mb(device) / 1024, 2),
        "prefill_mfu": round(2 * _common.matmul_params(model) * prefill / (peak * 1e12), 4),
    }


def markdown(rows: list[dict], s) -> str:
    """The Markdown table: training rows, then generation rows."""
    lines = ["| run | tokens/s | × upstream | step s | peak GB | MFU |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    upstream = next((r for r in rows if r.get("strategy") == BASELINE and not r.get("oom") and not r.get("skipped")), None)
    for r in rows:
        if "strategy" in r:
            name = f"{r['method']}, {r['strategy']} (batch {s.batch_size}, max {s.max_seq_len})"
            if r.get("skipped") or r.get("oom"):
                lines.append(f"| {name} | {'skipped: time budget spent' if r.get('skipped') else 'out of memory'} | | | | |")
                continue
            ratio = f"{r['useful_tokens_per_s'] / upstream['useful_tokens_per_s']:.2f}×" if upstream else "-"
            lines.append(f"| {name} | {r['useful_tokens_per_s']:.0f} useful | {ratio} | {r['step_s']:.3f} | {r['peak_mem_gb']:.1f} | {r['mfu']:.1%} |")
        elif r.get("skipped"):
            lines.append(f"| generation, batch {r['batch']} | skipped: time budget spent | | | | |")
        else:
            lines.append(f"| generation, batch {r['batch']}: prefill {s.prompt_len} tokens | {r['prefill_tokens_per_s']:.0f} | | | "
                         f"{r['peak_mem_gb']:.1f} | {r['prefill_mfu']:.1%} |")
            lines.append(f"| generation, batch {r['batch']}: decode {s.new_tokens} tokens (KV cache) | {r['decode_tokens_per_s']:.0f} | | | | |")
    return "\n".join(lines)


def run(dry_run: bool) -> dict:
    s = settings(dry_run)
    if dry_run:
        device, shape, gpu = "cpu", SHAPE_DRY, "CPU (dry run: tiny shape, figures meaningless)"
    elif not torch.cuda.is_available():
        raise BenchError("错误：没有可用的 CUDA GPU；在 CPU 上检查脚本请加 --dry-run / Error: no CUDA GPU available; use --dry-run to check the script on the CPU")
    else:
        device, shape, gpu = "cuda", SHAPE_6B, torch.cuda.get_device_name(0)
    peak = peak_tflops(s, gpu) if device == "cuda" else float(s.peak_tflops or 989)
    started = time.perf_counter()
    tokenizer = _common.load_tokenizer(s.tokenizer)
    items = conversations(s, tokenizer, s.max_seq_len)
    progress(f"{len(items)} conversations; building the model ({shape.layers} layers, hidden {shape.hidden}) ...")
    model = build(shape, s, tokenizer, device, pre_seq_len=s.pre_seq_len)
    training = train_rows("P-Tuning v2", STRATEGIES, model, s, items, tokenizer, device, peak, started)
    generation = []
    for batch_size in s.gen_batch_sizes:
        if time.perf_counter() - started > s.budget_s:
            generation.append({"batch": batch_size, "skipped": True})
            continue
        progress(f"generation: batch {batch_size} ...")
        generation.append({"batch": batch_size, **measure_generation(model, batch_size, s, device, peak)})
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    model = lora.add_lora(build(shape, s, tokenizer, device), s.lora_rank)
    training += train_rows("LoRA", LORA_STRATEGIES, model, s, items, tokenizer, device, peak, started)
    rows = training + generation
    lengths = [len(item["input_ids"]) for item in items]
    print(f"# gpu_bench.sh  {datetime.datetime.now():%Y-%m-%d %H:%M}  {gpu}, torch {torch.__version__}"
          + (f", CUDA {torch.version.cuda}" if device == "cuda" else "") + f", bf16; total {time.perf_counter() - started:.0f} s")
    print(f"# model: {shape.layers} layers, hidden {shape.hidden}, {shape.heads} heads x {shape.kv_channels}, {shape.kv_groups} KV groups, "
          f"ffn {shape.ffn}, vocab {shape.vocab}, random weights; P-Tuning v2 pre_seq_len {s.pre_seq_len}; LoRA rank {s.lora_rank} "
          "on query_key_value (PEFT, float32 adapter); AdamW"
          + (", gradient checkpointing" if s.gradient_checkpointing else ""))
    print(f"# data: {s.data or 'Pokémon conversations (data pipeline)'}, {len(items)} samples, tokens mean {statistics.fmean(lengths):.0f}, "
          f"max {max(lengths)}; {s.warmup} warm-up + {s.steps} timed steps (median); pad_to_max = upstream's recipe (float32 "
          "logits over the full vocabulary at every position); tokens/s of training rows = real (non-padding) tokens")
    print(f"# MFU = model FLOPs of the real tokens / time / {peak:g} TFLOP/s (dense bf16): training 4N per token (P-Tuning and LoRA: "
          "forward + backward to the activations) with the output layer on labelled positions + causal attention per conversation; "
          "prefill 2N per token; N = weights of the linear layers")
    print()
    print(markdown(rows, s))
    return {"date": f"{datetime.date.today()}", "gpu": gpu, "peak_tflops": peak, "max_seq_len": s.max_seq_len,
            "batch_size": s.batch_size, "pre_seq_len": s.pre_seq_len, "lora_rank": s.lora_rank, "prompt_len": s.prompt_len, "new_tokens": s.new_tokens,
            "rows": rows}


def memory_rows(dry_run: bool, tokenizer: str) -> dict:
    """bench_memory.py's rows, each in a fresh process (so this process's GPU memory is freed first): on CUDA at
    the 6B shape (the random model written once beside the repository), in a dry run two rows at its tiny shape on
    the CPU. Its table goes to stdout; its figures come back for the JSON line."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    command = [sys.executable, str(Path(__file__).resolve().parent / "bench_memory.py"), "--tokenizer", tokenizer, "--json"]
    with tempfile.TemporaryDirectory() as tmp:
        if dry_run:
            command += ["--shape", "tiny", "--device", "cpu", "--rows", "chat_bf16,lora_bf16", "--new-tokens", "3",
                        "--model-dir", f"{tmp}/model", "--out", f"{tmp}/memory.md"]
        else:
            command += ["--device", "cuda"]
        progress("memory rows: " + " ".join(command[1:]))
        result = subprocess.run(command, stdout=subprocess.PIPE, text=True)  # progress lines pass through on stderr
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        return {"error": f"bench_memory.py exited {result.returncode}"}
    print("\n".join(lines[:-1]))
    return json.loads(lines[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="gpu_bench.sh", allow_abbrev=False,
                                     description="chatglm3-6b 形状的 GPU 基准：训练与生成（5 分钟内），然后内存需求各行 / GPU "
                                     "benchmark at chatglm3-6b's shape: training strategies and generation (under 5 minutes), "
                                     "then the memory rows of bench_memory.py")
    parser.add_argument("--dry-run", action="store_true", help="CPU 上的小模型，每项 1 步 / tiny shape on the CPU, one step each")
    _docs.add_flag(parser, "gpu-bench")
    args = parser.parse_args(argv)
    if args.dry_run and args.update_docs:
        parser.error("--dry-run 的小模型数字不进文档 / --dry-run's tiny-shape figures do not go into the docs: drop one")
    recorder = _docs.Recorder("gpu-bench", args, "gpu_bench.sh", argv, markdown=True, runner="bash")
    recorder.json = True  # the JSON last line stays out of the docs
    report = run(args.dry_run)
    if os.environ.get("MEMORY", "1") != "0":
        print()
        report["memory"] = memory_rows(args.dry_run, settings(args.dry_run).tokenizer)
    print(json.dumps(report, ensure_ascii=False))
    recorder.publish()


if __name__ == "__main__":
    try:
        main()
    except (ChatGLMError, _docs.DocsError) as e:  # bad settings or data: the message says what to do
        _common.fail(str(e))
    except KeyboardInterrupt:
        _common.fail("已中断 / interrupted", 130)
