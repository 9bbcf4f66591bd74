"""工具调用的训练与评测数据 / Tool-use training and evaluation data: teaching a model to look up Pokémon it never saw.

A model that only memorises knows the Pokémon it was trained on. To answer for one it never saw, it must copy the
name from the question into a `pokedex_lookup` call and the facts from the observation into its answer. Copying is
learnt from many different names, so most training samples are about synthetic Pokémon: invented names drawn
from the characters of the real names (so every character of a held-out name is one the model learns to write),
with facts built from the type chart. The held-out real Pokémon appear in no training sample of any kind; they
make the evaluation set.

Training samples (`build_training_samples`):
  * lookups: question -> call -> observation -> answer, several phrasings; follow-ups answered from the same
    observation without a new call; sometimes a second Pokémon in the same conversation (a second call);
  * not-found lookups: the observation says the Pokédex has no such Pokémon, and the answer says so;
  * no call needed, with the tool offered: greetings and type-chart questions;
  * ordinary conversations (no tool) about the real training Pokémon, as data_processing.py writes them.
Evaluation samples (`build_eval_samples`): for every held-out Pokémon, a type question whose reference is the call
and the answer, then a follow-up that needs no call; conversations asking about two of them (two calls); and
questions that need no call.
"""
import dataclasses
import json
import random

from chatglm3.model.conversation import encode_sample, format_tool_call
from dialogues import QUESTIONS, answer, ask, build_samples, split_dev
from pokedex import POKEDEX_TOOL, PokemonRow, PokemonTable, lookup_pokemon
from pokemon_types import TYPES, effectiveness, weaknesses

NAME_LENGTHS = {2: 0.2, 3: 0.6, 4: 0.2}  # about the real names' mix (2: 18%, 3: 67%, 4-5: 15%)
LOOKUP_QUESTIONS = ["帮我查一下{n}的资料。", "查查图鉴：{n}。", "{n}的图鉴信息是什么？", "我想了解{n}。"]
GREETINGS = [  # (question, answer): things to answer without a lookup
    ("你好", "你好！我是宝可梦图鉴助手，告诉我宝可梦的名字，我可以帮你查它的属性、弱点和特性。"),
    ("你好！", "你好！想了解哪只宝可梦？"),
    ("谢谢", "不客气！还有想查的宝可梦吗？"),
    ("谢谢你的帮助。", "不客气，随时可以再问我。"),
    ("你是谁？", "我是宝可梦图鉴助手，可以查询宝可梦的属性、弱点、特性和简介。"),
    ("你能做什么？", "我可以用图鉴查询宝可梦的资料，也可以回答属性相克的问题。"),
    ("再见", "再见，祝你旅途愉快！"),
]
CHART_QUESTIONS = {  # {t}: a type; answered from the type chart, no lookup needed
    "strong": ["{t}属性的招式对哪些属性效果拔群？", "{t}属性克制哪些属性？"],
    "weak": ["{t}属性的宝可梦怕什么属性？", "{t}属性的弱点是什么？"],
}
FOLLOW_UPS = ["types", "weaknesses", "ability", "description"]


# ---------------------------------------------------------------------------------------------- Pokémon

def held_out_names(table, ratio, seed=0):
    """The real Pokémon kept out of training: the same split as data_processing.py's --dev-ratio/--seed, plus
    those whose name holds a held-out one (嘟嘟利 holds 嘟嘟), which no training sample could name otherwise."""
    split = split_dev([row.name for row in table.rows], ratio, seed)
    return {row.name for row in table.rows if any(n in row.name for n in split)}


def scrubbed(row, held_out):
    """`row` with its ability and description left out where they name a held-out Pokémon (三合一磁怪's
    description names 小磁怪; the ability 怪力钳 holds 怪力), so that no training sample mentions one."""
    drop = {field: "" for field in ("ability", "description") if any(n in getattr(row, field) for n in held_out)}
    return dataclasses.replace(row, **drop) if drop else row


def mentioning(samples, names):
    """Indexes of the samples whose text mentions one of `names` (must be none for the held-out names)."""
    return [i for i, s in enumerate(samples) if any(n in json.dumps(s, ensure_ascii=False) for n in names)]


def lookup(row):
    """The pokedex_lookup observation for one row (synthetic or real): exactly what pokedex_lookup answers."""
    return lookup_pokemon(PokemonTable(path=None, encoding="", columns={}, rows=[row]), row.name)


def synthetic_rows(count, table, held_out, rng):
    """`count` invented Pokémon: names of 2-4 characters drawn uniformly from the characters of every real name
    (the held-out ones included, so each of their characters is learnt), never a real name and never containing
    a held-out one; 1-2 random types with the chart's weaknesses; a random training Pokémon's ability and a
    description spliced from 2-3 clauses of different ones (`spliced_description`)."""
    chars = sorted({ch for row in table.rows for ch in row.name})
    real = {row.name for row in table.rows}
    donors = [scrubbed(row, held_out) for row in table.rows if row.name not in held_out]
    abilities = sorted({row.ability for row in donors if row.ability})
    # Each donor's description cut into clauses once, for spliced_description.
    clauses = [(row.name, [c for c in row.description.replace("。", "，").split("，") if c])
               for row in donors if row.description]
    names, rows = set(), []
    while len(rows) < count:
        length = rng.choices(list(NAME_LENGTHS), weights=list(NAME_LENGTHS.values()))[0]
        name = "".join(rng.choice(chars) for _ in range(length))
        if name in names or name in real or any(h in name for h in held_out):
            continue
        names.add(name)
        types = rng.sample(TYPES, rng.choice((1, 1, 2)))
        rows.append(PokemonRow(line=0, name=name, raw={}, types=types, weaknesses=weaknesses(types),
                               quad_weaknesses=weaknesses(types, min_multiplier=4), ability=rng.choice(abilities),
                               description=spliced_description(name, clauses, rng)))
    return rows


def spliced_description(name, clauses, rng):
    """One clause each of 2-3 different training Pokémon's descriptions (`clauses`: [(donor name, its clauses)]),
    the donor's name replaced by `name`. A whole donor description would be one of ~135 texts the model memorises,
    so every observation in training would be familiar and a held-out Pokémon's description the first new one it
    meets; spliced, the description in the observation is new text each time, and an answer about it is copied,
    not recalled."""
    picked = rng.sample(clauses, rng.choice((2, 3)))
    return "，".join(rng.choice(parts).replace(donor, name) for donor, parts in picked) + "。"


def unknown_names(count, table, taken, rng):
    """Invented names that are in no table (for not-found lookups), built like the synthetic ones."""
    return [row.name for row in synthetic_rows(count, table, set(taken), rng) if row.name not in taken]


# ---------------------------------------------------------------------------------------------- conversations

def _call(row_or_name, observation):
    name = getattr(row_or_name, "name", row_or_name)
    return {"role": "tool", "name": POKEDEX_TOOL["name"], "parameters": {"name": name}, "observation": observation}


def lookup_turns(row, rng, first=True):
    """A user question naming `row`, the call, the answer; then 0-2 follow-ups about it ("它") answered from the
    same observation, without a new call."""
    topics = [t for t in FOLLOW_UPS if t in ("types", "weaknesses") or getattr(row, t)]
    if rng.random() < 0.15:
        question, reply, asked = rng.choice(LOOKUP_QUESTIONS).format(n=row.name), summary(row, rng), topics
    else:
        topic = rng.choice(topics)
        (question, reply), asked = ask(topic, row, rng), [topic]
    turns = [{"role": "user", "content": question}, _call(row, lookup(row)), {"role": "assistant", "content": reply}]
    rest = [t for t in topics if t not in asked]
    for topic in rng.sample(rest, min(len(rest), rng.choice((0, 1, 1, 2) if first else (0, 1)))):
        question, reply = ask(topic, row, rng, "它")
        turns += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    return turns


def summary(row, rng):
    """Every fact of the row in one answer."""
    parts = [answer("types", row, rng), answer("weaknesses", row, rng)]
    if row.ability:
        parts.append(answer("ability", row, rng))
    if row.description:
        parts.append(f"简介：{row.description}")
    return "".join(parts)


def lookup_conversation(rows, rng):
    """A tool sample about one Pokémon, or two (two calls) when `rows` holds two."""
    turns = []
    for i, row in enumerate(rows):
        turns += lookup_turns(row, rng, first=i == 0)
    return {"tools": [POKEDEX_TOOL], "conversations": turns}


def not_found_conversation(name, rng):
    """The lookup finds nothing; the answer says so instead of inventing facts."""
    topic = rng.choice(list(QUESTIONS))
    observation = lookup_pokemon(PokemonTable(path=None, encoding="", columns={}), name)
    return {"tools": [POKEDEX_TOOL], "conversations": [
        {"role": "user", "content": rng.choice(QUESTIONS[topic]).format(s=name)}, _call(name, observation),
        {"role": "assistant", "content": f"图鉴里没有找到「{name}」，请确认名字是否写对。"}]}


def chart_answer(kind, attack):
    """A type-chart answer: what `attack` hits ×2 ("strong"), or what hits a pure `attack` type ×2 ("weak")."""
    if kind == "strong":
        hit = [t for t in TYPES if effectiveness(attack, [t]) >= 2]
        return f"{attack}属性的招式对{'、'.join(hit)}属性效果拔群。" if hit else f"{attack}属性的招式对任何单一属性都没有2倍效果。"
    return f"{attack}属性的宝可梦怕{'、'.join(weaknesses([attack]))}属性的招式。"


def no_call_conversation(rng):
    """A question that needs no lookup, asked with the tool offered: a greeting or a type-chart question."""
    if rng.random() < 0.4:
        question, reply = rng.choice(GREETINGS)
    else:
        kind, attack = rng.choice(list(CHART_QUESTIONS)), rng.choice(TYPES)
        question, reply = rng.choice(CHART_QUESTIONS[kind]).format(t=attack), chart_answer(kind, attack)
    return {"tools": [POKEDEX_TOOL], "conversations": [{"role": "user", "content": question},
                                                       {"role": "assistant", "content": reply}]}


def build_training_samples(table, held_out, synthetic=8000, real_variants=4, max_pokemon=3, seed=0):
    """The tool-use training set: lookups of `synthetic` invented Pokémon (with up to `max_pokemon` - 1 more
    invented ones asked about in the same conversation), `real_variants` lookups and ordinary conversations per real training Pokémon, not-found lookups (5%)
    and no-call questions (10%), shuffled. No sample mentions a held-out Pokémon. Returns (samples, counts)."""
    rng = random.Random(f"{seed}|tool-train")
    train_rows = [scrubbed(row, held_out) for row in table.rows if row.name not in held_out]
    # Rows that had to be scrubbed are looked up nowhere: every observation in training is the tool's own.
    unchanged = [row for row in train_rows if row in table.rows]
    fake = synthetic_rows(synthetic, table, held_out, rng)
    # Up to `max_pokemon` per conversation: more calls (name copies) per token of the long tool system prompt.
    lookups = [lookup_conversation([row] + rng.sample(fake, min(len(fake), rng.randint(0, max_pokemon - 1))), rng)
               for row in fake + unchanged * real_variants]
    missing = unknown_names(max(1, len(lookups) // 20), table, {row.name for row in fake} | held_out, rng)
    train_table = PokemonTable(path=table.path, encoding=table.encoding, columns=table.columns, rows=train_rows)
    ordinary = [s for _, s in build_samples(train_table, seed=seed, variants=real_variants)]
    samples = (lookups + [not_found_conversation(n, rng) for n in missing]
               + [no_call_conversation(rng) for _ in range(max(1, len(lookups) // 10))] + ordinary)
    rng.shuffle(samples)
    counts = {"lookups": len(lookups), "synthetic_pokemon": len(fake), "not_found": len(missing),
              "no_call": max(1, len(lookups) // 10), "ordinary": len(ordinary)}
    return samples, counts


def build_eval_samples(table, held_out, seed=0):
    """Evaluation conversations about the held-out Pokémon (see the module doc); each expected call's observation
    is what pokedex_lookup answers for that name."""
    rng = random.Random(f"{seed}|tool-eval")
    rows = sorted((row for row in table.rows if row.name in held_out), key=lambda r: r.name)
    samples = []
    for row in rows:
        question, reply = ask("types", row, rng)
        follow, follow_reply = ask("weaknesses", row, rng, "它")
        samples.append({"tools": [POKEDEX_TOOL], "conversations": [
            {"role": "user", "content": question}, _call(row, lookup(row)), {"role": "assistant", "content": reply},
            {"role": "user", "content": follow}, {"role": "assistant", "content": follow_reply}]})
    for a, b in zip(rows, rows[1:] + rows[:1]):
        turns = []
        for row in (a, b):
            question, reply = ask("types", row, rng)
            turns += [{"role": "user", "content": question}, _call(row, lookup(row)),
                      {"role": "assistant", "content": reply}]
        samples.append({"tools": [POKEDEX_TOOL], "conversations": turns})
    samples += [no_call_conversation(rng) for _ in range(len(rows))]
    return samples


# ---------------------------------------------------------------------------------------------- checks

def copy_units(table):
    """What the model copies, as the tokenizer should keep it (build_tiny_model.py --single-tokens): every type
    name and every character a name is made of (the real names', so the synthetic and held-out ones' too). A
    tokenizer trained freely merges them with their neighbours (是水, 火属性的宝可梦, ▁小), so a type or a name is
    other tokens in the answer than in the observation, and copying it becomes a lookup learnt per type and
    template."""
    return [*TYPES, *sorted({ch for row in table.rows for ch in row.name} - set(TYPES))]


def unlearnt_name_tokens(tokenizer, names, samples):
    """{name: token pieces} for each name whose call (`tool_call(name='...')`) holds a token that no training
    reply teaches the model to write (a label in `samples`), i.e. names the model could not copy into a call."""
    learnt = set()
    for sample in samples:
        learnt.update(encode_sample(tokenizer, sample)[1])
    missing = {}
    for name in names:
        ids = tokenizer.tokenizer.encode(format_tool_call({"name": name}))
        bad = [tokenizer.tokenizer.sp_model.id_to_piece(i) for i in ids if i not in learnt]
        if bad:
            missing[name] = bad
    return missing
