"""工具调用评测 / Measuring tool use: every user turn of a conversation set with tools, answered through the real
tool loop (chatglm3.serving.tool_loop) with the tools of the --tools files, and scored.

Each user turn is asked with the reference conversation before it as history (the reference calls, observations
and answers of earlier turns). The reference "tool" entries right after the question are the expected calls.
Summary keys, fractions 0-1 (see `tool_metrics`):
  tool_call_rate        turns that expect a call where the model made one (well-formed or not)
  tool_false_call_rate  turns that expect none (the tool still offered) where the model made one
  tool_name_accuracy    turns that expect a call whose first call names the expected tool
  tool_args_exact       turns that expect a call whose first call has exactly the expected arguments
  tool_args_chars       characters of the expected string arguments that the first call wrote at the same place
                        (share of all of them): it rises while tool_args_exact is still 0, as copying arrives
  tool_extra_call_rate  turns that expect calls where the model made more than expected (a second lookup of a
                        garbled name after the right one, say)
  stopped_share         generations that ended on a stop token rather than the length limit
What only a tool's own side can check (e.g. the Pokédex plug-in: are the looked-up types in the answer) a tool file
adds with chatglm3.tools.register_metrics, from the records `turn_record` writes.
With `hide_tools`, the same questions are asked without offering the tools (no tool system message, no tool
entries in the history): the no-tool baseline.

`copy_losses` (evaluate.py --copy-loss) says where the loss is: the reference conversations read teacher-forced,
as in training, and each learnt token's loss (nats) averaged by what the token writes (`COPY_LOSS_KEYS`):
  copy_loss_call_first  the first token of an argument value in a call (the name the call must copy)
  copy_loss_call_rest   the later tokens of it: copying them in order is the induction step a small model learns
                        late (docs/tool_demo.md)
  copy_loss_echo        an argument value written again in a reply (the name in the answer)
  copy_loss_observation an observation's value written in a reply (the types in the answer)
  copy_loss_other       every other learnt token (templates, role tokens, stop tokens)
  copy_loss_all         all learnt tokens: the training loss on this data
"""
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from chatglm3 import json_files
from chatglm3.model.conversation import IGNORE_INDEX, TOOLS_KEY, encode_sample, sample_to_messages
from chatglm3.data.reader import Records, load_conversations
from chatglm3.serving.tool_loop import ToolTurn, run_turns
from chatglm3.tools import Tool

TOOL_METRIC_KEYS = ("tool_call_rate", "tool_false_call_rate", "tool_name_accuracy", "tool_args_exact",
                    "tool_args_chars", "tool_extra_call_rate", "stopped_share")


@dataclass
class ToolEvalItem:
    location: str  # "file:line" of the conversation
    history: List[dict]  # chat-history messages before the question
    query: str
    expected: List[dict]  # the reference calls: {"name", "parameters", "observation"}
    reference: Optional[str]  # the reference answer (None when the conversation ends without one)


def _observation(entry: dict):
    value = entry.get("observation")
    if isinstance(value, str):
        try:  # bounded nesting (chatglm3.json_files): a string observation may be any text
            return json_files.loads(value, "observation")
        except json_files.JSONFileError:
            return value
    return value


def load_items(path, hide_tools: bool = False) -> List[ToolEvalItem]:
    """One item per user message of every conversation in `path` (read and checked by chatglm3.data.reader)."""
    return conversation_items(load_conversations(path), hide_tools)


def conversation_items(records: Records, hide_tools: bool = False) -> List[ToolEvalItem]:
    """One item per user message of every conversation of `records` (chatglm3.data.reader)."""
    items = []
    for sample, location in zip(records, records.locations):
        conv = sample["conversations"]
        for i, message in enumerate(conv):
            if message["role"] != "user":
                continue
            after = conv[i + 1:]
            n_calls = next((k for k, m in enumerate(after) if m["role"] != "tool"), len(after))
            expected = [{"name": m["name"], "parameters": m["parameters"], "observation": _observation(m)}
                        for m in after[:n_calls]]
            reply = after[n_calls] if n_calls < len(after) else None
            before = {"conversations": conv[:i]}
            if hide_tools:
                before["conversations"] = [m for m in conv[:i] if m["role"] != "tool"]
            elif TOOLS_KEY in sample:
                before[TOOLS_KEY] = sample[TOOLS_KEY]
            history = [{k: v for k, v in m.items() if k != "loss"} for m in sample_to_messages(before)]
            reference = reply["content"] if reply and reply["role"] == "assistant" else None
            items.append(ToolEvalItem(location, history, message["content"], expected, reference))
    return items


def _share(hits: int, total: int) -> Optional[float]:
    return round(hits / total, 4) if total else None


def _chars_right(expected, called) -> tuple:
    """(characters right, characters expected) over the expected string arguments, position by position."""
    called = called if isinstance(called, dict) else {}
    pairs = [(value, called.get(key)) for key, value in expected.items() if isinstance(value, str)]
    return (sum(sum(a == b for a, b in zip(value, got)) for value, got in pairs if isinstance(got, str)),
            sum(len(value) for value, _ in pairs))


def tool_metrics(items: List[ToolEvalItem], turns: List[ToolTurn]) -> Dict:
    """The summary (module doc) for items and the turns that answered them; a fraction with nothing to count is
    None. Also the counts behind them: tool_turns_expecting_call, tool_turns_expecting_none, tool_failed_calls,
    tool_turns_given_up."""
    expecting = [(i, t) for i, t in zip(items, turns) if i.expected]
    none = [t for i, t in zip(items, turns) if not i.expected]
    first = [(i.expected[0], t.calls[0].call if t.calls else {}) for i, t in expecting]
    chars = [_chars_right(e["parameters"], c.get("parameters")) for e, c in first if isinstance(e["parameters"], dict)]
    return {
        "tool_call_rate": _share(sum(bool(t.calls) for _, t in expecting), len(expecting)),
        "tool_false_call_rate": _share(sum(bool(t.calls) for t in none), len(none)),
        "tool_name_accuracy": _share(sum(e["name"] == c.get("name") for e, c in first), len(expecting)),
        "tool_args_exact": _share(sum(e["parameters"] == c.get("parameters") for e, c in first), len(expecting)),
        "tool_args_chars": _share(sum(h for h, _ in chars), sum(n for _, n in chars)),
        "tool_extra_call_rate": _share(sum(len(t.calls) > len(i.expected) for i, t in expecting), len(expecting)),
        "stopped_share": _share(sum(t.stopped for t in turns), sum(t.replies for t in turns)),
        "tool_turns_expecting_call": len(expecting), "tool_turns_expecting_none": len(none),
        "tool_failed_calls": sum(t.errors for t in turns),
        "tool_turns_given_up": sum(t.given_up for t in turns),
    }


def answer_items(model, tokenizer, items: List[ToolEvalItem], tools: Dict[str, Tool], gen_kwargs: Dict,
                 batch_size: int, max_prompt_tokens: int) -> List[ToolTurn]:
    """Each item's question answered through the tool loop (batched generation), from its history."""
    turns = [ToolTurn(list(item.history), item.query, tools) for item in items]
    run_turns(model, tokenizer, turns, gen_kwargs, batch_size, max_prompt_tokens)
    return turns


def turn_record(item: ToolEvalItem, turn: ToolTurn) -> Dict:
    """One line of the predictions file: the question, each call and observation, the answer, the reference."""
    return {"location": item.location, "query": item.query, "expected_calls": item.expected,
            "calls": [{"call": c.call, "observation": c.observation, "ok": c.ok} for c in turn.calls],
            "prediction": turn.answer, "reference": item.reference, "given_up": turn.given_up,
            "replies": turn.replies, "stopped": turn.stopped}


COPY_LOSS_KEYS = ("copy_loss_call_first", "copy_loss_call_rest", "copy_loss_echo", "copy_loss_observation",
                  "copy_loss_other", "copy_loss_all")


def _spans(labels: List[int]) -> List[range]:
    """The runs of learnt positions (label != IGNORE_INDEX): one per reply."""
    spans, start = [], None
    for t, label in enumerate(labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = t
        elif label == IGNORE_INDEX and start is not None:
            spans.append(range(start, t))
            start = None
    return spans


def copy_categories(tokenizer, sample: dict, ids: List[int], labels: List[int]) -> Dict[int, str]:
    """{position: category} for every learnt position of one encoded sample (`encode_sample`), by what the token
    writes: a call's argument value (first or later token), an argument value again in a reply, an observation's
    value in a reply, or other. Values are found in the decoded text of each reply, so a token merged with its
    neighbours counts for the value it overlaps."""
    calls = [m for m in sample.get("conversations", []) if m.get("role") == "tool"]
    arguments = sorted({v for m in calls for v in json_files.string_values(m.get("parameters")) if v}, key=len,
                       reverse=True)
    observed = sorted({v for m in calls for v in json_files.string_values(_observation(m)) if v} - set(arguments),
                      key=len, reverse=True)
    categories = {}
    for span in _spans(labels):
        # Each token's characters in the reply's text: the growth of the decoded prefix.
        ends = [len(tokenizer.decode(ids[span.start:t + 1])) for t in span]
        starts = [0] + ends[:-1]
        text = tokenizer.decode(ids[span.start:span.stop])
        is_call = "tool_call(" in text
        found = {}  # token index in the span -> category, first match wins (arguments before observations)
        for values, kinds in ((arguments, ("call_first", "call_rest") if is_call else ("echo", "echo")),
                              ([] if is_call else observed, ("observation", "observation"))):
            for value in values:
                at = text.find(value)
                while at >= 0:
                    inside = [k for k in range(len(span)) if starts[k] < at + len(value) and ends[k] > at]
                    for n, k in enumerate(inside):
                        found.setdefault(k, kinds[0] if n == 0 else kinds[1])
                    at = text.find(value, at + len(value))
        for k, t in enumerate(span):
            categories[t] = found.get(k, "other")
    return categories


@torch.no_grad()
def copy_losses(model, tokenizer, samples: List[dict], max_length: int) -> Dict[str, Optional[float]]:
    """The mean loss (nats) of the learnt tokens of `samples`, by category (module doc), teacher-forced with the
    training encoding; None for a category with no token."""
    sums = {key: 0.0 for key in COPY_LOSS_KEYS}
    counts = dict.fromkeys(COPY_LOSS_KEYS, 0)
    device = next(model.parameters()).device
    for sample in samples:
        ids, labels = encode_sample(tokenizer, sample, max_length)
        # Label t is token t when token t-1 is learnt: the logits at t-1 predict it.
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].float()
        losses = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:], device=device),
                                                   reduction="none").tolist()
        for t, category in copy_categories(tokenizer, sample, ids, labels).items():
            for key in (f"copy_loss_{category}", "copy_loss_all"):
                sums[key] += losses[t - 1]
                counts[key] += 1
    return {key: round(sums[key] / counts[key], 4) if counts[key] else None for key in COPY_LOSS_KEYS}
