#!/usr/bin/env python
"""工具演示的汇总与学习曲线 / The tool demo's summary over seeds and its learning curve.

    python scripts/tool_report.py mean OUT/eval-s0.json OUT/eval-s1.json       # mean of evaluate.py's JSON lines
    python scripts/tool_report.py curve OUT/curve-s0.jsonl OUT/curve-s1.jsonl --out curve.png
    python scripts/tool_report.py table OUT [OUT2 ...] [--update-docs docs/tool_demo.md]  # per-seed table, min/mean/max

A curve file holds one JSON object per evaluated checkpoint: {"step": N, ...evaluate.py's summary}.
"""
import argparse
import io
import re
import statistics
import sys
from pathlib import Path

from chatglm3.errors import ChatGLMError
from chatglm3.json_files import DATA_LIMIT, dumps, expect, loads, read_text  # the one JSON reader
from chatglm3.output_files import replace_marked_block, write_atomic

KEYS = ("tool_call_rate", "tool_false_call_rate", "tool_name_accuracy", "tool_args_exact", "tool_args_chars",
        "tool_extra_call_rate", "tool_answer_grounded", "answer_types_correct", "type_answer_other_field",
        "stopped_share")


def read_json_lines(path: Path) -> list:
    """Every non-blank line's JSON value; a bad file, line or nesting is one line naming file:line."""
    try:
        text = read_text(path, DATA_LIMIT)
        return [loads(line, str(path), first_line=n) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    except ChatGLMError as e:
        raise SystemExit(str(e)) from None


def metric(row: dict, key: str, path: Path):
    """row[key]: a number or null (a fraction with nothing to count); anything else is one line naming it."""
    value = row.get(key)
    if value is not None:
        try:
            expect(value, (int, float), str(path), key)
        except ChatGLMError as e:
            raise SystemExit(str(e)) from None
    return value


def summaries(path: Path) -> list:
    """The JSON objects of an evaluate.py summary or curve file; one clear line when there are none (an evaluation
    that failed leaves an empty file)."""
    rows = read_json_lines(path)
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise SystemExit(f"错误：{path} 里没有 evaluate.py 的 JSON 汇总行，评测失败了吗？请看同名的 .log 文件 / "
                         f"Error: {path} holds no evaluate.py JSON summary line: did the evaluation fail? See its .log file")
    return rows


def mean(paths: list) -> dict:
    """Mean of each metric over the runs' summaries (the last JSON line of each file)."""
    runs = [(summaries(p)[-1], p) for p in paths]
    summary = {}
    for key in KEYS:
        values = [v for v in (metric(r, key, p) for r, p in runs) if v is not None]
        summary[key] = round(sum(values) / len(values), 4) if values else None
    summary["seeds"] = len(runs)
    return summary


# The demo's targets (docs/tool_demo.md): every seed, and the mean over seeds.
SEED_TARGETS = {"tool_args_exact": (">=", 0.95), "tool_answer_grounded": (">=", 0.85),
                "tool_false_call_rate": ("<=", 0.02), "stopped_share": (">=", 1.0)}
MEAN_TARGETS = {"tool_answer_grounded": (">=", 0.9)}
TABLE_KEYS = ("tool_args_exact", "tool_answer_grounded", "type_answer_other_field", "tool_false_call_rate", "stopped_share")
COPYING = 0.5  # tool_args_exact at which copying names "has arrived" (the curves jump from ~0 to ~1)


def _meets(value, target) -> bool:
    op, bound = target
    return value is not None and (value >= bound if op == ">=" else value <= bound)


def copy_step(path: Path):
    """The first checkpoint step whose tool_args_exact reaches COPYING, or None (no curve, or never)."""
    if not path.is_file():
        return None
    points = sorted((metric(r, "step", path), metric(r, "tool_args_exact", path)) for r in summaries(path) if "step" in r)
    return next((step for step, value in points if value is not None and value >= COPYING), None)


def seed_table(outs: list) -> str:
    """A Markdown table of the demo folders `outs` (one, or several runs of other seeds): one row per seed
    (eval-sN.json: the final model; curve-sN.jsonl: the step at which copying arrived), then min, mean and max, and
    whether the targets are met."""
    found = {}
    for out in outs:
        runs = [(int(m.group(1)), p) for p in out.glob("eval-s*.json") if (m := re.fullmatch(r"eval-s(\d+)\.json", p.name))]
        if not runs:
            raise SystemExit(f"错误：{out} 里没有 eval-s*.json，这是 tool_demo.sh 的输出目录吗？/ Error: {out} holds no "
                             "eval-s*.json: is it a tool_demo.sh output folder?")
        for seed, path in runs:
            if seed in found:
                raise SystemExit(f"错误：种子 {seed} 同时在 {found[seed].parent} 和 {out} 里，每个种子只能给一次 / Error: seed "
                                 f"{seed} is in both {found[seed].parent} and {out}; give each seed once")
            found[seed] = path
    rows = [(seed, summaries(path)[-1], copy_step(path.parent / f"curve-s{seed}.jsonl"), path)
            for seed, path in sorted(found.items())]
    header = "| 种子 / seed | " + " | ".join(f"`{k}`" for k in TABLE_KEYS) + " | 学会抄名字的步 / copying from step |"
    lines = [header, "|" + "---|" * (len(TABLE_KEYS) + 2)]
    show = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    for seed, summary, step, path in rows:
        values = [metric(summary, k, path) for k in TABLE_KEYS]
        lines.append(f"| {seed} | " + " | ".join(show(v) for v in values) + f" | {step if step is not None else '—'} |")
    for label, fold in (("最小 / min", min), ("平均 / mean", statistics.mean), ("最大 / max", max)):
        cells = []
        for k in TABLE_KEYS:
            values = [metric(s, k, p) for _, s, _, p in rows if s.get(k) is not None]
            cells.append(show(fold(values)) if values else "—")
        lines.append(f"| {label} | " + " | ".join(cells) + " | |")
    missed = [f"seed {seed} {k}" for seed, summary, _, path in rows for k, t in SEED_TARGETS.items()
              if not _meets(metric(summary, k, path), t)]
    for k, t in MEAN_TARGETS.items():
        values = [metric(s, k, p) for _, s, _, p in rows if s.get(k) is not None]
        if not values or not _meets(statistics.mean(values), t):
            missed.append(f"mean {k}")
    targets = ", ".join(f"{k} {op} {b}" for k, (op, b) in SEED_TARGETS.items())
    verdict = ("全部达到 / all met" if not missed else "未达到 / missed: " + ", ".join(missed))
    lines += ["", f"目标 / targets: 每个种子 / every seed {targets}; 平均 / mean tool_answer_grounded >= 0.9 — {verdict}"]
    return "\n".join(lines) + "\n"


def curve(paths: list, out: Path, key: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for path in paths:
        rows = summaries(path)
        if not all("step" in r for r in rows):
            raise SystemExit(f"错误：{path} 不是学习曲线文件（有的行没有 \"step\"），请给 tool_demo.sh 写的 curve-s*.jsonl / "
                             f"Error: {path} is not a curve file (a line has no \"step\"); give the curve-s*.jsonl "
                             "that tool_demo.sh writes")
        points = sorted((metric(r, "step", path), metric(r, key, path)) for r in rows if r.get(key) is not None)
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o", label=path.stem)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{key} (held-out real Pokemon)")  # ASCII: default fonts have no CJK glyphs
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Tool use of a tiny ChatGLM3 on Pokemon it never saw")
    fig.tight_layout()
    image = io.BytesIO()  # rendered first, then written whole: a failure never leaves half a picture
    fig.savefig(image, format=out.suffix.lstrip(".").lower() or "png")
    write_atomic(out, image.getvalue())
    print(f"曲线已保存 / curve saved: {out}")


def check_curve_output(files: list, out: Path) -> None:
    """The project's one output check (chatglm3.output_files): --out is no input (links included) and can be a file."""
    from chatglm3.output_files import check_outputs

    try:
        check_outputs([("FILES", f) for f in files], {"--out": out})
    except ChatGLMError as e:
        raise SystemExit(str(e)) from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("mean", allow_abbrev=False, help="各种子的平均 / mean over seeds")
    m.add_argument("files", nargs="+", type=Path)
    c = sub.add_parser("curve", allow_abbrev=False, help="学习曲线 / learning curve")
    c.add_argument("files", nargs="+", type=Path)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--key", default="tool_args_exact", choices=KEYS)
    t = sub.add_parser("table", allow_abbrev=False, help="每个种子一行，最小/平均/最大 / a row per seed, min/mean/max")
    t.add_argument("folders", nargs="+", type=Path,
                   help="tool_demo.sh 的输出目录，可以是分开跑的几个（种子不重复）/ the tool_demo.sh output folder, or several "
                        "run separately (no seed twice)")
    t.add_argument("--update-docs", type=Path, default=None, metavar="DOC",
                   help="把表写进 DOC 的 tool-demo-seeds 标记之间 / put the table between DOC's tool-demo-seeds markers")
    args = parser.parse_args(argv)
    if args.command == "curve":
        check_curve_output(args.files, args.out)
    if args.command == "mean":
        print(dumps(mean(args.files)))
    elif args.command == "table":
        table = seed_table(args.folders)
        print(table, end="")
        if args.update_docs:
            folders = " ".join(folder.name for folder in args.folders)
            command = f"python scripts/tool_report.py table {folders} --update-docs {args.update_docs}"
            try:
                replace_marked_block(args.update_docs, "tool-demo-seeds", f"`{command}`\n\n{table}")
            except ChatGLMError as e:
                raise SystemExit(str(e)) from None
    else:
        curve(args.files, args.out, args.key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
