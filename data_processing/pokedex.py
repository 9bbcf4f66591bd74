"""宝可梦表格：读取、检查、查询，以及 pokedex_lookup 工具 / The Pokémon table: reading, checking, looking up, and
the `pokedex_lookup` tool.

A table has one row per Pokémon with the columns 姓名,属性,弱点,特征,数据 (name, types, weaknesses, ability,
description; other header names accepted, see COLUMN_ALIASES). `load_table` reads UTF-8 (with or without BOM) or
GBK/GB18030, checks every row and records every problem with its line (`PokemonTable.issues`, summed up by
`format_report`); a problem with the file as a whole is a TableError naming the file and line.
`lookup_pokemon` is the observation the tool-calling training samples carry, and `pokedex_lookup` (a tool in
chatglm3's plug-in convention, offered by the plug-in file pokedex_tool.py) answers the model's calls with exactly
that observation, from the table $POKEDEX_TABLE names (default: data.csv beside this file).
"""
import csv
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from chatglm3 import json_files, register_tool
from chatglm3.errors import ChatGLMError
from chatglm3.tools import tool_of
from pokemon_types import UnknownTypeError, clean_text, split_types, weaknesses

__all__ = ["split_types", "weaknesses", "clean_text", "TableError", "PokemonRow", "PokemonTable", "read_text",
           "load_table", "format_report", "lookup_pokemon", "tool_table", "pokedex_lookup", "POKEDEX_TOOL"]

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


class TableError(ChatGLMError):
    """A problem with the table as a whole; the message is one line naming the file, line and fix."""


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

    encoding="auto" accepts UTF-8 (with or without BOM) and GBK/GB18030; anything else is a TableError that
    names the line. Any Python codec name forces that encoding.
    """
    path = Path(path)
    try:  # a regular file or a pipe, bounded: a link to /dev/zero is one line, not a read for ever
        raw = json_files.read_bytes(path, json_files.DATA_LIMIT)
    except json_files.JSONFileError as e:
        raise TableError(str(e)) from None
    if not raw.strip(b" \t\r\n\xef\xbb\xbf"):
        raise TableError(f"错误：文件 {path} 是空的 / Error: file {path} is empty")

    if encoding != "auto":
        try:
            return raw.decode(encoding), encoding
        except LookupError:
            raise TableError(f"错误：不认识的编码 {encoding} / Error: unknown encoding {encoding!r}") from None
        except UnicodeDecodeError as e:
            line, col = _line_of(raw, e.start)
            raise TableError(f"错误：{path} 第 {line} 行第 {col} 字节无法按 {encoding} 解码 / "
                             f"Error: {path} line {line}, byte {col}: cannot decode as {encoding}") from None

    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in raw:
        raise TableError(f"错误：{path} 看起来是 UTF-16 或二进制文件；请另存为 UTF-8 / "
                         f"Error: {path} looks like UTF-16 or binary; save it as UTF-8")
    if raw.startswith(b"\xef\xbb\xbf"):
        try:
            return raw[3:].decode("utf-8"), "UTF-8 (BOM)"
        except UnicodeDecodeError as e:
            line, col = _line_of(raw, e.start + 3)
            raise TableError(f"错误：{path} 第 {line} 行第 {col} 字节不是合法的 UTF-8 / "
                             f"Error: {path} line {line}, byte {col}: invalid UTF-8") from None
    try:
        return raw.decode("utf-8"), "UTF-8"
    except UnicodeDecodeError as e:
        utf8_error = e.start
    # A file that is valid UTF-8 up to some point and then not is a mix of encodings, not GBK.
    if any(b > 0x7F for b in raw[:utf8_error]):
        line, col = _line_of(raw, utf8_error)
        raise TableError(f"错误：{path} 第 {line} 行第 {col} 字节不是合法的 UTF-8（前面的内容是 UTF-8，文件混用了编码）；"
                         f"请统一另存为 UTF-8 / Error: {path} line {line}, byte {col}: invalid UTF-8 after UTF-8 "
                         f"text (mixed encodings); save the whole file as UTF-8")
    try:
        text = raw.decode("gb18030")
    except UnicodeDecodeError as e:
        line, col = _line_of(raw, max(e.start, utf8_error))
        raise TableError(f"错误：{path} 第 {line} 行第 {col} 字节无法按 UTF-8 或 GBK 解码；请另存为 UTF-8 / "
                         f"Error: {path} line {line}, byte {col}: cannot decode as UTF-8 or GBK; "
                         f"save the file as UTF-8") from None
    if not _looks_like_gbk(text):
        line, col = _line_of(raw, utf8_error)
        raise TableError(f"错误：{path} 既不是 UTF-8 也不像 GBK（第 {line} 行起），请另存为 UTF-8，或用 --encoding "
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
    """Map each role to its index in the header. Required roles that are absent are a TableError."""
    normed = [_norm_header(c) for c in header]
    seen = {}
    for i, name in enumerate(normed):
        if name and name in seen:
            raise TableError(f"错误：{path} 第 {line} 行（表头）：列名「{header[i].strip()}」出现了两次 / "
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
                raise TableError(f"错误：{path} 第 {line} 行（表头）缺少必需的列「{col}」，找到的列：{found}；"
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


def load_table(path, columns=None, encoding="auto", normalize=True, keep_weaknesses=False,
               required=("name", "types")):
    """Read and check a Pokémon table.

    columns: {role: header name} overrides for the roles name/types/weaknesses/ability/description (roles not
        given use COLUMNS, then COLUMN_ALIASES).
    normalize: parse types and weaknesses and clean the text cells; False keeps cells exactly as written
        (seed style) and only checks the structure.
    keep_weaknesses: take the weaknesses from the CSV (normalised) instead of deriving them from the types.
    required: roles whose column must exist and whose cells must be filled; other present columns are
        optional per row (an empty cell there omits that topic and is reported as "partial").
    Returns a PokemonTable; raises TableError for problems with the file as a whole.
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
        raise TableError(f"错误：{path} 第 {reader.line_num} 行：CSV 格式错误（{e}），可能有未闭合的引号 / "
                         f"Error: {path} line {reader.line_num}: malformed CSV ({e}), probably an unclosed "
                         f"quote") from None
    if index is None:
        raise TableError(f"错误：文件 {path} 是空的 / Error: file {path} is empty")
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
    if not normalize:
        row.ability = raw.get("ability") or ""
        row.description = raw.get("description") or ""
    elif not _normalize_row(table, row, keep_weaknesses):
        return
    first_line_of[key] = start
    table.rows.append(row)


def _normalize_row(table, row, keep_weaknesses):
    """Parse the row's types and weaknesses and clean its text cells; False (and an issue) when it is unusable."""
    def skip(reason, detail):
        table.issues.append(dict(line=row.line, name=row.name, reason=reason, detail=detail, skipped=True))
        return False

    raw = row.raw
    try:
        row.types = split_types(raw["types"])
    except UnknownTypeError as e:
        return skip("unknown_type", f"「{e.word}」（{raw['types'].strip()}）")
    if not row.types:
        return skip("unknown_type", f"「{raw['types'].strip()}」")
    if len(row.types) > 2:
        return skip("too_many_types", "、".join(row.types))
    if keep_weaknesses:
        try:
            row.weaknesses = split_types(raw["weaknesses"])
        except UnknownTypeError as e:
            return skip("bad_weakness", f"「{e.word}」（{raw['weaknesses'].strip()}）")
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
        table.issues.append(dict(line=row.line, name=row.name, reason="cleaned", detail="数据 / description",
                                 skipped=False))
    empty = [table.columns[r] for r in ("ability", "description") if r in table.columns and not getattr(row, r)]
    if empty:
        table.issues.append(dict(line=row.line, name=row.name, reason="partial", detail="、".join(empty),
                                 skipped=False))
    return True


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


def format_report(table):
    """Bilingual summary lines: problems by reason with their count and line numbers (first ten per reason)."""
    out = []
    for reason, label in REASONS.items():
        group = [i for i in table.issues if i["reason"] == reason]
        if not group:
            continue
        lines = ", ".join(str(i["line"]) for i in group[:10])
        if len(group) > 10:
            lines += f" …（另有 {len(group) - 10} 行 / {len(group) - 10} more）"
        examples = "；".join(f"{i['line']}行 {i['name']} {i['detail']}".strip() for i in group[:3])
        out.append(f"  {label}: {len(group)}（行 / lines {lines}）例 / e.g. {examples}")
    return out


# ---------------------------------------------------------------------------------------------- the tool

TABLE_ENV = "POKEDEX_TABLE"  # the table pokedex_lookup answers from (default: data.csv beside this file)
DEFAULT_TABLE = Path(__file__).resolve().with_name("data.csv")
_tool_tables = {}


def tool_table():
    """The table pokedex_lookup answers from: $POKEDEX_TABLE, else data.csv beside this file; read once. A bad
    table raises TableError (a ChatGLMError) naming the file and line."""
    path = os.environ.get(TABLE_ENV) or str(DEFAULT_TABLE)
    if path not in _tool_tables:
        _tool_tables[path] = load_table(path)
    return _tool_tables[path]


@register_tool
def pokedex_lookup(name: Annotated[str, "宝可梦的中文名字，例如 皮卡丘", True]) -> dict:
    """查询宝可梦图鉴，返回这只宝可梦的属性、弱点、特性和简介"""
    # Model-facing text (the docstring and the description go into the system prompt), so Chinese only.
    return lookup_pokemon(tool_table(), name)


# The tool as the tool-calling training samples offer it: the schema derived from the signature above, the one
# the plug-in (pokedex_tool.py) offers at inference.
POKEDEX_TOOL = tool_of(pokedex_lookup).schema
