#!/usr/bin/env bash
# P-Tuning v2 on multi-turn data (upstream's launcher name; same recipe as finetune_ps_pt_m.sh).
# Set DATASET_PATH to your own data in the multi-turn format; see scripts/_common.sh for every setting.
set -euo pipefail

MODE=pt
: "${RUN_NAME:=multiturn_pt}"
: "${PRE_SEQ_LEN:=128}"
: "${LR:=2e-2}"
: "${MAX_SEQ_LEN:=512}"
: "${DEV_BATCH_SIZE:=4}"
: "${GRAD_ACCUMULATION_STEPS:=4}"
: "${MAX_STEP:=1000}"
: "${NUM_GPUS:=1}"

source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_common.sh"
