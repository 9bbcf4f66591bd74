#!/usr/bin/env bash
# P-Tuning v2 on multi-turn data (upstream's launcher name): the same recipe and settings as
# finetune_ps_pt_m.sh, with its own run name. Set DATASET_PATH to your own data in the multi-turn format;
# see scripts/_common.sh for every setting.
set -euo pipefail

: "${RUN_NAME:=multiturn_pt}"
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/finetune_ps_pt_m.sh"
