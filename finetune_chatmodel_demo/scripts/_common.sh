# Shared launcher logic, sourced by finetune_ps_pt_m.sh, finetune_pt_multiturn.sh and finetune_ds_multiturn.sh.
# Not meant to be run on its own. The sourcing script sets MODE (pt = P-Tuning v2, ds = full fine-tuning with
# DeepSpeed) and its own defaults (RUN_NAME, LR, ...) with ${VAR:=value}, so the environment always wins.
#
# Settings (all overridable from the environment):
#   BASE_MODEL_PATH  base model directory (default THUDM/chatglm3-6b, relative to the current directory)
#   DATASET_PATH     training JSONL (default finetune_chatmodel_demo/formatted_data/pokemon_conversations.jsonl)
#   VALIDATION_PATH  validation JSONL; its loss is logged every SAVE_INTERVAL steps (default: none)
#   OUTPUT_DIR       where checkpoints and train.log go (default finetune_chatmodel_demo/output/RUN_NAME-...)
#   NUM_GPUS         processes on this machine (GPUs; on a CPU-only machine, CPU processes)
#   NNODES NODE_RANK MASTER_ADDR MASTER_PORT   several machines (run the launcher on each with its NODE_RANK)
#   MAX_STEP LR PRE_SEQ_LEN MAX_SEQ_LEN DEV_BATCH_SIZE GRAD_ACCUMULATION_STEPS SAVE_INTERVAL LOG_INTERVAL
#   RESUME           true = continue from the newest complete checkpoint in OUTPUT_DIR if there is one (to
#                    continue a run, set OUTPUT_DIR to its directory: the default name has a timestamp); false;
#                    or a checkpoint path
#   SAVE_TOTAL_LIMIT keep only the newest N checkpoints (default: all; the DeepSpeed launcher keeps 2, as a
#                    full 6B checkpoint with optimizer states is ~80 GB)
#   PACKING          1 = pack several conversations per row (default 0)
#   GRADIENT_CHECKPOINTING  1 = recompute activations in the backward pass (less memory, ~30% slower)
#   PRECISION        auto | bf16 | fp16 | fp32 (auto: bf16 or fp16 on CUDA, fp32 on CPU)
#   DS_CONFIG        DeepSpeed config (ds mode; default configs/deepspeed.json, ZeRO-3: configs/deepspeed_zero3.json)
#   SEED PYTHON EXTRA_ARGS (appended to finetune.py's command line)

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEMO_DIR="$(cd "$SCRIPT_DIR/.." && pwd)"
PYTHON="${PYTHON:-python}"

fail() {
    echo "$1" >&2
    exit 2
}

abspath() {  # a path relative to the caller's current directory, made absolute (the file need not exist)
    case "$1" in
        /*) echo "$1" ;;
        *) echo "$PWD/$1" ;;
    esac
}

: "${BASE_MODEL_PATH:=THUDM/chatglm3-6b}"
: "${DATASET_PATH:=$DEMO_DIR/formatted_data/pokemon_conversations.jsonl}"
: "${VALIDATION_PATH:=}"
: "${NNODES:=1}"
: "${NODE_RANK:=0}"
: "${MASTER_ADDR:=127.0.0.1}"
: "${MASTER_PORT:=29500}"
: "${SAVE_INTERVAL:=200}"
: "${LOG_INTERVAL:=10}"
: "${RESUME:=true}"
: "${SAVE_TOTAL_LIMIT:=}"
: "${PACKING:=0}"
: "${GRADIENT_CHECKPOINTING:=1}"
: "${PRECISION:=auto}"
: "${SEED:=42}"
: "${EXTRA_ARGS:=}"

BASE_MODEL_PATH="$(abspath "$BASE_MODEL_PATH")"
DATASET_PATH="$(abspath "$DATASET_PATH")"

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    fail "错误：找不到 Python 解释器 $PYTHON，请先激活虚拟环境 / Error: Python interpreter $PYTHON not found; activate your virtual environment first"
fi
if [ ! -d "$BASE_MODEL_PATH" ]; then
    fail "错误：找不到基座模型目录 $BASE_MODEL_PATH。请下载 THUDM/chatglm3-6b 的权重并设置 BASE_MODEL_PATH=目录 / Error: base model directory $BASE_MODEL_PATH not found. Download the THUDM/chatglm3-6b weights and set BASE_MODEL_PATH=<dir>"
fi
if [ ! -f "$DATASET_PATH" ]; then
    fail "错误：找不到训练数据 $DATASET_PATH。请先运行数据处理（data_processing/）生成它，或设置 DATASET_PATH=文件 / Error: training data $DATASET_PATH not found. Run the data pipeline (data_processing/) first, or set DATASET_PATH=<file>"
fi
if [ -n "$VALIDATION_PATH" ]; then
    VALIDATION_PATH="$(abspath "$VALIDATION_PATH")"
    [ -f "$VALIDATION_PATH" ] || fail "错误：找不到验证数据 $VALIDATION_PATH / Error: validation data $VALIDATION_PATH not found"
fi

# What the hardware offers: "bf16", "fp16" or "cpu", and the number of CUDA devices.
read -r HW_PRECISION GPU_COUNT < <("$PYTHON" -c "
import torch
if torch.cuda.is_available():
    print('bf16' if torch.cuda.is_bf16_supported() else 'fp16', torch.cuda.device_count())
else:
    print('cpu', 0)
") || fail "错误：$PYTHON 无法导入 torch / Error: $PYTHON cannot import torch"

if [ -z "${NUM_GPUS:-}" ]; then
    NUM_GPUS=$(( GPU_COUNT > 0 ? GPU_COUNT : 1 ))
fi
if [ "$PRECISION" = auto ]; then
    PRECISION=$([ "$HW_PRECISION" = cpu ] && echo fp32 || echo "$HW_PRECISION")
fi
case "$PRECISION" in
    bf16|fp16) [ "$HW_PRECISION" != cpu ] || fail "错误：PRECISION=$PRECISION 需要 CUDA GPU，本机没有 / Error: PRECISION=$PRECISION needs a CUDA GPU and none is available" ;;
    fp32) ;;
    *) fail "错误：PRECISION 只能是 auto、bf16、fp16 或 fp32，收到 $PRECISION / Error: PRECISION must be auto, bf16, fp16 or fp32, got $PRECISION" ;;
esac

DATESTR="$(date +%Y%m%d-%H%M%S)"
: "${OUTPUT_DIR:=$DEMO_DIR/output/${RUN_NAME}-${DATESTR}}"
OUTPUT_DIR="$(abspath "$OUTPUT_DIR")"
mkdir -p "$OUTPUT_DIR"

ARGS=(
    --train_format multi-turn
    --train_file "$DATASET_PATH"
    --max_seq_length "$MAX_SEQ_LEN"
    --model_name_or_path "$BASE_MODEL_PATH"
    --output_dir "$OUTPUT_DIR"
    --per_device_train_batch_size "$DEV_BATCH_SIZE"
    --gradient_accumulation_steps "$GRAD_ACCUMULATION_STEPS"
    --max_steps "$MAX_STEP"
    --logging_steps "$LOG_INTERVAL"
    --save_steps "$SAVE_INTERVAL"
    --learning_rate "$LR"
    --seed "$SEED"
    --dataloader_num_workers 0
    --report_to none
    --resume_from_checkpoint "$RESUME"
)
if [ -n "$VALIDATION_PATH" ]; then
    ARGS+=(--validation_file "$VALIDATION_PATH" --per_device_eval_batch_size "$DEV_BATCH_SIZE")
fi
if [ -n "$SAVE_TOTAL_LIMIT" ]; then ARGS+=(--save_total_limit "$SAVE_TOTAL_LIMIT"); fi
if [ "$PACKING" = 1 ]; then ARGS+=(--packing); fi
if [ "$GRADIENT_CHECKPOINTING" = 1 ]; then ARGS+=(--gradient_checkpointing); fi
if [ "$MODE" = pt ]; then
    # The frozen weights are already half precision on GPU (finetune.py chooses); no AMP flag needed.
    ARGS+=(--pre_seq_len "$PRE_SEQ_LEN")
else
    : "${DS_CONFIG:=$DEMO_DIR/configs/deepspeed.json}"
    DS_CONFIG="$(abspath "$DS_CONFIG")"
    [ -f "$DS_CONFIG" ] || fail "错误：找不到 DeepSpeed 配置 $DS_CONFIG / Error: DeepSpeed config $DS_CONFIG not found"
    ARGS+=(--deepspeed "$DS_CONFIG")
    if [ "$PRECISION" = bf16 ]; then ARGS+=(--bf16); fi
    if [ "$PRECISION" = fp16 ]; then ARGS+=(--fp16); fi
fi
if [ "$HW_PRECISION" = cpu ]; then
    ARGS+=(--use_cpu)
    # Several CPU processes talk over gloo (NCCL needs GPUs); a single process must not ask for a backend.
    if [ "$NUM_GPUS" -gt 1 ] || [ "$NNODES" -gt 1 ]; then ARGS+=(--ddp_backend gloo); fi
fi

# One process: plain python (clean error messages, no rendezvous port). Several: torchrun.
if [ "$NUM_GPUS" -gt 1 ] || [ "$NNODES" -gt 1 ]; then
    if [ "$NNODES" -gt 1 ]; then
        LAUNCH=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK"
                --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --nproc_per_node "$NUM_GPUS")
    else
        # --standalone picks a free local port, so several runs can share a machine.
        LAUNCH=("$PYTHON" -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node "$NUM_GPUS")
    fi
else
    LAUNCH=("$PYTHON")
fi

# EXTRA_ARGS is split on spaces on purpose: it holds extra flags.
# shellcheck disable=SC2206
EXTRA=($EXTRA_ARGS)

LOG_FILE="$OUTPUT_DIR/train.log"
echo "输出目录 / output dir: $OUTPUT_DIR ; 日志 / log: $LOG_FILE"
echo "+ ${LAUNCH[*]} $DEMO_DIR/finetune.py ${ARGS[*]} ${EXTRA[*]}" | tee -a "$LOG_FILE"

# Keep the log with tee, but exit with the training's own status, not tee's.
set +e
"${LAUNCH[@]}" "$DEMO_DIR/finetune.py" "${ARGS[@]}" "${EXTRA[@]}" 2>&1 | tee -a "$LOG_FILE"
STATUS=${PIPESTATUS[0]}
set -e
if [ "$STATUS" -ne 0 ]; then
    echo "训练失败，退出码 $STATUS，日志见 $LOG_FILE / Training failed with exit status $STATUS, see $LOG_FILE" >&2
fi
exit "$STATUS"
