"""Other data formats read as ChatGLM3's own, the one place that converts them (chatglm3.data.reader uses it):

- "chatglm3": ours (chatglm3.model.conversation), {"prompt", "response"} for input-output training;
- "openai": {"messages": [{"role": "system" | "developer" | "user" | "assistant" | "tool", "content", "tool_calls",
  "tool_call_id", "weight"}], "tools": [{"type": "function", "function": {...}}]}, as the chat API and OpenAI's
  fine-tuning files write them (`arguments` a JSON string; "weight": 0 = not learnt);
- "sharegpt": {"conversations": [{"from": "system" | "human" | "gpt" | "function_call" | "observation", "value"}],
  "system", "tools"}, as LLaMA-Factory writes it (a function_call's value: JSON {"name", "arguments"}, or a list of
  them; "tools": a list, or that list as a JSON string);
- "alpaca": {"instruction", "input", "output", "system", "history": [[query, answer], ...]}: the user's turn is
  instruction, then "\\n" and input when there is one (as LLaMA-Factory joins them).

A file holds one format: `detect_file` finds it from its first sample in a known format; a sample in another one is
an error, and one in none is converted and checked as the file's format (which names what is wrong with it).

Tool calls become ChatGLM3's "tool" turn (an assistant tool call and the observation that answers it). Several calls
in one assistant message become consecutive tool turns, each with its own result, in the order of the calls (an
OpenAI result is matched to its call by tool_call_id). ChatGLM3 renders them call, result, call, result: the model
learns to make them one after another. A call with no result is refused: our format has no unanswered call.

Input-output training (`train_format` "input-output": a raw prompt, no roles, no history) reads {"prompt",
"response"}, and Alpaca as prompt = instruction (+ "\\n" + input), response = output; an Alpaca sample with a system
prompt or a history is refused there (input-output has neither: train it as multi-turn). OpenAI and ShareGPT
samples are conversations: train them as multi-turn.
"""
import json

from chatglm3.errors import ChatGLMError
from chatglm3.json_files import type_name
from chatglm3.model.conversation import CONVERSATION_KEY, TOOLS_KEY

FORMATS = ("chatglm3", "openai", "sharegpt", "alpaca")
CHOICES = ("auto",) + FORMATS
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "function_call": "function_call", "observation": "observation", "tool": "observation"}


class FormatError(ChatGLMError):
    """A sample that cannot be converted; the message starts with its file:line."""


def _bad(where: str, field: str, zh: str, en: str) -> FormatError:
    return FormatError(f"{where}: {field}: {zh} / {en}")


def detect(record, multi_turn: bool = True) -> str | None:
    """The format a sample is written in, None when it fits none. `multi_turn` False: input-output data, where
    ChatGLM3's own form is {"prompt", "response"} (a multi-turn file's {"prompt", "response"} fits none)."""
    if not isinstance(record, dict):
        return None
    if "prompt" in record and "response" in record:
        return None if multi_turn else "chatglm3"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if isinstance(record.get("messages"), list):
        return "openai"
    turns = record.get(CONVERSATION_KEY)
    if isinstance(turns, list) and turns and isinstance(turns[0], dict):
        if "from" in turns[0] and "value" in turns[0]:
            return "sharegpt"
        if "role" in turns[0]:
            return "chatglm3"
    return None


def detect_file(records: list, path: str, multi_turn: bool = True) -> str:
    """The one format of a file's (line, sample) pairs: that of its first sample in a known format. A sample in
    another known format is an error; one that fits none is left to the conversion and the checks, which name
    what is wrong with it. When none fits, the file is taken as ours if its first sample looks like ours (not an
    object, or with ChatGLM3's keys), so the checks name the problem; otherwise that sample fits no format."""
    fmt, first = None, None
    for line, record in records:
        found = detect(record, multi_turn)
        if found is None:
            continue
        if fmt is None:
            fmt, first = found, line
        elif found != fmt:
            raise FormatError(
                f"{path}:{line}: 这条样本是 {found} 格式，而第 {first} 行是 {fmt} 格式；一个文件只能用一种格式（用 "
                f"scripts/convert_data.py 分别转换后再合并）/ this sample is in the {found} format but line {first} is "
                f"{fmt}: a file holds one format (convert the files separately with scripts/convert_data.py)"
            )
    line, record = records[0] if records else (None, None)
    ours = ("conversations",) if multi_turn else ("prompt", "response")
    if fmt is None and isinstance(record, dict) and not any(key in record for key in ours):
        raise FormatError(
            f"{path}:{line}: 认不出数据格式：应为 ChatGLM3（conversations 的 role/content{'' if multi_turn else '，或 prompt/response'}）、"
            "OpenAI（messages）、ShareGPT（conversations 的 from/value）或 Alpaca（instruction/output）/ the sample fits "
            f"no known format: ChatGLM3 (conversations of role/content{'' if multi_turn else ', or prompt/response'}), "
            "OpenAI (messages), ShareGPT (conversations of from/value) or Alpaca (instruction/output)"
            + ("; {prompt, response} is input-output data (--train_format input-output)" if multi_turn and
               isinstance(record, dict) and "prompt" in record else "")
        )
    return fmt or "chatglm3"


# --- conversions to ChatGLM3's multi-turn sample -------------------------------------------------------------------
def to_chatglm3(record, fmt: str, where: str) -> dict:
    """A multi-turn sample in `fmt` -> ChatGLM3's {"tools"?, "conversations"} (checked afterwards by the reader)."""
    if fmt == "chatglm3":
        return record
    if not isinstance(record, dict):
        raise FormatError(f"{where}: 样本应为 JSON 对象，实际是 {type_name(record)} / a sample must be a JSON object, got {type_name(record)}")
    return {"openai": _from_openai, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca}[fmt](record, where)


def to_input_output(record, fmt: str, where: str) -> dict:
    """An input-output sample in `fmt` -> {"prompt", "response"} (see the module doc for what may be one)."""
    if fmt == "chatglm3":
        return record
    if fmt != "alpaca":
        raise FormatError(f"{where}: {fmt} 格式的样本是多轮对话，不能用于 input-output 训练；请用 multi-turn 训练 / {fmt} samples "
                          "are conversations, not input-output pairs: train them as multi-turn")
    if not isinstance(record, dict):
        raise FormatError(f"{where}: 样本应为 JSON 对象，实际是 {type_name(record)} / a sample must be a JSON object, got {type_name(record)}")
    for key in ("system", "history"):
        if record.get(key):
            raise _bad(where, key, "input-output 格式没有系统提示和历史，请用 multi-turn 训练",
                       "input-output training has no system prompt and no history: train this file as multi-turn")
    return {"prompt": _alpaca_query(record, where), "response": _string(record, "output", where)}


_KINDS = {str: ("字符串", "a string"), list: ("列表", "a list")}


def _typed(record: dict, key: str, where: str, kind: type, field: str | None = None):
    """record[key] when it is a `kind` (str or list); otherwise one line naming the field."""
    value = record.get(key)
    if not isinstance(value, kind):
        zh, en = _KINDS[kind]
        raise _bad(where, field or key, f"应为{zh}，实际是 {type_name(value) if key in record else '缺失'}",
                   f"must be {en}, got {type_name(value) if key in record else 'nothing'}")
    return value


def _string(record: dict, key: str, where: str, field: str | None = None) -> str:
    return _typed(record, key, where, str, field)


def _list(record: dict, key: str, where: str, field: str | None = None) -> list:
    return _typed(record, key, where, list, field)


def _json_value(value, where: str, field: str):
    """A JSON string's value (anything else as it is)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except (ValueError, RecursionError) as e:
        raise _bad(where, field, f"不是合法的 JSON：{e}", f"is not valid JSON: {e}") from None


def _json_object(value, where: str, field: str) -> dict:
    """A tool call's arguments: a JSON object, or a string holding one."""
    value = _json_value(value, where, field)
    if not isinstance(value, dict):
        raise _bad(where, field, f"应为 JSON 对象，实际是 {type_name(value)}", f"must be a JSON object, got {type_name(value)}")
    return value


def _tool_turn(name, arguments, observation, where: str, field: str) -> dict:
    if not isinstance(name, str) or not name:
        raise _bad(where, f"{field}.name", "工具名应为非空字符串", "the tool name must be a non-empty string")
    return {"role": "tool", "name": name, "parameters": _json_object(arguments, where, f"{field}.arguments"),
            "observation": observation}


# OpenAI ---------------------------------------------------------------------------------------------------------
def _openai_text(message: dict, where: str, field: str) -> str:
    """content: a string, null, or a list of {"type": "text", "text"} parts (joined)."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise _bad(where, f"{field}.content", "应为字符串或文本片段列表", "must be a string or a list of text parts")


def _openai_tools(record: dict, where: str) -> list:
    functions = []
    for i, tool in enumerate(_list(record, "tools", where)):
        if not (isinstance(tool, dict) and tool.get("type", "function") == "function" and isinstance(tool.get("function"), dict)):
            raise _bad(where, f"tools[{i}]", "应为 {\"type\": \"function\", \"function\": {...}}",
                       "must be {\"type\": \"function\", \"function\": {...}}")
        functions.append(tool["function"])
    return functions


def _from_openai(record: dict, where: str) -> dict:
    sample = {TOOLS_KEY: _openai_tools(record, where)} if record.get("tools") not in (None, []) else {}
    turns, pending = [], {}  # pending: tool call id -> the tool turn waiting for its result
    for i, message in enumerate(_list(record, "messages", where)):
        field = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(where, field, f"应为 JSON 对象，实际是 {type_name(message)}", f"must be a JSON object, got {type_name(message)}")
        role = "system" if message.get("role") == "developer" else message.get("role")
        if pending and role != "tool":
            raise _bad(where, field, f"之前的工具调用 {next(iter(pending))} 还没有 tool 结果消息",
                       f"the tool call {next(iter(pending))} before it has no tool result message")
        if role == "tool":
            call_id = message.get("tool_call_id", next(iter(pending), None))
            if not isinstance(call_id, str) or call_id not in pending:
                raise _bad(where, f"{field}.tool_call_id", f"没有对应的工具调用（{call_id!r}）", f"answers no tool call ({call_id!r})")
            pending.pop(call_id)["observation"] = _openai_text(message, where, field)
        elif role in ("system", "user", "assistant"):
            text = _openai_text(message, where, field)
            calls = (message.get("tool_calls") or []) if role == "assistant" else []
            if not isinstance(calls, list):
                raise _bad(where, f"{field}.tool_calls", f"应为列表，实际是 {type_name(calls)}", f"must be a list, got {type_name(calls)}")
            start = len(turns)
            if text or not calls:
                turns.append({"role": role, "content": text})
            for j, call in enumerate(calls):
                here = f"{field}.tool_calls[{j}]"
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict):
                    raise _bad(where, here, "应为 {\"type\": \"function\", \"function\": {\"name\", \"arguments\"}}",
                               "must be {\"type\": \"function\", \"function\": {\"name\", \"arguments\"}}")
                turn = _tool_turn(function.get("name"), function.get("arguments", "{}"), None, where, f"{here}.function")
                call_id = call.get("id", f"#{j}")  # without ids, results answer the calls in order
                if not isinstance(call_id, str) or call_id in pending:
                    raise _bad(where, f"{here}.id", f"应为不重复的字符串，实际是 {call_id!r}", f"must be a string no other call has, got {call_id!r}")
                turns.append(turn)
                pending[call_id] = turn
            if message.get("weight") == 0:  # OpenAI's fine-tuning files: weight 0 = a reply not learnt
                for turn in turns[start:]:
                    turn["loss"] = False
        else:
            raise _bad(where, f"{field}.role", f"未知角色 {role!r}（system、developer、user、assistant、tool）",
                       f"unknown role {role!r} (system, developer, user, assistant, tool)")
    if pending:
        raise _bad(where, "messages", f"工具调用 {next(iter(pending))} 没有 tool 结果消息", f"the tool call {next(iter(pending))} has no tool result message")
    return dict(sample, **{CONVERSATION_KEY: turns})


# ShareGPT -------------------------------------------------------------------------------------------------------
def _sharegpt_tools(record: dict, where: str) -> list:
    tools = _json_value(record["tools"], where, "tools")  # LLaMA-Factory keeps them as a JSON string
    if not isinstance(tools, list):
        raise _bad(where, "tools", f"应为列表，实际是 {type_name(tools)}", f"must be a list, got {type_name(tools)}")
    return tools


def _from_sharegpt(record: dict, where: str) -> dict:
    sample = {TOOLS_KEY: _sharegpt_tools(record, where)} if record.get("tools") not in (None, "", []) else {}
    turns = [{"role": "system", "content": _string(record, "system", where)}] if record.get("system") else []
    waiting = []  # tool turns still waiting for their observation, in call order
    for i, message in enumerate(_list(record, CONVERSATION_KEY, where)):
        field = f"{CONVERSATION_KEY}[{i}]"
        if not isinstance(message, dict):
            raise _bad(where, field, f"应为 JSON 对象，实际是 {type_name(message)}", f"must be a JSON object, got {type_name(message)}")
        role = _SHAREGPT_ROLES.get(message["from"]) if isinstance(message.get("from"), str) else None
        value = _string(message, "value", where, f"{field}.value")
        if role is None:
            raise _bad(where, f"{field}.from", f"未知角色 {message.get('from')!r}（system、human、gpt、function_call、observation）",
                       f"unknown role {message.get('from')!r} (system, human, gpt, function_call, observation)")
        if waiting and role != "observation":
            raise _bad(where, field, "function_call 之后应为 observation（每个调用一条）", "a function_call must be followed by its "
                       "observation (one per call)")
        if role == "observation":
            if not waiting:
                raise _bad(where, field, "observation 之前没有 function_call", "an observation must follow a function_call")
            waiting.pop(0)["observation"] = value
        elif role == "function_call":
            calls = _json_value(value, where, f"{field}.value")
            for call in calls if isinstance(calls, list) else [calls]:  # LLaMA-Factory: a list = parallel calls
                if not isinstance(call, dict):
                    raise _bad(where, f"{field}.value", "应为 {\"name\", \"arguments\"} 或它们的列表",
                               "must be {\"name\", \"arguments\"} or a list of them")
                turn = _tool_turn(call.get("name"), call.get("arguments", {}), None, where, f"{field}.value")
                turns.append(turn)
                waiting.append(turn)
        else:
            turns.append({"role": role, "content": value})
    if waiting:
        raise _bad(where, CONVERSATION_KEY, "最后的 function_call 没有 observation", "the last function_call has no observation")
    return dict(sample, **{CONVERSATION_KEY: turns})


# Alpaca ---------------------------------------------------------------------------------------------------------
def _alpaca_query(record: dict, where: str) -> str:
    query = _string(record, "instruction", where)
    extra = record.get("input") or ""
    if not isinstance(extra, str):
        raise _bad(where, "input", f"应为字符串，实际是 {type_name(extra)}", f"must be a string, got {type_name(extra)}")
    return f"{query}\n{extra}" if extra else query


def _from_alpaca(record: dict, where: str) -> dict:
    turns = [{"role": "system", "content": _string(record, "system", where)}] if record.get("system") else []
    history = record.get("history") or []
    if not isinstance(history, list):
        raise _bad(where, "history", f"应为 [[问题, 回答], ...]，实际是 {type_name(history)}", f"must be [[query, answer], ...], got {type_name(history)}")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(text, str) for text in pair)):
            raise _bad(where, f"history[{i}]", "应为 [问题, 回答] 两个字符串", "must be [query, answer], two strings")
        turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    turns += [{"role": "user", "content": _alpaca_query(record, where)},
              {"role": "assistant", "content": _string(record, "output", where)}]
    return {CONVERSATION_KEY: turns}
