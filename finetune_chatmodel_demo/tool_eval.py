"""工具调用评测 / Measuring tool use: every user turn of a conversation set with tools, answered through the real
tool loop (chatglm3.serving.tool_loop) with the Pokédex as the tool, and scored.

Each user turn is asked with the reference conversation before it as history (the reference calls, observations
and answers of earlier turns). The reference "tool" entries right after the question are the expected calls.
Summary keys, fractions 0-1 (see `tool_metrics`):
  tool_call_rate        turns that expect a call where the model made one (well-formed or not)
  tool_false_call_rate  turns that expect none (the tool still offered) where the model made one
  tool_name_accuracy    turns that expect a call whose first call names the expected tool
  tool_args_exact       turns that expect a call whose first call has exactly the expected arguments
  tool_answer_grounded  type questions answered after a lookup whose final answer names exactly the types in
                        the observation the loop fed back (0 for a turn with no successful lookup)
  answer_types_correct  type questions whose final answer names exactly the true types (the reference
                        observation's); the figure to compare with a model asked without the tool
  stopped_share         generations that ended on a stop token rather than the length limit
With `hide_tools`, the same questions are asked without offering the tool (no tool system message, no tool
entries in the history): the no-tool baseline.
"""
import json
from dataclasses import dataclass
from typing import Dict, List, Optional

from chatglm3 import json_files
from chatglm3.model.conversation import TOOLS_KEY, sample_to_messages
from chatglm3.data.reader import load_conversations
from chatglm3.serving.tool_loop import Tool, ToolTurn, run_turns
from pokemon_types import TYPES

TOOL_METRIC_KEYS = ("tool_call_rate", "tool_false_call_rate", "tool_name_accuracy", "tool_args_exact",
                    "tool_answer_grounded", "answer_types_correct", "stopped_share")
TYPES_KEY = "属性"  # the observation field holding the Pokémon's types (pokedex.lookup_pokemon)
NAME_KEY = "姓名"


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
    records = load_conversations(path)
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


def types_named(text: str, names=()) -> set:
    """The type names `text` mentions, once the Pokémon `names` are taken out (海刺龙 holds 龙)."""
    for name in sorted((n for n in names if isinstance(n, str) and n), key=len, reverse=True):  # a number is no name
        text = text.replace(name, "")
    return {t for t in TYPES if t in text}


def _is_type_question(item: ToolEvalItem) -> bool:
    """A turn that expects a lookup whose reference answer names exactly the looked-up types."""
    if not item.expected or item.reference is None or not isinstance(item.expected[0]["observation"], dict):
        return False
    observation = item.expected[0]["observation"]
    types, name = observation.get(TYPES_KEY), observation.get(NAME_KEY)
    # Only a pokedex-shaped observation (a list of type names, a name) makes a type question; anything else in a
    # hand-written file is context, not a TypeError.
    if not (isinstance(types, list) and types and all(isinstance(t, str) for t in types)
            and isinstance(name, (str, type(None)))):
        return False
    return types_named(item.reference, [name]) == set(types)


def _grounded(turn: ToolTurn, names) -> bool:
    looked_up = [json.loads(c.observation) for c in turn.calls if c.ok]
    if not looked_up or turn.answer is None or not isinstance(looked_up[-1], dict):
        return False
    observation = looked_up[-1]
    return types_named(turn.answer, [*names, observation.get(NAME_KEY)]) == set(observation.get(TYPES_KEY) or ())


def _share(hits: int, total: int) -> Optional[float]:
    return round(hits / total, 4) if total else None


def tool_metrics(items: List[ToolEvalItem], turns: List[ToolTurn]) -> Dict:
    """The summary (module doc) for items and the turns that answered them; a fraction with nothing to count is
    None. Also the counts behind them: tool_turns_expecting_call, tool_turns_expecting_none, type_questions,
    tool_failed_calls, tool_turns_given_up."""
    expecting = [(i, t) for i, t in zip(items, turns) if i.expected]
    none = [t for i, t in zip(items, turns) if not i.expected]
    typed = [(i, t) for i, t in expecting if _is_type_question(i)]
    first = [(i.expected[0], t.calls[0].call if t.calls else {}) for i, t in expecting]
    truth = [set(i.expected[0]["observation"][TYPES_KEY]) for i, _ in typed]
    names = [[i.expected[0]["parameters"].get("name"), i.expected[0]["observation"].get(NAME_KEY)] for i, _ in typed]
    return {
        "tool_call_rate": _share(sum(bool(t.calls) for _, t in expecting), len(expecting)),
        "tool_false_call_rate": _share(sum(bool(t.calls) for t in none), len(none)),
        "tool_name_accuracy": _share(sum(e["name"] == c.get("name") for e, c in first), len(expecting)),
        "tool_args_exact": _share(sum(e["parameters"] == c.get("parameters") for e, c in first), len(expecting)),
        "tool_answer_grounded": _share(sum(_grounded(t, n) for (_, t), n in zip(typed, names)), len(typed)),
        "answer_types_correct": _share(sum(t.answer is not None and types_named(t.answer, n) == s
                                           for (_, t), n, s in zip(typed, names, truth)), len(typed)),
        "stopped_share": _share(sum(t.stopped for t in turns), sum(t.replies for t in turns)),
        "tool_turns_expecting_call": len(expecting), "tool_turns_expecting_none": len(none),
        "type_questions": len(typed), "tool_failed_calls": sum(t.errors for t in turns),
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
