#!/usr/bin/env bash
# Full fine-tuning on multi-turn data with DeepSpeed ZeRO-2 (DS_CONFIG=.../configs/deepspeed_zero3.json for
# ZeRO-3). Needs several GPUs for ChatGLM3-6B (weights, gradients and Adam states are ~100 GB in all); NUM_GPUS
# defaults to every visible GPU. Saves the whole model in upstream's format (sharded safetensors).
# See scripts/_common.sh for every setting.
#   LR=2e-5   a conservative rate for updating all 6B weights on a small data set (upstream used 1e-4).
set -euo pipefail

MODE=ds
: "${RUN_NAME:=multiturn_ft}"
: "${PRE_SEQ_LEN:=}"
: "${LR:=2e-5}"
: "${MAX_SEQ_LEN:=512}"
: "${DEV_BATCH_SIZE:=4}"
: "${GRAD_ACCUMULATION_STEPS:=1}"
: "${MAX_STEP:=200}"
: "${SAVE_INTERVAL:=50}"
: "${SAVE_TOTAL_LIMIT:=2}"

source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_common.sh"
