"""fp32 against bf16 mixed precision for training on the CPU, paired: what `PRECISION=auto` picks on a CPU with bf16
arithmetic (AVX512-BF16 or AMX) rests on this measurement.

For each method (P-Tuning v2, LoRA, full fine-tuning) the same seeded model and the same random-token batches train
in float32 and in bf16 as finetune.py trains them with `--bf16` on the CPU: the frozen base held in bf16 (P-Tuning,
LoRA; the prefix and the adapter stay float32) and the step under torch.autocast(bf16), which is what the Trainer
does with --bf16 (full fine-tuning: float32 master weights under autocast). The two alternate (fp32, bf16, then
bf16, fp32, ...) so that a machine's drift hits both; the table gives the median seconds per step (the first step
left out), bf16's speed-up, and both loss curves.

    python benchmarks/bench_precision.py                      # small shape: 4 layers, hidden 256, the real vocabulary
    python benchmarks/bench_precision.py --layers 2 --hidden 4096 --heads 32 --kv-channels 128 --ffn 13696 \\
        --methods ptuning,lora --steps 4 --pairs 1 --docs-marker precision-table-6b   # two layers at chatglm3-6b's width
    python benchmarks/bench_precision.py --update-docs        # the table into docs/training.md
"""
import argparse
import statistics
import sys
import time

import _common  # noqa: F401  (the drop-in folder on sys.path)
import _docs
from _common import BenchError, ChatGLMError, add_shape_args, build_model, model_config, progress

import torch

from chatglm3.checkpoint import lora
from chatglm3.checkpoint.loading import cpu_has_bf16

METHODS = ("ptuning", "lora", "full")
LABELS = {"ptuning": "P-Tuning v2（基座 bf16 / bf16 base）", "lora": "LoRA r8（基座 bf16 / bf16 base）",
          "full": "全参数 / full fine-tuning (bf16 autocast)"}
DOCS = _docs.REPO / "docs" / "training.md"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    add_shape_args(parser)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"逗号分隔 / comma-separated: {','.join(METHODS)}")
    parser.add_argument("--steps", type=int, default=8, help="每次运行的步数 / steps per run (default 8)")
    parser.add_argument("--pairs", type=int, default=2, help="fp32/bf16 配对次数 / fp32-bf16 pairs (default 2)")
    parser.add_argument("--batch", type=int, default=2, help="批大小 / batch size (default 2)")
    parser.add_argument("--seq", type=int, default=256, help="每条 token 数 / tokens per row (default 256)")
    parser.add_argument("--pre-seq-len", type=int, default=128, help="P-Tuning 前缀长度 / prefix length (default 128)")
    parser.add_argument("--threads", type=int, default=None, help="torch 线程数 / torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    _docs.add_flag(parser, "precision-table")
    parser.add_argument("--docs-marker", default="precision-table",
                        help="--update-docs 写入的标记名 / the markers --update-docs writes between (default: precision-table; "
                             "precision-table-6b for the run at chatglm3-6b's width)")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        raise BenchError(f"错误：--methods 中未知的方法 {unknown} / Error: unknown methods in --methods {unknown}; "
                         f"choose from {','.join(METHODS)}")
    for name in ("steps", "pairs", "batch", "seq", "pre_seq_len"):
        if getattr(args, name) < 1 or (name == "steps" and args.steps < 2):
            raise BenchError(f"错误：--{name.replace('_', '-')} 太小 / Error: --{name.replace('_', '-')} is too small "
                             "(--steps needs at least 2: the first step is left out)")
    return args


def batches(args):
    generator = torch.Generator().manual_seed(args.seed)
    for _ in range(args.steps):
        ids = torch.randint(5, args.vocab, (args.batch, args.seq), generator=generator)
        yield {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def train(method: str, precision: str, args) -> tuple:
    """(seconds per step, losses) of one run."""
    config = model_config(args, pre_seq_len=args.pre_seq_len if method == "ptuning" else None)
    model = build_model(config, seed=args.seed)
    if method == "ptuning":
        for name, parameter in model.named_parameters():
            parameter.requires_grad = name.startswith("transformer.prefix_encoder")
    elif method == "lora":
        model = lora.add_lora(model, rank=8)
    if precision == "bf16" and method != "full":  # the frozen base in bf16, what is trained in float32
        for parameter in model.parameters():
            if not parameter.requires_grad:
                parameter.data = parameter.data.to(torch.bfloat16)
    model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    seconds, losses = [], []
    for batch in batches(args):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
    return seconds[1:], losses


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        if args.threads:
            torch.set_num_threads(args.threads)
        recorder = _docs.Recorder(args.docs_marker, args, "bench_precision.py", argv, markdown=True, path=DOCS)
        rows = []
        for method in args.methods:
            runs = {"fp32": [], "bf16": []}
            for pair in range(args.pairs):
                for precision in (("fp32", "bf16") if pair % 2 == 0 else ("bf16", "fp32")):
                    progress(f"{method} {precision} (pair {pair + 1}/{args.pairs}) ...")
                    runs[precision].append(train(method, precision, args))
            fp32 = statistics.median(s for seconds, _ in runs["fp32"] for s in seconds)
            bf16 = statistics.median(s for seconds, _ in runs["bf16"] for s in seconds)
            loss32, loss16 = runs["fp32"][0][1], runs["bf16"][0][1]
            gap = max(abs(a - b) for a, b in zip(loss32, loss16))
            rows.append((method, fp32, bf16, loss32, loss16, gap))
        print(f"# 机器 / machine: {_common.machine_line('cpu', 'fp32 vs bf16')}; bf16 arithmetic: "
              f"{'yes' if cpu_has_bf16() else 'no'}")
        print(f"# 形状 / shape: {args.layers} layers, hidden {args.hidden}, ffn {args.ffn}, vocab {args.vocab}; batch "
              f"{args.batch} x {args.seq} tokens, gradient checkpointing, {args.steps} steps x {args.pairs} pairs, "
              f"median seconds per step without the first")
        print()
        print("| 方法 / method | fp32 每步 / step | bf16 每步 / step | bf16 加速 / speed-up | 损失 / loss fp32 | 损失 / loss bf16 | 最大差 / max gap |")
        print("|---|---:|---:|---:|---|---|---:|")
        for method, fp32, bf16, loss32, loss16, gap in rows:
            print(f"| {LABELS[method]} | {fp32:.2f} s | {bf16:.2f} s | {fp32 / bf16:.2f}x | "
                  f"{loss32[0]:.3f} → {loss32[-1]:.3f} | {loss16[0]:.3f} → {loss16[-1]:.3f} | {gap:.3f} |")
        recorder.publish()
    except (ChatGLMError, _docs.DocsError) as e:
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
