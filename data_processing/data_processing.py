#!/usr/bin/env python
"""把宝可梦表格（CSV）转换成 ChatGLM3 多轮对话训练数据 / Turn a Pokémon table (CSV) into ChatGLM3 multi-turn
conversations.

The table has one row per Pokémon with the columns 姓名,属性,弱点,特征,数据 (name, types, weaknesses, ability,
description; names configurable). The script reads UTF-8 (with or without BOM) or GBK/GB18030, checks every row,
normalises the types, derives the weaknesses from the type chart and writes a JSON list of
{"conversations": [...]}. Every row ends up in a conversation or in the printed report (and in --report FILE).
The table is read by pokedex.py, the dialogues are written by dialogues.py.
"""
import argparse
import sys
from pathlib import Path

from cli_common import (DEFAULT_CONVERSATIONS, DEFAULT_TABLE, add_table_args, check_outputs, dumps, run_cli,
                        table_columns, write_all_atomic)
from chatglm3.errors import ChatGLMError
from dialogues import build_samples, split_dev
from pokedex import REASONS, format_report, load_table


def build_parser():
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        description="把宝可梦表格转换成 ChatGLM3 多轮对话数据（JSON 列表） / Convert a Pokémon table (CSV) into "
                    "ChatGLM3 multi-turn conversations (a JSON list of {\"conversations\": [...]}).")
    p.add_argument("--input", default=str(DEFAULT_TABLE),
                   help="输入 CSV（UTF-8 或 GBK，自动识别）；默认是自带的 data.csv / input CSV (UTF-8 or GBK, "
                        "detected); default: the bundled data.csv")
    p.add_argument("--output", default=str(DEFAULT_CONVERSATIONS),
                   help="输出 JSON 文件 / output JSON file (default: %(default)s)")
    p.add_argument("--style", choices=["rich", "seed"], default="rich",
                   help="rich（默认）：多种问法、问题里点名宝可梦、2-4 轮；seed：原项目的五条消息格式，单元格原样写入 / "
                        "rich (default): varied 2-4 turn dialogues naming the Pokémon; seed: the original "
                        "project's five-message conversation with the cells as written")
    p.add_argument("--normalize", action="store_true",
                   help="seed 风格下也规范属性（草、毒）并按属性表推导弱点 / in seed style, also normalise types "
                        "and derive weaknesses (rich style always does)")
    p.add_argument("--keep-weaknesses", action="store_true",
                   help="使用表格里的弱点列（规范化后），而不是按属性表推导 / use the table's weakness column "
                        "(normalised) instead of deriving ×2/×4 weaknesses from the type chart")
    p.add_argument("--seed", type=int, default=0, help="随机种子：决定问法和话题 / random seed for phrasing and "
                                                       "topics (default: %(default)s)")
    p.add_argument("--variants", type=int, default=1,
                   help="rich 风格下每只宝可梦生成几段对话 / rich-style dialogues per Pokémon (default: %(default)s)")
    p.add_argument("--dev-ratio", type=float, default=0.0,
                   help="按宝可梦划分验证集的比例（0-1），需配合 --dev-output / fraction of Pokémon for a dev "
                        "set (no Pokémon in both); needs --dev-output")
    p.add_argument("--dev-output", help="验证集 JSON 文件 / dev set JSON file")
    p.add_argument("--report", help="把每个有问题的行（行号、原因）写成 JSON / write every problem row (line, "
                                    "reason) to this JSON file")
    add_table_args(p)
    return p


def check_options(args):
    """Raise ChatGLMError for options that cannot work together."""
    if not 0 <= args.dev_ratio < 1:
        raise ChatGLMError(f"错误：--dev-ratio 必须在 0 到 1 之间（不含 1），收到 {args.dev_ratio} / "
                           f"Error: --dev-ratio must be in [0, 1), got {args.dev_ratio}")
    if (args.dev_ratio > 0) != bool(args.dev_output):
        raise ChatGLMError("错误：--dev-ratio 和 --dev-output 需要一起使用 / Error: --dev-ratio and --dev-output "
                           "must be given together")
    if args.variants < 1:
        raise ChatGLMError(f"错误：--variants 至少为 1 / Error: --variants must be at least 1, got {args.variants}")
    check_outputs(inputs={"--input": args.input},
                  outputs={"--output": args.output, "--dev-output": args.dev_output, "--report": args.report})


def no_rows_error(table):
    """The error for a table none of whose rows is usable: how many were skipped for which reason, from where."""
    first = {}
    for issue in table.skipped:
        first.setdefault(issue["reason"], issue)
    why = "; ".join(f"{REASONS[r]} ×{sum(j['reason'] == r for j in table.skipped)}（第 {i['line']} 行起 / "
                    f"from line {i['line']}）" for r, i in first.items())
    return ChatGLMError(f"错误：{table.path} 没有可用的行，{table.records} 行全部被跳过 / Error: no usable rows in "
                        f"{table.path}, all {table.records} skipped: {why}")


def run(args):
    """Do the work for parsed arguments; return the lines to print. Raises ChatGLMError."""
    check_options(args)
    input_path = Path(args.input)
    seed_style = args.style == "seed"
    normalize = args.normalize or not seed_style
    required = ("name", "types", "weaknesses", "ability", "description") if seed_style else ("name", "types")
    table = load_table(input_path, columns=table_columns(args), encoding=args.encoding, normalize=normalize,
                       keep_weaknesses=args.keep_weaknesses, required=required)
    samples = build_samples(table, style=args.style, seed=args.seed, variants=args.variants,
                            normalize=normalize)
    if not samples:
        raise no_rows_error(table)
    dev_names = split_dev([n for n, _ in samples], args.dev_ratio, args.seed)
    train = [s for n, s in samples if n not in dev_names]
    dev = [s for n, s in samples if n in dev_names]

    # All or nothing: a failure on --report leaves an earlier --output as it was.
    outputs = {args.output: dumps(train, args.output, indent=2) + "\n"}
    if args.dev_output:
        outputs[args.dev_output] = dumps(dev, args.dev_output, indent=2) + "\n"
    if args.report:
        outputs[args.report] = dumps({"input": str(input_path), "rows_read": table.records, "rows_used": len(table.rows),
                                      "issues": table.issues}, args.report, indent=2) + "\n"
    write_all_atomic(outputs)

    skipped = table.skipped
    blank = [i for i in table.issues if i["reason"] == "blank_line"]
    lines = [f"读取 {table.records} 行数据（{input_path}，{table.encoding}）/ read {table.records} data rows "
             f"({input_path}, {table.encoding})",
             f"使用 {len(table.rows)} 行，跳过 {len(skipped)} 行，空行 {len(blank)} 个 / used {len(table.rows)} rows, "
             f"skipped {len(skipped)}, blank lines {len(blank)}"]
    lines += format_report(table)
    lines.append(f"写出 {len(train)} 条对话 → {args.output} / wrote {len(train)} conversations to {args.output}")
    if args.dev_output:
        lines.append(f"写出 {len(dev)} 条验证对话（{len(dev_names)} 只宝可梦）→ {args.dev_output} / wrote "
                     f"{len(dev)} dev conversations ({len(dev_names)} Pokémon) to {args.dev_output}")
    if args.report:
        lines.append(f"问题行清单 → {args.report} / problem rows listed in {args.report}")
    return lines


def main(argv=None):
    """Command-line entry point; returns the exit status (0 ok, 1 bad input)."""
    return run_cli(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
