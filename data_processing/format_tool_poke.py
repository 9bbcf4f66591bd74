#!/usr/bin/env python
"""检查多轮对话数据并写成 ChatGLM3 微调用的 JSONL / Validate multi-turn conversations and write the JSONL that
finetune_chatmodel_demo trains on; with --tools, build tool-calling conversations (pokedex_lookup) instead.

Input (--path): the JSON list written by data_processing.py, or JSONL, one {"conversations": [...]} (optionally
with "tools") per sample. Files are read and every sample checked by chatglm3.data.reader, the reader training uses: a
problem stops the script with the file, line and problem, and nothing is written.
"""
import argparse
import sys
from pathlib import Path

from cli_common import (DEFAULT_CONVERSATIONS, DEFAULT_JSONL, DEFAULT_TABLE, add_table_args, check_outputs, dumps,
                        run_cli, table_columns, write_atomic)
from chatglm3.data.reader import check_conversation, load_conversations
from chatglm3.errors import ChatGLMError
from dialogues import build_tool_samples, conversation_stats
from pokedex import format_report, load_table


def build_parser():
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        description="检查对话数据并写成 JSONL（ChatGLM3 多轮格式）；--tools 生成调用 pokedex_lookup 工具的对话 / "
                    "Validate conversations and write JSONL in the ChatGLM3 multi-turn format; --tools builds "
                    "tool-calling conversations with a pokedex_lookup function instead.")
    p.add_argument("--path", help="对话数据：JSON 列表或 JSONL（默认是 data_processing.py 的输出；用 --tools 时只在给出时读取，"
                                  "并和工具对话一起写出） / conversations: "
                                  f"a JSON list or JSONL (default: {DEFAULT_CONVERSATIONS}); with --tools, only "
                                  "read when given, and then written together with the tool samples")
    p.add_argument("--output", default=str(DEFAULT_JSONL),
                   help="输出 JSONL，目录不存在会自动创建 / output JSONL, folder created if needed "
                        "(default: %(default)s)")
    p.add_argument("--tools", action="store_true",
                   help="改为根据 --table 生成工具调用对话（每行一条，另加少量查无此宝可梦的样本） / build "
                        "tool-calling samples from --table instead (one per row, plus a few not-found lookups)")
    p.add_argument("--table", default=str(DEFAULT_TABLE),
                   help="--tools 使用的宝可梦表格 / the Pokémon table for --tools (default: the bundled data.csv)")
    p.add_argument("--seed", type=int, default=0, help="--tools 的随机种子 / random seed for --tools "
                                                       "(default: %(default)s)")
    add_table_args(p, zh_prefix="--table：", en_suffix=" of --table")
    return p


def tool_samples(args):
    """The tool-calling samples built from --table, and the report lines about the table."""
    table = load_table(args.table, columns=table_columns(args), encoding=args.encoding)
    samples = build_tool_samples(table, args.seed)
    for i, sample in enumerate(samples, 1):  # built here, so a problem is a bug; check anyway before writing
        check_conversation(sample, f"tool sample {i}")
    lines = [f"表格 {args.table}：{table.records} 行，使用 {len(table.rows)} 行，跳过 {len(table.skipped)} 行 / "
             f"table {args.table}: {table.records} rows, used {len(table.rows)}, skipped {len(table.skipped)}"]
    lines += format_report(table)
    lines.append(f"生成 {len(samples)} 条工具调用对话 / built {len(samples)} tool-calling conversations")
    return samples, lines


def run(args):
    """Do the work for parsed arguments; return the lines to print. Raises ChatGLMError."""
    samples, lines = [], []
    path = args.path or (None if args.tools else str(DEFAULT_CONVERSATIONS))
    check_outputs(inputs={"--path": path, "--table": args.table if args.tools else None}, outputs={"--output": args.output})
    if path:
        if not Path(path).exists() and not args.path:
            raise ChatGLMError(f"错误：找不到文件 {path}；请先运行 data_processing.py 或用 --path 指定 / Error: file "
                               f"{path} not found; run data_processing.py first or pass --path")
        samples += load_conversations(path)
        lines.append(f"读取 {len(samples)} 条对话（{path}）/ read {len(samples)} conversations ({path})")
    if args.tools:
        built, table_lines = tool_samples(args)
        samples += built
        lines += table_lines
    write_atomic(args.output, "".join(dumps(s, args.output) + "\n" for s in samples))
    stats = conversation_stats(samples)
    lines.append("错误数 / err_count: 0")
    lines.append(f"样本数 / train_examples: {stats['count']}（含工具 / with tools: {stats['with_tools']}）")
    lines.append(f"对话长度分布 / conversation distribution: {stats['lengths']}")
    lines.append(f"写出 → {args.output} / written to {args.output}")
    return lines


def main(argv=None):
    """Command-line entry point; returns the exit status (0 ok, 1 bad input)."""
    return run_cli(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
