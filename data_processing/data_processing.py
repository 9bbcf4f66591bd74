#!/usr/bin/env python
"""把宝可梦表格（CSV）转换成 ChatGLM3 多轮对话训练数据 / Turn a Pokémon table (CSV) into ChatGLM3 multi-turn
conversations.

The table has one row per Pokémon with the columns 姓名,属性,弱点,特征,数据 (name, types, weaknesses, ability,
description; names configurable). The script reads UTF-8 (with or without BOM) or GBK/GB18030, checks every row,
normalises the types, derives the weaknesses from the type chart and writes a JSON list of
{"conversations": [...]}. Every row ends up in a conversation or in the printed report (and in --report FILE).

Importable API:
- `load_table(path, ...) -> PokemonTable`, `lookup_pokemon(table, name) -> dict` (the tool observation),
- `split_types(text)`, `weaknesses(types)` (from pokemon_types),
- `seed_conversation(...)`, `rich_conversation(...)`, `build_samples(...)`, `split_dev(...)`, `main(argv)`.
"""
import argparse
import csv
import hashlib
import io
import json
import os
import random
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # so that `pokemon_types` imports however this module was loaded
    sys.path.insert(0, str(HERE))

from pokemon_types import TYPES, UnknownTypeError, clean_text, split_types, weaknesses  # noqa: E402

__all__ = ["TYPES", "split_types", "weaknesses", "DataError", "PokemonRow", "PokemonTable", "read_text",
           "load_table", "lookup_pokemon", "seed_conversation", "rich_conversation", "build_samples",
           "split_dev", "write_atomic", "main"]

REPO = HERE.parent
DEFAULT_INPUT = HERE / "data.csv"
DEFAULT_OUTPUT = REPO / "finetune_chatmodel_demo" / "formatted_data" / "pokemon_data.json"

# Column roles and their default header names (the original project's schema).
COLUMNS = {"name": "姓名", "types": "属性", "weaknesses": "弱点", "ability": "特征", "description": "数据"}
# Other header names accepted for a role when the user did not name the column explicitly.
COLUMN_ALIASES = {  # simplified, traditional, English
    "name": ["名字", "名称", "宝可梦", "名稱", "寶可夢", "name", "pokemon"],
    "types": ["类型", "屬性", "類型", "type", "types"],
    "weaknesses": ["弱點", "weakness", "weaknesses"],
    "ability": ["特性", "特徵", "ability", "abilities"],
    "description": ["描述", "介绍", "简介", "數據", "介紹", "簡介", "description"],
}
COLUMN_FLAGS = {"name": "--name-col", "types": "--type-col", "weaknesses": "--weakness-col",
                "ability": "--ability-col", "description": "--desc-col"}
# Cell values that crawlers and pandas write for "no value".
_NULL_WORDS = {"nan", "none", "null"}

REASONS = {  # reason code -> bilingual label used in the printed report
    "blank_line": "空行 / blank line",
    "repeated_header": "重复的表头行 / repeated header row",
    "empty_name": "名字为空 / empty name",
    "duplicate_name": "名字重复（保留第一次出现的行） / duplicate name (first row kept)",
    "missing_cells": "缺少单元格 / missing cells",
    "too_many_cells": "单元格过多（含逗号的单元格请加英文引号） / too many cells (quote cells containing commas)",
    "bad_quote": "引号未闭合，多行被并成一个单元格 / unclosed quote merged several lines into one cell",
    "unknown_type": "未知属性 / unknown type",
    "too_many_types": "属性超过两种 / more than two types",
    "bad_weakness": "弱点中有未知属性 / unknown type in weaknesses",
    # The two below keep the row.
    "partial": "部分单元格为空，对话中省略这些话题（已保留） / some optional cells empty, topics omitted (kept)",
    "cleaned": "清理了爬虫残留的 nan（已保留） / removed a stray 'nan' left by a crawler (kept)",
}
KEPT_REASONS = {"partial", "cleaned"}


class DataError(ValueError):
    """A problem with the input or the options; the message is one line naming the file, line and fix."""


@dataclass
class PokemonRow:
    """One usable table row. `raw` holds the cells exactly as written, keyed by role."""
    line: int
    name: str
    raw: dict
    types: list = None  # canonical types, None when not normalised (seed style as written)
    weaknesses: list = None  # ×2 and ×4, chart order (or the CSV's list with keep_weaknesses)
    quad_weaknesses: list = None  # ×4 only; None when weaknesses come from the CSV
    ability: str = ""
    description: str = ""


@dataclass
class PokemonTable:
    """A checked table: usable rows, every problem found (`issues`), and how it was read."""
    path: Path
    encoding: str
    columns: dict
    rows: list = field(default_factory=list)
    issues: list = field(default_factory=list)  # dicts: line, name, reason, detail, skipped
    records: int = 0  # data records read (header and blank lines not counted)

    @property
    def skipped(self):
        return [i for i in self.issues if i["skipped"] and i["reason"] != "blank_line"]

    def by_name(self):
        return {row.name: row for row in self.rows}


# ---------------------------------------------------------------------------------------------- reading

def _line_of(raw, offset):
    """1-based line number and 1-based byte column of a byte offset."""
    line_start = raw.rfind(b"\n", 0, offset) + 1
    return raw.count(b"\n", 0, offset) + 1, offset - line_start + 1


def _looks_like_gbk(text):
    """True when the non-ASCII characters are mostly common simplified Chinese (GB2312). Text in another
    8-bit encoding (Big5, Shift-JIS, Latin-1) usually decodes as GB18030 too, but into rare characters."""
    non_ascii = [ch for ch in text if ord(ch) > 127]
    if not non_ascii:
        return True
    common = 0
    for ch in non_ascii:
        try:
            ch.encode("gb2312")
            common += 1
        except UnicodeEncodeError:
            pass
    return common >= 0.9 * len(non_ascii)


def read_text(path, encoding="auto"):
    """Read a text file and return (text, encoding label).

    encoding="auto" accepts UTF-8 (with or without BOM) and GBK/GB18030; anything else is a DataError that
    names the line. Any Python codec name forces that encoding.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"错误：找不到文件 {path} / Error: file {path} not found")
    if path.is_dir():
        raise DataError(f"错误：{path} 是目录，不是文件 / Error: {path} is a directory, not a file")
    raw = path.read_bytes()
    if not raw.strip(b" \t\r\n\xef\xbb\xbf"):
        raise DataError(f"错误：文件 {path} 是空的 / Error: file {path} is empty")

    if encoding != "auto":
        try:
            return raw.decode(encoding), encoding
        except LookupError:
            raise DataError(f"错误：不认识的编码 {encoding} / Error: unknown encoding {encoding!r}") from None
        except UnicodeDecodeError as e:
            line, col = _line_of(raw, e.start)
            raise DataError(f"错误：{path} 第 {line} 行第 {col} 字节无法按 {encoding} 解码 / "
                            f"Error: {path} line {line}, byte {col}: cannot decode as {encoding}") from None

    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in raw:
        raise DataError(f"错误：{path} 看起来是 UTF-16 或二进制文件；请另存为 UTF-8 / "
                        f"Error: {path} looks like UTF-16 or binary; save it as UTF-8")
    if raw.startswith(b"\xef\xbb\xbf"):
        try:
            return raw[3:].decode("utf-8"), "UTF-8 (BOM)"
        except UnicodeDecodeError as e:
            line, col = _line_of(raw, e.start + 3)
            raise DataError(f"错误：{path} 第 {line} 行第 {col} 字节不是合法的 UTF-8 / "
                            f"Error: {path} line {line}, byte {col}: invalid UTF-8") from None
    try:
        return raw.decode("utf-8"), "UTF-8"
    except UnicodeDecodeError as e:
        utf8_error = e.start
    # A file that is valid UTF-8 up to some point and then not is a mix of encodings, not GBK.
    if any(b > 0x7F for b in raw[:utf8_error]):
        line, col = _line_of(raw, utf8_error)
        raise DataError(f"错误：{path} 第 {line} 行第 {col} 字节不是合法的 UTF-8（前面的内容是 UTF-8，文件混用了编码）；"
                        f"请统一另存为 UTF-8 / Error: {path} line {line}, byte {col}: invalid UTF-8 after UTF-8 "
                        f"text (mixed encodings); save the whole file as UTF-8")
    try:
        text = raw.decode("gb18030")
    except UnicodeDecodeError as e:
        line, col = _line_of(raw, max(e.start, utf8_error))
        raise DataError(f"错误：{path} 第 {line} 行第 {col} 字节无法按 UTF-8 或 GBK 解码；请另存为 UTF-8 / "
                        f"Error: {path} line {line}, byte {col}: cannot decode as UTF-8 or GBK; "
                        f"save the file as UTF-8") from None
    if not _looks_like_gbk(text):
        line, col = _line_of(raw, utf8_error)
        raise DataError(f"错误：{path} 既不是 UTF-8 也不像 GBK（第 {line} 行起），请另存为 UTF-8，或用 --encoding "
                        f"指定编码 / Error: {path} is neither UTF-8 nor plausible GBK (from line {line}); save it "
                        f"as UTF-8 or name the encoding with --encoding")
    return text, "GBK/GB18030"


def _norm_header(cell):
    return clean_text(cell).lower()


def _pick_delimiter(header_line):
    """Choose the delimiter that makes the header split into the most known column names."""
    known = {_norm_header(n) for n in COLUMNS.values()}
    known.update(_norm_header(a) for names in COLUMN_ALIASES.values() for a in names)
    best, best_hits = ",", -1
    for delim in (",", "\t", ";", "|"):
        cells = next(csv.reader([header_line], delimiter=delim), [])
        hits = sum(_norm_header(c) in known for c in cells)
        if hits > best_hits:
            best, best_hits = delim, hits
    return best


def _resolve_columns(header, path, line, columns, explicit, needed):
    """Map each role to its index in the header. Required roles that are absent are a DataError."""
    normed = [_norm_header(c) for c in header]
    seen = {}
    for i, name in enumerate(normed):
        if name and name in seen:
            raise DataError(f"错误：{path} 第 {line} 行（表头）：列名「{header[i].strip()}」出现了两次 / "
                            f"Error: {path} line {line} (header): column {header[i].strip()!r} appears twice")
        seen[name] = i
    index = {}
    for role, col in columns.items():
        candidates = [col] if role in explicit else [col] + COLUMN_ALIASES[role]
        for cand in candidates:
            if _norm_header(cand) in seen:
                index[role] = seen[_norm_header(cand)]
                break
        else:
            if role in needed:
                found = "、".join(c.strip() for c in header if c.strip()) or "（无 / none）"
                hint_zh = hint_en = ""
                if len(header) == 1 and "，" in header[0]:
                    hint_zh, hint_en = "；表头用了中文逗号，请改用英文逗号", "; the header uses full-width commas (，), use ASCII commas"
                raise DataError(f"错误：{path} 第 {line} 行（表头）缺少必需的列「{col}」，找到的列：{found}；"
                                f"可用 {COLUMN_FLAGS[role]} 指定列名{hint_zh} / Error: {path} line {line} (header): "
                                f"required column {col!r} not found (columns: {found}); name it with "
                                f"{COLUMN_FLAGS[role]}{hint_en}")
    return index


def _is_blank(cells):
    return all(not c.strip() for c in cells)


def _cell(cells, index, role):
    i = index.get(role)
    if i is None or i >= len(cells):
        return None
    return cells[i]


def _is_empty(value):
    return value is None or not value.strip() or value.strip().lower() in _NULL_WORDS


def load_table(path=DEFAULT_INPUT, columns=None, encoding="auto", normalize=True, keep_weaknesses=False,
               required=("name", "types")):
    """Read and check a Pokémon table.

    columns: {role: header name} overrides for the roles name/types/weaknesses/ability/description (roles not
        given use COLUMNS, then COLUMN_ALIASES).
    normalize: parse types and weaknesses and clean the text cells; False keeps cells exactly as written
        (seed style) and only checks the structure.
    keep_weaknesses: take the weaknesses from the CSV (normalised) instead of deriving them from the types.
    required: roles whose column must exist and whose cells must be filled; other present columns are
        optional per row (an empty cell there omits that topic and is reported as "partial").
    Returns a PokemonTable; raises DataError for problems with the file as a whole.
    """
    path = Path(path)
    explicit = set(columns or {})
    columns = {**COLUMNS, **(columns or {})}
    required = set(required) | ({"weaknesses"} if keep_weaknesses else set())
    text, enc = read_text(path, encoding)

    header_text = next(l for l in re.split(r"\r\n|\r|\n", text) if l.strip())  # read_text rejected blank files
    delimiter = _pick_delimiter(header_text)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    table = PokemonTable(path=path, encoding=enc, columns=columns)
    index, header, first_line_of = None, None, {}
    prev_line = 0
    try:
        for cells in reader:
            start, end = prev_line + 1, reader.line_num
            prev_line = end
            if _is_blank(cells):
                table.issues.append(dict(line=start, name="", reason="blank_line", detail="", skipped=True))
                continue
            if index is None:
                header = cells
                index = _resolve_columns(cells, path, start, columns, explicit, required)
                table.columns = {role: header[i].strip() for role, i in index.items()}
                continue
            table.records += 1
            _check_row(table, cells, start, end, header, index, required, normalize, keep_weaknesses,
                       first_line_of, delimiter)
    except csv.Error as e:
        raise DataError(f"错误：{path} 第 {reader.line_num} 行：CSV 格式错误（{e}），可能有未闭合的引号 / "
                        f"Error: {path} line {reader.line_num}: malformed CSV ({e}), probably an unclosed "
                        f"quote") from None
    if index is None:
        raise DataError(f"错误：文件 {path} 是空的 / Error: file {path} is empty")
    return table


def _check_row(table, cells, start, end, header, index, required, normalize, keep_weaknesses,
               first_line_of, delimiter):
    """Validate one record; append a PokemonRow or an issue to `table`."""
    def skip(reason, detail, name=""):
        table.issues.append(dict(line=start, name=name, reason=reason, detail=detail, skipped=True))

    raw_name = _cell(cells, index, "name") or ""
    name = clean_text(raw_name) if normalize else raw_name
    if [_norm_header(c) for c in cells] == [_norm_header(c) for c in header]:
        return skip("repeated_header", "")
    if end > start and any("\n" in c and any(l.count(delimiter) >= len(header) - 1 for l in c.splitlines())
                           for c in cells):
        return skip("bad_quote", f"第 {start}-{end} 行 / lines {start}-{end}", clean_text(raw_name)[:20])
    extra = [c for c in cells[len(header):] if c.strip()]
    if extra:
        return skip("too_many_cells", f"表头 {len(header)} 列，这一行 {len(cells)} 列 / header has "
                    f"{len(header)} columns, this row {len(cells)}", clean_text(raw_name))
    if _is_empty(raw_name):
        return skip("empty_name", "")
    missing = [table.columns[r] for r in sorted(required & set(index), key=list(COLUMNS).index)
               if _is_empty(_cell(cells, index, r))]
    if missing:
        return skip("missing_cells", "、".join(missing), name)
    key = clean_text(raw_name)
    if key in first_line_of:
        return skip("duplicate_name", f"与第 {first_line_of[key]} 行重复 / same as line {first_line_of[key]}",
                    name)
    raw = {role: _cell(cells, index, role) for role in index}

    row = PokemonRow(line=start, name=name, raw=raw)
    if normalize:
        try:
            row.types = split_types(raw["types"])
        except UnknownTypeError as e:
            return skip("unknown_type", f"「{e.word}」（{raw['types'].strip()}）", name)
        if not row.types:
            return skip("unknown_type", f"「{raw['types'].strip()}」", name)
        if len(row.types) > 2:
            return skip("too_many_types", "、".join(row.types), name)
        if keep_weaknesses:
            try:
                row.weaknesses = split_types(raw["weaknesses"])
            except UnknownTypeError as e:
                return skip("bad_weakness", f"「{e.word}」（{raw['weaknesses'].strip()}）", name)
        else:
            row.weaknesses = weaknesses(row.types)
            row.quad_weaknesses = weaknesses(row.types, min_multiplier=4)
        for role in ("ability", "description"):
            value = raw.get(role)
            if not _is_empty(value):
                setattr(row, role, clean_text(value))
        # pandas-made crawls append "nan" for an empty part of a glued cell: "...不停地练习。nan".
        stray = re.search(r"(?<=[^A-Za-z])nan$", row.description)
        if stray:
            row.description = row.description[:stray.start()].rstrip()
            table.issues.append(dict(line=start, name=name, reason="cleaned", detail="数据 / description",
                                     skipped=False))
        empty = [table.columns[r] for r in ("ability", "description") if r in index and not getattr(row, r)]
        if empty:
            table.issues.append(dict(line=start, name=name, reason="partial", detail="、".join(empty),
                                     skipped=False))
    else:
        row.ability = raw.get("ability") or ""
        row.description = raw.get("description") or ""
    first_line_of[key] = start
    table.rows.append(row)


def lookup_pokemon(table, name):
    """The `pokedex_lookup` tool's answer for `name`: a dict of that row's facts (the observation used in the
    tool-calling training samples), or {"姓名": name, "错误": ...} when the table has no such Pokémon.
    `table` is a PokemonTable from load_table() (normalised)."""
    key = clean_text(str(name))
    row = next((r for r in table.rows if r.name == key), None)
    if row is None:
        return {"姓名": key, "错误": "图鉴中没有找到这只宝可梦"}  # model-facing, so Chinese only
    facts = {"姓名": row.name, "属性": list(row.types), "弱点": list(row.weaknesses)}
    if row.quad_weaknesses:
        facts["四倍弱点"] = list(row.quad_weaknesses)
    if row.ability:
        facts["特性"] = row.ability
    if row.description:
        facts["简介"] = row.description
    return facts


# ---------------------------------------------------------------------------------------------- dialogues

def seed_conversation(name, types, weakness, ability, description):
    """The original project's five-message conversation, values inserted exactly as given."""
    return {"conversations": [
        {"role": "system", "content": f"描述一个宝可梦：{name}。"},
        {"role": "user", "content": "它有什么特性和弱点？"},
        {"role": "assistant", "content": f"{name}的属性是{types}，弱点是{weakness}，特性是{ability}。"},
        {"role": "user", "content": "有更多的信息吗？"},
        {"role": "assistant", "content": description},
    ]}


SYSTEM_PROMPTS = ["你是一个熟悉宝可梦图鉴的助手。", "你是宝可梦百科助手，请根据图鉴回答问题。",
                  "你是一位宝可梦训练家的助手，回答要简洁准确。"]
QUESTIONS = {  # {s}: the Pokémon's name, or 它 in a follow-up turn
    "types": ["{s}是什么属性的？", "{s}的属性是什么？", "{s}属于哪种属性？", "请告诉我{s}的属性。",
              "{s}是哪个属性的宝可梦？"],
    "weaknesses": ["{s}的弱点是什么？", "{s}怕什么属性的招式？", "对付{s}用什么属性的招式效果好？",
                   "{s}被哪些属性克制？", "打{s}该用什么属性？"],
    "ability": ["{s}的特性是什么？", "{s}有什么特性？", "说说{s}的特性。", "{s}的特性叫什么？"],
    "description": ["介绍一下{s}。", "{s}是一只什么样的宝可梦？", "能多讲讲{s}吗？", "关于{s}还有什么信息？",
                    "给我讲讲{s}吧。"],
}


def _join(items):
    return "、".join(items)


def answer(topic, row, rng):
    """An assistant answer about one topic, stated from the row's facts only."""
    n = row.name
    if topic == "types":
        if len(row.types) == 2:
            a, b = row.types
            return rng.choice([f"{n}是{a}和{b}双属性的宝可梦。", f"{n}的属性是{a}、{b}。",
                               f"{n}同时拥有{a}和{b}两种属性。"])
        return rng.choice([f"{n}是{row.types[0]}属性的宝可梦。", f"{n}的属性是{row.types[0]}。",
                           f"{n}是单一{row.types[0]}属性的宝可梦。"])
    if topic == "weaknesses":
        if not row.weaknesses:
            return f"按属性相克来看，没有哪种属性的招式对{n}有2倍以上的效果。"
        w = _join(row.weaknesses)
        text = rng.choice([f"{n}的弱点是{w}。", f"{n}怕{w}属性的招式。",
                           f"用{w}属性的招式攻击{n}效果拔群。"])
        if row.quad_weaknesses:
            text += f"其中{_join(row.quad_weaknesses)}属性的招式对它有4倍效果。"
        return text
    if topic == "ability":
        return rng.choice([f"{n}的特性是{row.ability}。", f"{n}的特性是「{row.ability}」。"])
    d = row.description
    return rng.choice([d, f"关于{n}：{d}", f"简单介绍一下{n}：{d}"])


def rich_conversation(row, rng):
    """A 2-4 turn dialogue about one Pokémon (types, weaknesses, ability, description), the Pokémon named in
    the first user turn; phrasing, order and an occasional system prompt are drawn from `rng`."""
    topics = ["types", "weaknesses"] + [t for t in ("ability", "description") if getattr(row, t)]
    chosen = rng.sample(topics, rng.randint(2, min(4, len(topics))))
    messages = []
    if rng.random() < 0.2:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for turn, topic in enumerate(chosen):
        subject = row.name if turn == 0 or rng.random() < 0.3 else "它"
        messages.append({"role": "user", "content": rng.choice(QUESTIONS[topic]).format(s=subject)})
        messages.append({"role": "assistant", "content": answer(topic, row, rng)})
    return {"conversations": messages}


def build_samples(table, style="rich", seed=0, variants=1, normalize=False):
    """Conversations for every row of `table`: a list of (Pokémon name, sample).

    style="seed": the original five messages (cells as written unless `normalize`); style="rich": `variants`
    dialogues per Pokémon from rich_conversation, each seeded by (seed, name, variant) so that a row's
    dialogues do not depend on the other rows.
    """
    samples = []
    for row in table.rows:
        if style == "seed":
            if normalize:
                values = (row.name, _join(row.types), _join(row.weaknesses), row.ability, row.description)
            else:
                r = row.raw
                values = (r["name"], r["types"], r["weaknesses"], r["ability"], r["description"])
            samples.append((row.name, seed_conversation(*values)))
        else:
            for v in range(variants):
                samples.append((row.name, rich_conversation(row, random.Random(f"{seed}|{row.name}|{v}"))))
    return samples


def split_dev(names, ratio, seed=0):
    """The set of Pokémon names that go to the dev set: round(ratio * n) of the distinct names (at least one
    and at most n-1 when ratio > 0), chosen by a seeded hash so the split is deterministic."""
    distinct = sorted(set(names))
    if ratio <= 0 or len(distinct) < 2:
        return set()
    k = min(max(1, round(ratio * len(distinct))), len(distinct) - 1)
    ranked = sorted(distinct, key=lambda n: hashlib.sha256(f"{seed}|{n}".encode("utf-8")).hexdigest())
    return set(ranked[:k])


def write_atomic(path, text):
    """Write `text` to `path` through a temporary file in the same folder, so a failure leaves no half file."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"错误：输出路径 {path} 是目录 / Error: output path {path} is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------- command line

def _lines_text(issues, limit=10):
    lines = [str(i["line"]) for i in issues[:limit]]
    more = f" …（另有 {len(issues) - limit} 行 / {len(issues) - limit} more）" if len(issues) > limit else ""
    return ", ".join(lines) + more


def format_report(table):
    """Bilingual summary lines: problems by reason, with line numbers (first ten per reason)."""
    out = []
    for reason, label in REASONS.items():
        group = [i for i in table.issues if i["reason"] == reason]
        if not group:
            continue
        examples = "；".join(f"{i['line']}行 {i['name']} {i['detail']}".strip() for i in group[:3])
        out.append(f"  {label}: {len(group)}（行 / lines {_lines_text(group)}）例 / e.g. {examples}")
    return out


def build_parser():
    p = argparse.ArgumentParser(
        description="把宝可梦表格转换成 ChatGLM3 多轮对话数据（JSON 列表） / Convert a Pokémon table (CSV) into "
                    "ChatGLM3 multi-turn conversations (a JSON list of {\"conversations\": [...]}).")
    p.add_argument("--input", default=str(DEFAULT_INPUT),
                   help="输入 CSV（UTF-8 或 GBK，自动识别）；默认是自带的 data.csv / input CSV (UTF-8 or GBK, "
                        "detected); default: the bundled data.csv")
    p.add_argument("--output", default=str(DEFAULT_OUTPUT),
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
    p.add_argument("--encoding", default="auto",
                   help="输入编码，默认自动识别 UTF-8/GBK / input encoding (default: auto = UTF-8 or GBK)")
    for role, flag in COLUMN_FLAGS.items():
        p.add_argument(flag, dest=f"col_{role}", metavar="NAME",
                       help=f"「{COLUMNS[role]}」列的列名 / header of the {role} column "
                            f"(default: {COLUMNS[role]})")
    return p


def run(args):
    """Do the work for parsed arguments; return the lines to print. Raises DataError."""
    if not 0 <= args.dev_ratio < 1:
        raise DataError(f"错误：--dev-ratio 必须在 0 到 1 之间（不含 1），收到 {args.dev_ratio} / "
                        f"Error: --dev-ratio must be in [0, 1), got {args.dev_ratio}")
    if (args.dev_ratio > 0) != bool(args.dev_output):
        raise DataError("错误：--dev-ratio 和 --dev-output 需要一起使用 / Error: --dev-ratio and --dev-output "
                        "must be given together")
    if args.variants < 1:
        raise DataError(f"错误：--variants 至少为 1 / Error: --variants must be at least 1, got {args.variants}")
    input_path = Path(args.input)
    for out in filter(None, (args.output, args.dev_output, args.report)):
        if Path(out).resolve() == input_path.resolve():
            raise DataError(f"错误：输出文件 {out} 与输入文件相同 / Error: output {out} is the input file")

    columns = {role: getattr(args, f"col_{role}") for role in COLUMNS if getattr(args, f"col_{role}")}
    seed_style = args.style == "seed"
    normalize = args.normalize or not seed_style
    required = ("name", "types", "weaknesses", "ability", "description") if seed_style else ("name", "types")
    table = load_table(input_path, columns=columns, encoding=args.encoding, normalize=normalize,
                       keep_weaknesses=args.keep_weaknesses, required=required)
    samples = build_samples(table, style=args.style, seed=args.seed, variants=args.variants,
                            normalize=normalize)
    if not samples:
        first = {}
        for issue in table.skipped:
            first.setdefault(issue["reason"], issue)
        why = "; ".join(f"{REASONS[r]} ×{sum(j['reason'] == r for j in table.skipped)}（第 {i['line']} 行起 / "
                        f"from line {i['line']}）" for r, i in first.items())
        raise DataError(f"错误：{input_path} 没有可用的行，{table.records} 行全部被跳过 / Error: no usable rows in "
                        f"{input_path}, all {table.records} skipped: {why}")
    dev_names = split_dev([n for n, _ in samples], args.dev_ratio, args.seed)
    train = [s for n, s in samples if n not in dev_names]
    dev = [s for n, s in samples if n in dev_names]

    write_atomic(args.output, json.dumps(train, ensure_ascii=False, indent=2) + "\n")
    if args.dev_output:
        write_atomic(args.dev_output, json.dumps(dev, ensure_ascii=False, indent=2) + "\n")
    if args.report:
        write_atomic(args.report, json.dumps({"input": str(input_path), "rows_read": table.records,
                                              "rows_used": len(table.rows), "issues": table.issues},
                                             ensure_ascii=False, indent=2) + "\n")

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


def cli(build_parser, run, argv=None):
    """Parse argv, run, print the report; returns the exit status (0 ok, 1 bad input). Bad input gives a
    one-line message, never a traceback. Shared with format_tool_poke.py."""
    args = build_parser().parse_args(argv)
    try:
        lines = run(args)
    except DataError as e:
        print(e, file=sys.stderr)
        return 1
    except OSError as e:
        print(f"错误：{e.filename or ''} 读写失败：{e.strerror} / Error: cannot read or write "
              f"{e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


def main(argv=None):
    """Command-line entry point; returns the exit status (0 ok, 1 bad input)."""
    return cli(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
