"""OpenAI's Chat Completions API over a serving Engine: requests checked and mapped onto ChatGLM3's chat format
(the `conversation` module's, so a served call looks exactly like what training taught), replies mapped back
(text, or `tool_calls` with JSON arguments), plain or streamed as server-sent events.

Tool calls are only ever returned to the client: nothing the model writes is executed here.
"""
import asyncio
import contextlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from . import conversation
from .serving import CANCELLED, ERROR, LENGTH, EngineBusy, SamplingParams

# Sampling defaults when a request leaves them out: upstream's `model.chat` defaults.
DEFAULT_TEMPERATURE, DEFAULT_TOP_P = 0.8, 0.8
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streamed request checks that its client is still there
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


class APIError(Exception):
    """Answered as OpenAI's error object with this HTTP status."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --- the request, as OpenAI documents it (the fields this server understands) -----------------------------------
class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FunctionDef(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[dict] = None


class ToolDef(_Model):
    type: Literal["function"]
    function: FunctionDef


class CalledFunction(_Model):
    name: str
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


class ChatRequest(_Model):
    model: str
    messages: list[Message]
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0, le=2)
    top_p: float = Field(DEFAULT_TOP_P, gt=0, le=1)
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    tools: Optional[list[ToolDef]] = None
    tool_choice: Union[Literal["auto", "none"], NamedToolChoice, None] = None
    n: int = Field(1, ge=1, le=1)


def parse_request(body: bytes) -> ChatRequest:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"请求体不是合法的 JSON / the request body is not valid JSON: {e}") from None
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(400, f"{where}: {first['msg']}", param=where) from None


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
    pending = {}  # tool calls of the last assistant message still waiting for their results
    previous = None
    for i, m in enumerate(request.messages):
        where = f"messages[{i}]"
        role = "system" if m.role == "developer" else m.role
        if pending and role != "tool":
            raise APIError(400, f"{where}: 工具调用 {next(iter(pending))} 缺少 tool 消息 / tool call "
                                f"{next(iter(pending))} has no tool message before this {m.role} message", param=where)
        if role == "system" and previous not in (None, "system"):
            raise APIError(400, f"{where}: system 消息只能在开头 / system messages only at the start", param=where)
        if role == "assistant" and previous not in ("user", "tool"):
            raise APIError(400, f"{where}: assistant 消息须在 user 或 tool 之后 / an assistant message must follow "
                                "a user or tool message", param=where)
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


def _calls(m: Message, where: str) -> dict:
    """An assistant message's tool calls: {id: (name, arguments)}."""
    calls = {}
    for j, call in enumerate(m.tool_calls or []):
        try:
            arguments = json.loads(call.function.arguments)
        except json.JSONDecodeError:
            arguments = None
        if not isinstance(arguments, dict):
            param = f"{where}.tool_calls[{j}].function.arguments"
            raise APIError(400, f"{param}: 须是 JSON 对象 / must be a JSON object", param=param)
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
    asked = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    if asked is None:
        asked = min(limits.max_tokens, room)
    elif not 1 <= asked <= limits.max_tokens:
        raise APIError(400, f"max_tokens: 须在 1 到 {limits.max_tokens} 之间 / must be between 1 and {limits.max_tokens}",
                       param="max_tokens")
    if asked > room or room < 1:
        raise APIError(400, f"提示 {prompt_len} 个 token 加 max_tokens {asked} 超出上下文长度 {context} / the prompt's "
                            f"{prompt_len} tokens plus max_tokens {asked} exceed the context length {context}",
                       param="messages", code="context_length_exceeded")
    return SamplingParams(max_new_tokens=asked, temperature=request.temperature, top_p=request.top_p, seed=request.seed)


def stop_strings(request: ChatRequest) -> list:
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > 4 or not all(stop):
        raise APIError(400, "stop: 最多 4 个非空字符串 / at most 4 non-empty strings", param="stop")
    return stop


# --- ChatGLM3 reply -> OpenAI message ----------------------------------------------------------------------------
class Reply:
    """The tokens of one reply read back as `model.chat` reads them (`conversation.process_response`), with
    OpenAI's stop strings applied to text answers."""

    def __init__(self, tokenizer, prompt: Prompt, stop: list):
        self.tokenizer, self.stop = tokenizer, stop
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
            held = max((k for s in self.stop for k in range(1, len(s)) if response.endswith(s[:k])), default=0)
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
            if reply.stop and not finish and isinstance(reply.response(), str) and reply.hit_stop:
                break
    message, finish_reason = reply.message(finish)
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
                text = reply.delta(final=finish is not None)
                if text:
                    yield event({"content": text})
                if reply.hit_stop:
                    break
    except APIError as e:
        yield f"data: {json.dumps(e.body(), ensure_ascii=False)}\n\n"
        return
    if finish == CANCELLED and not reply.hit_stop:  # the client is gone
        return
    message, finish_reason = reply.message(finish)
    if message.get("tool_calls"):
        yield event({"tool_calls": [dict(call, index=0) for call in message["tool_calls"]]})
    yield event({}, finish_reason)
    if chat.stream_options and chat.stream_options.include_usage:
        chunk = {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(prompt, generation)}
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"


# --- the application ---------------------------------------------------------------------------------------------
async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it exceeds `limit` bytes."""
    too_large = APIError(413, f"请求体超过 {limit} 字节 / the request body exceeds {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def create_app(engine, tokenizer, model_name: str, context: int, limits: Limits, api_key: Optional[str] = None,
               page: Optional[Path] = None) -> FastAPI:
    app = FastAPI(title="ChatGLM3", docs_url=None, redoc_url=None, openapi_url=None)

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
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
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

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        chat = parse_request(await read_body(request, limits.max_request_bytes))
        if chat.model != model_name:
            raise APIError(404, f"模型 {chat.model!r} 不存在，可用 / model {chat.model!r} does not exist; this server "
                                f"serves {model_name!r}", param="model", code="model_not_found")
        if not 1 <= len(chat.messages) <= limits.max_messages:
            raise APIError(400, f"messages: 须有 1 到 {limits.max_messages} 条 / must hold 1 to {limits.max_messages} "
                                "messages", param="messages")
        reply_stop = stop_strings(chat)
        prompt = build_prompt(tokenizer, chat)
        params = sampling_params(chat, len(prompt.ids), context, limits)
        generation = Generation(engine, prompt, params)
        reply = Reply(tokenizer, prompt, reply_stop)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if chat.stream:
            return StreamingResponse(stream(request, chat, prompt, generation, reply, head), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await complete(request, prompt, generation, reply, head)

    return app
