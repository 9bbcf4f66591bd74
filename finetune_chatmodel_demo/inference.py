#!/usr/bin/env python
"""与 ChatGLM3（基座或微调后）对话 / Chat with a ChatGLM3 model, base or fine-tuned.

三种用法 / Three ways to run it:
  * 交互 / interactive (stdin is a terminal): multi-turn chat in the ChatGLM3 format, the answer printed as it is
    generated. Commands: `clear` starts a new conversation, `exit` / `quit` / `stop` (or Ctrl-D) leaves.
  * 管道 / piped (stdin is not a terminal): every input line is one user turn of the same conversation (the same
    commands apply). stdout gets exactly one line per answer: "ChatGLM：" followed by the answer, with line breaks
    inside the answer written as the two characters "\\n". Everything else (loading, tool calls, errors) goes to
    stderr, so `printf 'q1\\nq2\\n' | python inference.py --model M | sed 's/^ChatGLM：//'` gives the answers.
  * `--prompt TEXT`: answer once ("ChatGLM：" + the answer as generated, line breaks kept) and exit.

退出码 / Exit status: 0 done; 1 piped input with turns that could not be answered (each is reported on stderr
and the chat goes on); 2 bad flags, model or checkpoint.

`--tools FILE.py` offers the tools of a tool file (functions decorated with @register_tool, upstream's convention;
docs/tools.md): a call from the model is executed by that function, its result fed back as an observation turn, and
the model continues to its answer.
"""
import argparse
import contextlib
import json
import os
import sys
from typing import Dict, List, Optional, Tuple


@contextlib.contextmanager
def stdout_to_stderr():
    """Send whatever libraries print (DeepSpeed's notices under transformers 4.x) to stderr, at the file-descriptor
    level: stdout carries the answers only."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


# Importing transformers 4.x imports DeepSpeed, which prints its accelerator notice on stdout: run as a script, that
# goes to stderr (imported, e.g. by tests, nothing is redirected).
with stdout_to_stderr() if __name__ == "__main__" else contextlib.nullcontext():
    import torch

    from chatglm3 import ChatGLMError
    from chatglm3.model.conversation import prompt_ids, tool_system_message
    from chatglm3.serving.tool_loop import MAX_CALLS, MAX_ERROR_OBSERVATIONS, ToolTurn
    from chatglm3.model.generation import generate_stream
    from chatglm3.json_files import check_unicode
    from chatglm3.data.train_format import raw_prompt_ids
    from chatglm3.tools import Tool, load_tool_files
    from chatglm3.cli import (add_format_arg, add_generation_args, add_model_args, check_generation_args, generation_kwargs,
                     load_from_args, prompt_format)

ANSWER_PREFIX = "ChatGLM："
USER_PROMPT = "用户 / User："
EXIT_COMMANDS = ("exit", "quit", "stop")
CLEAR_COMMAND = "clear"


# ---------------------------------------------------------------------------------------------------------------
# History: the start of a conversation, trimming
# ---------------------------------------------------------------------------------------------------------------
def initial_history(system: Optional[str] = None, tools: Optional[List[dict]] = None) -> List[dict]:
    """The history a new conversation starts from: the tool system message first (as training renders a sample
    with "tools"; model.chat looks for the tools there), then the --system prompt."""
    history = [tool_system_message(tools)] if tools else []
    if system:
        history.append({"role": "system", "content": system})
    return history


def trim_history(tokenizer, query: str, history: List[dict], role: str, max_prompt_tokens: int) -> List[dict]:
    """Drop the oldest turns (a user message and all that follows it up to the next one) until the prompt fits.

    The leading system message is kept. While answering a tool observation the current turn is kept too, since
    the observation means nothing without it. Raises ChatGLMError when even that does not fit.
    """
    first_user = next((i for i, m in enumerate(history) if m["role"] == "user"), len(history))
    head, rest = history[:first_user], history[first_user:]
    turn_starts = [i for i, m in enumerate(rest) if m["role"] == "user"]
    droppable = len(turn_starts) - (1 if role == "observation" and turn_starts else 0)
    length = len(prompt_ids(tokenizer, history, query, role))
    dropped = 0
    while length > max_prompt_tokens and dropped < droppable:
        dropped += 1
        cut = turn_starts[dropped] if dropped < len(turn_starts) else len(rest)
        length = len(prompt_ids(tokenizer, head + rest[cut:], query, role))
    if length > max_prompt_tokens:
        raise ChatGLMError(
            f"错误：输入过长（{length} 个 token，最多 {max_prompt_tokens}）。请缩短问题，或用 clear 开始新对话，"
            f"或减小 --max-new-tokens / Error: prompt too long ({length} tokens, at most {max_prompt_tokens} = "
            f"context length minus --max-new-tokens); shorten it, `clear` the conversation or lower --max-new-tokens"
        )
    if dropped:
        print(f"提示：对话过长，已丢弃最早的 {dropped} 轮 / Note: conversation too long, dropped the oldest "
              f"{dropped} turn(s)", file=sys.stderr)
        cut = turn_starts[dropped] if dropped < len(turn_starts) else len(rest)
        return head + rest[cut:]
    return history


# ---------------------------------------------------------------------------------------------------------------
# One chat turn
# ---------------------------------------------------------------------------------------------------------------
class Display:
    """Where a turn's output goes: streamed to the terminal, or collected and printed once (piped / scripted)."""

    def __init__(self, stream: bool, verbose: bool = False):
        self.stream = stream
        self.verbose = verbose
        self._shown = ""

    def begin_answer(self) -> None:
        self._shown = ""
        if self.stream:
            print(ANSWER_PREFIX, end="", flush=True)

    def partial(self, text: str) -> None:
        # Only extend what is on screen; a partial text that rewrites earlier output is settled in end_answer.
        if self.stream and text.startswith(self._shown):
            print(text[len(self._shown):], end="", flush=True)
            self._shown = text

    def end_answer(self, text: str) -> None:
        if self.stream:
            tail = text[len(self._shown):] if text.startswith(self._shown) else "\n" + text
            print(tail, flush=True)

    def tool_call(self, call: dict, observation: str) -> None:
        out = sys.stdout if self.stream else sys.stderr
        if self.stream and self._shown:
            print(file=out)
        print(f"[调用工具 / tool call] {json.dumps(call, ensure_ascii=False)}", file=out)
        print(f"[工具结果 / observation] {observation}", file=out, flush=True)
        self._shown = ""

    def debug_prompt(self, ids: List[int]) -> None:
        if self.verbose:
            print(f"[调试 / debug] input_ids: {json.dumps(ids)}", file=sys.stderr, flush=True)


def chat_turn(model, tokenizer, query: str, history: List[dict], gen_kwargs: Dict, max_prompt_tokens: int,
              tools: Optional[Dict[str, Tool]] = None, display: Optional[Display] = None,
              max_tool_rounds: int = MAX_CALLS) -> Tuple[str, List[dict]]:
    """Answer one user message; returns (answer text, new history).

    With `tools` ({name: chatglm3.tools.Tool}), the turn runs the tool loop (chatglm3.serving.tool_loop, as
    evaluate.py --tools does): a call from the model is executed by the tool it names and its observation (or an
    error observation) fed back, at most `max_tool_rounds` calls. Raises ChatGLMError for a prompt that cannot fit, too many calls or failed calls; the caller's history
    is then unchanged.
    """
    display = display or Display(stream=False)
    turn = ToolTurn(history, query, dict(tools or {}), max_calls=max_tool_rounds)
    while not turn.done:
        turn.history = trim_history(tokenizer, turn.content, turn.history, turn.role, max_prompt_tokens)
        display.debug_prompt(turn.prompt(tokenizer))
        display.begin_answer()
        response, new_history = "", turn.history
        for response, new_history in model.stream_chat(tokenizer, turn.content, turn.history, role=turn.role,
                                                        **gen_kwargs):
            if isinstance(response, str):
                display.partial(response)
        call = turn.step(response, new_history, stopped=None)
        if call is not None:
            display.tool_call(call.call, call.observation)
    if turn.given_up:
        display.end_answer("")
        if turn.errors > MAX_ERROR_OBSERVATIONS:
            raise ChatGLMError(f"错误：工具调用失败 {turn.errors} 次，本轮放弃 / Error: {turn.errors} tool calls failed; "
                               f"this turn was given up")
        raise ChatGLMError(f"错误：模型连续调用工具超过 {max_tool_rounds} 次，本轮放弃 / Error: the model called tools "
                           f"more than {max_tool_rounds} times in a row; this turn was given up")
    display.end_answer(turn.answer)
    return turn.answer, turn.history


def raw_turn(model, tokenizer, prompt: str, gen_kwargs: Dict, max_prompt_tokens: int,
             display: Optional[Display] = None) -> str:
    """Answer a model trained on input-output data: the prompt alone, encoded as training encoded it (no role
    tokens, no history), the answer ending at eos, as upstream's inference.py asked."""
    display = display or Display(stream=False)
    ids = raw_prompt_ids(tokenizer, prompt)
    if len(ids) > max_prompt_tokens:
        raise ChatGLMError(f"错误：提示有 {len(ids)} 个 token，超过 {max_prompt_tokens} / Error: the prompt has {len(ids)} "
                           f"tokens, more than {max_prompt_tokens} (the context length minus --max-new-tokens)")
    display.debug_prompt(ids)
    display.begin_answer()
    new_ids = []
    for token in generate_stream(model, torch.tensor([ids], device=model.device),
                                 eos_token_id=tokenizer.eos_token_id, **gen_kwargs):
        if int(token[0]) == tokenizer.eos_token_id:
            break
        new_ids.append(int(token[0]))
        display.partial(tokenizer.decode(new_ids, skip_special_tokens=True))
    answer = tokenizer.decode(new_ids, skip_special_tokens=True).strip()
    display.end_answer(answer)
    return answer


def answer_turn(fmt: str, model, tokenizer, query: str, history: List[dict], gen_kwargs: Dict,
                max_prompt_tokens: int, tools=None, display: Optional[Display] = None) -> Tuple[str, List[dict]]:
    """One turn in the format the model was trained on (cli.prompt_format): a chat turn, or a raw prompt (an
    input-output model keeps no history)."""
    if fmt == "input-output":
        return raw_turn(model, tokenizer, query, gen_kwargs, max_prompt_tokens, display), history
    return chat_turn(model, tokenizer, query, history, gen_kwargs, max_prompt_tokens, tools, display)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,  # an abbreviation (--prom) would slip past the checks of the flag it stands for
        description="与 ChatGLM3 对话（交互、管道或单次）/ Chat with ChatGLM3 (interactive, piped or one-shot)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 2)[2],
    )
    add_model_args(parser)
    add_format_arg(parser)
    add_generation_args(parser, max_new_tokens=512)
    parser.add_argument("--system", default=None, help="系统提示词 / system prompt")
    parser.add_argument("--prompt", default=None, help="只回答这一个问题然后退出 / answer this one prompt and exit")
    parser.add_argument("--tools", nargs="+", default=None, metavar="FILE.py",
                        help="提供这些工具文件里的工具（@register_tool 装饰的函数，见 docs/tools.md）/ offer the tools of "
                             "these tool files (functions decorated with @register_tool, see docs/tools.md)")
    parser.add_argument("--verbose", action="store_true",
                        help="在 stderr 打印每次输入的 token id / print each prompt's token ids on stderr")
    return parser


def read_line(interactive: bool, number: int) -> Optional[str]:
    """Input line `number`, or None at the end. Piped lines are decoded one at a time, so a line that is not valid
    text raises ChatGLMError naming it and nothing else is lost; so does a typed line that Python decoded with
    surrogateescape (a terminal whose encoding is not the one typed)."""
    encoding = sys.stdin.encoding or "utf-8"
    not_text = ChatGLMError(f"错误：输入第 {number} 行不是有效的 {encoding} 文本，已跳过 / Error: input line {number} is "
                            f"not valid {encoding} text; skipped")
    try:
        if interactive:
            line = input(f"\n{USER_PROMPT}")
        else:
            raw = sys.stdin.buffer.readline()
            line = raw.decode(encoding) if raw else None
        check_unicode(line, "")
    except (EOFError, KeyboardInterrupt):
        return None
    except (UnicodeDecodeError, ChatGLMError):
        raise not_text from None
    return line


def check_args(args: argparse.Namespace) -> None:
    for flag, text in (("--prompt", args.prompt), ("--system", args.system)):
        check_unicode(text, flag)  # invalid UTF-8 on the command line arrives as lone surrogates
    check_generation_args(args)


def run(args: argparse.Namespace) -> int:
    check_args(args)
    tools = {}
    if args.tools:  # a bad tool file is one line before the model loads
        tools = load_tool_files(args.tools).tools
        print(f"工具 / Tools: {', '.join(tools)} ({' '.join(args.tools)})", file=sys.stderr)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    fmt = prompt_format(args)
    if fmt == "input-output" and (tools or args.system):
        raise ChatGLMError("错误：--tools、--system 只适用于对话格式（--format multi-turn）/ Error: --tools and --system need "
                           "the chat format; this model was trained on input-output data (--format multi-turn to force)")
    with stdout_to_stderr():
        model, tokenizer = load_from_args(args)
    max_prompt_tokens = model.config.seq_length - args.max_new_tokens
    if max_prompt_tokens < 1:
        raise ChatGLMError(f"错误：--max-new-tokens {args.max_new_tokens} 不小于模型上下文长度 "
                           f"{model.config.seq_length} / Error: --max-new-tokens must be below the model's context "
                           f"length {model.config.seq_length}")
    gen_kwargs = generation_kwargs(args)
    fresh = initial_history(args.system, [tool.schema for tool in tools.values()])

    if args.prompt is not None:
        if not args.prompt.strip():
            raise ChatGLMError("错误：--prompt 为空 / Error: --prompt is empty")
        answer_turn(fmt, model, tokenizer, args.prompt, list(fresh), gen_kwargs, max_prompt_tokens, tools,
                    Display(stream=True, verbose=args.verbose))
        return 0

    interactive = sys.stdin.isatty()
    display = Display(stream=interactive, verbose=args.verbose)
    if interactive:
        print("输入问题开始对话；clear 清空历史，exit / stop 退出 / Type to chat; `clear` starts over, "
              "`exit` / `stop` quits")
    history, failed_turns, number = list(fresh), 0, 0
    while True:
        number += 1
        try:
            line = read_line(interactive, number)
        except ChatGLMError as exc:  # not valid text: skipped, the chat goes on
            failed_turns += 1
            print(exc, file=sys.stderr, flush=True)
            continue
        if line is None:  # EOF
            break
        query = line.strip()
        if query in EXIT_COMMANDS:
            break
        if query == CLEAR_COMMAND:
            history = list(fresh)
            print("已开始新对话 / Started a new conversation", file=sys.stdout if interactive else sys.stderr)
            continue
        if not query:
            if interactive:
                print("提示：请输入问题（空行被忽略）/ Note: type a question (empty lines are ignored)")
            continue
        try:
            answer, history = answer_turn(fmt, model, tokenizer, query, history, gen_kwargs, max_prompt_tokens,
                                          tools, display)
        except ChatGLMError as exc:
            failed_turns += 1
            print(exc, file=sys.stderr, flush=True)
            continue
        except KeyboardInterrupt:
            print("\n已中断本次回答 / Answer interrupted", file=sys.stderr)
            continue
        except Exception as exc:  # e.g. out of memory: this turn is lost, not the conversation
            failed_turns += 1
            reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
            print(f"错误：这一轮失败（{reason}），对话继续 / Error: this turn failed ({reason}); the chat goes on",
                  file=sys.stderr, flush=True)
            continue
        if not interactive:
            print(ANSWER_PREFIX + answer.replace("\n", "\\n"), flush=True)
    if failed_turns and not interactive:
        print(f"有 {failed_turns} 轮未能回答 / {failed_turns} turn(s) could not be answered", file=sys.stderr)
        return 1
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except ChatGLMError as exc:
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
