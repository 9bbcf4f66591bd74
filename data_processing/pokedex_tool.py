"""宝可梦图鉴工具插件 / The Pokédex as a tool plug-in (docs/tools.md):

    python finetune_chatmodel_demo/inference.py --model M --tools data_processing/pokedex_tool.py
    POKEDEX_TABLE=my_table.csv python finetune_chatmodel_demo/evaluate.py --data D --model M \\
        --tools data_processing/pokedex_tool.py

Offers `pokedex_lookup` (pokedex.py: the schema the tool-calling training samples carry), answered from the table
$POKEDEX_TABLE names (default: data.csv beside this file; a bad table is reported when the plug-in loads, before
the model), and adds the Pokémon-specific figures to evaluate.py --tools's summary (`type_answer_metrics`):
  tool_answer_grounded  type questions answered after a lookup whose final answer names exactly the types in
                        the observation the loop fed back (0 for a turn with no successful lookup)
  answer_types_correct  type questions whose final answer names exactly the true types (the reference
                        observation's); the figure to compare with a model asked without the tool (--hide-tools)
  type_answer_other_field  type questions answered, after a lookup, with another field: the observation's
                        weaknesses (exactly those types named), its ability, or the words 弱点/特性 (docs/tool_demo.md:
                        a model that has learnt to copy can still answer another question than the one asked)
A type question is a turn that expects a lookup whose reference answer names exactly the looked-up types.
"""
import json

from chatglm3.tools import register_metrics
from pokedex import pokedex_lookup, tool_table  # noqa: F401  (pokedex_lookup: the tool this file offers)
from pokemon_types import TYPES

TYPES_KEY = "属性"  # the observation field holding the Pokémon's types (pokedex.lookup_pokemon)
NAME_KEY = "姓名"
WEAKNESSES_KEY, ABILITY_KEY = "弱点", "特性"

tool_table()  # read (and checked) now: a bad table is one line before the model loads


def types_named(text: str, names=()) -> set:
    """The type names `text` mentions, once the Pokémon `names` are taken out (海刺龙 holds 龙)."""
    for name in sorted((n for n in names if isinstance(n, str) and n), key=len, reverse=True):  # a number is no name
        text = text.replace(name, "")
    return {t for t in TYPES if t in text}


def is_type_question(record: dict) -> bool:
    """A turn (a line of evaluate.py's predictions) that expects a lookup whose reference answer names exactly the
    looked-up types."""
    expected = record["expected_calls"]
    if not expected or record["reference"] is None or not isinstance(expected[0]["observation"], dict):
        return False
    observation = expected[0]["observation"]
    types, name = observation.get(TYPES_KEY), observation.get(NAME_KEY)
    # Only a pokedex-shaped observation (a list of type names, a name) makes a type question; anything else in a
    # hand-written file is context, not a TypeError.
    if not (isinstance(types, list) and types and all(isinstance(t, str) for t in types)
            and isinstance(name, (str, type(None)))):
        return False
    return types_named(record["reference"], [name]) == set(types)


def _names(record: dict) -> list:
    expected = record["expected_calls"][0]
    parameters = expected["parameters"] if isinstance(expected["parameters"], dict) else {}
    return [parameters.get("name"), expected["observation"].get(NAME_KEY)]


def _answer_and_observation(record: dict):
    """(the types the final answer names, the last successful lookup's observation), or None without either."""
    looked_up = [json.loads(c["observation"]) for c in record["calls"] if c["ok"]]
    if not looked_up or record["prediction"] is None or not isinstance(looked_up[-1], dict):
        return None
    observation = looked_up[-1]
    return types_named(record["prediction"], [*_names(record), observation.get(NAME_KEY)]), observation


def _types_of(observation: dict) -> set:
    return set(observation.get(TYPES_KEY) or ())


def _grounded(record: dict) -> bool:
    found = _answer_and_observation(record)
    return found is not None and found[0] == _types_of(found[1])


def _other_field(record: dict) -> bool:
    found = _answer_and_observation(record)
    if found is None:
        return False
    named, observation = found
    if named == _types_of(observation):  # grounded: the field asked for
        return False
    weaknesses, ability = observation.get(WEAKNESSES_KEY), observation.get(ABILITY_KEY)
    prediction = record["prediction"]
    return bool((isinstance(weaknesses, list) and weaknesses and named == set(weaknesses))
                or (isinstance(ability, str) and ability and ability in prediction)
                or WEAKNESSES_KEY in prediction or ABILITY_KEY in prediction)


def _share(hits: int, total: int):
    return round(hits / total, 4) if total else None


@register_metrics
def type_answer_metrics(records: list) -> dict:
    """tool_answer_grounded, answer_types_correct and type_answer_other_field (module doc), fractions 0-1 (None without type questions)."""
    typed = [r for r in records if is_type_question(r)]
    correct = sum(r["prediction"] is not None
                  and types_named(r["prediction"], _names(r)) == set(r["expected_calls"][0]["observation"][TYPES_KEY])
                  for r in typed)
    return {"tool_answer_grounded": _share(sum(_grounded(r) for r in typed), len(typed)),
            "answer_types_correct": _share(correct, len(typed)),
            "type_answer_other_field": _share(sum(_other_field(r) for r in typed), len(typed)),
            "type_questions": len(typed)}
