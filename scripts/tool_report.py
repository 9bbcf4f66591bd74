#!/usr/bin/env python
"""工具演示的汇总与学习曲线 / The tool demo's summary over seeds and its learning curve.

    python scripts/tool_report.py mean OUT/eval-s0.json OUT/eval-s1.json       # mean of evaluate.py's JSON lines
    python scripts/tool_report.py curve OUT/curve-s0.jsonl OUT/curve-s1.jsonl --out curve.png

A curve file holds one JSON object per evaluated checkpoint: {"step": N, ...evaluate.py's summary}.
"""
import argparse
import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "finetune_chatmodel_demo"))
from chatglm3.errors import ChatGLMError  # noqa: E402
from chatglm3.json_files import DATA_LIMIT, dumps, expect, loads, read_text  # noqa: E402  (the one JSON reader)
from chatglm3.output_files import write_atomic  # noqa: E402

KEYS = ("tool_call_rate", "tool_false_call_rate", "tool_name_accuracy", "tool_args_exact", "tool_answer_grounded",
        "answer_types_correct", "stopped_share")


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
    args = parser.parse_args(argv)
    if args.command == "curve":
        check_curve_output(args.files, args.out)
    if args.command == "mean":
        print(dumps(mean(args.files)))
    else:
        curve(args.files, args.out, args.key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
