#! /usr/bin/env bash
# LoRA (PEFT) on the Pokémon multi-turn conversations: only the adapter trains and is saved, in PEFT's format
# (adapter_config.json + adapter_model.safetensors), which inference.py / evaluate.py / export.py load with --adapter
# and upstream's finetune_demo loads too. Upstream's lora.yaml values: LORA_RANK=8 LORA_ALPHA=32 LORA_DROPOUT=0.1
# on query_key_value (LORA_TARGET=query_key_value,dense,... for more layers). This project's values:
#   LR=5e-4          measured on the quick-start model (40 steps, data it never saw): loss 14.6 -> 8.7, where
#                    upstream's 5e-5 barely moves (15.0 -> 14.6); 5e-3 learns faster on that tiny random model but is
#                    beyond the usual LoRA range for a pretrained 6B model (README: LoRA).
#   MAX_SEQ_LEN=512, DEV_BATCH_SIZE=4 x GRAD_ACCUMULATION_STEPS=4: as finetune_ps_pt_m.sh.
# Data: python data_processing/format_tool_poke.py (-> formatted_data/pokemon_conversations.jsonl).
# Each setting can be set from the environment, e.g. BASE_MODEL_PATH=/models/chatglm3-6b MAX_STEP=500.
# DS_CONFIG=configs/deepspeed.json trains under DeepSpeed ZeRO-2 (PRECISION picks --bf16/--fp16); without it, the
# frozen base sits in bf16/fp16 on a GPU and the adapter in float32, no AMP flag needed.
# NUM_GPUS defaults to the visible GPUs (1 without one). PRECISION NNODES NODE_RANK MASTER_ADDR MASTER_PORT are read
# by scripts/launch.py, which also locks OUTPUT_DIR, continues the newest unfinished run of this RUN_NAME when
# RESUME is true, and keeps the log in OUTPUT_DIR/train.log (python scripts/launch.py -h).

set -e
DEMO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

LORA_RANK=${LORA_RANK:-8}
LORA_ALPHA=${LORA_ALPHA:-32}
LORA_DROPOUT=${LORA_DROPOUT:-0.1}
LORA_TARGET=${LORA_TARGET:-query_key_value}
LR=${LR:-5e-4}
NUM_GPUS=${NUM_GPUS:-}
MAX_SEQ_LEN=${MAX_SEQ_LEN:-512}
DEV_BATCH_SIZE=${DEV_BATCH_SIZE:-4}
GRAD_ACCUMULATION_STEPS=${GRAD_ACCUMULATION_STEPS:-${GRAD_ACCUMULARION_STEPS:-4}}
MAX_STEP=${MAX_STEP:-1000}
SAVE_INTERVAL=${SAVE_INTERVAL:-200}
LOG_INTERVAL=${LOG_INTERVAL:-10}

RESUME=${RESUME:-${AUTORESUME_FROM_CHECKPOINT:-true}}
DATESTR=$(date +%Y%m%d-%H%M%S)
RUN_NAME=${RUN_NAME:-pokemon_lora}

BASE_MODEL_PATH=${BASE_MODEL_PATH:-THUDM/chatglm3-6b}
DATASET_PATH=${DATASET_PATH:-$DEMO_DIR/formatted_data/pokemon_conversations.jsonl}
OUTPUT_DIR=${OUTPUT_DIR:-$DEMO_DIR/output/${RUN_NAME}-${DATESTR}-${LORA_RANK}-${LR}}
DS_CONFIG=${DS_CONFIG:-}                             # e.g. $DEMO_DIR/configs/deepspeed.json (ZeRO-2)
VALIDATION_PATH=${VALIDATION_PATH:-}                 # eval loss on this file every SAVE_INTERVAL steps
DATASET_WEIGHTS=${DATASET_WEIGHTS:-}                 # DATASET_PATH=a.jsonl,b.jsonl 时各文件的权重，如 3,1 / one weight per file
DATA_FORMAT=${DATA_FORMAT:-}                         # auto|chatglm3|openai|sharegpt|alpaca（默认按文件识别 / default: detected)
PACKING=${PACKING:-0}                                # 1: several samples per row
GRADIENT_CHECKPOINTING=${GRADIENT_CHECKPOINTING:-1}  # 0: faster, more memory
QUANTIZATION_BIT=${QUANTIZATION_BIT:-}                 # 4 或 8：量化冻结的基座（bitsandbytes，CPU/GPU）/ 4 or 8: quantize the frozen base (QLoRA)
EXTRA_ARGS=${EXTRA_ARGS:-}                           # more finetune.py flags, e.g. "--save_total_limit 2"

# shellcheck disable=SC2086  # EXTRA_ARGS is a list of flags
python "$DEMO_DIR/scripts/launch.py" --num-gpus "$NUM_GPUS" --datestr "$DATESTR" -- "$DEMO_DIR/finetune.py" \
    --train_format multi-turn \
    --train_file "$DATASET_PATH" \
    --model_name_or_path "$BASE_MODEL_PATH" \
    --output_dir "$OUTPUT_DIR" \
    --max_seq_length "$MAX_SEQ_LEN" \
    --per_device_train_batch_size "$DEV_BATCH_SIZE" \
    --gradient_accumulation_steps "$GRAD_ACCUMULATION_STEPS" \
    --max_steps "$MAX_STEP" \
    --logging_steps "$LOG_INTERVAL" \
    --save_steps "$SAVE_INTERVAL" \
    --learning_rate "$LR" \
    --lora_rank "$LORA_RANK" \
    --lora_alpha "$LORA_ALPHA" \
    --lora_dropout "$LORA_DROPOUT" \
    --lora_target "$LORA_TARGET" \
    --resume_from_checkpoint "$RESUME" \
    --gradient_checkpointing "$GRADIENT_CHECKPOINTING" \
    --packing "$PACKING" \
    ${DS_CONFIG:+--deepspeed "$DS_CONFIG"} \
    ${DATASET_WEIGHTS:+--train_weights "$DATASET_WEIGHTS"} \
    ${DATA_FORMAT:+--data_format "$DATA_FORMAT"} \
    ${VALIDATION_PATH:+--validation_file "$VALIDATION_PATH" --per_device_eval_batch_size "$DEV_BATCH_SIZE"} \
    ${QUANTIZATION_BIT:+--quantization_bit "$QUANTIZATION_BIT"} \
    $EXTRA_ARGS
