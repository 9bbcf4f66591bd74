#!/usr/bin/env bash
# Everything measured on one CUDA GPU in one run, at chatglm3-6b's exact shape in bf16 (random weights). First, in at
# most 5 minutes: P-Tuning v2 training the upstream way (pad to max, float32 full-vocabulary loss) beside
# dynamic padding, length grouping and packing; LoRA (rank 8 on query_key_value) with dynamic padding and packing;
# then generation with the KV cache (prefill and decode, batch 1 and 16). Prints one Markdown table (useful tokens/s, × upstream, step time, peak memory, MFU). Then the memory rows of
# bench_memory.py on CUDA, each in a fresh process (load; chat bf16/8-bit/4-bit; P-Tuning v2, LoRA, QLoRA, P-Tuning over
# 4-bit, 2 steps of 512 tokens; LoRA merge export), peak torch.cuda.max_memory_allocated: its table, then a JSON line
# with every figure. The first run writes the random 6B model (12.5 GB) to ../big/chatglm3-6b-shape, once.
#
#   bash benchmarks/gpu_bench.sh              # on a CUDA GPU (needs the real tokenizer: TOKENIZER=/path/to/chatglm3-6b)
#   bash benchmarks/gpu_bench.sh --dry-run    # tiny shape on the CPU, 1 step each: checks the script itself
#   bash benchmarks/gpu_bench.sh --update-docs   # also writes the tables into docs/performance.md (gpu-bench markers)
#
# Environment overrides: MAX_SEQ_LEN=2048 BATCH_SIZE=4 PRE_SEQ_LEN=128 LORA_RANK=8 WARMUP=2 STEPS=5 GRADIENT_CHECKPOINTING=0
# PROMPT_LEN=512 NEW_TOKENS=64 GEN_BATCH_SIZES="1 16" PEAK_TFLOPS (dense bf16; known for H100/H200/A100/...)
# BUDGET_S=270 (later rows are skipped, and say so, once this many seconds have passed) TOKENIZER DATA PYTHON.
# MEMORY=0 skips the memory rows.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu_bench.py "$@"
