"""从 trainer_state.json 画出训练损失曲线 / Plot the loss curve of a run from its trainer_state.json.

    python scripts/plot_loss.py output/pokemon-pt/checkpoint-1000/trainer_state.json --out loss.png
    python scripts/plot_loss.py RUN_DIR --out loss.png --original   # beside the original project's flat run
    python scripts/plot_loss.py RUN_A RUN_B --labels "LR 2e-2" "LR 2e-5" --out compare.png

RUN_DIR may be an output directory: its newest checkpoint-N/trainer_state.json (or its own) is used.
"""
import argparse
import io
import re
import sys
from pathlib import Path

import _bootstrap  # noqa: E402,F401  (puts the drop-in folder first on sys.path)

from chatglm3 import ChatGLMError  # noqa: E402
from chatglm3.json_files import read_trainer_state  # noqa: E402
from chatglm3.output_files import check_outputs, write_atomic  # noqa: E402

# The original project's P-Tuning v2 run (LR 2e-5, 1000 steps): its published trainer_state.json went from
# about 5.0 to 4.8. Only these two reported figures are drawn, as a straight reference line.
# Labels stay ASCII: common default fonts have no CJK glyphs.
ORIGINAL_RUN = {"steps": [0, 1000], "loss": [5.0, 4.8], "label": "original project: P-Tuning v2 of chatglm3-6b, LR 2e-5 (reported 5.0 -> 4.8)"}


def find_state(path: Path) -> Path:
    if path.is_file():
        return path
    if (path / "trainer_state.json").is_file():
        return path / "trainer_state.json"
    checkpoints = sorted(path.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(re.sub(r"\D", "", p.parent.name) or 0))
    if checkpoints:
        return checkpoints[-1]
    raise FileNotFoundError(f"{path}: 找不到 trainer_state.json / no trainer_state.json found")


def read_curves(state_file: Path) -> dict:
    """{'train': ([steps], [loss]), 'eval': ([steps], [loss])} from the Trainer's log_history."""
    history = read_trainer_state(state_file)["log_history"]  # shape checked: a list of objects
    curves = {"train": ([], []), "eval": ([], [])}
    for i, entry in enumerate(history):
        for key, name in (("loss", "train"), ("eval_loss", "eval")):
            if key in entry and "step" in entry:
                for field in ("step", key):  # numbers; a NaN loss (a diverged run) is drawn as a gap
                    if not isinstance(entry[field], (int, float)) or isinstance(entry[field], bool):
                        raise ChatGLMError(f"错误：{state_file}: log_history[{i}].{field} 应为数字，实际是 {entry[field]!r} / "
                                           f"Error: {state_file}: log_history[{i}].{field} must be a number, got {entry[field]!r}")
                curves[name][0].append(entry["step"])
                curves[name][1].append(entry[key])
    if not curves["train"][0]:
        raise ValueError(f"{state_file}: 没有记录损失 / no loss was logged (log more often: --logging_steps)")
    return curves


def plot(runs: list, out: Path, title: str, original: bool = False):
    """runs: [(label, curves)]; the label prefixes each run's lines when there are several."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("错误：需要 matplotlib 才能画图，请运行 pip install matplotlib / Error: plotting needs matplotlib: pip install matplotlib")
    fig, ax = plt.subplots(figsize=(7, 4.8), dpi=120)
    for label, curves in runs:
        prefix = f"{label}: " if len(runs) > 1 else ""
        ax.plot(*curves["train"], label=f"{prefix}train loss")
        if curves["eval"][0]:
            ax.plot(*curves["eval"], "o-", label=f"{prefix}eval loss (validation file)")
    if original:
        ax.plot(ORIGINAL_RUN["steps"], ORIGINAL_RUN["loss"], "--", color="gray", label=ORIGINAL_RUN["label"])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), fontsize=8, frameon=False)  # below: never over the curves
    fig.tight_layout()
    image = io.BytesIO()  # rendered first, then written whole: a failure never leaves half a picture
    fig.savefig(image, format=out.suffix.lstrip(".").lower() or "png")
    plt.close(fig)
    write_atomic(out, image.getvalue())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("state", type=Path, nargs="+", help="trainer_state.json 或输出目录（可多个）/ trainer_state.json or a run's output directory (several to compare)")
    p.add_argument("--labels", nargs="+", default=None, help="每个运行的图例名 / a legend label per run (default: the paths)")
    p.add_argument("--out", type=Path, default=Path("loss.png"), help="输出 PNG / output PNG (default loss.png)")
    p.add_argument("--title", default="Training loss", help="图标题 / plot title")
    p.add_argument("--original", action="store_true", help="同时画出原项目的平坦曲线 / also draw the original project's flat run")
    a = p.parse_args(argv)
    labels = a.labels or [str(s) for s in a.state]
    if len(labels) != len(a.state):
        p.error(f"--labels 需要 {len(a.state)} 个 / --labels needs one label per run ({len(a.state)})")
    try:
        states = [find_state(s) for s in a.state]
        runs = [(label, read_curves(state)) for label, state in zip(labels, states)]
        check_outputs([("STATE", state) for state in states], {"--out": a.out})  # a PNG never replaces a log
    except ChatGLMError as e:
        print(e, file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as e:
        print(f"错误 / Error: {e}", file=sys.stderr)
        return 1
    plot(runs, a.out, a.title, a.original)
    print(f"已写入 / wrote {a.out}")
    for state, (label, curves) in zip(states, runs):
        steps, losses = curves["train"]
        print(f"  {label} ({state}): loss {losses[0]:.3f} @ step {steps[0]} → {losses[-1]:.3f} @ step {steps[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
