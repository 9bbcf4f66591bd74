#!/usr/bin/env python
"""写出工具调用的训练集与留出评测集 / Write the tool-use training set and the held-out evaluation set.

The held-out real Pokémon (--held-out-ratio of the table, the same split as data_processing.py's --dev-ratio with
the same --seed) appear in no training sample; the training set teaches copying with --synthetic invented
Pokémon (see tool_data.py). Writes OUT/train.jsonl, OUT/heldout.jsonl, OUT/heldout_names.txt and
OUT/single_tokens.txt (the type names and name characters, for build_tiny_model.py --single-tokens).

With --check-tokenizer MODEL_DIR it writes nothing and checks that the model can write every held-out name: each
token of each held-out name's call (with that model's tokenizer) is one that some training reply teaches.
"""
import argparse
import json
import sys
from pathlib import Path

from cli_common import DEFAULT_TABLE, add_table_args, dumps, run_cli, table_columns, write_all_atomic
from chatglm3.json_files import DATA_LIMIT, read_text
from chatglm3.data.reader import check_conversation, load_conversations
from chatglm3.errors import ChatGLMError
from chatglm3.checkpoint.loading import load_tokenizer
from chatglm3.output_files import check_outputs
from pokedex import format_report, load_table
from tool_data import (build_eval_samples, build_training_samples, copy_units, held_out_names, mentioning,
                       unlearnt_name_tokens)


def build_parser():
    p = argparse.ArgumentParser(allow_abbrev=False, description="写出工具调用训练集与留出评测集 / Write the tool-use training set and the "
                                            "held-out evaluation set (see the module doc).")
    p.add_argument("--table", default=str(DEFAULT_TABLE), help="宝可梦表格 / the Pokémon table (default: data.csv)")
    p.add_argument("--out-dir", required=True, help="输出目录 / output folder (train.jsonl, heldout.jsonl, "
                                                    "heldout_names.txt)")
    p.add_argument("--synthetic", type=int, default=8000,
                   help="虚构宝可梦的数量 / number of invented Pokémon (default: %(default)s)")
    p.add_argument("--real-variants", type=int, default=4,
                   help="每只训练集宝可梦的查询对话和普通对话数 / lookups and ordinary conversations per real training "
                        "Pokémon (default: %(default)s)")
    p.add_argument("--max-pokemon", type=int, default=3,
                   help="每段查询对话最多问几只宝可梦（1 到该数，均匀）/ Pokémon asked about per lookup conversation, "
                        "1 to this many (default: %(default)s)")
    p.add_argument("--held-out-ratio", type=float, default=0.1,
                   help="留出（从不训练）的真实宝可梦比例 / share of real Pokémon held out of training "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="随机种子 / random seed (default: %(default)s)")
    p.add_argument("--check-tokenizer", metavar="MODEL_DIR",
                   help="只检查（不写文件）：该模型的分词器下，每个留出名字的调用里的每个 token 都有训练回复教过 / only "
                        "check (writes nothing) that with this model's tokenizer every token of every held-out "
                        "name's call is taught by some training reply in OUT/train.jsonl")
    add_table_args(p, zh_prefix="--table：", en_suffix=" of --table")
    return p


def check_tokenizer(args):
    """The --check-tokenizer report; a held-out name the model could not write is an error."""
    out = Path(args.out_dir)
    names_file = out / "heldout_names.txt"
    if not names_file.exists():  # a device or folder there is read_text's one line
        raise ChatGLMError(f"错误：找不到 {names_file}，请先不带 --check-tokenizer 运行一次 / Error: {names_file} not "
                           f"found; run once without --check-tokenizer first")
    names = [n for n in read_text(names_file, DATA_LIMIT).split() if n]  # a regular file, bounded, UTF-8
    missing = unlearnt_name_tokens(load_tokenizer(args.check_tokenizer), names, load_conversations(out / "train.jsonl"))
    if missing:
        shown = "；".join(f"{n}: {' '.join(p)}" for n, p in sorted(missing.items()))
        raise ChatGLMError(f"错误：{args.check_tokenizer} 的分词器下，这些留出名字含有训练中从未学过的 token（模型写不出）：{shown}；"
                           f"请只用训练集训练分词器，或增加 --synthetic / Error: with the tokenizer of "
                           f"{args.check_tokenizer}, these held-out names hold tokens no training reply teaches (the "
                           f"model cannot write them): {shown}; train the tokenizer on the training set only, or raise "
                           f"--synthetic")
    return [f"分词器 {args.check_tokenizer}：{len(names)} 个留出名字的调用 token 都有训练回复教过 / tokenizer of "
            f"{args.check_tokenizer}: every token of the {len(names)} held-out names' calls is taught in training"]


def run(args):
    if args.check_tokenizer:
        return check_tokenizer(args)
    if args.synthetic < 0 or args.real_variants < 1 or args.max_pokemon < 1 or not 0 < args.held_out_ratio < 1:
        raise ChatGLMError("错误：需要 --synthetic ≥ 0、--real-variants ≥ 1、--max-pokemon ≥ 1、0 < --held-out-ratio < 1 / Error: need "
                           "--synthetic >= 0, --real-variants >= 1, --max-pokemon >= 1 and 0 < --held-out-ratio < 1")
    out = Path(args.out_dir)
    outputs = {f"--out-dir {name}": out / name for name in ("train.jsonl", "heldout.jsonl", "heldout_names.txt",
                                                                   "single_tokens.txt")}
    check_outputs({"--table": args.table}, outputs)
    table = load_table(args.table, columns=table_columns(args), encoding=args.encoding)
    held_out = held_out_names(table, args.held_out_ratio, args.seed)
    train, counts = build_training_samples(table, held_out, args.synthetic, args.real_variants, args.max_pokemon,
                                           args.seed)
    evaluation = build_eval_samples(table, held_out, args.seed)
    leaks = mentioning(train, held_out)
    if leaks:  # a bug in tool_data.py, never the user's input
        raise ChatGLMError(f"错误：{len(leaks)} 条训练样本提到了留出的宝可梦 / Error: {len(leaks)} training samples "
                           f"mention a held-out Pokémon (first: sample {leaks[0] + 1})")
    for name, samples in (("train", train), ("heldout", evaluation)):
        for i, sample in enumerate(samples, 1):  # built here, so a problem is a bug; check anyway before writing
            check_conversation(sample, f"{name} sample {i}")
    # All or nothing: the four files belong together (a failure on the last leaves the others as they were).
    write_all_atomic({**{out / name: "".join(dumps(s, str(out / name)) + "\n" for s in samples)
                         for name, samples in (("train.jsonl", train), ("heldout.jsonl", evaluation))},
                      out / "heldout_names.txt": "".join(n + "\n" for n in sorted(held_out)),
                      out / "single_tokens.txt": "".join(u + "\n" for u in copy_units(table))})
    lines = [f"表格 {args.table}：使用 {len(table.rows)} 行，跳过 {len(table.skipped)} 行 / table {args.table}: "
             f"{len(table.rows)} rows used, {len(table.skipped)} skipped", *format_report(table),
             f"留出 {len(held_out)} 只真实宝可梦（不在任何训练样本中）/ held out {len(held_out)} real Pokémon (in no "
             f"training sample): {'、'.join(sorted(held_out))}",
             f"训练集 {len(train)} 条 / training samples: {len(train)} ({json.dumps(counts)}) → {out / 'train.jsonl'}",
             f"评测集 {len(evaluation)} 条 / evaluation samples: {len(evaluation)} → {out / 'heldout.jsonl'}"]
    return lines


def main(argv=None):
    """Command-line entry point; returns the exit status (0 ok, 1 bad input)."""
    return run_cli(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
