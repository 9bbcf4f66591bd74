"""Reading and checking data files, the one place that does it: JSON lists or JSONL, each sample with its
"file:line" so every error and every skipped sample can be named.

Two sample formats, as upstream: multi-turn (see chatglm3.conversation) and input-output {"prompt", "response"}.
"""
import json
import re

from .conversation import CONVERSATION_KEY, SAMPLE_ROLES, TOOLS_KEY
from .errors import ChatGLMError

INPUT_OUTPUT_KEYS = ("prompt", "response")


class DataFormatError(ChatGLMError):
    """A training/evaluation data file or sample that cannot be used; the message names file:line and the fix."""


class Records(list):
    """Samples read from a file; `locations[i]` is "file:line" of sample i, used in later messages."""

    def __init__(self, samples, locations):
        super().__init__(samples)
        self.locations = list(locations)


def _type_name(value) -> str:
    return {dict: "object", list: "list", str: "string", bool: "bool", int: "number", float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def _not_a_string(record: dict, key: str) -> str:
    if key not in record:
        return f"缺少 \"{key}\"（字符串）/ missing \"{key}\" (a string)"
    got = _type_name(record[key])
    return f"\"{key}\" 应为字符串，实际是 {got} / \"{key}\" must be a string, got {got}"


# --- reading files -----------------------------------------------------------------------------------------------
_WS = re.compile(r"[ \t\n\r]*")


def _read_json_array(text: str, path: str) -> list[tuple[int, object]]:
    """Elements of a top-level JSON list, each with the line it starts on."""
    decoder = json.JSONDecoder()
    records, pos = [], _WS.match(text, text.index("[") + 1).end()
    if text.startswith("]", pos):
        return records
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path}:{e.lineno}: JSON 解析失败 / invalid JSON: {e.msg} (column {e.colno})") from None
        records.append((text.count("\n", 0, pos) + 1, value))
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


def read_json_records(path) -> list[tuple[int, object]]:
    """(line, value) for each sample of a JSON file holding a list, or of a JSONL file (blank lines skipped)."""
    path = str(path)
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except FileNotFoundError:
        raise DataFormatError(f"错误：找不到数据文件 {path} / Error: data file {path} not found") from None
    except IsADirectoryError:
        raise DataFormatError(f"错误：{path} 是目录，需要 .json 或 .jsonl 文件 / Error: {path} is a directory, expected a .json or .jsonl file") from None
    except UnicodeDecodeError as e:
        raise DataFormatError(f"错误：{path} 不是 UTF-8 文本（第 {e.start} 字节）/ Error: {path} is not UTF-8 text (byte {e.start}); re-save it as UTF-8") from None
    except OSError as e:
        raise DataFormatError(f"错误：无法读取 {path}：{e.strerror} / Error: cannot read {path}: {e.strerror}") from None

    if text.lstrip().startswith("["):
        return _read_json_array(text, path)
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((line_no, json.loads(line)))
        except json.JSONDecodeError as e:
            # A pretty-printed single object is a common mistake; say so instead of "line 1 is broken".
            if not records:
                try:
                    json.loads(text)
                except json.JSONDecodeError:
                    pass
                else:
                    raise DataFormatError(
                        f"{path}:1: 文件是单个 JSON 对象；需要 JSON 列表，或每行一个样本的 JSONL / the file is a single JSON "
                        "object; expected a JSON list of samples or JSONL (one sample per line)"
                    ) from None
            raise DataFormatError(f"{path}:{line_no}: JSON 解析失败 / invalid JSON: {e.msg} (column {e.colno})") from None
    return records


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


def check_input_output(sample, where: str) -> None:
    if not isinstance(sample, dict):
        raise DataFormatError(f"{where}: 样本应为 JSON 对象，实际是 {_type_name(sample)} / a sample must be a JSON object, got {_type_name(sample)}")
    for key in INPUT_OUTPUT_KEYS:
        if not isinstance(sample.get(key), str):
            raise DataFormatError(f"{where}: {_not_a_string(sample, key)}")


def _load(path, check) -> Records:
    records = read_json_records(path)
    if not records:
        raise DataFormatError(f"错误：{path} 中没有样本 / Error: {path} holds no samples")
    locations = [f"{path}:{line}" for line, _ in records]
    for where, (_, sample) in zip(locations, records):
        check(sample, where)
    return Records([sample for _, sample in records], locations)


def load_conversations(path) -> Records:
    """Multi-turn samples from a JSON list or JSONL file, every sample checked; errors name file:line."""
    return _load(path, check_conversation)


def load_input_output(path) -> Records:
    """{"prompt", "response"} samples from a JSON list or JSONL file, every sample checked."""
    return _load(path, check_input_output)


def as_records(samples, check) -> Records:
    """Records as they are (load_* checked them); any other list of samples is checked now, named by position."""
    if isinstance(samples, Records):
        return samples
    locations = [f"第 {i + 1} 条样本 / sample {i + 1}" for i in range(len(samples))]
    for sample, where in zip(samples, locations):
        check(sample, where)
    return Records(samples, locations)
