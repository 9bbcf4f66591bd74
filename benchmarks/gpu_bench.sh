#!/usr/bin/env bash
# GPU training benchmark at chatglm3-6b's exact shape (random weights, bf16, built directly on the GPU):
# P-Tuning v2 (PRE_SEQ_LEN 128) at MAX_SEQ_LEN 512 and 2048, batch 1 and 4, without and with gradient
# checkpointing; then full fine-tuning steps (AdamW, bf16 states, gradient checkpointing) where memory allows.
# Prints step time, tokens/s, peak GPU memory and model FLOPs utilisation (MFU); the last line is JSON.
#
#   bash benchmarks/gpu_bench.sh              # on a CUDA GPU; about 2-4 minutes on an H100/H200
#   bash benchmarks/gpu_bench.sh --dry-run    # tiny shape on the CPU, 1 step each: checks the script itself
#
# Environment overrides: MAX_SEQ_LENS="512 2048" BATCH_SIZES="1 4" PRE_SEQ_LEN=128 WARMUP=2 STEPS=5
# PEAK_TFLOPS=989 (dense bf16 of H100/H200 SXM) FULL=1 (0 skips full fine-tuning) BUDGET_S=420 (later
# configurations are skipped, and say so, once this many seconds have passed) PYTHON=python3.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" - "$@" <<'PY'
import argparse, datetime, json, os, statistics, sys, time
from types import SimpleNamespace

sys.path.insert(0, "benchmarks")
import _common
import torch

parser = argparse.ArgumentParser(prog="gpu_bench.sh", description="chatglm3-6b 形状的 GPU 训练基准 / GPU training benchmark at chatglm3-6b's shape")
parser.add_argument("--dry-run", action="store_true", help="CPU 上的小模型，每项 1 步 / tiny shape on the CPU, one step each")
args = parser.parse_args()

def env_ints(name, default):
    try:
        return [int(v) for v in os.environ.get(name, default).split()]
    except ValueError:
        _common.fail(f"错误：环境变量 {name} 应为空格分隔的整数 / Error: {name} must be space-separated integers, got {os.environ[name]!r}")

if args.dry_run:
    device = "cpu"
    shape = SimpleNamespace(layers=2, hidden=64, heads=4, kv_channels=16, kv_groups=2, ffn=128, vocab=1024)
    seq_lens, batch_sizes, pre_seq_len, warmup, steps = env_ints("MAX_SEQ_LENS", "32 64"), env_ints("BATCH_SIZES", "1 2"), 8, 0, 1
else:
    if not torch.cuda.is_available():
        _common.fail("错误：没有可用的 CUDA GPU；在 CPU 上检查脚本请加 --dry-run / Error: no CUDA GPU available; use --dry-run to check the script on the CPU")
    device = "cuda"
    # chatglm3-6b's config.json: 28 layers, hidden 4096, 32 heads x 128, multi-query with 2 groups, ffn 13696.
    shape = SimpleNamespace(layers=28, hidden=4096, heads=32, kv_channels=128, kv_groups=2, ffn=13696, vocab=65024)
    seq_lens, batch_sizes = env_ints("MAX_SEQ_LENS", "512 2048"), env_ints("BATCH_SIZES", "1 4")
    pre_seq_len, warmup, steps = int(os.environ.get("PRE_SEQ_LEN", 128)), int(os.environ.get("WARMUP", 2)), int(os.environ.get("STEPS", 5))
peak_tflops = float(os.environ.get("PEAK_TFLOPS", 989))
budget_s = float(os.environ.get("BUDGET_S", 420))
run_full = os.environ.get("FULL", "1") != "0"
dtype = torch.bfloat16
started = time.perf_counter()

gpu = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (dry run: tiny shape, figures meaningless)"
print(f"# gpu_bench.sh  {datetime.datetime.now():%Y-%m-%d %H:%M}  {gpu}, torch {torch.__version__}, bf16"
      + (f", CUDA {torch.version.cuda}" if device == "cuda" else ""))
print(f"# model: {shape.layers} layers, hidden {shape.hidden}, {shape.heads} heads x {shape.kv_channels}, {shape.kv_groups} KV groups, "
      f"ffn {shape.ffn}, vocab {shape.vocab}; random weights; random token rows, every position labelled")
print(f"# {warmup} warm-up + {steps} timed steps (median). MFU = model FLOPs / step time / {peak_tflops:g} TFLOP/s, model FLOPs per token = "
      "2N forward + 2N backward to the activations (+2N weight gradients when fine-tuning all weights), N = weights of all linear layers, "
      "+ causal attention 3 x 4 x layers x heads*head_dim x (seq/2 + prefix); recomputation under gradient checkpointing not counted")

def step_flops(model, method, batch, seq, prefix):
    tokens = batch * seq
    dense = (6 if method == "full" else 4) * _common.matmul_params(model) * tokens
    attention = 3 * 4 * shape.layers * shape.heads * shape.kv_channels * (seq / 2 + prefix) * tokens
    return dense + attention

def measure(model, optimizer, method, seq, batch, checkpointing, prefix):
    if checkpointing:
        model.gradient_checkpointing_enable()
    else:
        model.gradient_checkpointing_disable()
    model.train()
    generator = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(100, shape.vocab - 100, (batch, seq), device=device, generator=generator)
    labels = ids.clone()
    labels[:, 0] = -100
    mask = torch.ones_like(ids)
    _common.reset_peak_memory(device)
    times, loss = [], None
    try:
        for n in range(warmup + steps):
            _common.synchronize(device)
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = model(ids, attention_mask=mask, labels=labels, use_cache=False).loss
            loss.backward()
            optimizer.step()
            _common.synchronize(device)
            if n >= warmup:
                times.append(time.perf_counter() - start)
    except torch.cuda.OutOfMemoryError:
        loss = None
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return {"oom": True, "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    step_s = statistics.median(times)
    return {
        "oom": False,
        "step_s": round(step_s, 4),
        "tokens_per_s": round(batch * seq / step_s, 1),
        "peak_mem_gb": round(_common.peak_memory_mb(device) / 1024, 2),
        "mfu": round(step_flops(model, method, batch, seq, prefix) / step_s / (peak_tflops * 1e12), 4),
        "loss": round(loss.item(), 4),
    }

head = f"{'method':<9} {'seq':>5} {'batch':>5} {'ckpt':>4} {'step s':>8} {'tokens/s':>10} {'peak GB':>8} {'MFU':>6}"
print(head)
print("-" * len(head))
results = []

def report(method, seq, batch, checkpointing, r):
    results.append({"method": method, "seq": seq, "batch": batch, "grad_ckpt": checkpointing, **r})
    ckpt = "yes" if checkpointing else "no"
    if r.get("skipped"):
        print(f"{method:<9} {seq:>5} {batch:>5} {ckpt:>4}  skipped: time budget ({budget_s:.0f} s) spent")
    elif r["oom"]:
        print(f"{method:<9} {seq:>5} {batch:>5} {ckpt:>4}  out of memory (peak {r['peak_mem_gb']} GB before failing)")
    else:
        print(f"{method:<9} {seq:>5} {batch:>5} {ckpt:>4} {r['step_s']:>8.3f} {r['tokens_per_s']:>10.1f} {r['peak_mem_gb']:>8.2f} {r['mfu']:>6.1%}")

def run_all(method, prefix, configs):
    config = _common.model_config(shape, pre_seq_len=prefix or None)
    model = _common.build_model(config, device, dtype)
    if method == "full":
        model.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5 if method == "full" else 2e-2)
    for seq, batch, checkpointing in configs:
        if time.perf_counter() - started > budget_s:
            report(method, seq, batch, checkpointing, {"skipped": True, "oom": False})
            continue
        report(method, seq, batch, checkpointing, measure(model, optimizer, method, seq, batch, checkpointing, prefix))
    del model, optimizer
    if device == "cuda":
        torch.cuda.empty_cache()

run_all("p-tuning", pre_seq_len, [(s, b, c) for s in seq_lens for b in batch_sizes for c in (False, True)])
if run_full:
    run_all("full", 0, [(seq_lens[0], b, True) for b in batch_sizes])
print(f"# total {time.perf_counter() - started:.0f} s")
print(json.dumps({"date": f"{datetime.date.today()}", "gpu": gpu, "peak_tflops": peak_tflops, "pre_seq_len": pre_seq_len, "results": results}))
PY
