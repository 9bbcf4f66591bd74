#!/usr/bin/env python
"""检查多轮对话数据并写成 ChatGLM3 微调用的 JSONL / Validate multi-turn conversations and write the JSONL that
finetune_chatmodel_demo trains on; with --tools, build tool-calling conversations (pokedex_lookup) instead.

Input (--path): the JSON list written by data_processing.py, or JSONL, one {"conversations": [...]} (optionally
with "tools") per sample. Every sample is checked against the ChatGLM3 schema; any problem stops the script with
the file, line and problem, and nothing is written.

Importable API: `read_samples(path)`, `validate_sample(sample) -> list[(zh, en)]`, `POKEDEX_TOOL`,
`tool_conversation(row, table, rng)`, `build_tool_samples(table, seed)`, `conversation_stats(samples)`,
`main(argv)`.
"""
import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import data_processing as dp  # noqa: E402
from data_processing import DataError  # noqa: E402

DEFAULT_OUTPUT = dp.REPO / "finetune_chatmodel_demo" / "formatted_data" / "pokemon_conversations.jsonl"
TEXT_ROLES = {"system", "user", "assistant", "observation"}
ROLES = TEXT_ROLES | {"tool"}

POKEDEX_TOOL = {
    "name": "pokedex_lookup",
    # Model-facing text (it goes into the system prompt), so Chinese only.
    "description": "查询宝可梦图鉴，返回这只宝可梦的属性、弱点、特性和简介",
    "parameters": {
        "type": "object",
        "properties": {"name": {"type": "string", "description": "宝可梦的中文名字，例如 皮卡丘"}},
        "required": ["name"],
    },
}
# Names that are in no Pokédex, for samples where the lookup finds nothing and the answer must say so.
UNKNOWN_NAMES = ["星光狐", "雷霆猫", "阿尔法兽", "冰晶鹿", "熔岩龟", "风铃鸟", "月影狼", "泡泡鲸"]


# ---------------------------------------------------------------------------------------------- reading

def _iter_json_list(text, path):
    """Yield (line, element) for each element of a top-level JSON array, with the line it starts on."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1

    def skip_ws(p):
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip_ws(pos)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        line = text.count("\n", 0, pos) + 1
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"错误：{path} 第 {e.lineno} 行第 {e.colno} 列：JSON 格式错误（{e.msg}） / "
                            f"Error: {path} line {e.lineno}, column {e.colno}: invalid JSON ({e.msg})") from None
        yield line, obj
        pos = skip_ws(pos)
        if pos < len(text) and text[pos] == ",":
            pos = skip_ws(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            if skip_ws(pos + 1) != len(text):
                line = text.count("\n", 0, pos + 1) + 1
                raise DataError(f"错误：{path} 第 {line} 行：列表结束后还有多余内容 / Error: {path} line {line}: "
                                f"extra content after the JSON list")
            return
        line = text.count("\n", 0, pos) + 1
        raise DataError(f"错误：{path} 第 {line} 行：JSON 列表中缺少逗号或 ] / Error: {path} line {line}: "
                        f"expected ',' or ']' in the JSON list")


def read_samples(path):
    """Read a JSON list or JSONL file of samples; return [(line, sample)]. Raises DataError for unreadable
    files and for JSON that is not a list of samples."""
    text, _ = dp.read_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        return list(_iter_json_list(text, path))
    if stripped.startswith("{"):
        samples = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue  # blank lines carry no sample
            try:
                samples.append((number, json.loads(line)))
            except json.JSONDecodeError as e:
                if number == 1 or not samples:
                    raise DataError(f"错误：{path} 第 {number} 行：不是一行一条的 JSONL，也不是 JSON 列表（{e.msg}）/ "
                                    f"Error: {path} line {number}: neither JSONL (one sample per line) nor a JSON "
                                    f"list ({e.msg})") from None
                raise DataError(f"错误：{path} 第 {number} 行：JSON 格式错误（{e.msg}） / Error: {path} line "
                                f"{number}: invalid JSON ({e.msg})") from None
        return samples
    line = text.count("\n", 0, len(text) - len(stripped)) + 1
    raise DataError(f"错误：{path} 第 {line} 行：应当是对话列表（JSON 列表或 JSONL） / Error: {path} line {line}: "
                    f"expected a list of conversations (a JSON list or JSONL)")


def validate_sample(sample):
    """Problems with one sample against the ChatGLM3 multi-turn schema: a list of (Chinese, English) message
    pairs, empty when the sample is fine."""
    if not isinstance(sample, dict):
        kind = type(sample).__name__
        return [(f"样本应当是含 conversations 的对象，实际是 {kind}",
                 f"a sample must be an object with \"conversations\", got {kind}")]
    problems = []
    if "tools" in sample and not isinstance(sample["tools"], list):
        problems.append(("tools 应当是列表", "\"tools\" must be a list"))
    conv = sample.get("conversations")
    if not isinstance(conv, list) or not conv:
        return problems + [("缺少非空的 conversations 列表", "missing a non-empty \"conversations\" list")]
    replies = 0
    for k, msg in enumerate(conv, 1):
        def bad(zh, en):
            problems.append((f"第 {k} 条消息：{zh}", f"message {k}: {en}"))
        if not isinstance(msg, dict):
            bad("应当是对象", "must be an object")
            continue
        role = msg.get("role")
        if role not in ROLES:
            bad(f"未知角色 {role!r}（可用 system/user/assistant/tool/observation）",
                f"unknown role {role!r} (use system/user/assistant/tool/observation)")
            continue
        if role in TEXT_ROLES and not isinstance(msg.get("content"), str):
            bad(f"{role} 的 content 应当是字符串", f"{role} \"content\" must be a string")
        if role == "system" and k != 1:
            bad("system 只能是第一条消息", "a system message must come first")
        if role == "assistant":
            replies += 1
            if "loss" in msg and not isinstance(msg["loss"], bool):
                bad("loss 应当是 true 或 false", "\"loss\" must be true or false")
        if role == "tool":
            replies += 1
            if not isinstance(msg.get("name"), str) or not msg.get("name"):
                bad("tool 缺少工具名 name", "tool entry without a \"name\"")
            if not isinstance(msg.get("parameters"), dict):
                bad("tool 的 parameters 应当是对象", "tool \"parameters\" must be an object")
            if "observation" not in msg:
                bad("tool 缺少 observation", "tool entry without an \"observation\"")
    if not replies:
        problems.append(("没有 assistant 或 tool 消息，无可训练内容", "no assistant or tool message to learn from"))
    return problems


# ---------------------------------------------------------------------------------------------- tool samples

LOOKUP_QUESTIONS = ["帮我查一下{n}的资料。", "查查图鉴：{n}。", "{n}的图鉴信息是什么？"]


def _summary(row, rng):
    """Every fact of the row in one answer."""
    return "".join(dp.answer(t, row, rng) if t != "description" else f"简介：{row.description}"
                   for t in ("types", "weaknesses", "ability", "description")
                   if t in ("types", "weaknesses") or getattr(row, t))


def tool_conversation(row, table, rng):
    """One tool-calling sample about `row`: the user asks, the assistant calls pokedex_lookup, the observation
    holds the row's facts (lookup_pokemon), the answer states them; sometimes a follow-up answered from the
    same observation."""
    topics = ["types", "weaknesses"] + [t for t in ("ability", "description") if getattr(row, t)]
    conv = []
    if rng.random() < 0.25:
        question, reply = rng.choice(LOOKUP_QUESTIONS).format(n=row.name), _summary(row, rng)
        topics = []
    else:
        topic = rng.choice(topics)
        topics.remove(topic)
        question, reply = rng.choice(dp.QUESTIONS[topic]).format(s=row.name), dp.answer(topic, row, rng)
    conv.append({"role": "user", "content": question})
    conv.append({"role": "tool", "name": POKEDEX_TOOL["name"], "parameters": {"name": row.name},
                 "observation": dp.lookup_pokemon(table, row.name)})
    conv.append({"role": "assistant", "content": reply})
    if topics and rng.random() < 0.5:
        topic = rng.choice(topics)
        conv.append({"role": "user", "content": rng.choice(dp.QUESTIONS[topic]).format(s="它")})
        conv.append({"role": "assistant", "content": dp.answer(topic, row, rng)})
    return {"tools": [POKEDEX_TOOL], "conversations": conv}


def not_found_conversation(name, table, rng):
    """A sample where the lookup finds nothing and the answer says so instead of inventing facts."""
    topic = rng.choice(list(dp.QUESTIONS))
    return {"tools": [POKEDEX_TOOL], "conversations": [
        {"role": "user", "content": rng.choice(dp.QUESTIONS[topic]).format(s=name)},
        {"role": "tool", "name": POKEDEX_TOOL["name"], "parameters": {"name": name},
         "observation": dp.lookup_pokemon(table, name)},
        {"role": "assistant", "content": f"图鉴里没有找到「{name}」，请确认名字是否写对。"},
    ]}


def build_tool_samples(table, seed=0):
    """One tool-calling sample per table row, plus one not-found sample per 20 rows (at least one), each seeded
    by (seed, name) so the output is deterministic."""
    samples = [tool_conversation(row, table, random.Random(f"{seed}|tool|{row.name}")) for row in table.rows]
    known = {row.name for row in table.rows}
    unknown = [n for n in UNKNOWN_NAMES if n not in known][:max(1, len(table.rows) // 20)]
    samples += [not_found_conversation(n, table, random.Random(f"{seed}|missing|{n}")) for n in unknown]
    return samples


# ---------------------------------------------------------------------------------------------- command line

def conversation_stats(samples):
    """Upstream's statistics: sample count and the distribution of conversation lengths (messages)."""
    lengths = Counter(len(s["conversations"]) for s in samples)
    return {"count": len(samples), "lengths": dict(sorted(lengths.items())),
            "with_tools": sum(1 for s in samples if s.get("tools"))}


def build_parser():
    p = argparse.ArgumentParser(
        description="检查对话数据并写成 JSONL（ChatGLM3 多轮格式）；--tools 生成调用 pokedex_lookup 工具的对话 / "
                    "Validate conversations and write JSONL in the ChatGLM3 multi-turn format; --tools builds "
                    "tool-calling conversations with a pokedex_lookup function instead.")
    p.add_argument("--path", help="对话数据：JSON 列表或 JSONL（默认是 data_processing.py 的输出；用 --tools 时只在给出时读取，"
                                  "并和工具对话一起写出） / conversations: "
                                  f"a JSON list or JSONL (default: {dp.DEFAULT_OUTPUT}); with --tools, only "
                                  "read when given, and then written together with the tool samples")
    p.add_argument("--output", default=str(DEFAULT_OUTPUT),
                   help="输出 JSONL，目录不存在会自动创建 / output JSONL, folder created if needed "
                        "(default: %(default)s)")
    p.add_argument("--tools", action="store_true",
                   help="改为根据 --table 生成工具调用对话（每行一条，另加少量查无此宝可梦的样本） / build "
                        "tool-calling samples from --table instead (one per row, plus a few not-found lookups)")
    p.add_argument("--table", default=str(dp.DEFAULT_INPUT),
                   help="--tools 使用的宝可梦表格 / the Pokémon table for --tools (default: the bundled data.csv)")
    p.add_argument("--seed", type=int, default=0, help="--tools 的随机种子 / random seed for --tools "
                                                       "(default: %(default)s)")
    p.add_argument("--encoding", default="auto", help="--table 的编码，默认自动识别 UTF-8/GBK / encoding of "
                                                      "--table (default: auto)")
    for role, flag in dp.COLUMN_FLAGS.items():
        p.add_argument(flag, dest=f"col_{role}", metavar="NAME",
                       help=f"--table 中「{dp.COLUMNS[role]}」列的列名 / header of the {role} column in --table")
    return p


def run(args):
    """Do the work for parsed arguments; return the lines to print. Raises DataError."""
    samples, lines = [], []
    path = args.path or (None if args.tools else str(dp.DEFAULT_OUTPUT))
    if path:
        if not Path(path).exists() and not args.path:
            raise DataError(f"错误：找不到文件 {path}；请先运行 data_processing.py 或用 --path 指定 / Error: file "
                            f"{path} not found; run data_processing.py first or pass --path")
        read = read_samples(path)
        errors = [f"错误：{path} 第 {line} 行：{zh} / Error: {path} line {line}: {en}"
                  for line, sample in read for zh, en in validate_sample(sample)]
        if errors:
            more = f"\n（共 {len(errors)} 个问题 / {len(errors)} problems in all）" if len(errors) > 10 else ""
            raise DataError("\n".join(errors[:10]) + more)
        samples += [s for _, s in read]
        lines.append(f"读取 {len(read)} 条对话（{path}）/ read {len(read)} conversations ({path})")
    if args.tools:
        columns = {r: getattr(args, f"col_{r}") for r in dp.COLUMNS if getattr(args, f"col_{r}")}
        table = dp.load_table(args.table, columns=columns, encoding=args.encoding)
        tool_samples = build_tool_samples(table, args.seed)
        for sample in tool_samples:  # built here, so a problem is a bug; check anyway before writing
            assert not validate_sample(sample), validate_sample(sample)
        samples += tool_samples
        skipped = table.skipped
        lines.append(f"表格 {args.table}：{table.records} 行，使用 {len(table.rows)} 行，跳过 {len(skipped)} 行 / "
                     f"table {args.table}: {table.records} rows, used {len(table.rows)}, skipped {len(skipped)}")
        lines += dp.format_report(table)
        lines.append(f"生成 {len(tool_samples)} 条工具调用对话 / built {len(tool_samples)} tool-calling "
                     f"conversations")
    if not samples:
        raise DataError(f"错误：{path} 里没有对话 / Error: no conversations in {path}")
    if Path(args.output).resolve() in {Path(p).resolve() for p in (path, args.table) if p}:
        raise DataError(f"错误：输出文件 {args.output} 与输入文件相同 / Error: output {args.output} is an input file")
    dp.write_atomic(args.output, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    stats = conversation_stats(samples)
    lines.append("错误数 / err_count: 0")
    lines.append(f"样本数 / train_examples: {stats['count']}（含工具 / with tools: {stats['with_tools']}）")
    lines.append(f"对话长度分布 / conversation distribution: {stats['lengths']}")
    lines.append(f"写出 → {args.output} / written to {args.output}")
    return lines


def main(argv=None):
    """Command-line entry point; returns the exit status (0 ok, 1 bad input)."""
    return dp.cli(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
