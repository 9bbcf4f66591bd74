"""Training data for ChatGLM3: read and check JSON/JSONL files, turn samples into token ids and labels exactly as
upstream's finetune_chatmodel_demo does, then truncate, pad or pack them into batches.

Two formats, as upstream:
- multi-turn: {"tools": [...optional], "conversations": [{"role": "system" | "user" | "assistant", "content": str,
  "loss": bool (assistant only)}, {"role": "tool", "name": str, "parameters": {...}, "observation": any},
  {"role": "observation", "content": str}, ...]}
- input-output: {"prompt": str, "response": str}

Datasets tokenize once, at construction; each item is {"input_ids": [...], "labels": [...]} without padding, and
labels are aligned with input_ids (the model shifts them): label i is token i when token i-1 belongs to a
loss-bearing reply, else -100.
"""
import json
import re
from bisect import bisect_left, insort

import torch
from torch.utils.data import Dataset

from chatglm3.errors import ChatGLMError

CONVERSATION_KEY = "conversations"
TOOL_DESC_KEY = "tools"
TOOL_DEFINITION_PREFIX = "Answer the following questions as best as you can. You have access to the following tools:\n"
FUNCTION_CALL_NAME = "tool_call"
FUNCTION_CALL_PREFIX = "```python\n"
FUNCTION_CALL_POSTFIX = "\n```"
ROLES = ("system", "user", "assistant", "tool", "observation")
IGNORE_INDEX = -100


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


def _location(data, i: int) -> str:
    locations = getattr(data, "locations", None)
    return locations[i] if locations else f"第 {i + 1} 条样本 / sample {i + 1}"


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


def check_conversation(sample, where: str, conversation_key: str = CONVERSATION_KEY, tool_key: str = TOOL_DESC_KEY) -> None:
    """Raise DataFormatError, prefixed with `where`, unless `sample` is a valid multi-turn sample."""
    if not isinstance(sample, dict):
        raise DataFormatError(f"{where}: 样本应为 JSON 对象，实际是 {_type_name(sample)} / a sample must be a JSON object, got {_type_name(sample)}")
    conversations = sample.get(conversation_key)
    if conversations is None:
        raise DataFormatError(f"{where}: 缺少 \"{conversation_key}\" 列表 / missing the \"{conversation_key}\" list")
    if not isinstance(conversations, list) or not conversations:
        raise DataFormatError(
            f"{where}: \"{conversation_key}\" 应为非空列表，实际是 {_type_name(conversations)} / \"{conversation_key}\" must be a "
            f"non-empty list, got {_type_name(conversations) if conversations != [] else 'an empty list'}"
        )
    if tool_key in sample and not isinstance(sample[tool_key], list):
        raise DataFormatError(f"{where}: \"{tool_key}\" 应为列表，实际是 {_type_name(sample[tool_key])} / \"{tool_key}\" must be a list, got {_type_name(sample[tool_key])}")
    for j, message in enumerate(conversations):
        here = f"{where}: {conversation_key}[{j}]"
        if not isinstance(message, dict):
            raise DataFormatError(f"{here}: 消息应为 JSON 对象，实际是 {_type_name(message)} / a message must be a JSON object, got {_type_name(message)}")
        role = message.get("role")
        if role not in ROLES:
            raise DataFormatError(f"{here}: 未知角色 {role!r}，应为 {' / '.join(ROLES)} 之一 / unknown role {role!r}, expected one of {', '.join(ROLES)}")
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


def check_input_output(sample, where: str, prompt_key: str = "prompt", response_key: str = "response") -> None:
    if not isinstance(sample, dict):
        raise DataFormatError(f"{where}: 样本应为 JSON 对象，实际是 {_type_name(sample)} / a sample must be a JSON object, got {_type_name(sample)}")
    for key in (prompt_key, response_key):
        if not isinstance(sample.get(key), str):
            raise DataFormatError(f"{where}: {_not_a_string(sample, key)}")


def _load(path, check, **keys) -> Records:
    records = read_json_records(path)
    if not records:
        raise DataFormatError(f"错误：{path} 中没有样本 / Error: {path} holds no samples")
    locations = [f"{path}:{line}" for line, _ in records]
    for where, (_, sample) in zip(locations, records):
        check(sample, where, **keys)
    return Records([sample for _, sample in records], locations)


def load_conversations(path, conversation_key: str = CONVERSATION_KEY, tool_key: str = TOOL_DESC_KEY) -> Records:
    """Multi-turn samples from a JSON list or JSONL file, every sample checked; errors name file:line."""
    return _load(path, check_conversation, conversation_key=conversation_key, tool_key=tool_key)


def load_input_output(path, prompt_key: str = "prompt", response_key: str = "response") -> Records:
    """{"prompt", "response"} samples from a JSON list or JSONL file, every sample checked."""
    return _load(path, check_input_output, prompt_key=prompt_key, response_key=response_key)


# --- conversations -> ids and loss masks ---------------------------------------------------------------------------
def format_function_call(function_name: str, parameters: dict) -> str:
    """`name(k='v', n=1)`: Python call syntax with repr() values, as upstream's astunparse produced."""
    return f"{function_name}(" + ", ".join(f"{name}={value!r}" for name, value in parameters.items()) + ")"


def format_conversation(item, tokenizer, conversation_key: str = CONVERSATION_KEY, tool_key: str = TOOL_DESC_KEY):
    """(tokens, loss_masks) of one multi-turn sample, upstream's layout: `[gMASK] sop`, one
    `<|role|>` + metadata "\\n" + content block per message, a final eos. loss_masks[i] says whether token i
    belongs to a reply the model learns (assistant messages and tool calls, unless "loss": false)."""
    conversations = list(item[conversation_key])
    tokens = [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]
    loss_masks = [False, False]

    def add(ids, loss):
        tokens.extend(ids)
        loss_masks.extend([bool(loss)] * len(ids))

    if tool_key in item:
        conversations.insert(0, {"role": "system", "content": TOOL_DEFINITION_PREFIX + json.dumps(item[tool_key], indent=4, ensure_ascii=False)})
    for message in conversations:
        role = message["role"]
        # Only replies are learnt; upstream left explicit observation messages trainable, which teaches the model
        # to invent tool output, so they are context here like system and user.
        loss = message.get("loss", True) and role in ("assistant", "tool")
        if role == "tool":
            call = FUNCTION_CALL_PREFIX + format_function_call(FUNCTION_CALL_NAME, message["parameters"]) + FUNCTION_CALL_POSTFIX
            add(tokenizer.build_single_message("assistant", message["name"], call), loss)
            observation = message.get("observation")
            if not isinstance(observation, str):
                observation = json.dumps(observation, ensure_ascii=False)
            add(tokenizer.build_single_message("observation", "", observation), False)
        else:
            add(tokenizer.build_single_message(role, "", message["content"]), loss)
    add([tokenizer.eos_token_id], False)
    return tokens, loss_masks


def build_labels(tokens: list[int], loss_masks: list[bool]) -> list[int]:
    """Label i = token i when token i-1 is part of a learnt reply (so the token after a reply, its closing
    role token or eos, is learnt too), else -100."""
    return [token if previous else IGNORE_INDEX for token, previous in zip(tokens, [False] + loss_masks[:-1])]


# --- datasets ------------------------------------------------------------------------------------------------------
class _TokenizedDataset(Dataset):
    """Items tokenized once; `lengths` (token counts) serves group_by_length and packing."""

    def __init__(self):
        self.items: list[dict] = []
        self.num_samples = 0  # samples given, before dropping
        self.num_truncated = 0
        self.num_dropped = 0
        self.dropped: list[str] = []  # where each dropped sample came from

    @property
    def lengths(self) -> list[int]:
        return [len(item["input_ids"]) for item in self.items]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i) -> dict:
        return self.items[i]

    def _finish(self, max_length, verbose: bool):
        if not self.items:
            raise DataFormatError(
                f"错误：{self.num_samples} 条样本全部被丢弃（没有需要学习的回复，或截断到 {max_length} 个 token 后没有剩下回复），"
                f"数据集为空 / Error: the dataset is empty: all {self.num_samples} samples were dropped (no reply to learn "
                f"within {max_length} tokens); check the data or raise the max length. First: {', '.join(self.dropped[:3])}"
            )
        if verbose:
            print(self.summary())

    def summary(self) -> str:
        text = (
            f"数据：{self.num_samples} 条样本，保留 {len(self.items)} 条，截断 {self.num_truncated} 条，丢弃 {self.num_dropped} 条 / "
            f"data: {self.num_samples} samples, {len(self.items)} kept, {self.num_truncated} truncated, {self.num_dropped} dropped"
        )
        if self.dropped:
            more = " ..." if len(self.dropped) > 5 else ""
            text += f" (没有可学习的回复 / no reply left to learn: {', '.join(self.dropped[:5])}{more})"
        return text


class MultiTurnDataset(_TokenizedDataset):
    """Multi-turn samples -> {"input_ids", "labels"}, truncated to max_seq_length (None: no limit).

    A sample whose labels are all -100 (no assistant reply to learn, or none left after truncation) is dropped
    and counted in `num_dropped`; `dropped` lists where those samples came from."""

    def __init__(self, data, tokenizer, max_seq_length, conversation_key=CONVERSATION_KEY, tool_key=TOOL_DESC_KEY, verbose=True):
        super().__init__()
        self.max_seq_length = max_seq_length
        self.num_samples = len(data)
        for i, sample in enumerate(data):
            where = _location(data, i)
            check_conversation(sample, where, conversation_key, tool_key)
            tokens, loss_masks = format_conversation(sample, tokenizer, conversation_key, tool_key)
            labels = build_labels(tokens, loss_masks)
            if max_seq_length is not None and len(tokens) > max_seq_length:
                tokens, labels = tokens[:max_seq_length], labels[:max_seq_length]
                self.num_truncated += 1
            if all(label == IGNORE_INDEX for label in labels):
                self.num_dropped += 1
                self.dropped.append(where)
                continue
            self.items.append({"input_ids": tokens, "labels": labels})
        self._finish(max_seq_length, verbose)


class InputOutputDataset(_TokenizedDataset):
    """{"prompt", "response"} samples -> `[gMASK] sop` + prompt (context, at most max_source_length tokens with
    the prefix) + response (at most max_target_length tokens) + eos, the last two learnt."""

    def __init__(self, data, tokenizer, max_source_length, max_target_length, prompt_key="prompt", response_key="response", verbose=True):
        super().__init__()
        self.max_seq_length = max_source_length + max_target_length + 1
        self.num_samples = len(data)
        for i, sample in enumerate(data):
            check_input_output(sample, _location(data, i), prompt_key, response_key)
            source = tokenizer.encode(sample[prompt_key], add_special_tokens=True)
            target = tokenizer.encode(sample[response_key], add_special_tokens=False)
            if len(source) > max_source_length or len(target) > max_target_length:
                self.num_truncated += 1
                source, target = source[:max_source_length], target[:max_target_length]
            target = target + [tokenizer.eos_token_id]
            self.items.append({"input_ids": source + target, "labels": [IGNORE_INDEX] * len(source) + target})
        self._finish(self.max_seq_length, verbose)


def build_dataset(path, tokenizer, train_format="multi-turn", max_seq_length=None, max_source_length=None, max_target_length=None, verbose=True):
    """Load and tokenize a data file in `train_format` ("multi-turn" or "input-output")."""
    if train_format == "multi-turn":
        return MultiTurnDataset(load_conversations(path), tokenizer, max_seq_length, verbose=verbose)
    if train_format == "input-output":
        if max_source_length is None or max_target_length is None:
            raise DataFormatError("input-output 格式需要 max_source_length 和 max_target_length / the input-output format needs max_source_length and max_target_length")
        return InputOutputDataset(load_input_output(path), tokenizer, max_source_length, max_target_length, verbose=verbose)
    raise DataFormatError(f"未知数据格式 {train_format!r}，应为 multi-turn 或 input-output / unknown train format {train_format!r}, expected multi-turn or input-output")


# --- packing -------------------------------------------------------------------------------------------------------
def pack_samples(items, max_seq_length: int) -> list[dict]:
    """Pack tokenized items into rows of at most max_seq_length tokens (best-fit decreasing, deterministic).

    Each row is {"input_ids", "labels", "attention_mask"}; attention_mask holds the segment id 1, 2, 3, ... of the
    item each token comes from, so the model attends within a conversation and restarts its positions. Every
    item lands in exactly one row. Items must start with an unlabelled token (`[gMASK]`), so no label ever asks
    the model to predict one conversation from the previous one."""
    lengths = []
    for i, item in enumerate(items):
        n = len(item["input_ids"])
        if n > max_seq_length:
            raise ValueError(f"第 {i} 条样本有 {n} 个 token，超过打包长度 {max_seq_length}（应先截断）/ item {i} has {n} tokens, more than the packing length {max_seq_length} (truncate it first)")
        if len(item["labels"]) != n:
            raise ValueError(f"第 {i} 条样本 input_ids 与 labels 长度不同 / item {i}: input_ids and labels differ in length ({n} vs {len(item['labels'])})")
        if n and item["labels"][0] != IGNORE_INDEX:
            raise ValueError(f"第 {i} 条样本的第一个 label 不是 -100，打包会跨样本泄漏 / item {i}: its first label is not -100, packing would leak across samples")
        lengths.append(n)

    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted: the first entry with room >= n fits best
    for i in sorted(range(len(items)), key=lambda i: (-lengths[i], i)):
        k = bisect_left(free, (lengths[i], -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = max_seq_length, len(rows)
            rows.append([])
        rows[r].append(i)
        insort(free, (room - lengths[i], r))

    packed = []
    for members in rows:
        row = {"input_ids": [], "labels": [], "attention_mask": []}
        for segment, i in enumerate(members, start=1):
            row["input_ids"] += items[i]["input_ids"]
            row["labels"] += items[i]["labels"]
            row["attention_mask"] += [segment] * lengths[i]
        packed.append(row)
    return packed


class PackedDataset(Dataset):
    """Rows of several conversations from a tokenized dataset (see pack_samples); use with DataCollatorForPacking."""

    def __init__(self, dataset, max_seq_length: int, verbose=True):
        items = [dataset[i] for i in range(len(dataset))]
        self.rows = pack_samples(items, max_seq_length)
        self.num_samples = len(items)
        self.max_seq_length = max_seq_length
        if verbose:
            tokens = sum(self.lengths)
            fill = tokens / (len(self.rows) * max_seq_length) if self.rows else 0.0
            print(
                f"打包：{self.num_samples} 条样本 → {len(self.rows)} 行（每行 ≤ {max_seq_length} token，填充率 {fill:.1%}）/ "
                f"packing: {self.num_samples} samples -> {len(self.rows)} rows of <= {max_seq_length} tokens, {fill:.1%} full"
            )

    @property
    def lengths(self) -> list[int]:
        return [len(row["input_ids"]) for row in self.rows]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i) -> dict:
        return self.rows[i]


# --- collators -----------------------------------------------------------------------------------------------------
class DataCollatorForChatGLM:
    """Pad a list of items into tensors input_ids, labels (padding -100) and attention_mask (1 token, 0 padding;
    an item's own attention_mask, e.g. packing's segment ids, is kept).

    padding="longest" pads to the batch's longest item rounded up to pad_to_multiple_of; "max_length" pads every
    batch to max_length (upstream's behaviour). Training pads on the right by default: the model takes position
    ids from attention_mask, and right padding keeps every sample's tokens at the same offsets as unpadded."""

    def __init__(self, tokenizer, pad_to_multiple_of=8, padding="longest", max_length=None, padding_side="right"):
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding 应为 'longest' 或 'max_length'，实际是 {padding!r} / padding must be 'longest' or 'max_length', got {padding!r}")
        if padding == "max_length" and not max_length:
            raise ValueError("padding='max_length' 需要 max_length / padding='max_length' needs max_length")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side 应为 'left' 或 'right' / padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id = tokenizer.pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding = padding
        self.max_length = max_length
        self.padding_side = padding_side

    def target_length(self, longest: int) -> int:
        if self.padding == "max_length":
            if longest > self.max_length:
                raise ValueError(f"批内样本有 {longest} 个 token，超过 max_length={self.max_length} / a sample has {longest} tokens, more than max_length={self.max_length}")
            return self.max_length
        multiple = self.pad_to_multiple_of
        return -(-longest // multiple) * multiple if multiple else longest

    def __call__(self, features: list[dict]) -> dict:
        length = self.target_length(max(len(f["input_ids"]) for f in features))
        batch = {"input_ids": [], "labels": [], "attention_mask": []}
        for f in features:
            n = len(f["input_ids"])
            if len(f["labels"]) != n:
                raise ValueError(f"input_ids 与 labels 长度不同 / input_ids and labels differ in length ({n} vs {len(f['labels'])})")
            columns = {"input_ids": list(f["input_ids"]), "labels": list(f["labels"]), "attention_mask": list(f.get("attention_mask", [1] * n))}
            fill = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX, "attention_mask": 0}
            for key, values in columns.items():
                pad = [fill[key]] * (length - n)
                batch[key].append(values + pad if self.padding_side == "right" else pad + values)
        return {key: torch.tensor(values, dtype=torch.long) for key, values in batch.items()}


class DataCollatorForPacking(DataCollatorForChatGLM):
    """Collator for PackedDataset rows: attention_mask keeps their segment ids 1, 2, 3, ... and pads with 0;
    no position_ids (the model restarts them per segment)."""

    def __call__(self, features: list[dict]) -> dict:
        for f in features:
            if "attention_mask" not in f:
                raise ValueError("打包的行缺少 attention_mask（段编号），请用 PackedDataset / a packed row lacks its attention_mask (segment ids): use PackedDataset")
        return super().__call__(features)
