"""Reading and writing the JSON the project handles, the one place that does it: data files, config.json,
tokenizer_config.json, weight index files, trainer_state.json, DeepSpeed configs, tool schemas and arguments.

Every hostile input is one ChatGLMError line naming the file (and line or field), never a traceback:
- only regular files and pipes are read (a directory, a device such as /dev/zero behind a link, a socket are
  refused), at most `limit` bytes; a named pipe nobody writes to reads as empty instead of hanging;
- text must be UTF-8 (the error names the line of the first bad byte), and no string may hold a lone surrogate
  (`"\\ud800"`), which nothing downstream can encode;
- nesting deeper than MAX_DEPTH is refused before parsing (json's parser recurses: 100,000 brackets are a
  RecursionError), by a linear scan of the brackets outside strings;
- NaN/Infinity are refused unless the caller allows them (the Trainer writes NaN losses); huge integers are one
  line, not ValueError;
- `expect`/`field` check shapes: the top-level type and each field's type, named in the message.

`dumps` is the writer: non-finite numbers are refused (`allow_nan=False`), so no file gets a bare `NaN`.
"""
import json
import math
import os
import re
import stat
from itertools import accumulate
from typing import Iterator, Optional

from chatglm3.errors import ChatGLMError

MAX_DEPTH = 100  # ours nest 3-5 deep; a JSON-Schema tool definition rarely passes 10
METADATA_LIMIT = 256 * 2**20  # config.json, tokenizer_config.json, trainer_state.json, index files, DeepSpeed
DATA_LIMIT = 4 * 2**30  # a data file is held in memory as text and as samples


class JSONFileError(ChatGLMError):
    """A JSON file or value that cannot be used; the message names the file, line or field."""


def type_name(value) -> str:
    """JSON's name for the type of a parsed value (object, list, string, number, bool, null)."""
    return {dict: "object", list: "list", str: "string", bool: "bool", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


# --- bytes and text ----------------------------------------------------------------------------------------------
def read_bytes(path, limit: int = METADATA_LIMIT) -> bytes:
    """The content of a regular file or a pipe, at most `limit` bytes; anything else is one line."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise JSONFileError(f"错误：{path} 是目录，需要文件 / Error: {path} is a directory, expected a file")
    try:
        # Non-blocking open: a named pipe without a writer would otherwise block here for ever.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise JSONFileError(f"错误：找不到文件 {path} / Error: file {path} not found") from None
    except OSError as e:
        raise JSONFileError(f"错误：无法读取 {path}：{e.strerror} / Error: cannot read {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if stat.S_ISFIFO(mode):
            if hasattr(os, "set_blocking"):
                os.set_blocking(fd, True)  # a pipe with a writer is read to its end; without one it is empty
        elif not stat.S_ISREG(mode):
            raise JSONFileError(f"错误：{path} 不是普通文件（设备、目录或套接字）/ Error: {path} is not a regular file "
                                "(a device, directory or socket); give a file")
        elif os.fstat(fd).st_size > limit:
            raise JSONFileError(f"错误：{path} 超过 {limit // 2**20} MiB，不像是要读的文件 / Error: {path} is larger than "
                                f"{limit // 2**20} MiB; not a file this reads")
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise JSONFileError(f"错误：无法读取 {path}：{e.strerror} / Error: cannot read {path}: {e.strerror}") from None
    if len(data) > limit:
        raise JSONFileError(f"错误：{path} 超过 {limit // 2**20} MiB / Error: {path} is larger than {limit // 2**20} MiB")
    return data


def read_text(path, limit: int = METADATA_LIMIT) -> str:
    """UTF-8 text of a file (a leading BOM dropped); invalid UTF-8 is one line naming file:line."""
    data = read_bytes(path, limit)
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise JSONFileError(f"错误：{os.fspath(path)}:{line}: 不是 UTF-8 文本（第 {e.start} 字节），请另存为 UTF-8 / Error: "
                            f"{os.fspath(path)}:{line}: not UTF-8 text (byte {e.start}); re-save it as UTF-8") from None


def check_unicode(value, where: str) -> None:
    """Refuse a string (or a key or string anywhere inside lists and objects) holding a lone surrogate, e.g. from
    JSON's "\\ud800" or from a command line of invalid UTF-8: it cannot be encoded, tokenized or written."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as e:
                raise JSONFileError(f"错误：{where}: 文本含无法编码的字符 {item[e.start]!r}（第 {e.start + 1} 个字符，孤立的代理项或"
                                    f"无效的 UTF-8）/ Error: {where}: the text holds {item[e.start]!r} at character "
                                    f"{e.start + 1}, which is not valid Unicode (a lone surrogate or invalid UTF-8)") from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def string_values(value) -> Iterator[str]:
    """Every string value inside a JSON value (object values and list items, recursively, in order; keys not)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from string_values(item)
    elif isinstance(value, list):
        for item in value:
            yield from string_values(item)


# --- parsing -----------------------------------------------------------------------------------------------------
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def too_deep(text: str) -> Optional[int]:
    """Offset of the bracket that nests deeper than MAX_DEPTH (brackets inside strings do not count), else None.
    Linear, without recursion; the common case (few brackets) costs two counts."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return None
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    if max(accumulate(map(_STEP.__getitem__, brackets)), default=0) <= MAX_DEPTH:
        return None
    depth = 0
    for match in _TOKEN.finditer(text):  # only for the message: where it happens
        depth += _STEP.get(match.group(), 0)
        if depth > MAX_DEPTH:
            return match.start()
    return len(text)


def _where(where: str, line: Optional[int]) -> str:
    return where if line is None else f"{where}:{line}"


def refuse_constant(name):
    """parse_constant for json: NaN, Infinity and -Infinity are not JSON numbers."""
    raise ValueError(f"{name} is not a number JSON allows")


def loads(text: str, where: str, first_line: Optional[int] = None, allow_nan: bool = False):
    """Parse `text` (from `where`: a file, a flag or a field; its line `first_line` if it is one line of a file)
    with the checks above. Errors name where, and the line when `where` is a file."""
    line_of = (lambda pos: first_line) if first_line is not None else (lambda pos: text.count("\n", 0, pos) + 1)
    deep = too_deep(text)
    if deep is not None:
        raise JSONFileError(f"错误：{_where(where, line_of(deep))}: JSON 嵌套超过 {MAX_DEPTH} 层 / Error: "
                            f"{_where(where, line_of(deep))}: JSON nested deeper than {MAX_DEPTH} levels")
    try:
        value = json.loads(text, parse_constant=None if allow_nan else refuse_constant)
    except json.JSONDecodeError as e:
        here = _where(where, first_line if first_line is not None else e.lineno)
        raise JSONFileError(f"{here}: JSON 解析失败 / invalid JSON: {e.msg} (column {e.colno})") from None
    except (ValueError, RecursionError, MemoryError) as e:  # NaN refused, a 5,000-digit integer, ...
        here = _where(where, first_line)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise JSONFileError(f"{here}: JSON 解析失败 / invalid JSON: {reason}") from None
    if _SURROGATE_ESCAPE.search(text):
        check_unicode(value, _where(where, first_line))
    return value


def expect(value, kinds, where: str, name: Optional[str] = None):
    """`value` if it is of `kinds` (a type or tuple; bool never counts as a number, nor does NaN), else one line
    naming `where` and the field `name` (None: the top level)."""
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if isinstance(value, float) and not math.isfinite(value):
        ok = False
    if not ok:
        wanted = " / ".join(dict.fromkeys(type_name(k()) for k in kinds))
        got = repr(value) if isinstance(value, float) else type_name(value)
        zh, en = (f"字段 {name}", f"field {name}") if name else ("顶层", "the top level")
        raise JSONFileError(f"错误：{where}: {zh} 应为 {wanted}，实际是 {got} / Error: {where}: {en} must be {wanted}, "
                            f"got {got}")
    return value


def field(data: dict, name: str, kinds, where: str, default=...):
    """data[name] checked against `kinds`; a missing field is `default`, or an error when none is given."""
    if name not in data:
        if default is not ...:
            return default
        raise JSONFileError(f"错误：{where}: 缺少字段 {name} / Error: {where}: field {name} is missing")
    return expect(data[name], kinds, where, name)


def read_json(path, expect_type=dict, limit: int = METADATA_LIMIT, allow_nan: bool = False):
    """A JSON file whose top level is `expect_type` (dict: an object, list: a list, None: anything)."""
    where = os.fspath(path)
    value = loads(read_text(path, limit), where, allow_nan=allow_nan)
    if expect_type is not None:
        expect(value, expect_type, where)
    return value


# --- files of known shape ---------------------------------------------------------------------------------------
def read_weight_map(path) -> dict:
    """{tensor name: shard file name} of a `*.index.json`."""
    where = os.fspath(path)
    weight_map = field(read_json(path), "weight_map", dict, where)
    for key, shard in weight_map.items():
        expect(shard, str, where, f"weight_map[{key!r}]")
    return weight_map


def read_trainer_state(path) -> dict:
    """A Trainer's trainer_state.json: an object whose `log_history` is a list of objects (NaN losses allowed:
    the Trainer writes them) and whose `global_step`, when present, is an integer."""
    where = os.fspath(path)
    state = read_json(path, allow_nan=True)
    for i, entry in enumerate(field(state, "log_history", list, where)):
        expect(entry, dict, where, f"log_history[{i}]")
    field(state, "global_step", int, where, default=None)
    return state


# --- writing -----------------------------------------------------------------------------------------------------
def dumps(value, what: str = "JSON", **kwargs) -> str:
    """json.dumps that refuses NaN/Infinity (one line naming `what`) instead of writing a bare NaN no JSON reader
    accepts; non-ASCII kept."""
    kwargs.setdefault("ensure_ascii", False)
    try:
        return json.dumps(value, allow_nan=False, **kwargs)
    except ValueError:
        raise JSONFileError(f"错误：{what} 含 NaN 或无穷大，无法写成 JSON / Error: {what} holds NaN or infinity, which "
                            "JSON cannot hold") from None
