"""Token generation as a plain loop over a KV cache (no dependence on transformers' GenerationMixin).

Greedy unless asked to sample (`do_sample=True`), as transformers' generate. The scripts (inference.py,
evaluate.py, scripts/quiz_types.py) decode greedily by default too, so their answers repeat; `--do-sample` draws
with SAMPLE_TEMPERATURE and SAMPLE_TOP_P, upstream's values, which `model.chat` and the API server's clients
keep as their default (upstream's `chat` samples).
"""
from typing import Iterator, Optional, Sequence, Union

import torch

SAMPLE_TEMPERATURE = 0.8
SAMPLE_TOP_P = 0.8


def _stop_ids(model, eos_token_id) -> list[int]:
    """The ids that end a row: the caller's (chat.py, batch_replies.py and the scripts pass
    chatglm3.model.conversation.stop_token_ids), else the config's eos."""
    if eos_token_id is None:
        return [model.config.eos_token_id]
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return list(eos_token_id)  # [] never stops


def next_token(logits: torch.Tensor, generated: Optional[torch.Tensor] = None, *, do_sample: bool = False,
               temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0) -> torch.Tensor:
    """logits: [b, vocab] (float32) -> [b] token ids: the most likely (greedy), or drawn with `do_sample`.
    `generated` ([b, n], the ids so far) is needed for a repetition penalty only."""
    if repetition_penalty != 1.0:
        seen = torch.gather(logits, 1, generated)
        seen = torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty)
        logits = logits.scatter(1, generated, seen)
    if not do_sample or temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop tokens once the mass before them already exceeds top_p (the first token always stays).
        drop = cumulative - sorted_logits.softmax(-1) > top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), num_samples=1).squeeze(-1)


@torch.no_grad()
def generate_stream(
    model,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    max_new_tokens: Optional[int] = None,
    max_length: Optional[int] = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    eos_token_id: Union[int, Sequence[int], None] = None,
    pad_token_id: Optional[int] = None,
) -> Iterator[torch.Tensor]:
    """Yields the next token of every row ([b]) until all rows stopped or the budget is spent.
    Rows that already stopped get `pad_token_id`."""
    if max_new_tokens is None:
        max_new_tokens = (max_length - input_ids.shape[1]) if max_length else 256
    stop = torch.tensor(_stop_ids(model, eos_token_id), device=input_ids.device, dtype=torch.long)
    pad = pad_token_id if pad_token_id is not None else (model.config.pad_token_id or 0)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = (attention_mask > 0).long()
    generated = input_ids
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    step_ids, cache = input_ids, None
    was_training = model.training
    model.eval()  # no dropout while generating; the caller's mode comes back afterwards
    try:
        for _ in range(max(max_new_tokens, 0)):
            out = model(step_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True, return_last_logit=True)
            cache = out.past_key_values
            token = next_token(out.logits[:, -1].float(), generated, do_sample=do_sample, temperature=temperature,
                               top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty)
            token = torch.where(finished, torch.full_like(token, pad), token)
            yield token
            finished |= torch.isin(token, stop)
            if bool(finished.all()):
                return
            generated = torch.cat([generated, token[:, None]], dim=1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
            step_ids = token[:, None]
    finally:
        model.train(was_training)


def _drop_upstream_kwargs(kwargs: dict):
    """Accept the transformers/upstream arguments that mean 'the default' here; refuse the rest clearly."""
    if kwargs.pop("num_beams", 1) != 1:
        raise ValueError("beam search is not supported: use num_beams=1 (greedy or sampling)")
    if kwargs.pop("logits_processor", None):
        raise ValueError("logits_processor is not supported: use temperature/top_p/top_k/repetition_penalty")
    kwargs.pop("use_cache", None)  # always on


def generate(model, input_ids, attention_mask=None, streamer=None, **kwargs) -> torch.Tensor:
    """prompt + new tokens, like transformers' generate. `streamer` follows transformers' TextStreamer
    protocol (put(prompt), put(token)..., end())."""
    _drop_upstream_kwargs(kwargs)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    new = []
    for token in generate_stream(model, input_ids, attention_mask, **kwargs):
        new.append(token)
        if streamer is not None:
            streamer.put(token.cpu())
    if streamer is not None:
        streamer.end()
    if not new:
        return input_ids
    return torch.cat([input_ids, torch.stack(new, dim=1)], dim=1)
