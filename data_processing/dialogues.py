"""宝可梦对话的写法 / How the Pokémon conversations are written.

From the rows of a checked table (pokedex.load_table): the original project's five-message conversation
(`seed_conversation`), varied 2-4 turn dialogues (`rich_conversation`), tool-calling samples that look the
Pokémon up with pokedex_lookup (`tool_conversation`, `not_found_conversation`), whole sets of them
(`build_samples`, `build_tool_samples`), the dev split by Pokémon (`split_dev`) and upstream's statistics
(`conversation_stats`). Every answer states the row's facts only.
"""
import hashlib
import random
from collections import Counter

from pokedex import POKEDEX_TOOL, lookup_pokemon

# Names that are in no Pokédex, for samples where the lookup finds nothing and the answer must say so.
UNKNOWN_NAMES = ["星光狐", "雷霆猫", "阿尔法兽", "冰晶鹿", "熔岩龟", "风铃鸟", "月影狼", "泡泡鲸"]

def seed_conversation(name, types, weakness, ability, description):
    """The original project's five-message conversation, values inserted exactly as given."""
    return {"conversations": [
        {"role": "system", "content": f"描述一个宝可梦：{name}。"},
        {"role": "user", "content": "它有什么特性和弱点？"},
        {"role": "assistant", "content": f"{name}的属性是{types}，弱点是{weakness}，特性是{ability}。"},
        {"role": "user", "content": "有更多的信息吗？"},
        {"role": "assistant", "content": description},
    ]}


SYSTEM_PROMPTS = ["你是一个熟悉宝可梦图鉴的助手。", "你是宝可梦百科助手，请根据图鉴回答问题。",
                  "你是一位宝可梦训练家的助手，回答要简洁准确。"]
# Every question with the frame of its answer: the answer repeats the question's words around the facts
# ("X属于哪种属性？" -> "X属于水属性。"). What to answer is then the word after the name, copied from the question;
# with free answer wording a small model had to recall the question across the lookup's call and observation, and
# its choice of field swung from checkpoint to checkpoint (docs/tool_demo.md, "Answers in the question's words").
# {s}: the name, or 它 in a follow-up turn; {n}: the name; {f}: the facts.
ASKS = {
    "types": [("{s}是什么属性的？", "{n}是{f}属性的。"), ("{s}的属性是什么？", "{n}的属性是{f}。"),
              ("{s}属于哪种属性？", "{n}属于{f}属性。"), ("请告诉我{s}的属性。", "{n}的属性是{f}。"),
              ("{s}是哪个属性的宝可梦？", "{n}是{f}属性的宝可梦。")],
    "weaknesses": [("{s}的弱点是什么？", "{n}的弱点是{f}。"), ("{s}怕什么属性的招式？", "{n}怕{f}属性的招式。"),
                   ("对付{s}用什么属性的招式效果好？", "对付{n}用{f}属性的招式效果好。"),
                   ("{s}被哪些属性克制？", "{n}被{f}属性克制。"), ("打{s}该用什么属性？", "打{n}该用{f}属性的招式。")],
    "ability": [("{s}的特性是什么？", "{n}的特性是{f}。"), ("{s}有什么特性？", "{n}有「{f}」这个特性。"),
                ("说说{s}的特性。", "{n}的特性是「{f}」。"), ("{s}的特性叫什么？", "{n}的特性叫{f}。")],
    "description": [("介绍一下{s}。", "简单介绍一下{n}：{f}"), ("{s}是一只什么样的宝可梦？", "{f}"),
                    ("能多讲讲{s}吗？", "关于{n}：{f}"), ("关于{s}还有什么信息？", "关于{n}：{f}"),
                    ("给我讲讲{s}吧。", "{f}")],
}
QUESTIONS = {topic: [question for question, _ in asks] for topic, asks in ASKS.items()}


def _join(items):
    return "、".join(items)


def _fill(topic, frame, row):
    """The answer `frame` with the row's facts about `topic` (no weakness at all: one sentence that says so)."""
    n = row.name
    if topic == "types":
        return frame.format(n=n, f=_join(row.types))
    if topic == "weaknesses":
        if not row.weaknesses:
            return f"按属性相克来看，没有哪种属性的招式对{n}有2倍以上的效果。"
        text = frame.format(n=n, f=_join(row.weaknesses))
        if row.quad_weaknesses:
            text += f"其中{_join(row.quad_weaknesses)}属性的招式对它有4倍效果。"
        return text
    return frame.format(n=n, f=row.ability if topic == "ability" else row.description)


def ask(topic, row, rng, subject=None):
    """A question about `topic` naming `subject` (default: the row's name; 它 in a follow-up) and its answer in
    the question's words, stated from the row's facts only."""
    question, frame = rng.choice(ASKS[topic])
    return question.format(s=subject or row.name), _fill(topic, frame, row)


def answer(topic, row, rng):
    """An answer about `topic` in one of its frames (for answers to no particular question: a summary)."""
    return _fill(topic, rng.choice(ASKS[topic])[1], row)


def rich_conversation(row, rng):
    """A 2-4 turn dialogue about one Pokémon (types, weaknesses, ability, description), the Pokémon named in
    the first user turn; phrasing, order and an occasional system prompt are drawn from `rng`."""
    topics = ["types", "weaknesses"] + [t for t in ("ability", "description") if getattr(row, t)]
    chosen = rng.sample(topics, rng.randint(2, min(4, len(topics))))
    messages = []
    if rng.random() < 0.2:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for turn, topic in enumerate(chosen):
        subject = row.name if turn == 0 or rng.random() < 0.3 else "它"
        question, reply = ask(topic, row, rng, subject)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    return {"conversations": messages}


def build_samples(table, style="rich", seed=0, variants=1, normalize=False):
    """Conversations for every row of `table`: a list of (Pokémon name, sample).

    style="seed": the original five messages (cells as written unless `normalize`); style="rich": `variants`
    dialogues per Pokémon from rich_conversation, each seeded by (seed, name, variant) so that a row's
    dialogues do not depend on the other rows.
    """
    samples = []
    for row in table.rows:
        if style == "seed":
            if normalize:
                values = (row.name, _join(row.types), _join(row.weaknesses), row.ability, row.description)
            else:
                r = row.raw
                values = (r["name"], r["types"], r["weaknesses"], r["ability"], r["description"])
            samples.append((row.name, seed_conversation(*values)))
        else:
            for v in range(variants):
                samples.append((row.name, rich_conversation(row, random.Random(f"{seed}|{row.name}|{v}"))))
    return samples


def split_dev(names, ratio, seed=0):
    """The set of Pokémon names that go to the dev set: round(ratio * n) of the distinct names (at least one
    and at most n-1 when ratio > 0), chosen by a seeded hash so the split is deterministic."""
    distinct = sorted(set(names))
    if ratio <= 0 or len(distinct) < 2:
        return set()
    k = min(max(1, round(ratio * len(distinct))), len(distinct) - 1)
    ranked = sorted(distinct, key=lambda n: hashlib.sha256(f"{seed}|{n}".encode("utf-8")).hexdigest())
    return set(ranked[:k])


# ---------------------------------------------------------------------------------------------- tool samples

LOOKUP_QUESTIONS = ["帮我查一下{n}的资料。", "查查图鉴：{n}。", "{n}的图鉴信息是什么？"]


def _summary(row, rng):
    """Every fact of the row in one answer."""
    return "".join(answer(t, row, rng) if t != "description" else f"简介：{row.description}"
                   for t in ("types", "weaknesses", "ability", "description")
                   if t in ("types", "weaknesses") or getattr(row, t))


def tool_conversation(row, table, rng):
    """One tool-calling sample about `row`: the user asks, the assistant calls pokedex_lookup, the observation
    holds the row's facts (lookup_pokemon), the answer states them; sometimes a follow-up answered from the
    same observation."""
    topics = ["types", "weaknesses"] + [t for t in ("ability", "description") if getattr(row, t)]
    conv = []
    if rng.random() < 0.25:
        question, reply = rng.choice(LOOKUP_QUESTIONS).format(n=row.name), _summary(row, rng)
        topics = []
    else:
        topic = rng.choice(topics)
        topics.remove(topic)
        question, reply = ask(topic, row, rng)
    conv.append({"role": "user", "content": question})
    conv.append({"role": "tool", "name": POKEDEX_TOOL["name"], "parameters": {"name": row.name},
                 "observation": lookup_pokemon(table, row.name)})
    conv.append({"role": "assistant", "content": reply})
    if topics and rng.random() < 0.5:
        topic = rng.choice(topics)
        question, reply = ask(topic, row, rng, "它")
        conv += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    return {"tools": [POKEDEX_TOOL], "conversations": conv}


def not_found_conversation(name, table, rng):
    """A sample where the lookup finds nothing and the answer says so instead of inventing facts."""
    topic = rng.choice(list(QUESTIONS))
    return {"tools": [POKEDEX_TOOL], "conversations": [
        {"role": "user", "content": rng.choice(QUESTIONS[topic]).format(s=name)},
        {"role": "tool", "name": POKEDEX_TOOL["name"], "parameters": {"name": name},
         "observation": lookup_pokemon(table, name)},
        {"role": "assistant", "content": f"图鉴里没有找到「{name}」，请确认名字是否写对。"},
    ]}


def build_tool_samples(table, seed=0):
    """One tool-calling sample per table row, plus one not-found sample per 20 rows (at least one), each seeded
    by (seed, name) so the output is deterministic."""
    samples = [tool_conversation(row, table, random.Random(f"{seed}|tool|{row.name}")) for row in table.rows]
    known = {row.name for row in table.rows}
    unknown = [n for n in UNKNOWN_NAMES if n not in known][:max(1, len(table.rows) // 20)]
    samples += [not_found_conversation(n, table, random.Random(f"{seed}|missing|{n}")) for n in unknown]
    return samples


def conversation_stats(samples):
    """Upstream's statistics: sample count and the distribution of conversation lengths (messages)."""
    lengths = Counter(len(s["conversations"]) for s in samples)
    return {"count": len(samples), "lengths": dict(sorted(lengths.items())),
            "with_tools": sum(1 for s in samples if s.get("tools"))}

