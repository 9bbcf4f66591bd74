#!/usr/bin/env python
"""工具演示的汇总与学习曲线 / The tool demo's summary over seeds and its learning curve.

    python scripts/tool_report.py mean OUT/eval-s0.json OUT/eval-s1.json       # mean of evaluate.py's JSON lines
    python scripts/tool_report.py curve OUT/curve-s0.jsonl OUT/curve-s1.jsonl --out curve.png

A curve file holds one JSON object per evaluated checkpoint: {"step": N, ...evaluate.py's summary}.
"""
import argparse
import json
import sys
from pathlib import Path

KEYS = ("tool_call_rate", "tool_false_call_rate", "tool_name_accuracy", "tool_args_exact", "tool_answer_grounded",
        "answer_types_correct", "stopped_share")


def read_json_lines(path: Path) -> list:
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise SystemExit(f"错误：无法读取 {path}：{e} / Error: cannot read {path}: {e}") from None


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
    runs = [summaries(p)[-1] for p in paths]
    summary = {}
    for key in KEYS:
        values = [r[key] for r in runs if r.get(key) is not None]
        summary[key] = round(sum(values) / len(values), 4) if values else None
    summary["seeds"] = len(runs)
    return summary


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
        points = sorted((r["step"], r[key]) for r in rows if r.get(key) is not None)
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o", label=path.stem)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{key} (held-out real Pokemon)")  # ASCII: default fonts have no CJK glyphs
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Tool use of a tiny ChatGLM3 on Pokemon it never saw")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(f"曲线已保存 / curve saved: {out}")


def check_curve_output(files: list, out: Path) -> None:
    """The project's one output check (chatglm3.safe_io): --out is no input (links included) and can be a file.
    Imported here, not at the top: it brings torch, which `mean` does not need."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "finetune_chatmodel_demo"))
    from chatglm3.errors import ChatGLMError
    from chatglm3.safe_io import check_outputs

    try:
        check_outputs([("FILES", f) for f in files], {"--out": out})
    except ChatGLMError as e:
        raise SystemExit(str(e)) from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("mean", help="各种子的平均 / mean over seeds")
    m.add_argument("files", nargs="+", type=Path)
    c = sub.add_parser("curve", help="学习曲线 / learning curve")
    c.add_argument("files", nargs="+", type=Path)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--key", default="tool_args_exact", choices=KEYS)
    args = parser.parse_args(argv)
    if args.command == "curve":
        check_curve_output(args.files, args.out)
    if args.command == "mean":
        print(json.dumps(mean(args.files), ensure_ascii=False))
    else:
        curve(args.files, args.out, args.key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
