"""OpenAI's Chat Completions API over a serving Engine: requests checked and mapped onto ChatGLM3's chat format
(the `conversation` module's, so a served call looks exactly like what training taught), replies mapped back
(text, or `tool_calls` with JSON arguments), plain or streamed as server-sent events.

Tool calls are only ever returned to the client: nothing the model writes is executed here. Every bad request is
an OpenAI-shaped 4xx naming the field; the work a request costs in text (JSON, tokenizing, stop strings) is
bounded, linear and done off the event loop, so one request never stalls the others.
"""
import asyncio
import contextlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from starlette.exceptions import HTTPException

from chatglm3 import json_files
from chatglm3.model import conversation
from chatglm3.model.generation import SAMPLE_TEMPERATURE, SAMPLE_TOP_P
from chatglm3.serving.engine import CANCELLED, ERROR, LENGTH, EngineBusy, SamplingParams

# Sampling defaults when a request leaves them out: upstream's `model.chat` defaults (a chat client samples).
DEFAULT_TEMPERATURE, DEFAULT_TOP_P = SAMPLE_TEMPERATURE, SAMPLE_TOP_P
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streamed request checks that its client is still there
# Below this temperature sampling is greedy but for exact ties, and 1/temperature overflows float32 long before 0:
# such a request is answered greedily (the limit) instead of failing on infinite logits.
GREEDY_BELOW_TEMPERATURE = 1e-4
MAX_STOP_STRINGS, MAX_STOP_CHARS = 4, 1000  # OpenAI's 4; the length bounds the work per streamed update
INT64 = 2 ** 63
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")  # the Host headers a keyless server accepts by default
PAGE_HEADERS = {  # the chat page talks to this server only and renders text, never HTML
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "connect-src 'self'; img-src 'self' data:",
    "X-Content-Type-Options": "nosniff",
}


@dataclass
class Limits:
    max_request_bytes: int = 1 << 20
    max_messages: int = 128
    max_tokens: int = 2048  # the most new tokens one request may ask for
    body_timeout_s: float = 30.0  # a body still arriving after this is refused (408): no slow-loris uploads


class APIError(Exception):
    """Answered as OpenAI's error object with this HTTP status."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def api_key_problem(key: Optional[str]) -> Optional[tuple[str, str]]:
    """Why `key` cannot protect a server, (Chinese, English); None: it can, or no key is set. An empty key is
    refused (a client sending `Bearer ` would match it), and so is anything but visible ASCII: HTTP clients send
    header values as ASCII (a non-ASCII key could never match) and strip surrounding spaces."""
    if key is None:
        return None
    if not key:
        return "为空，服务将对任何人开放", "is empty, which would open the server to anyone"
    if not all("!" <= c <= "~" for c in key):
        return ("只能由可见 ASCII 字符组成（不含空格、中文），否则客户端无法发送",
                "must be visible ASCII characters only (no spaces, no non-ASCII), or clients could never send it")
    return None


def host_name(header: str) -> str:
    """The host of a Host header, without its port, lower case ('[::1]' keeps its brackets)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[:header.find("]") + 1] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostCheck:
    """Only requests whose Host header names one of `allowed`: a web page that rebinds its own domain to
    127.0.0.1 (DNS rebinding) sends its domain as the Host and is refused, so it cannot use a keyless server."""

    def __init__(self, app, allowed):
        # a bare IPv6 address as given to --host ('::1') is '[::1]' in a Host header
        self.app, self.allowed = app, {host_name(f"[{h}]" if h.count(":") > 1 and "[" not in h else h) for h in allowed}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            hosts = [value.decode("latin-1") for name, value in scope["headers"] if name == b"host"]
            if len(hosts) != 1 or host_name(hosts[0]) not in self.allowed:
                shown = hosts[0][:100] if len(hosts) == 1 else f"{len(hosts)} Host headers"
                error = APIError(400, f"Host {shown!r} 不被接受（服务器未设 API key 时只接受本机名称，以防 DNS 重绑定；"
                                      f"服务器可用 --allowed-hosts 添加）/ Host {shown!r} is not accepted (a server "
                                      "without an API key accepts local names only, against DNS rebinding; the server "
                                      "can add names with --allowed-hosts)", code="invalid_host")
                await JSONResponse(error.body(), status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)


BODY = "请求体 / the request body"


# --- the request, as OpenAI documents it (the fields this server understands) -----------------------------------
class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


FunctionName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]  # OpenAI's rule for names
StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]


class FunctionDef(_Model):
    name: FunctionName
    description: Optional[str] = None
    parameters: Optional[dict] = None


class ToolDef(_Model):
    type: Literal["function"]
    function: FunctionDef


class CalledFunction(_Model):
    name: FunctionName  # it becomes the metadata line of the call: no newline may slip into the chat format
    arguments: str


class ToolCall(_Model):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class TextPart(_Model):
    type: Literal["text"]
    text: str


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class NamedFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Model):
    include_usage: bool = False


class ResponseFormat(_Model):
    type: str


class ChatRequest(_Model):
    """Numbers within OpenAI's documented ranges (finite: NaN and infinities are refused by _Model)."""
    model: str
    messages: list[Message]
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0, le=2)
    top_p: float = Field(DEFAULT_TOP_P, gt=0, le=1)
    max_tokens: Optional[int] = Field(None, ge=1)  # the upper bound is the context: sampling_params
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    stop: Union[StopString, Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)], None] = None
    seed: Optional[int] = Field(None, ge=-INT64, lt=INT64)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    tools: Optional[list[ToolDef]] = None
    tool_choice: Union[Literal["auto", "none"], NamedToolChoice, None] = None
    n: int = Field(1, ge=1, le=1)
    # Not implemented: accepted only with values that change nothing (see `unsupported`), never silently ignored.
    response_format: Optional[ResponseFormat] = None
    logit_bias: Optional[dict[str, Annotated[float, Field(ge=-100, le=100)]]] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)

    def unsupported(self) -> Optional[str]:
        """The first field asking for something this server does not do."""
        used = {"response_format": self.response_format and self.response_format.type != "text",
                "logit_bias": bool(self.logit_bias), "logprobs": bool(self.logprobs),
                "top_logprobs": bool(self.top_logprobs), "presence_penalty": bool(self.presence_penalty),
                "frequency_penalty": bool(self.frequency_penalty)}
        return next((name for name, value in used.items() if value), None)


def _integer(text: str) -> int:
    if len(text.lstrip("-")) > 100:  # (Python's own error, past 4300 digits, tells the client to raise a limit)
        raise ValueError(f"整数 {text[:20]}… 位数过多 / the integer {text[:20]}… has too many digits")
    return int(text)


def load_json(data, param: Optional[str]):
    """Strict JSON from a request (the body: param None; tool-call arguments): nesting beyond
    json_files.MAX_DEPTH is refused by the project's linear bracket scan before parsing (json's parser recurses),
    NaN/Infinity and huge integers while parsing, strings that are not UTF-8 (lone surrogates such as "\\ud800",
    which no tokenizer or encoder takes) after it, naming the field. A 400 for each."""
    where = param or BODY
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise APIError(400, f"{where}: 不是 UTF-8（第 {e.start} 字节）/ not UTF-8 (byte {e.start})", param=param) from None
    if json_files.too_deep(data) is not None:
        raise APIError(400, f"{where}: 嵌套超过 {json_files.MAX_DEPTH} 层 / nested more than {json_files.MAX_DEPTH} "
                            "levels deep", param=param)
    try:
        value = json.loads(data, parse_constant=json_files.refuse_constant, parse_int=_integer)
    except ValueError as e:  # JSONDecodeError, NaN, huge integers
        raise APIError(400, f"{where}: 不是合法的 JSON / not valid JSON: {str(e)[:200]}", param=param) from None
    stack = [(value, ())]
    while stack:  # iterative: nothing recurses on the client's data
        node, path = stack.pop()
        if isinstance(node, dict):
            stack.extend((key, path) for key in node)
            stack.extend((item, path + (key,)) for key, item in node.items())
        elif isinstance(node, list):
            stack.extend((item, path + (i,)) for i, item in enumerate(node))
        elif isinstance(node, str) and not node.isascii():
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                field = _path(param, path) or None
                raise APIError(400, f"{field or BODY}: 含有孤立的代理字符（如 \\ud800），不是合法的 Unicode 文本 / holds a "
                                    "lone surrogate (such as \\ud800), which is not valid Unicode text", param=field) from None
    return value


def _path(param: Optional[str], path: tuple) -> str:
    """('messages', 0, 'content') -> 'messages[0].content', as OpenAI names fields."""
    out = param or ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def _error_field(data, error: dict) -> tuple:
    """The request path of a pydantic error: its location with union tags ('str', 'list[TextPart]'...) left out."""
    path, node = (), data
    for i, part in enumerate(error["loc"]):
        if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            path, node = path + (part,), node[part]
        elif isinstance(node, dict) and part in node:
            path, node = path + (part,), node[part]
        elif error["type"] == "missing" and i == len(error["loc"]) - 1:
            path += (part,)
    return path


def parse_request(body: bytes) -> ChatRequest:
    data = load_json(body, None)
    try:
        request = ChatRequest.model_validate(data)
    except ValidationError as e:
        # the most specific error: of a union's alternatives, the one that got furthest into the request, and
        # rather one about the value than about its type (which only says that another alternative was meant)
        first = max(e.errors(), key=lambda error: (len(_error_field(data, error)), not error["type"].endswith("_type")))
        where = _path(None, _error_field(data, first)) or None
        got = "" if first["type"] == "missing" else f" (got {json.dumps(first['input'], ensure_ascii=False)[:60]})"
        raise APIError(400, f"{where or BODY}: 取值无效 / invalid value: {first['msg']}{got}",
                       param=where) from None
    field = request.unsupported()
    if field:
        raise APIError(400, f"{field}: 本服务不支持 / not supported by this server ({json.dumps(data[field])[:60]})",
                       param=field, code="unsupported_parameter")
    return request


# --- OpenAI messages -> ChatGLM3 messages --------------------------------------------------------------------------
@dataclass
class Prompt:
    ids: list  # what the model reads: the conversation, <|assistant|>, and a forced start of the reply if any
    reply_start: list  # the forced start of the reply (a tool name line), decoded with the reply


def to_chatglm(request: ChatRequest) -> list:
    """OpenAI messages -> ChatGLM3 messages (the tools' system message first, each tool call followed by its
    result, as training samples are rendered). Raises APIError for a conversation the model cannot continue."""
    tools = {t.function.name: t.function for t in request.tools or []}
    if len(tools) != len(request.tools or []):
        raise APIError(400, "tools: 函数名重复 / duplicate function names", param="tools")
    out = [conversation.tool_system_message([f.model_dump(exclude_none=True) for f in tools.values()])] if tools else []
    _check_order(request.messages)
    pending = {}  # tool calls of the last assistant message still waiting for their results
    previous = None
    for i, m in enumerate(request.messages):
        where = f"messages[{i}]"
        role = "system" if m.role == "developer" else m.role
        if pending and role != "tool":
            raise APIError(400, f"{where}: 工具调用 {next(iter(pending))} 缺少 tool 消息 / tool call "
                                f"{next(iter(pending))} has no tool message before this {m.role} message", param=where)
        if role == "tool":
            out += _tool_result(m, where, pending, tools)
        elif role == "assistant":
            if m.text() or not m.tool_calls:
                out.append({"role": "assistant", "metadata": "", "content": m.text()})
            pending = _calls(m, where)
        else:
            out.append({"role": role, "content": m.text()})
        previous = role
    if previous not in ("user", "tool") or pending:
        raise APIError(400, "messages: 最后一条须是 user 或 tool 消息 / the last message must be a user or tool "
                            "message (with every tool call answered)", param="messages")
    return out


def _check_order(messages: list):
    """The order of turns by training data's one rule (conversation.role_order_error), so that the server refuses
    exactly the conversations training refuses: an assistant message with tool calls is a tool turn (after its
    text, if any), and a tool message is the result of a call already counted."""
    turns = []  # (sample role, index of the message it comes from)
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        if role == "assistant" and m.tool_calls:
            turns += [("assistant", i)] * bool(m.text()) + [("tool", i)]
        elif role != "tool":
            turns.append((role, i))
    error = conversation.role_order_error([role for role, _ in turns])
    if error:
        where = f"messages[{turns[error[0]][1]}]"
        raise APIError(400, f"{where}: {error[1]}", param=where)


def _calls(m: Message, where: str) -> dict:
    """An assistant message's tool calls: {id: (name, arguments)}."""
    calls = {}
    for j, call in enumerate(m.tool_calls or []):
        param = f"{where}.tool_calls[{j}]"
        if call.id in calls:
            raise APIError(400, f"{param}.id: 重复的工具调用 id / duplicate tool call id {call.id!r}", param=f"{param}.id")
        arguments = load_json(call.function.arguments, f"{param}.function.arguments")
        if not isinstance(arguments, dict):
            raise APIError(400, f"{param}.function.arguments: 须是 JSON 对象 / must be a JSON object",
                           param=f"{param}.function.arguments")
        calls[call.id] = (call.function.name, arguments)
    return calls


def _tool_result(m: Message, where: str, pending: dict, tools: dict) -> list:
    """A tool message -> the call it answers (assistant, metadata = tool name) and its observation."""
    if m.tool_call_id not in pending:
        raise APIError(400, f"{where}.tool_call_id: 没有对应的工具调用 / answers no pending tool call "
                            f"({m.tool_call_id!r})", param=f"{where}.tool_call_id")
    name, arguments = pending.pop(m.tool_call_id)
    if tools and name not in tools or m.name not in (None, name):
        raise APIError(400, f"{where}: 未知工具 / unknown tool {m.name or name!r}", param=where)
    return [{"role": "assistant", "metadata": name, "content": conversation.format_tool_call(arguments)},
            {"role": "observation", "content": m.text()}]


def build_prompt(tokenizer, request: ChatRequest) -> Prompt:
    """The generation prompt. tool_choice "none" starts the reply with an empty metadata line (a text answer);
    a named function starts it with that function's name line (a call to it), as training wrote them."""
    messages = to_chatglm(request)
    ids = conversation.prompt_ids(tokenizer, messages)
    choice = request.tool_choice
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in {t.function.name for t in request.tools or []}:
            raise APIError(400, f"tool_choice: 未知函数 / unknown function {choice.function.name!r}", param="tool_choice")
        start = choice.function.name
    elif choice == "none" and request.tools:
        start = ""
    else:
        return Prompt(ids, [])
    opened = conversation.encode_messages(tokenizer, messages + [{"role": "assistant", "metadata": start, "content": ""}])[0]
    assert opened[:len(ids)] == ids, "the prompt is a prefix of the conversation with the reply opened"
    return Prompt(opened, opened[len(ids):])


def sampling_params(request: ChatRequest, prompt_len: int, context: int, limits: Limits) -> SamplingParams:
    room = context - prompt_len
    field = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    asked = getattr(request, field)
    if asked is None:
        asked = min(limits.max_tokens, room)
    elif asked > limits.max_tokens:
        raise APIError(400, f"{field}: 须在 1 到 {limits.max_tokens} 之间 / must be between 1 and {limits.max_tokens}",
                       param=field)
    if asked > room or room < 1:
        raise APIError(400, f"提示 {prompt_len} 个 token 加 {field} {asked} 超出上下文长度 {context} / the prompt's "
                            f"{prompt_len} tokens plus {field} {asked} exceed the context length {context}",
                       param="messages", code="context_length_exceeded")
    temperature = request.temperature if request.temperature >= GREEDY_BELOW_TEMPERATURE else 0.0
    return SamplingParams(max_new_tokens=asked, temperature=temperature, top_p=request.top_p, seed=request.seed)


def stop_strings(request: ChatRequest) -> list:
    return [request.stop] if isinstance(request.stop, str) else list(request.stop or [])


class StopMatcher:
    """One stop string with its KMP failure table, so that how much of its start a text ends with is found in
    time linear in the string's length (checking every prefix would be quadratic, seconds per streamed update
    for a long stop string)."""

    def __init__(self, stop: str):
        self.stop = stop
        self.fail = [0] * len(stop)  # fail[i]: the longest proper border of stop[:i + 1]
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fail[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self.fail[i] = k

    def held(self, text: str) -> int:
        """The longest k < len(stop) such that `text` ends with stop[:k]: text that may yet become the stop string."""
        stop, k = self.stop, 0
        for c in text[max(0, len(text) - len(stop) + 1):] if len(stop) > 1 else "":
            while k and c != stop[k]:
                k = self.fail[k - 1]
            if c == stop[k]:
                k += 1
            if k == len(stop):  # a whole occurrence (cut before it by `response`): keep looking past it
                k = self.fail[k - 1]
        return k


# --- ChatGLM3 reply -> OpenAI message ----------------------------------------------------------------------------
class Reply:
    """The tokens of one reply read back as `model.chat` reads them (`conversation.process_response`), with
    OpenAI's stop strings applied to text answers."""

    def __init__(self, tokenizer, prompt: Prompt, stop: list):
        self.tokenizer, self.stop = tokenizer, stop
        self.matchers = [StopMatcher(s) for s in stop]
        self.ids = list(prompt.reply_start)
        self.sent = ""  # text already streamed
        self.hit_stop = False  # a stop string ended the answer

    def add(self, tokens: list):
        self.ids += tokens

    def response(self):
        """Text, or {"name", "parameters"} for a tool call, or {"name", "content"} for one that does not parse."""
        response, _ = conversation.process_response(self.tokenizer.decode(self.ids), [])  # (the history is not needed)
        if isinstance(response, str):
            cut = min((i for i in (response.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self.hit_stop, response = True, response[:cut]
        return response

    def delta(self, final: bool) -> str:
        """New text to stream. Nothing until the metadata line is complete (a tool name must not show as text),
        and never a possible start of a stop string, an unfinished placeholder or a half character: the pieces
        add up to the final answer."""
        text = self.tokenizer.decode(self.ids)
        if not final and ("\n" not in text or text.endswith("\ufffd")):
            return ""
        response = self.response()
        if not isinstance(response, str):  # a tool call: at the end, the text written before it
            if not final:
                return ""
            response = self.preamble()
        if not (final or self.hit_stop):
            held = max((m.held(response) for m in self.matchers), default=0)
            response = response[:len(response) - held]
            opened = response.rfind("[[")  # process_response rewrites upstream's [[...]] placeholder once complete
            if opened >= 0 and "]]" not in response[opened:]:
                response = response[:opened]
            response = response.removesuffix("[")
        if not response.startswith(self.sent):  # cannot take back streamed text; the rest still goes out
            return ""
        new, self.sent = response[len(self.sent):], response
        return new

    def preamble(self) -> str:
        """Text the model wrote before its last segment (e.g. a thought before a tool call), as it was streamed."""
        text = self.tokenizer.decode(self.ids)
        cut = text.rfind(conversation.role_token("assistant"))
        before = conversation.process_response(text[:cut], [])[0] if cut > 0 else ""
        return before if isinstance(before, str) else ""

    def message(self, finish: str) -> tuple[dict, str]:
        """(OpenAI assistant message, finish_reason)."""
        response = self.response()
        if isinstance(response, dict) and "parameters" in response:
            call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                    "function": {"name": response["name"], "arguments": json.dumps(response["parameters"], ensure_ascii=False)}}
            return {"role": "assistant", "content": self.preamble() or None, "tool_calls": [call]}, "tool_calls"
        if isinstance(response, dict):  # a call that does not parse is returned as the text the model wrote
            response = response["content"]
        return {"role": "assistant", "content": response}, "stop" if self.hit_stop or finish != LENGTH else "length"


# --- the running request --------------------------------------------------------------------------------------------
class Generation:
    """A job on the engine seen from asyncio: `updates()` yields (new tokens, finish reason or None)."""

    def __init__(self, engine, prompt: Prompt, params: SamplingParams):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        try:
            self.job = engine.submit(prompt.ids, params, lambda tokens, finish: loop.call_soon_threadsafe(
                self.queue.put_nowait, (tokens, finish)))
        except EngineBusy as e:
            raise APIError(503, f"服务器繁忙，请稍后重试 / the server is busy, retry later ({e})",
                           code="server_overloaded", type_="server_error") from None

    async def updates(self, request: Request):
        """Until the job finishes; cancels it when the client disconnects or stops reading."""
        finish = None
        try:
            while finish is None:
                try:
                    tokens, finish = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    tokens = []
                while finish is None and not self.queue.empty():  # take whatever piled up
                    more, finish = self.queue.get_nowait()
                    tokens = tokens + more
                if await request.is_disconnected():
                    return
                if finish == ERROR:
                    raise APIError(500, f"生成失败 / generation failed: {self.job.error}", type_="server_error")
                yield tokens, finish
        finally:
            self.job.cancel()  # no-op when finished


def usage(prompt: Prompt, generation: Generation) -> dict:
    completion = generation.job.generated
    return {"prompt_tokens": len(prompt.ids), "completion_tokens": completion, "total_tokens": len(prompt.ids) + completion}


async def complete(request: Request, prompt: Prompt, generation: Generation, reply: Reply, head: dict) -> dict:
    finish = CANCELLED
    async with contextlib.aclosing(generation.updates(request)) as updates:
        async for tokens, finish in updates:
            reply.add(tokens)
            if reply.stop and not finish:
                await asyncio.to_thread(reply.response)  # (sets hit_stop) text work stays off the event loop
                if reply.hit_stop:
                    break
    message, finish_reason = await asyncio.to_thread(reply.message, finish)
    return {**head, "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage(prompt, generation)}


async def stream(request: Request, chat: ChatRequest, prompt: Prompt, generation: Generation, reply: Reply, head: dict):
    """Server-sent events in OpenAI's chunk format, ending with [DONE]; an error mid-stream is an error event."""
    def event(delta: dict, finish_reason=None) -> str:
        chunk = {**head, "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    yield event({"role": "assistant", "content": ""})
    finish = CANCELLED
    try:
        async with contextlib.aclosing(generation.updates(request)) as updates:
            async for tokens, finish in updates:
                reply.add(tokens)
                text = await asyncio.to_thread(reply.delta, finish is not None)  # off the event loop
                if text:
                    yield event({"content": text})
                if reply.hit_stop:
                    break
    except APIError as e:
        yield f"data: {json.dumps(e.body(), ensure_ascii=False)}\n\n"
        return
    if finish == CANCELLED and not reply.hit_stop:  # the client is gone
        return
    message, finish_reason = await asyncio.to_thread(reply.message, finish)
    if message.get("tool_calls"):
        yield event({"tool_calls": [dict(call, index=0) for call in message["tool_calls"]]})
    yield event({}, finish_reason)
    if chat.stream_options and chat.stream_options.include_usage:
        chunk = {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(prompt, generation)}
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"


# --- the application ---------------------------------------------------------------------------------------------
async def read_body(request: Request, limits: Limits) -> bytes:
    """The request body, refused as soon as it exceeds the size limit (413) or is still arriving after the time
    limit (408)."""
    limit = limits.max_request_bytes
    too_large = APIError(413, f"请求体超过 {limit} 字节 / the request body exceeds {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdecimal() and int(declared) > limit:
        raise too_large

    async def read() -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        return bytes(body)

    try:
        return await asyncio.wait_for(read(), limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise APIError(408, f"请求体在 {limits.body_timeout_s:g} 秒内没有传完 / the request body did not arrive within "
                            f"{limits.body_timeout_s:g} s", code="request_timeout") from None


def create_app(engine, tokenizer, model_name: str, context: int, limits: Limits, api_key: Optional[str] = None,
               page: Optional[Path] = None, allowed_hosts: Optional[list] = None) -> FastAPI:
    """`allowed_hosts`: the Host headers accepted (None: any)."""
    problem = api_key_problem(api_key)
    if problem:
        raise ValueError(f"api_key {problem[1]}")
    app = FastAPI(title="ChatGLM3", docs_url=None, redoc_url=None, openapi_url=None)
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=allowed_hosts)

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)  # unknown routes and methods
    async def http_error(_, e: HTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_, e: Exception):
        error = APIError(500, f"服务器内部错误 / internal server error: {type(e).__name__}", type_="server_error")
        return JSONResponse(error.body(), status_code=500)

    def authorize(request: Request):
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # the header's bytes as sent (Starlette decodes them as latin-1), compared in constant time
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("latin-1"), api_key.encode("ascii")):
            raise APIError(401, "API key 无效或缺失 / invalid or missing API key (Authorization: Bearer KEY)",
                           code="invalid_api_key")

    @app.get("/", include_in_schema=False)
    async def chat_page():
        if page is None:
            raise APIError(404, "没有聊天页面 / no chat page", code="not_found")
        return FileResponse(page, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.load()}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "chatglm3"}]}

    def prepare(body: bytes):
        """The checked request, its prompt and sampling parameters, and its reply (run off the event loop: parsing
        and tokenizing a megabyte takes a while)."""
        chat = parse_request(body)
        if chat.model != model_name:
            raise APIError(404, f"模型 {chat.model[:100]!r} 不存在，可用 / model {chat.model[:100]!r} does not exist; "
                                f"this server serves {model_name!r}", param="model", code="model_not_found")
        if not 1 <= len(chat.messages) <= limits.max_messages:
            raise APIError(400, f"messages: 须有 1 到 {limits.max_messages} 条 / must hold 1 to {limits.max_messages} "
                                "messages", param="messages")
        prompt = build_prompt(tokenizer, chat)
        params = sampling_params(chat, len(prompt.ids), context, limits)
        return chat, prompt, params, Reply(tokenizer, prompt, stop_strings(chat))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        chat, prompt, params, reply = await asyncio.to_thread(prepare, await read_body(request, limits))
        generation = Generation(engine, prompt, params)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if chat.stream:
            return StreamingResponse(stream(request, chat, prompt, generation, reply, head), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await complete(request, prompt, generation, reply, head)

    return app
