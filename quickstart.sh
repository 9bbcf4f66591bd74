#!/usr/bin/env bash
# 快速上手：在一台只有 CPU 的机器上跑通整个流程（约 10 分钟）。
# Quick start: the whole job on a CPU-only machine in about 10 minutes, with the same scripts that fine-tune
# chatglm3-6b on a GPU, but on a tiny ChatGLM3 built here (random weights, tokenizer trained on the bundled data):
#   CSV → conversations → JSONL → tiny model → full fine-tuning (DeepSpeed) → P-Tuning v2 and LoRA → evaluation → chat
#
#   bash quickstart.sh                 # everything lands in quickstart_out/
#   QUICKSTART_FAST=1 bash quickstart.sh   # a few steps only (what CI runs); the model will not have learned
#   QUICKSTART_OUT=/tmp/qs bash quickstart.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC1091
source "$ROOT/setup_env.sh"
WITH_PLOT=1
python -c "import matplotlib" 2>/dev/null || python -m pip install -q matplotlib || WITH_PLOT=0

OUT="${QUICKSTART_OUT:-$ROOT/quickstart_out}"
FAST="${QUICKSTART_FAST:-0}"
DEMO="$ROOT/finetune_chatmodel_demo"
DATA="$OUT/data"
if [ "$FAST" = 1 ]; then
    FULL_STEPS=20; PT_STEPS=4; EVAL_SAMPLES=8; EVAL_EVERY=10; LOG_EVERY=5; PT_LOG_EVERY=1
else
    FULL_STEPS=${FULL_STEPS:-450}; PT_STEPS=${PT_STEPS:-30}; EVAL_SAMPLES=${EVAL_SAMPLES:-60}; EVAL_EVERY=50; LOG_EVERY=25; PT_LOG_EVERY=5
fi
rm -rf "$OUT"
mkdir -p "$DATA"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
START=$SECONDS
stage() { printf '\n[%s/9] %s  (%ds)\n' "$1" "$2" $((SECONDS - START)); }
# One line per logged step of a training run (loss, tokens/s, epoch; eval loss) and its periodic progress line
# (steps done, time left); the full log goes to a file.
progress() {
    python -u -c '
import ast, re, sys
for line in sys.stdin:
    if line.startswith("训练步 / training steps:"):  # the periodic progress line (chatglm3.progress), as it is
        print("  " + line.strip(), flush=True)
    for m in re.finditer(r"[{]\x27(?:loss|eval_loss)\x27[^}]*[}]", line):
        d = {k: float(v) for k, v in ast.literal_eval(m.group(0)).items()}
        if "loss" in d:
            print("  loss %.3f  (%.0f tok/s, epoch %.1f)" % (d["loss"], d["tokens_per_second"], d["epoch"]), flush=True)
        else:
            print("  eval loss %.3f" % d["eval_loss"], flush=True)
'
}

stage 1 "CSV → 多轮对话，按宝可梦划分验证集 / CSV → conversations, dev split by Pokémon"
python "$ROOT/data_processing/data_processing.py" --output "$DATA/train.json" --variants 10 \
    --dev-ratio 0.1 --dev-output "$DATA/dev.json"

stage 2 "校验并写成 JSONL / validate and write JSONL"
python "$ROOT/data_processing/format_tool_poke.py" --path "$DATA/train.json" --output "$DATA/train.jsonl"
python "$ROOT/data_processing/format_tool_poke.py" --path "$DATA/dev.json" --output "$DATA/dev.jsonl"

stage 3 "构建小型 ChatGLM3（随机权重 + 自训分词器）/ build a tiny ChatGLM3 (random weights, own tokenizer)"
python "$DEMO/scripts/build_tiny_model.py" --corpus "$ROOT/data_processing/data.csv" "$DATA/train.jsonl" \
    --out "$OUT/tiny-base" --layers 4 --hidden 128 --heads 8 --kv-groups 2 --vocab-size 3000

stage 4 "全参数微调（DeepSpeed ZeRO-2，2 个 CPU 进程）/ full fine-tuning (DeepSpeed ZeRO-2, 2 CPU processes)"
BASE_MODEL_PATH="$OUT/tiny-base" DATASET_PATH="$DATA/train.jsonl" VALIDATION_PATH="$DATA/dev.jsonl" \
    OUTPUT_DIR="$OUT/full" NUM_GPUS=2 MAX_STEP="$FULL_STEPS" LR=6e-3 DEV_BATCH_SIZE=8 MAX_SEQ_LEN=256 \
    SAVE_INTERVAL="$FULL_STEPS" LOG_INTERVAL="$LOG_EVERY" GRADIENT_CHECKPOINTING=0 PACKING=1 RESUME=false \
    EXTRA_ARGS="--warmup_steps 10 --eval_steps $EVAL_EVERY" \
    bash "$DEMO/scripts/finetune_ds_multiturn.sh" 2>&1 | tee "$OUT/full.log" | progress "$FULL_STEPS" \
    || { tail -40 "$OUT/full.log"; exit 1; }

stage 5 "在其上做 P-Tuning v2 和 LoRA / P-Tuning v2 and LoRA on top of it"
BASE_MODEL_PATH="$OUT/full" DATASET_PATH="$DATA/train.jsonl" OUTPUT_DIR="$OUT/ptuning" NUM_GPUS=1 \
    MAX_STEP="$PT_STEPS" PRE_SEQ_LEN=8 LR=2e-2 DEV_BATCH_SIZE=8 GRAD_ACCUMULATION_STEPS=1 MAX_SEQ_LEN=256 \
    SAVE_INTERVAL="$PT_STEPS" LOG_INTERVAL="$PT_LOG_EVERY" GRADIENT_CHECKPOINTING=0 RESUME=false \
    bash "$DEMO/scripts/finetune_ps_pt_m.sh" 2>&1 | tee "$OUT/ptuning.log" | progress "$PT_STEPS" \
    || { tail -40 "$OUT/ptuning.log"; exit 1; }
echo "LoRA（秩 8，query_key_value，启动脚本的默认学习率）/ LoRA (rank 8 on query_key_value, the launcher's default LR):"
BASE_MODEL_PATH="$OUT/full" DATASET_PATH="$DATA/train.jsonl" OUTPUT_DIR="$OUT/lora" NUM_GPUS=1 \
    MAX_STEP="$PT_STEPS" DEV_BATCH_SIZE=8 GRAD_ACCUMULATION_STEPS=1 MAX_SEQ_LEN=256 \
    SAVE_INTERVAL="$PT_STEPS" LOG_INTERVAL="$PT_LOG_EVERY" GRADIENT_CHECKPOINTING=0 RESUME=false \
    bash "$DEMO/scripts/finetune_lora.sh" 2>&1 | tee "$OUT/lora.log" | progress "$PT_STEPS" \
    || { tail -40 "$OUT/lora.log"; exit 1; }
final_loss() { python -c 'import json, sys; print("%.3f" % [e["loss"] for e in json.load(open(sys.argv[1]))["log_history"] if "loss" in e][-1])' "$1/trainer_state.json"; }
echo "最终损失 / final loss after $PT_STEPS steps: P-Tuning v2 $(final_loss "$OUT/ptuning"), LoRA $(final_loss "$OUT/lora")"

stage 6 "在验证集上评测（ROUGE / BLEU）/ evaluate on the dev split (ROUGE / BLEU)"
python "$DEMO/evaluate.py" --data "$DATA/dev.jsonl" --model "$OUT/full" --pt-checkpoint "$OUT/ptuning" \
    --max-samples "$EVAL_SAMPLES" --output "$OUT/eval_predictions.jsonl" 2> "$OUT/evaluate.log" | tail -1 \
    | tee "$OUT/eval.json"

stage 7 "考考模型：训练集宝可梦的属性 / quiz: types of the training Pokémon"
if [ "$FAST" = 1 ]; then echo "（QUICKSTART_FAST=1：只训练了 $FULL_STEPS 步，模型还没学会 / only $FULL_STEPS steps: the model has not learned yet）"; fi
python "$ROOT/data_processing/quiz_types.py" --model "$OUT/full" --data "$DATA/train.jsonl" --show 5 | tee "$OUT/quiz.txt"
echo "inference.py --prompt（真实的命令行对话脚本 / the real chat script）:"
for name in 皮卡丘 妙蛙种子 可达鸭; do
    truth=$(cd "$ROOT/data_processing" && python -c "import sys, pokedex; r = pokedex.load_table(sys.argv[2]).by_name()[sys.argv[1]]; print('、'.join(r.types))" "$name" "$ROOT/data_processing/data.csv")
    answer=$(python "$DEMO/inference.py" --model "$OUT/full" --prompt "${name}是什么属性的？" --greedy --max-new-tokens 32 2>/dev/null | tail -1 | sed 's/^ChatGLM：//')
    echo "  问 / Q: ${name}是什么属性的？  答 / A: ${answer}  （事实 / truth: ${truth}）"
done

stage 8 "画损失曲线 / plot the loss curve"
if [ "$WITH_PLOT" = 1 ]; then
    python "$DEMO/scripts/plot_loss.py" "$OUT/full" --out "$OUT/loss.png" --title "Quick start: full fine-tuning of a tiny ChatGLM3 (CPU)"
else
    echo "跳过：没有 matplotlib / skipped: matplotlib is not installed"
fi

stage 9 "工具调用演示（缩短版）：为没见过的宝可梦查图鉴 / tool-use demo (shortened): looking up Pokémon never seen"
# The full demo (2 seeds, 4500 steps) is `bash scripts/tool_demo.sh`; here 1 seed and fewer steps, so the figures
# below are those of a model that has barely started to learn (see the README for the full demo's).
if [ "$FAST" = 1 ]; then TOOL_ENV=(STEPS=20 SAVE_EVERY=10); else TOOL_ENV=(); fi
# Its stage lines and training progress are shown as it runs; everything goes to tools.log.
env "${TOOL_ENV[@]}" TOOL_DEMO_FAST=1 TOOL_DEMO_OUT="$OUT/tools" bash "$ROOT/scripts/tool_demo.sh" 2>&1 \
    | tee "$OUT/tools.log" | grep --line-buffered -E '^\[[1-5]/6\]|^  种子 / seed [0-9]+: 训练步' \
    || { tail -30 "$OUT/tools.log"; exit 1; }
sed -n '/^\[6\/6\]/,$p' "$OUT/tools.log" | sed '1d'
echo "留出的真实宝可梦上的工具评测 / tool evaluation on the held-out real Pokémon (evaluate.py --tools, 1 seed):"
cat "$OUT/tools/eval-s0.json"

printf '\n完成，用时 %d 秒 / done in %d s. 输出 / outputs in %s:\n' $((SECONDS - START)) $((SECONDS - START)) "$OUT"
echo "  data/                 对话数据 / conversations (train/dev, JSON and JSONL)"
echo "  tiny-base/            初始小模型 / the tiny base model"
echo "  full/                 全参数微调结果 / full fine-tuned model (+ train.log, trainer_state.json)"
echo "  ptuning/              P-Tuning v2 检查点 / P-Tuning v2 checkpoint (prefix only)"
echo "  lora/                 LoRA 适配器 / LoRA adapter (PEFT format)"
echo "  eval_predictions.jsonl, quiz.txt, loss.png"
echo "  tools/                工具调用演示（缩短版）/ the shortened tool-use demo (tools.log)"
echo "和它聊天 / chat with it:  python finetune_chatmodel_demo/inference.py --model $OUT/full --pt-checkpoint $OUT/ptuning"
echo "                          python finetune_chatmodel_demo/inference.py --model $OUT/full --adapter $OUT/lora"

# UPDATE_DOCS=1: this run's results into docs/quickstart.md (between its quickstart-results markers), so the docs
# show what the command printed, not a hand-copied figure.
if [ "${UPDATE_DOCS:-0}" = 1 ]; then
    {
        echo "\`$([ "$FAST" = 1 ] && echo "QUICKSTART_FAST=1 ")UPDATE_DOCS=1 bash quickstart.sh\` — $(date -u +%Y-%m-%d), $(python -c 'import platform, os, torch; print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")'), load average $(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo '?') at the end:"
        echo
        echo "- 用时 / time: $((SECONDS - START)) s"
        echo "- 验证集 / dev split (stage 6): \`$(cat "$OUT/eval.json")\`"
        echo "- 测验 / quiz (stage 7): $(grep '属性问答正确率' "$OUT/quiz.txt")"
        echo "- 工具评测 / tool evaluation (stage 9, 1 seed, shortened): \`$(cat "$OUT/tools/eval-s0.json")\`"
    } | python -c "import sys; from chatglm3.output_files import replace_marked_block; replace_marked_block(sys.argv[1], 'quickstart-results', sys.stdin.read())" "$ROOT/docs/quickstart.md"
    echo "已写入 / written: docs/quickstart.md (quickstart-results)"
fi
