"""ChatGLM3's chat format, written once: special tokens, roles, the tool system prompt, tool-call syntax, how a
conversation becomes token ids (for training and for generation alike) and how a reply is read back.

Layout (upstream's): `[gMASK] sop`, then per message `<|role|>` + encode(metadata + "\\n") + encode(content);
a prompt ends with `<|assistant|>`, a training sample with eos. Because prompts and training ids come from the
same `encode_messages`, the prompt for a conversation prefix equals training's ids for that prefix.

Training samples: {"tools": [...]?, "conversations": [{"role": "system" | "user" | "assistant" | "observation",
"content": str, "loss": bool?}, {"role": "tool", "name": str, "parameters": {...}, "observation": any}, ...]};
a "tool" entry is an assistant tool call followed by its observation.
"""
import ast
import copy
import json

from chatglm3.errors import ChatGLMError

ROLES = ("system", "user", "assistant", "observation")
SPECIAL_TOKENS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"] + [f"<|{role}|>" for role in ROLES]
PREFIX_TOKENS = ("[gMASK]", "sop")
TOOL_SYSTEM_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"
CONVERSATION_KEY = "conversations"
TOOLS_KEY = "tools"
SAMPLE_ROLES = ROLES + ("tool",)  # roles a training sample may use
IGNORE_INDEX = -100
_CALL_NAME = "tool_call"
_CALL_FENCE = ("```python\n", "\n```")
# Longer "tool calls" are not calls; the bound also keeps Python's parser clear of recursion/memory limits.
MAX_TOOL_CALL_CHARS = 20_000


def role_token(role: str) -> str:
    return f"<|{role}|>"


def tool_system_message(tools: list) -> dict:
    """The system message that offers `tools` (rendered as content + "\\n" + the tools as JSON)."""
    return {"role": "system", "content": TOOL_SYSTEM_PROMPT, "tools": tools}


def format_tool_call(parameters: dict) -> str:
    """```python\\ntool_call(k='v', n=1)\\n```: Python call syntax with repr() values, as upstream wrote them."""
    call = f"{_CALL_NAME}(" + ", ".join(f"{name}={value!r}" for name, value in parameters.items()) + ")"
    return _CALL_FENCE[0] + call + _CALL_FENCE[1]


def parse_tool_call(text: str) -> dict:
    """Inverse of format_tool_call (the fence is optional): keyword arguments that are literal JSON values only,
    never `eval`. Raises ValueError for anything else."""
    lines = text.strip().split("\n")
    if lines and lines[0].startswith("```"):
        lines = lines[1:]
    if lines and lines[-1].strip().startswith("```"):
        lines = lines[:-1]
    text = "\n".join(lines).strip()
    if len(text) > MAX_TOOL_CALL_CHARS:
        raise ValueError(f"not a tool call: longer than {MAX_TOOL_CALL_CHARS} characters")
    try:
        node = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise ValueError(f"not a tool call: {getattr(e, 'msg', type(e).__name__)}") from None
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == _CALL_NAME) or node.args:
        raise ValueError(f"not a tool call: expected {_CALL_NAME}(key=value, ...)")
    params = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise ValueError("not a tool call: **kwargs are not allowed")
        try:
            params[kw.arg] = ast.literal_eval(kw.value)
            json.dumps(params[kw.arg])  # the tool gets it and the chat shows it as JSON: no set, bytes, 1j, ...
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            raise ValueError(f"not a tool call: argument {kw.arg} is not a literal JSON value") from None
    return params


# Which turn may follow which, in a sample's roles ("tool" is a call answered by its observation): the one rule
# for training data, evaluation and the server (which maps an OpenAI tool call to "tool"). None: the start.
_MAY_FOLLOW = {
    "system": {None, "system"},
    "user": {None, "system", "user", "assistant", "tool", "observation"},
    "assistant": {"user", "tool", "observation"},
    "tool": {"user", "assistant", "tool", "observation"},
    "observation": {"assistant", "tool"},
}
_ORDER_RULES = {
    "system": ("system 消息只能在对话开头", "a system turn may only come at the start"),
    "user": ("", ""),
    "assistant": ("assistant 消息须在 user、tool 或 observation 之后", "an assistant turn must follow a user, tool or "
                  "observation turn"),
    "tool": ("tool 调用须在 user、assistant、tool 或 observation 之后", "a tool call must follow a user, assistant, tool "
             "or observation turn"),
    "observation": ("observation 须紧跟工具调用（assistant 或 tool）", "an observation must follow a tool call (an "
                    "assistant or tool turn)"),
}


def role_order_error(roles) -> tuple[int, str] | None:
    """(index, one-line reason) of the first turn whose role may not follow the one before it, else None.
    `roles`: the roles of a conversation's turns in order (SAMPLE_ROLES)."""
    previous = None
    for i, role in enumerate(roles):
        if previous not in _MAY_FOLLOW.get(role, ()):
            zh, en = _ORDER_RULES.get(role, ("未知角色", "unknown role"))
            after = "开头" if previous is None else previous
            return i, f"{zh}（此处在 {after} 之后）/ {en} (here it follows {previous or 'nothing'})"
        previous = role
    return None


def sample_to_messages(sample: dict) -> list[dict]:
    """A (checked) training sample -> chat-history messages with "loss" (True for the replies the model learns:
    assistant messages and tool calls unless "loss": false). Upstream also trained on observation messages,
    which teaches the model to invent tool output; here they are context, like system and user."""
    messages = [dict(tool_system_message(sample[TOOLS_KEY]), loss=False)] if TOOLS_KEY in sample else []
    for message in sample[CONVERSATION_KEY]:
        role, loss = message["role"], message.get("loss", True)
        if role == "tool":
            observation = message.get("observation")
            if not isinstance(observation, str):
                observation = json.dumps(observation, ensure_ascii=False)
            messages.append({"role": "assistant", "metadata": message["name"], "content": format_tool_call(message["parameters"]), "loss": loss})
            messages.append({"role": "observation", "content": observation, "loss": False})
        else:
            messages.append({"role": role, "content": message["content"], "loss": loss and role == "assistant"})
    return messages


def encode_message(tokenizer, role: str, metadata: str, content: str) -> list[int]:
    """`<|role|>` + encode(metadata + "\\n") + encode(content), without the `[gMASK] sop` prefix. Text goes to
    SentencePiece as is: "<|user|>" inside a message is ordinary text."""
    if role not in ROLES:
        raise ChatGLMError(f"未知角色 {role!r} / unknown role {role!r} (one of {', '.join(ROLES)})")
    encode = tokenizer.tokenizer.encode
    return [tokenizer.get_command(role_token(role))] + encode(f"{metadata}\n") + encode(content)


def message_text(message: dict) -> str:
    """The text encoded after a message's role token and metadata line: its content, and for a system message that
    offers tools, the tools as JSON after it."""
    if message["role"] == "system" and TOOLS_KEY in message:
        return message["content"] + "\n" + json.dumps(message[TOOLS_KEY], indent=4, ensure_ascii=False)
    return message["content"]


def encode_messages(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """(ids, learnt): `[gMASK] sop` and every message; learnt[i] says token i belongs to a reply the model
    learns (an assistant message with "loss")."""
    ids = [tokenizer.get_command(t) for t in PREFIX_TOKENS]
    learnt = [False] * len(ids)
    for message in messages:
        message_ids = encode_message(tokenizer, message["role"], message.get("metadata", ""), message_text(message))
        ids += message_ids
        learnt += [bool(message.get("loss")) and message["role"] == "assistant"] * len(message_ids)
    return ids, learnt


def encode_sample(tokenizer, sample: dict, max_length: int | None = None) -> tuple[list[int], list[int]]:
    """Training (input_ids, labels) of a sample, upstream-exact: the messages and a final eos; label i is token i
    when token i-1 is learnt (so a reply's closing role token or eos is learnt too), else -100.

    With `max_length`, a longer sample loses whole messages from its end, down to the last learnt reply that fits
    with the eos: never half a reply, so every reply learnt ends with its stop token (labels all -100 when not even
    the first reply fits)."""
    messages = sample_to_messages(sample)
    ids, learnt = encode_messages(tokenizer, messages)
    if max_length is not None and len(ids) + 1 > max_length:
        ids, learnt = _whole_turns(tokenizer, messages, max_length - 1)
    ids.append(tokenizer.eos_token_id)
    labels = [token if previous else IGNORE_INDEX for token, previous in zip(ids, [False] + learnt)]
    return ids, labels


def _whole_turns(tokenizer, messages: list[dict], limit: int) -> tuple[list[int], list[bool]]:
    """encode_messages of the longest run of leading messages that ends with a learnt reply and fits in `limit`
    tokens; `[gMASK] sop` alone (nothing learnt) when there is none."""
    length, keep = len(PREFIX_TOKENS), 0
    for k, message in enumerate(messages, 1):
        length += len(encode_message(tokenizer, message["role"], message.get("metadata", ""), message_text(message)))
        if length > limit:
            break
        if message["role"] == "assistant" and message.get("loss"):
            keep = k
    return encode_messages(tokenizer, messages[:keep])


def prompt_ids(tokenizer, history: list[dict], query: str | None = None, role: str = "user") -> list[int]:
    """Ids the model continues with its next reply: the history, then `<|role|>` query if given, then
    `<|assistant|>`."""
    messages = list(history) + ([{"role": role, "content": query}] if query is not None else [])
    return encode_messages(tokenizer, messages)[0] + [tokenizer.get_command(role_token("assistant"))]


def stop_token_ids(tokenizer) -> list[int]:
    """A reply ends with eos, or where the model starts the user's turn or a tool's observation."""
    return [tokenizer.eos_token_id, tokenizer.get_command(role_token("user")), tokenizer.get_command(role_token("observation"))]


def process_response(text: str, history: list) -> tuple:
    """A decoded reply -> (response, history + the reply's messages), as upstream's chat: one segment per
    `<|assistant|>`; a segment with metadata (a tool name) is a tool call {"name", "parameters"}, or
    {"name", "content"} when the call does not parse; otherwise the response is text."""
    content = ""
    history = copy.deepcopy(history)
    for segment in text.split(role_token("assistant")):
        metadata, sep, content = segment.partition("\n")
        if not sep:  # no metadata line (e.g. a reply cut short)
            metadata, content = "", segment
        if not metadata.strip():
            content = content.strip()
            history.append({"role": "assistant", "metadata": metadata, "content": content})
            content = content.replace("[[训练时间]]", "2023年")  # upstream's placeholder
        else:
            # Decoding gives back the space SentencePiece puts before the content; format_tool_call writes none.
            content = content.strip()
            history.append({"role": "assistant", "metadata": metadata, "content": content})
            try:
                content = {"name": metadata.strip(), "parameters": parse_tool_call(content)}
            except ValueError:
                content = {"name": metadata.strip(), "content": content}
    return content, history
