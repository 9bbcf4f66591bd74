"""Reading and checking data files, the one place that does it: JSON lists or JSONL, each sample with its
"file:line" so every error and every skipped sample can be named.

Two sample formats, as upstream: multi-turn (see chatglm3.model.conversation) and input-output {"prompt", "response"}.
A file may also be written in OpenAI's, ShareGPT's or Alpaca's format (chatglm3.data.formats converts it as it is
read; `data_format` "auto" detects it per file).
"""
import json
import os
import re

from chatglm3 import json_files, limits
from chatglm3.model.conversation import CONVERSATION_KEY, SAMPLE_ROLES, TOOLS_KEY, role_order_error
from chatglm3.data import formats
from chatglm3.errors import ChatGLMError
from chatglm3.json_files import type_name as _type_name

INPUT_OUTPUT_KEYS = ("prompt", "response")


class DataFormatError(ChatGLMError):
    """A training/evaluation data file or sample that cannot be used; the message names file:line and the fix."""


class Records(list):
    """Samples read from a file; `locations[i]` is "file:line" of sample i, used in later messages; `data_format`:
    the format the file was written in (chatglm3.data.formats), its samples converted to ours."""

    def __init__(self, samples, locations, data_format: str = "chatglm3"):
        super().__init__(samples)
        self.locations = list(locations)
        self.data_format = data_format


def _not_a_string(record: dict, key: str) -> str:
    if key not in record:
        return f"缺少 \"{key}\"（字符串）/ missing \"{key}\" (a string)"
    got = _type_name(record[key])
    return f"\"{key}\" 应为字符串，实际是 {got} / \"{key}\" must be a string, got {got}"


# --- reading files -----------------------------------------------------------------------------------------------
_WS = re.compile(r"[ \t\n\r]*")


def _read_json_array(text: str, path: str) -> list[tuple[int, object]]:
    """Elements of a top-level JSON list, each with the line it starts on (json_files.too_deep already ran)."""
    decoder = json.JSONDecoder(parse_constant=json_files.refuse_constant)
    records, pos = [], _WS.match(text, text.index("[") + 1).end()
    if text.startswith("]", pos):
        return records
    while True:
        line = text.count("\n", 0, pos) + 1
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}:{e.lineno}: JSON 解析失败 / invalid JSON: {e.msg} (column {e.colno})") from None
        except ValueError as e:  # NaN, a 5,000-digit integer
            raise DataFormatError(f"{path}:{line}: JSON 解析失败 / invalid JSON: {str(e).splitlines()[0]}") from None
        records.append((line, value))
        pos = _WS.match(text, end).end()
        if text.startswith(",", pos):
            pos = _WS.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            if _WS.match(text, pos + 1).end() != len(text):
                line = text.count("\n", 0, pos) + 1
                raise DataFormatError(f"{path}:{line}: 列表结束后还有内容 / unexpected text after the closing ']'")
            return records
        else:
            line = text.count("\n", 0, pos) + 1
            raise DataFormatError(f"{path}:{line}: 此处应为 ',' 或 ']' / expected ',' or ']' between samples")


def _read_records(path: str) -> list[tuple[int, object]]:
    text = json_files.read_text(path, json_files.DATA_LIMIT)  # a regular file or pipe, UTF-8, bounded
    if text.lstrip().startswith("["):
        deep = json_files.too_deep(text)
        if deep is not None:
            json_files.loads(text[:deep + 1], path)  # the one-line "nested deeper than" error, with its line
        records = _read_json_array(text, path)
        for line, value in records:
            json_files.check_unicode(value, f"{path}:{line}")
        return records
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((line_no, json_files.loads(line, path, first_line=line_no)))
        except json_files.JSONFileError:
            # A pretty-printed single object is a common mistake; say so instead of "line 1 is broken".
            if not records:
                try:
                    json_files.loads(text, path)
                except json_files.JSONFileError:
                    pass
                else:
                    raise DataFormatError(
                        f"{path}:1: 文件是单个 JSON 对象；需要 JSON 列表，或每行一个样本的 JSONL / the file is a single JSON "
                        "object; expected a JSON list of samples or JSONL (one sample per line)"
                    ) from None
            raise
    return records


def read_json_records(path) -> list[tuple[int, object]]:
    """(line, value) for each sample of a JSON file holding a list, or of a JSONL file (blank lines skipped).
    Every problem is one DataFormatError line naming file:line (chatglm3.json_files' checks)."""
    try:
        return _read_records(str(path))
    except json_files.JSONFileError as e:
        raise DataFormatError(str(e)) from None


def check_conversation(sample, where: str) -> None:
    """Raise DataFormatError, prefixed with `where`, unless `sample` is a valid multi-turn sample."""
    if not isinstance(sample, dict):
        raise DataFormatError(f"{where}: 样本应为 JSON 对象，实际是 {_type_name(sample)} / a sample must be a JSON object, got {_type_name(sample)}")
    conversations = sample.get(CONVERSATION_KEY)
    if conversations is None:
        raise DataFormatError(f"{where}: 缺少 \"{CONVERSATION_KEY}\" 列表 / missing the \"{CONVERSATION_KEY}\" list")
    if not isinstance(conversations, list) or not conversations:
        raise DataFormatError(
            f"{where}: \"{CONVERSATION_KEY}\" 应为非空列表，实际是 {_type_name(conversations)} / \"{CONVERSATION_KEY}\" must be a "
            f"non-empty list, got {_type_name(conversations) if conversations != [] else 'an empty list'}"
        )
    if TOOLS_KEY in sample and not isinstance(sample[TOOLS_KEY], list):
        raise DataFormatError(f"{where}: \"{TOOLS_KEY}\" 应为列表，实际是 {_type_name(sample[TOOLS_KEY])} / \"{TOOLS_KEY}\" must be a list, got {_type_name(sample[TOOLS_KEY])}")
    for j, message in enumerate(conversations):
        here = f"{where}: {CONVERSATION_KEY}[{j}]"
        if not isinstance(message, dict):
            raise DataFormatError(f"{here}: 消息应为 JSON 对象，实际是 {_type_name(message)} / a message must be a JSON object, got {_type_name(message)}")
        role = message.get("role")
        if role not in SAMPLE_ROLES:
            raise DataFormatError(f"{here}: 未知角色 {role!r}，应为 {' / '.join(SAMPLE_ROLES)} 之一 / unknown role {role!r}, expected one of {', '.join(SAMPLE_ROLES)}")
        if role == "tool":
            if not isinstance(message.get("name"), str) or not message["name"]:
                raise DataFormatError(f"{here}: tool 消息缺少 \"name\"（字符串）/ a tool message needs a \"name\" (string)")
            if not isinstance(message.get("parameters"), dict):
                raise DataFormatError(
                    f"{here}: tool 消息的 \"parameters\" 应为对象，实际是 {_type_name(message.get('parameters'))} / a tool message needs "
                    f"\"parameters\" (an object), got {_type_name(message.get('parameters'))}"
                )
        elif not isinstance(message.get("content"), str):
            raise DataFormatError(f"{here}: {_not_a_string(message, 'content')}")
        if "loss" in message and not isinstance(message["loss"], bool):
            raise DataFormatError(f"{here}: \"loss\" 应为 true 或 false，实际是 {message['loss']!r} / \"loss\" must be true or false, got {message['loss']!r}")
    # The order the server accepts is the order training and evaluation accept (conversation.role_order_error).
    wrong = role_order_error([message["role"] for message in conversations])
    if wrong is not None:
        raise DataFormatError(f"{where}: {CONVERSATION_KEY}[{wrong[0]}]: {wrong[1]}")


def check_input_output(sample, where: str) -> None:
    if not isinstance(sample, dict):
        raise DataFormatError(f"{where}: 样本应为 JSON 对象，实际是 {_type_name(sample)} / a sample must be a JSON object, got {_type_name(sample)}")
    for key in INPUT_OUTPUT_KEYS:
        if not isinstance(sample.get(key), str):
            raise DataFormatError(f"{where}: {_not_a_string(sample, key)}")


def _load(path, check, convert, data_format: str) -> Records:
    if data_format not in formats.CHOICES:
        raise DataFormatError(f"错误：未知数据格式 {data_format!r}，应为 {' / '.join(formats.CHOICES)} 之一 / Error: unknown data "
                              f"format {data_format!r}, expected one of {', '.join(formats.CHOICES)}")
    records = read_json_records(path)
    if not records:
        raise DataFormatError(f"错误：{path} 中没有样本 / Error: {path} holds no samples")
    multi_turn = check is check_conversation
    try:
        fmt = formats.detect_file(records, str(path), multi_turn) if data_format == "auto" else data_format
        locations = [f"{path}:{line}" for line, _ in records]
        samples = [convert(sample, fmt, where) for where, (_, sample) in zip(locations, records)]
    except formats.FormatError as e:
        raise DataFormatError(str(e)) from None
    for where, sample in zip(locations, samples):
        check(sample, where)
    return Records(samples, locations, fmt)


def load_conversations(path, data_format: str = "auto") -> Records:
    """Multi-turn samples from a JSON list or JSONL file, every sample checked; errors name file:line.
    `data_format`: "auto" (detected from the file) or one of chatglm3.data.formats.FORMATS."""
    return _load(path, check_conversation, formats.to_chatglm3, data_format)


def load_input_output(path, data_format: str = "auto") -> Records:
    """{"prompt", "response"} samples (or Alpaca's, see chatglm3.data.formats) from a JSON list or JSONL file,
    every sample checked."""
    return _load(path, check_input_output, formats.to_input_output, data_format)


def as_records(samples, check) -> Records:
    """Records as they are (load_* checked them); any other list of samples is checked now, named by position."""
    if isinstance(samples, Records):
        return samples
    locations = [f"第 {i + 1} 条样本 / sample {i + 1}" for i in range(len(samples))]
    for sample, where in zip(samples, locations):
        check(sample, where)
    return Records(samples, locations)


# --- several training files ----------------------------------------------------------------------------------------
def split_files(value: str) -> list[str]:
    """`a.jsonl,b.jsonl` -> the files (spaces around the commas dropped); a path that exists as it is stays one file
    (a file name with a comma keeps working)."""
    if os.path.exists(value) or "," not in value:
        return [value]
    files = [part.strip() for part in value.split(",")]
    if not all(files):
        raise DataFormatError(f"错误：{value!r} 中有空的文件名（多余的逗号？）/ Error: {value!r} has an empty file name (a stray comma?)")
    return files


def parse_weights(value, count: int, label: str, files_label: str) -> list[float] | None:
    """`3,1` -> [3.0, 1.0]: one positive finite number per file (chatglm3.limits); None or "" -> None. `label`
    and `files_label` name the flag or variable in the error."""
    if value is None or str(value).strip() == "":
        return None
    parts = [part.strip() for part in str(value).split(",")]
    if len(parts) != count:
        raise DataFormatError(f"错误：{label} 有 {len(parts)} 个权重，而 {files_label} 有 {count} 个文件；每个文件一个权重 / "
                              f"Error: {label} has {len(parts)} weights but {files_label} names {count} files: give one "
                              "weight per file")
    return [limits.POSITIVE.check(f"{label}[{i + 1}]", part) for i, part in enumerate(parts)]
