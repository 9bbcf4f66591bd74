"""The 18 Pokémon types and their effectiveness chart (Generation VI and later).

Public helpers:
- `TYPES`: the 18 simplified-Chinese type names in the chart's standard order.
- `split_types(text)`: parse a messy type cell ("一般飞行", "草、毒", "Grass/Poison", "冰岩") into type names.
- `effectiveness(attack, defender_types)`: damage multiplier of one attacking type.
- `weaknesses(types, min_multiplier=2)`: attacking types that deal at least `min_multiplier`, chart order.
"""
import re
import unicodedata

TYPES = ["一般", "火", "水", "草", "电", "冰", "格斗", "毒", "地面",
         "飞行", "超能力", "虫", "岩石", "幽灵", "龙", "恶", "钢", "妖精"]

# Attacking type -> {defending type: multiplier}; every pair not listed is ×1.
_CHART = {
    "一般": {"岩石": 0.5, "钢": 0.5, "幽灵": 0},
    "火": {"火": 0.5, "水": 0.5, "草": 2, "冰": 2, "虫": 2, "岩石": 0.5, "龙": 0.5, "钢": 2},
    "水": {"火": 2, "水": 0.5, "草": 0.5, "地面": 2, "岩石": 2, "龙": 0.5},
    "草": {"火": 0.5, "水": 2, "草": 0.5, "毒": 0.5, "地面": 2, "飞行": 0.5, "虫": 0.5, "岩石": 2,
           "龙": 0.5, "钢": 0.5},
    "电": {"水": 2, "草": 0.5, "电": 0.5, "地面": 0, "飞行": 2, "龙": 0.5},
    "冰": {"火": 0.5, "水": 0.5, "草": 2, "冰": 0.5, "地面": 2, "飞行": 2, "龙": 2, "钢": 0.5},
    "格斗": {"一般": 2, "冰": 2, "毒": 0.5, "飞行": 0.5, "超能力": 0.5, "虫": 0.5, "岩石": 2, "幽灵": 0,
             "恶": 2, "钢": 2, "妖精": 0.5},
    "毒": {"草": 2, "毒": 0.5, "地面": 0.5, "岩石": 0.5, "幽灵": 0.5, "钢": 0, "妖精": 2},
    "地面": {"火": 2, "草": 0.5, "电": 2, "毒": 2, "飞行": 0, "虫": 0.5, "岩石": 2, "钢": 2},
    "飞行": {"草": 2, "电": 0.5, "格斗": 2, "虫": 2, "岩石": 0.5, "钢": 0.5},
    "超能力": {"格斗": 2, "毒": 2, "超能力": 0.5, "恶": 0, "钢": 0.5},
    "虫": {"火": 0.5, "草": 2, "格斗": 0.5, "毒": 0.5, "飞行": 0.5, "超能力": 2, "幽灵": 0.5, "恶": 2,
           "钢": 0.5, "妖精": 0.5},
    "岩石": {"火": 2, "冰": 2, "格斗": 0.5, "地面": 0.5, "飞行": 2, "虫": 2, "钢": 0.5},
    "幽灵": {"一般": 0, "超能力": 2, "幽灵": 2, "恶": 0.5},
    "龙": {"龙": 2, "钢": 0.5, "妖精": 0},
    "恶": {"格斗": 0.5, "超能力": 2, "幽灵": 2, "恶": 0.5, "妖精": 0.5},
    "钢": {"火": 0.5, "水": 0.5, "电": 0.5, "冰": 2, "岩石": 2, "钢": 0.5, "妖精": 2},
    "妖精": {"火": 0.5, "格斗": 2, "毒": 0.5, "龙": 2, "恶": 2, "钢": 0.5},
}

# Other spellings seen in crawled tables: traditional characters, older fan translations, abbreviations
# (the original table writes 岩 for 岩石) and English names. Keys are compared in lower case.
_ALIASES = {
    "普通": "一般", "電": "电", "格鬥": "格斗", "格闘": "格斗", "飛行": "飞行", "超能": "超能力",
    "蟲": "虫", "岩": "岩石", "幽靈": "幽灵", "鬼": "幽灵", "龍": "龙", "惡": "恶", "悪": "恶",
    "鋼": "钢", "精灵": "妖精",
    "normal": "一般", "fire": "火", "water": "水", "grass": "草", "electric": "电", "ice": "冰",
    "fighting": "格斗", "poison": "毒", "ground": "地面", "flying": "飞行", "psychic": "超能力",
    "bug": "虫", "rock": "岩石", "ghost": "幽灵", "dragon": "龙", "dark": "恶", "steel": "钢",
    "fairy": "妖精",
}
_VOCAB = {t: t for t in TYPES}
_VOCAB.update(_ALIASES)
# Words that carry no type: suffixes ("火属性", "水系") and the placeholder for "no second type" ("草/无").
_FILLERS = ("属性", "屬性", "系", "属", "屬", "无", "無")
_LONGEST = max(len(w) for w in list(_VOCAB) + list(_FILLERS))
_SEPARATORS = re.compile(r"[\s、,，/／;；|｜+＋&＆·・\-－—和与及]+")
# Damage annotations in weakness lists: "冰(x4)", "火×2", "地面（4倍）".
_MULTIPLIERS = re.compile(r"[(（]?\s*(?:[x×X*]\s*[0-9.]+|[0-9.]+\s*倍)\s*[)）]?")


class UnknownTypeError(ValueError):
    """A type cell holds a word that is not one of the 18 types (the message names the word)."""

    def __init__(self, text, word):
        self.text, self.word = text, word
        super().__init__(f"未知属性词「{word}」（在「{text}」中） / unknown type word {word!r} in {text!r}")


def clean_text(text):
    """Strip surrounding whitespace and map CJK compatibility ideographs (U+F900-U+FAFF, which crawled
    tables contain, e.g. 力 written as U+F98A) and full-width letters/digits to their ordinary forms.
    Chinese punctuation is kept as it is."""
    out = []
    for ch in text:
        code = ord(ch)
        if 0xF900 <= code <= 0xFAFF or 0xFF10 <= code <= 0xFF19 or 0xFF21 <= code <= 0xFF3A \
                or 0xFF41 <= code <= 0xFF5A:
            ch = unicodedata.normalize("NFKC", ch)
        out.append(ch)
    return "".join(out).strip()


def _segment(chunk):
    """Split one separator-free chunk into vocabulary words, longest match first with backtracking.
    Returns the list of canonical types, or None when the chunk cannot be covered."""
    lower = chunk.lower()
    memo = {}

    def walk(pos):
        if pos == len(lower):
            return []
        if pos in memo:
            return memo[pos]
        memo[pos] = None
        for size in range(min(_LONGEST, len(lower) - pos), 0, -1):
            word = lower[pos:pos + size]
            if word in _VOCAB or word in _FILLERS:
                rest = walk(pos + size)
                if rest is not None:
                    memo[pos] = ([_VOCAB[word]] if word in _VOCAB else []) + rest
                    break
        return memo[pos]

    return walk(0)


def _first_unknown(chunk):
    """The part of `chunk` that no vocabulary word explains (for the error message)."""
    lower, pos, start = chunk.lower(), 0, None
    while pos < len(lower):
        for size in range(min(_LONGEST, len(lower) - pos), 0, -1):
            if lower[pos:pos + size] in _VOCAB or lower[pos:pos + size] in _FILLERS:
                if start is not None:
                    return chunk[start:pos]
                pos += size
                break
        else:
            start = pos if start is None else start
            pos += 1
    return chunk[start:] if start is not None else chunk


def split_types(text):
    """Parse a type cell into canonical type names, in order, without repeats.

    Accepts run-together names ("一般飞行" -> ["一般", "飞行"]), separators (、 , / ; | - and spaces),
    traditional and English spellings, the abbreviation 岩, suffixes like 属性/系, the placeholder 无 and
    damage notes ("冰(x4)"). Raises UnknownTypeError naming the first
    word it cannot read. An empty cell gives [].
    """
    found = []
    for chunk in _SEPARATORS.split(_MULTIPLIERS.sub(" ", clean_text(text))):
        if not chunk:
            continue
        words = _segment(chunk)
        if words is None:
            raise UnknownTypeError(text, _first_unknown(chunk))
        found.extend(w for w in words if w not in found)
    return found


def effectiveness(attack, defender_types):
    """Damage multiplier (0, 0.25, 0.5, 1, 2 or 4) of an `attack`-type move against these types."""
    mult = 1.0
    for t in defender_types:
        mult *= _CHART[attack].get(t, 1)
    return mult


def weaknesses(types, min_multiplier=2):
    """Attacking types that deal at least `min_multiplier` (default ×2, so ×4 too) against `types`,
    in the type chart's order. `types` is a list of type names or a cell text such as "草毒"."""
    if isinstance(types, str):
        types = split_types(types)
    for t in types:
        if t not in _CHART:
            raise UnknownTypeError("、".join(types), t)
    return [a for a in TYPES if effectiveness(a, types) >= min_multiplier]
