#!/usr/bin/env bash
# P-Tuning v2 on the Pokémon multi-turn conversations (the project's main recipe).
# Every setting can be overridden from the environment, e.g.
#   BASE_MODEL_PATH=/models/chatglm3-6b MAX_STEP=500 bash finetune_chatmodel_demo/scripts/finetune_ps_pt_m.sh
# See scripts/_common.sh for the full list (DATASET_PATH, OUTPUT_DIR, NUM_GPUS, LR, PRE_SEQ_LEN, ...).
#
# Defaults and why:
#   LR=2e-2          P-Tuning v2 trains only the prefix and needs a large rate; the original project used 2e-5
#                    and its loss stayed at 5.0.
#   MAX_SEQ_LEN=512  The Pokémon conversations average ~112 tokens; batches are padded only to their longest
#                    sample, so this is just the truncation cap, with room for the longest conversations.
#   DEV_BATCH_SIZE=4, GRAD_ACCUMULATION_STEPS=4  16 conversations per step, as upstream (1 x 16), in 4x fewer
#                    forward passes; fits a 24 GB GPU with gradient checkpointing.
set -euo pipefail

MODE=pt
: "${RUN_NAME:=pokemon_pt}"
: "${PRE_SEQ_LEN:=128}"
: "${LR:=2e-2}"
: "${MAX_SEQ_LEN:=512}"
: "${DEV_BATCH_SIZE:=4}"
: "${GRAD_ACCUMULATION_STEPS:=4}"
: "${MAX_STEP:=1000}"
: "${NUM_GPUS:=1}"

source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/_common.sh"
