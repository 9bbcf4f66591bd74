"""Replies to many prompts at once (evaluate.py, data_processing/quiz_types.py): prompts of similar length share a batch,
left padded, and each reply is read back as model.chat would return it."""
from typing import Dict, List, Optional, Tuple

import torch

from chatglm3.model.conversation import process_response, stop_token_ids
from chatglm3.progress import Progress


def clean_response(text: str) -> str:
    """The reply text as model.chat returns it (metadata line removed, stripped); a tool call stays as written."""
    response, _ = process_response(text, [])
    return response if isinstance(response, str) else text.strip()


def left_pad(rows: List[List[int]], pad_token_id: int, device="cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of the rows padded on the left to the longest, as generation needs them."""
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([[pad_token_id] * (width - len(row)) + row for row in rows], device=device)
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=device)
    return input_ids, attention_mask


def generate_replies(model, tokenizer, prompts: List[List[int]], batch_size: int, gen_kwargs: Dict,
                     progress: bool = True) -> List[str]:
    """The reply to each prompt (ids from conversation.prompt_ids), in the order of `prompts`."""
    return [clean_response(text) for text, _ in generate_texts(model, tokenizer, prompts, batch_size, gen_kwargs,
                                                               progress)]


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: List[List[int]], batch_size: int, gen_kwargs: Dict,
                   progress: bool = True) -> List[Tuple[str, bool]]:
    """For each prompt, the decoded reply as generated (the tokens before the stop token, for process_response)
    and whether it ended on a stop token rather than the length limit."""
    stop_ids = stop_token_ids(tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies: List[Optional[Tuple[str, bool]]] = [None] * len(prompts)
    bar = Progress(len(prompts), "已生成回复 / replies generated", unit="reply", disable=not progress)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        input_ids, attention_mask = left_pad([prompts[i] for i in batch], tokenizer.pad_token_id, model.device)
        output = model.generate(input_ids, attention_mask=attention_mask, eos_token_id=stop_ids,
                                pad_token_id=tokenizer.pad_token_id, **gen_kwargs)
        width = input_ids.shape[1]
        for row, i in enumerate(batch):
            new_ids = output[row, width:].tolist()
            stop = next((k for k, t in enumerate(new_ids) if t in stop_ids), len(new_ids))
            replies[i] = (tokenizer.decode(new_ids[:stop]), stop < len(new_ids))
        bar.update(len(batch))
    bar.close()
    return replies
