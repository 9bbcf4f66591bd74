"""ChatGLM3's chat loop: history in, response (text or tool call) out, as upstream's `chat`/`stream_chat`."""
from typing import Optional

import torch

from chatglm3.model.conversation import process_response, prompt_ids, stop_token_ids
from chatglm3.model.generation import SAMPLE_TEMPERATURE, SAMPLE_TOP_P, _drop_upstream_kwargs, generate_stream


def _strip_stop(ids: list, stop_ids: list) -> list:
    return ids[:-1] if ids and ids[-1] in stop_ids else ids


def stream_chat(model, tokenizer, query: str, history: Optional[list] = None, role: str = "user", max_length: int = 8192,
                do_sample: bool = True, top_p: float = SAMPLE_TOP_P, temperature: float = SAMPLE_TEMPERATURE,
                max_new_tokens: Optional[int] = None, **gen_kwargs):
    """Yields (response so far, history) while decoding; the last yield is the complete turn. Samples by
    default, as upstream's `stream_chat` (the scripts pass do_sample=False unless --do-sample)."""
    _drop_upstream_kwargs(gen_kwargs)
    history = [] if history is None else history
    input_ids = torch.tensor([prompt_ids(tokenizer, history, query, role)], device=model.device)
    stop_ids = stop_token_ids(tokenizer)
    if max_new_tokens is None:
        max_new_tokens = max(max_length - input_ids.shape[1], 1)
    new_ids = []
    new_history = history + [{"role": role, "content": query}]
    for token in generate_stream(model, input_ids, None, max_new_tokens=max_new_tokens,
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
