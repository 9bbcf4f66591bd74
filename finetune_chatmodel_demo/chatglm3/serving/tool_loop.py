"""The tool loop, written once: a user turn in which the model may call tools before it answers.

The model's reply is read by conversation.process_response. A tool call is executed with exactly the arguments
the model wrote, by the tool of that name in `tools` (chatglm3.tools.Tool: a registered function of a tool file;
nothing else is ever run; the call syntax is parsed as literals only), and what the tool returns is fed back as an
observation turn. A call that fails (it does not parse, names no offered tool, its arguments do not fit the
function's signature, the tool raises, or the tool answers with an error) is fed back as an error observation
{"错误": ...}. A turn is given up at a call beyond MAX_CALLS (stops call loops) or a failed call
beyond MAX_ERROR_OBSERVATIONS (at most that many error observations are fed back).

`ToolTurn` is one turn's state; inference.py drives one turn with streamed generation, `run_turns` drives many
at once with batched generation (evaluate.py).
"""
import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from chatglm3.progress import Progress
from chatglm3.serving.batch_replies import generate_texts
from chatglm3.model.conversation import process_response, prompt_ids
from chatglm3.tools import Tool

MAX_ERROR_OBSERVATIONS = 2  # error observations fed back per user turn before it is given up
MAX_CALLS = 3  # calls answered per user turn (stops call loops)
ERROR_KEY = "错误"  # an observation {"错误": ...} reports a failed call (model-facing, so Chinese, as the data)


def error_observation(message: str) -> str:
    return json.dumps({ERROR_KEY: message}, ensure_ascii=False)


def is_error_observation(observation: str) -> bool:
    try:
        value = json.loads(observation)
    except ValueError:
        return False
    return isinstance(value, dict) and ERROR_KEY in value


@dataclass
class CallResult:
    call: dict  # as the model wrote it: {"name", "parameters"}, or {"name", "content"} when it did not parse
    observation: str  # what was fed back
    ok: bool


def execute(call: dict, tools: Dict[str, Tool]) -> CallResult:
    """Run one tool call from the model; never raises (a failure becomes an error observation)."""
    name = call.get("name")
    if "parameters" not in call:
        return CallResult(call, error_observation("工具调用格式错误，应为 tool_call(参数名='值')"), False)
    if name not in tools:
        offered = "、".join(tools) or "无"
        return CallResult(call, error_observation(f"没有名为 {name!r} 的工具，可用的工具：{offered}"), False)
    tool = tools[name]
    problem = tool.argument_problem(call["parameters"])
    if problem is not None:
        return CallResult(call, error_observation(problem), False)
    try:
        observation = tool.run(call["parameters"])
    except Exception as exc:  # a tool's bug must not end the conversation: the model is told, the loop goes on
        return CallResult(call, error_observation(f"工具 {name} 出错：{type(exc).__name__}: {exc}"), False)
    if not isinstance(observation, str):
        observation = json.dumps(observation, ensure_ascii=False, default=str)
    return CallResult(call, observation, not is_error_observation(observation))


@dataclass
class ToolTurn:
    """One user turn: feed the model's replies with `step` until `done`. With no `tools`, a call is not
    executed but returned as the answer text (the model was offered nothing to call)."""
    history: List[dict]  # chat-history messages before the turn; grows with the turn's messages
    query: str
    tools: Dict[str, Tool] = field(default_factory=dict)
    max_calls: int = MAX_CALLS
    role: str = "user"  # role and content of the message the model answers next
    content: str = ""
    calls: List[CallResult] = field(default_factory=list)
    answer: Optional[str] = None
    given_up: bool = False
    replies: int = 0  # generations, and how many of them ended on a stop token (None: not known)
    stopped: int = 0

    def __post_init__(self):
        self.content = self.query

    @property
    def done(self) -> bool:
        return self.answer is not None or self.given_up

    @property
    def errors(self) -> int:
        return sum(not c.ok for c in self.calls)

    def prompt(self, tokenizer) -> List[int]:
        return prompt_ids(tokenizer, self.history, self.content, self.role)

    def step(self, response, history: List[dict], stopped: Optional[bool] = True) -> Optional[CallResult]:
        """Take the model's reply as process_response returns it (response, history incl. the message answered);
        returns the executed call, if the reply was one."""
        self.history, self.replies = history, self.replies + 1
        self.stopped += bool(stopped)
        if isinstance(response, str):
            self.answer = response
            return None
        if not self.tools:
            self.answer = response.get("content", json.dumps(response, ensure_ascii=False))
            return None
        if len(self.calls) >= self.max_calls:
            self.given_up = True
            return None
        result = execute(response, self.tools)
        self.calls.append(result)
        self.role, self.content = "observation", result.observation
        self.given_up = self.errors > MAX_ERROR_OBSERVATIONS
        return result

    def feed_text(self, text: str, stopped: bool) -> Optional[CallResult]:
        """`step` for a decoded reply (the tokens before the stop token)."""
        response, history = process_response(text, self.history + [{"role": self.role, "content": self.content}])
        return self.step(response, history, stopped)


def run_turns(model, tokenizer, turns: List[ToolTurn], gen_kwargs: Dict, batch_size: int,
              max_prompt_tokens: int) -> None:
    """Drive every turn to its end with batched generation. A turn whose prompt outgrows `max_prompt_tokens`
    is given up. Progress counts finished turns (a turn may take several rounds: call, observation, answer)."""
    with Progress(len(turns), "已完成的工具轮 / tool turns finished", unit="turn") as progress:
        while True:
            pending = [t for t in turns if not t.done]
            prompts = [t.prompt(tokenizer) for t in pending]
            for turn, prompt in zip(pending, prompts):
                turn.given_up = len(prompt) > max_prompt_tokens
            fitting = [(t, p) for t, p in zip(pending, prompts) if not t.given_up]
            progress.update(len(pending) - len(fitting))  # given up: finished too
            if not fitting:
                return
            outputs = generate_texts(model, tokenizer, [p for _, p in fitting], batch_size, gen_kwargs, progress=False)
            for (turn, _), (text, stopped) in zip(fitting, outputs):
                turn.feed_text(text, stopped)
            progress.update(sum(turn.done for turn, _ in fitting))
