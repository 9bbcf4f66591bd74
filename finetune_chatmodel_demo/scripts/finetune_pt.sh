#! /usr/bin/env bash
# P-Tuning v2 on input-output data ({"prompt", "response"}), upstream's AdvertiseGen example:
#   ./scripts/format_advertise_gen.py --path AdvertiseGen/train.json && ./scripts/finetune_pt.sh
# Upstream's settings; each can be set from the environment, e.g. BASE_MODEL_PATH=/models/chatglm3-6b MAX_STEP=10.
# NUM_GPUS defaults to the visible GPUs (1 without one). PRECISION NNODES NODE_RANK MASTER_ADDR MASTER_PORT are read
# by scripts/launch.py, which also locks OUTPUT_DIR, continues the newest unfinished run of this RUN_NAME when
# AUTORESUME_FROM_CHECKPOINT (or RESUME) is true, and keeps the log in OUTPUT_DIR/train.log (python scripts/launch.py -h).

set -e
DEMO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

PRE_SEQ_LEN=${PRE_SEQ_LEN:-128}
LR=${LR:-2e-2}
NUM_GPUS=${NUM_GPUS:-}
MAX_SOURCE_LEN=${MAX_SOURCE_LEN:-1024}
MAX_TARGET_LEN=${MAX_TARGET_LEN:-128}
DEV_BATCH_SIZE=${DEV_BATCH_SIZE:-1}
GRAD_ACCUMULARION_STEPS=${GRAD_ACCUMULARION_STEPS:-${GRAD_ACCUMULATION_STEPS:-32}}
MAX_STEP=${MAX_STEP:-1000}
SAVE_INTERVAL=${SAVE_INTERVAL:-500}
LOG_INTERVAL=${LOG_INTERVAL:-1}

AUTORESUME_FROM_CHECKPOINT=${AUTORESUME_FROM_CHECKPOINT:-${RESUME:-True}}
DATESTR=$(date +%Y%m%d-%H%M%S)
RUN_NAME=${RUN_NAME:-advertise_gen_pt}

BASE_MODEL_PATH=${BASE_MODEL_PATH:-THUDM/chatglm3-6b}
DATASET_PATH=${DATASET_PATH:-$DEMO_DIR/formatted_data/advertise_gen.jsonl}
OUTPUT_DIR=${OUTPUT_DIR:-$DEMO_DIR/output/${RUN_NAME}-${DATESTR}-${PRE_SEQ_LEN}-${LR}}
# This project's additions / 本项目的补充
VALIDATION_PATH=${VALIDATION_PATH:-}                 # eval loss on this file every SAVE_INTERVAL steps
DATASET_WEIGHTS=${DATASET_WEIGHTS:-}                 # DATASET_PATH=a.jsonl,b.jsonl 时各文件的权重，如 3,1 / one weight per file
DATA_FORMAT=${DATA_FORMAT:-}                         # auto|chatglm3|openai|sharegpt|alpaca（默认按文件识别 / default: detected)
PACKING=${PACKING:-0}                                # 1: several samples per row
GRADIENT_CHECKPOINTING=${GRADIENT_CHECKPOINTING:-1}  # 0: faster, more memory
QUANTIZATION_BIT=${QUANTIZATION_BIT:-}                 # 4 或 8：量化冻结的基座（bitsandbytes，CPU/GPU）/ 4 or 8: quantize the frozen base
EXTRA_ARGS=${EXTRA_ARGS:-}                           # more finetune.py flags, e.g. "--save_total_limit 2"

# shellcheck disable=SC2086  # EXTRA_ARGS is a list of flags
python "$DEMO_DIR/scripts/launch.py" --num-gpus "$NUM_GPUS" --datestr "$DATESTR" -- "$DEMO_DIR/finetune.py" \
    --train_format input-output \
    --train_file "$DATASET_PATH" \
    --preprocessing_num_workers 1 \
    --model_name_or_path "$BASE_MODEL_PATH" \
    --output_dir "$OUTPUT_DIR" \
    --max_source_length "$MAX_SOURCE_LEN" \
    --max_target_length "$MAX_TARGET_LEN" \
    --per_device_train_batch_size "$DEV_BATCH_SIZE" \
    --gradient_accumulation_steps "$GRAD_ACCUMULARION_STEPS" \
    --max_steps "$MAX_STEP" \
    --logging_steps "$LOG_INTERVAL" \
    --save_steps "$SAVE_INTERVAL" \
    --learning_rate "$LR" \
    --pre_seq_len "$PRE_SEQ_LEN" \
    --resume_from_checkpoint "$AUTORESUME_FROM_CHECKPOINT" \
    --gradient_checkpointing "$GRADIENT_CHECKPOINTING" \
    --packing "$PACKING" \
    ${DATASET_WEIGHTS:+--train_weights "$DATASET_WEIGHTS"} \
    ${DATA_FORMAT:+--data_format "$DATA_FORMAT"} \
    ${VALIDATION_PATH:+--validation_file "$VALIDATION_PATH" --per_device_eval_batch_size "$DEV_BATCH_SIZE"} \
    ${QUANTIZATION_BIT:+--quantization_bit "$QUANTIZATION_BIT"} \
    $EXTRA_ARGS
