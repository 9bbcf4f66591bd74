"""ChatGLM3's chat protocol: history in, response (text or tool call) out, as upstream's `chat`/`stream_chat`."""
import ast
import copy
from typing import Optional

from .generation import _drop_upstream_kwargs, generate_stream


def parse_tool_call(code: str) -> dict:
    """`tool_call(name='x', n=3)` (optionally inside a ```python fence) -> {'name': 'x', 'n': 3}.

    Upstream evaluates the model's output with `eval`; here only literal keyword arguments are accepted.
    Raises ValueError for anything else."""
    lines = code.strip().split("\n")
    if lines and lines[0].startswith("```"):
        lines = lines[1:]
    if lines and lines[-1].strip().startswith("```"):
        lines = lines[:-1]
    text = "\n".join(lines).strip()
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"not a tool call: {e.msg}") from None
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "tool_call") or node.args:
        raise ValueError("not a tool call: expected tool_call(key=value, ...)")
    params = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise ValueError("not a tool call: **kwargs are not allowed")
        try:
            params[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            raise ValueError(f"not a tool call: argument {kw.arg} is not a literal") from None
    return params


def process_response(output: str, history: list) -> tuple:
    """Splits the decoded reply at <|assistant|> into history entries; returns (response, history).
    A segment with metadata (a tool name) is a tool call: {'name', 'parameters'}."""
    content = ""
    history = copy.deepcopy(history)
    for segment in output.split("<|assistant|>"):
        metadata, sep, content = segment.partition("\n")
        if not sep:  # no metadata line (e.g. a reply cut short)
            metadata, content = "", segment
        if not metadata.strip():
            content = content.strip()
            history.append({"role": "assistant", "metadata": metadata, "content": content})
            content = content.replace("[[训练时间]]", "2023年")  # upstream's placeholder
        else:
            history.append({"role": "assistant", "metadata": metadata, "content": content})
            try:
                content = {"name": metadata.strip(), "parameters": parse_tool_call(content)}
            except ValueError:
                content = {"name": metadata.strip(), "content": content}
    return content, history


def _strip_stop(ids: list, stop_ids: list) -> list:
    return ids[:-1] if ids and ids[-1] in stop_ids else ids


def stream_chat(model, tokenizer, query: str, history: Optional[list] = None, role: str = "user", max_length: int = 8192,
                do_sample: bool = True, top_p: float = 0.8, temperature: float = 0.8, max_new_tokens: Optional[int] = None, **gen_kwargs):
    """Yields (response so far, history) while decoding; the last yield is the complete turn."""
    _drop_upstream_kwargs(gen_kwargs)
    history = [] if history is None else history
    inputs = tokenizer.build_chat_input(query, history=history, role=role).to(model.device)
    stop_ids = [tokenizer.eos_token_id, tokenizer.get_command("<|user|>"), tokenizer.get_command("<|observation|>")]
    prompt_len = inputs["input_ids"].shape[1]
    if max_new_tokens is None:
        max_new_tokens = max(max_length - prompt_len, 1)
    new_ids = []
    new_history = history + [{"role": role, "content": query}]
    for token in generate_stream(model, inputs["input_ids"], inputs["attention_mask"], max_new_tokens=max_new_tokens,
                                 do_sample=do_sample, top_p=top_p, temperature=temperature, eos_token_id=stop_ids, **gen_kwargs):
        new_ids.append(int(token[0]))
        text = tokenizer.decode(_strip_stop(new_ids, stop_ids))
        # Wait for the metadata line (a tool name would otherwise show as text) and for whole characters.
        if "\n" in text and not text.endswith("\ufffd"):
            yield process_response(text, new_history)
    yield process_response(tokenizer.decode(_strip_stop(new_ids, stop_ids)), new_history)


def chat(model, tokenizer, query: str, history: Optional[list] = None, role: str = "user", **gen_kwargs):
    """One turn: (response, history). The response is text, or a dict for a tool call."""
    result = ("", history or [])
    for result in stream_chat(model, tokenizer, query, history, role, **gen_kwargs):
        pass
    return result
