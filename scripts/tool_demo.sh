#!/usr/bin/env bash
# 工具调用演示：小模型学会为从没见过的宝可梦查图鉴 / Tool-use demo: a tiny ChatGLM3 learns to look up Pokémon it
# never saw. Trains on tool-calling data (synthetic Pokémon + the real training ones; the held-out real Pokémon
# are in no training sample), evaluates the held-out ones through the real tool loop with and without the tool
# (evaluate.py --tools / --hide-tools), draws the tool_args_exact learning curve from the checkpoints, and asks
# three held-out Pokémon through inference.py --tools.
#
#   bash scripts/tool_demo.sh                    # full: 2 seeds × 4500 steps, trained side by side (~30 min each)
#   TOOL_DEMO_FAST=1 bash scripts/tool_demo.sh   # shortened (the quick start's stage): 1 seed, 300 steps
#   TOOL_DEMO_OUT=/tmp/td SEEDS="0 1 2 3" STEPS=4500 bash scripts/tool_demo.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEMO="$ROOT/finetune_chatmodel_demo"
TABLE="$ROOT/data_processing/data.csv"
# The Pokédex tool plug-in (docs/tools.md); it answers from the table $POKEDEX_TABLE names.
POKEDEX="$ROOT/data_processing/pokedex_tool.py"
export POKEDEX_TABLE="$TABLE"
OUT="${TOOL_DEMO_OUT:-$ROOT/tool_demo_out}"
if [ "${TOOL_DEMO_FAST:-0}" = 1 ]; then
    : "${SEEDS:=0}" "${STEPS:=300}" "${SYNTHETIC:=3000}" "${SAVE_EVERY:=100}"
else
    # Copying unseen names arrives at a step that differs by seed, and answering from the observation follows
    # (docs/tool_demo.md, "Recipe experiments").
    : "${SEEDS:=0 1}" "${STEPS:=4500}" "${SYNTHETIC:=12000}" "${SAVE_EVERY:=250}"
fi
# The tiny models' initial weights' standard deviation (build_tiny_model.py --init-std). At 0.02 (GPT-2's value
# for width 768) seeds 3 and 5 never learnt to copy names in 4500 steps; 0.05 (0.02 scaled as 1/sqrt(width) to
# width 128) made both copy (docs/tool_demo.md, "Initial standard deviation 0.05").
: "${INIT_STD:=0.05}"
# FROM_STAGE=4: evaluate again the models that a finished or cut-off run left in TOOL_DEMO_OUT (stages 4-6, no
# retraining); 5: the curves and the three questions; 6: the three questions.
: "${FROM_STAGE:=1}"
read -r -a SEED_LIST <<< "$SEEDS"
die() { echo "$*" >&2; exit 2; }
[ ${#SEED_LIST[@]} -gt 0 ] || die "SEEDS 为空 / SEEDS is empty"
for seed in "${SEED_LIST[@]}"; do
    [[ "$seed" =~ ^[0-9]+$ ]] || die "SEEDS 里的「$seed」不是非负整数 / '$seed' in SEEDS is not a whole number"
done
# Seeds train side by side, one CPU thread each unless there are cores to spare (a GPU is used when there is one).
# A seed repeats its run to the bit only with the same number of threads: THREADS=1 SEEDS=5 repeats seed 5 of a
# two-seed run on two cores (docs/tool_demo.md).
: "${THREADS:=$(( $(nproc) / ${#SEED_LIST[@]} > 0 ? $(nproc) / ${#SEED_LIST[@]} : 1 ))}"
for var in STEPS SAVE_EVERY THREADS; do
    [[ "${!var}" =~ ^[1-9][0-9]*$ ]] || die "$var=${!var}：应为正整数 / $var must be a positive whole number"
done
[[ "$SYNTHETIC" =~ ^[0-9]+$ ]] || die "SYNTHETIC=$SYNTHETIC：应为非负整数 / SYNTHETIC must be a whole number"
[[ "$FROM_STAGE" =~ ^[1456]$ ]] || die "FROM_STAGE=$FROM_STAGE：只能是 1、4、5 或 6 / FROM_STAGE must be 1, 4, 5 or 6"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ "$FROM_STAGE" = 1 ]; then
    # Only an earlier demo's folder is emptied (TOOL_DEMO_OUT=~ must not remove a home folder); .tool_demo marks
    # one from its first moment, so that a run cut off in stage 1 can be run again.
    if [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
        [ -f "$OUT/.tool_demo" ] || [ -f "$OUT/data/heldout.jsonl" ] || die "TOOL_DEMO_OUT=$OUT 不是空文件夹，也不是之前的演示输出；请换一个新文件夹 / is neither empty nor an earlier demo's output: choose a new folder"
        echo "清空上一次演示的输出 / removing the earlier demo's outputs in $OUT"
    fi
    rm -rf "$OUT"
    mkdir -p "$OUT"
    echo "scripts/tool_demo.sh" > "$OUT/.tool_demo"
else  # what the stages skipped would have left in $OUT
    for seed in "${SEED_LIST[@]}"; do
        need="$OUT/s$seed/config.json"
        if [ "$FROM_STAGE" -gt 4 ]; then need="$need $OUT/eval-s$seed.json $OUT/summary.json $OUT/summary_notool.json"; fi
        for f in $need "$OUT/data/heldout.jsonl"; do
            [ -f "$f" ] || die "FROM_STAGE=$FROM_STAGE 需要之前一次运行的 $f（同样的 TOOL_DEMO_OUT 和 SEEDS）/ needs $f from an earlier run (the same TOOL_DEMO_OUT and SEEDS)"
        done
    done
fi
# The environment after the settings are checked: a mistyped setting is refused before anything is installed.
# shellcheck disable=SC1091
source "$ROOT/setup_env.sh"
START=$SECONDS
stage() { printf '\n[%s/6] %s  (%ds)\n' "$1" "$2" $((SECONDS - START)); }
evaluate() {  # MODEL OUTPUT_PREFIX [evaluate.py flags...]: the summary JSON line into OUTPUT_PREFIX.json
    local model=$1 prefix=$2; shift 2
    OMP_NUM_THREADS=$THREADS python "$DEMO/evaluate.py" --data "$OUT/data/heldout.jsonl" --model "$model" \
        --tools "$POKEDEX" --max-new-tokens 96 --batch-size 16 --output "$prefix.predictions.jsonl" "$@" \
        2> "$prefix.log" | tail -1 > "$prefix.json" || { tail -5 "$prefix.log"; exit 1; }
}

if [ "$FROM_STAGE" = 1 ]; then
    stage 1 "工具调用数据：虚构宝可梦 + 训练集宝可梦，留出的真实宝可梦不进训练 / tool data: synthetic + training Pokémon, held-out ones kept out"
    python "$ROOT/data_processing/build_tool_data.py" --out-dir "$OUT/data" --synthetic "$SYNTHETIC" --max-pokemon 4 --seed 0

    stage 2 "小模型，分词器只用训练集训练 / tiny models, the tokenizer trained on the training set only"
    # 2 heads of 64 dims, not 4 of 32: at 3000 steps all four seeds tried copy names; with 4 heads one never did.
    # --single-tokens: each type name and name character is one token wherever it is written, so that the answer
    # copies the observation's tokens (a free tokenizer writes 水 as 是水 in answers: docs/tool_demo.md).
    for seed in "${SEED_LIST[@]}"; do
        python "$DEMO/scripts/build_tiny_model.py" --corpus "$OUT/data/train.jsonl" --out "$OUT/base-s$seed" \
            --layers 4 --hidden 128 --heads 2 --kv-groups 2 --vocab-size 3000 --seed "$seed" \
            --init-std "$INIT_STD" --single-tokens "$OUT/data/single_tokens.txt"
        python "$ROOT/data_processing/build_tool_data.py" --out-dir "$OUT/data" --check-tokenizer "$OUT/base-s$seed"
    done

    # --full_determinism: a seed repeats its run to the bit on one machine (docs/training.md, "Repeatable runs").
    # Warm-up, a constant LR, then a cosine decay over the last fifth (warmup_stable_decay): copying arrives at a
    # step that differs by seed, and one that arrives late still learns at the full rate (under a plain cosine the
    # rate had fallen to a quarter by step 3000).
    DECAY_STEPS=$(( STEPS / 5 ))
    stage 3 "全参数训练，各种子并行 / full training, seeds side by side (${STEPS} steps, logs in $OUT/train-s*.log)"
    pids=()
    for seed in "${SEED_LIST[@]}"; do
        OMP_NUM_THREADS=$THREADS python "$DEMO/finetune.py" --train_format multi-turn \
            --train_file "$OUT/data/train.jsonl" --model_name_or_path "$OUT/base-s$seed" --output_dir "$OUT/s$seed" \
            --max_seq_length 768 --packing 1 --per_device_train_batch_size 4 --max_steps "$STEPS" \
            --learning_rate 3e-3 --lr_scheduler_type warmup_stable_decay \
            --lr_scheduler_kwargs "{\"num_decay_steps\": $DECAY_STEPS}" --warmup_steps 50 --logging_steps 25 \
            --save_steps "$SAVE_EVERY" --gradient_checkpointing 0 --dataloader_num_workers 0 --report_to none \
            --seed "$seed" --full_determinism > "$OUT/train-s$seed.log" 2>&1 &
        pids+=($!)
    done
    # While they train, each seed's latest progress line (steps, time left) every PROGRESS_SECONDS (default 30).
    running() { local pid; for pid in "${pids[@]}"; do if kill -0 "$pid" 2>/dev/null; then return 0; fi; done; return 1; }
    waited=0
    while running; do
        sleep 1
        waited=$((waited + 1))
        if [ $((waited % ${PROGRESS_SECONDS:-30})) = 0 ]; then
            for seed in "${SEED_LIST[@]}"; do
                line=$(grep -a "^训练步 / training steps:" "$OUT/train-s$seed.log" 2>/dev/null | tail -1 || true)
                if [ -n "$line" ]; then echo "  种子 / seed $seed: $line"; fi
            done
        fi
    done
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}" || { tail -20 "$OUT/train-s${SEED_LIST[$i]}.log"; exit 1; }
    done
fi

if [ "$FROM_STAGE" -le 4 ]; then
    stage 4 "在留出的真实宝可梦上评测：有工具 / 无工具 / evaluate on the held-out real Pokémon: with / without the tool"
    for seed in "${SEED_LIST[@]}"; do
        evaluate "$OUT/s$seed" "$OUT/eval-s$seed"
        evaluate "$OUT/s$seed" "$OUT/notool-s$seed" --hide-tools
        echo "种子 / seed $seed，有工具 / with the tool: $(cat "$OUT/eval-s$seed.json")"
        echo "种子 / seed $seed，无工具 / without:      $(cat "$OUT/notool-s$seed.json")"
    done
    echo "平均 / mean over seeds，有工具 / with the tool:"
    python "$ROOT/scripts/tool_report.py" mean "$OUT"/eval-s*.json | tee "$OUT/summary.json"
    echo "平均 / mean over seeds，无工具 / without the tool:"
    python "$ROOT/scripts/tool_report.py" mean "$OUT"/notool-s*.json | tee "$OUT/summary_notool.json"
fi

if [ "$FROM_STAGE" -le 5 ]; then
    stage 5 "学习曲线：各检查点的 tool_args_exact 与 copy_loss_* / learning curve: tool_args_exact and copy_loss_* of every checkpoint"
    curve() {  # SEED: every checkpoint of that seed evaluated, one JSON line per step into curve-sSEED.jsonl
        local seed=$1 ckpt step
        rm -f "$OUT/curve-s$seed.jsonl"  # FROM_STAGE=5 evaluates the checkpoints again
        for ckpt in "$OUT/s$seed"/checkpoint-*; do
            [ -d "$ckpt" ] || continue  # SAVE_EVERY above STEPS: no checkpoint, no curve
            step=${ckpt##*-}
            evaluate "$ckpt" "$OUT/ckpt-s$seed-$step" --copy-loss  # + where the loss is (the name's characters, ...)
            python -c 'import json, sys; print(json.dumps({"step": int(sys.argv[1]), **json.load(open(sys.argv[2]))}))' \
                "$step" "$OUT/ckpt-s$seed-$step.json" >> "$OUT/curve-s$seed.jsonl"
        done
    }
    # Seeds in parallel, as many at once as there are cores (each evaluation uses $THREADS threads).
    pids=()
    for seed in "${SEED_LIST[@]}"; do
        while [ "$(jobs -rp | wc -l)" -ge $(( $(nproc) / THREADS )) ]; do sleep 1; done
        curve "$seed" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || exit 1; done
    if ! compgen -G "$OUT/curve-s*.jsonl" > /dev/null; then
        echo "没有检查点，跳过学习曲线 / no checkpoints (SAVE_EVERY > STEPS): no learning curve"
    elif python -c "import matplotlib" 2>/dev/null; then
        python "$ROOT/scripts/tool_report.py" curve "$OUT"/curve-s*.jsonl --out "$OUT/tool_args_exact.png"
    else
        echo "跳过画图：没有 matplotlib / plot skipped: matplotlib is not installed"
    fi
fi

stage 6 "inference.py --tools：问三只留出的宝可梦 / ask three held-out Pokémon"
for name in $(head -3 "$OUT/data/heldout_names.txt"); do
    truth=$(cd "$ROOT/data_processing" && python -c "import sys, pokedex; r = pokedex.load_table(sys.argv[2]).by_name()[sys.argv[1]]; print('、'.join(r.types))" "$name" "$TABLE")
    echo "问 / Q: ${name}是什么属性的？  （事实 / truth: ${truth}）"
    python "$DEMO/inference.py" --model "$OUT/s${SEED_LIST[0]}" --tools "$POKEDEX" --prompt "${name}是什么属性的？" \
        --greedy --max-new-tokens 96 2>/dev/null | sed 's/^/    /'
    echo "  不提供工具 / without the tool:"
    python "$DEMO/inference.py" --model "$OUT/s${SEED_LIST[0]}" --prompt "${name}是什么属性的？" \
        --greedy --max-new-tokens 96 2>/dev/null | sed 's/^/    /'
done
echo "无工具时属性答对的比例 / share of types right without the tool: $(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["answer_types_correct"])' "$OUT/summary_notool.json")"

printf '\n完成，用时 %d 秒 / done in %d s. 输出 / outputs in %s\n' $((SECONDS - START)) $((SECONDS - START)) "$OUT"
echo "工具评测 / tool evaluation (mean over seeds: ${SEEDS}):"
cat "$OUT/summary.json"
echo "每个种子 / per seed (docs: python scripts/tool_report.py table $OUT --update-docs docs/tool_demo.md):"
python "$ROOT/scripts/tool_report.py" table "$OUT" | tee "$OUT/seeds.md"
