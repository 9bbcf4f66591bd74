"""The Pokémon data pipeline: the table and the tool (data_processing/pokedex.py, pokedex_tool.py), the dialogues
(data_processing/dialogues.py) and the two command lines, called in-process; one real subprocess run per script."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import data_processing as dp_cli
import dialogues
import format_tool_poke as ftp_cli
import pokedex
from chatglm3 import ChatGLMError
from chatglm3.data.reader import check_conversation
from chatglm3.serving.tool_loop import execute
from chatglm3.tools import load_tool_files
from pokedex import TableError, load_table, lookup_pokemon
from pokemon_types import TYPES, UnknownTypeError, clean_text, effectiveness, split_types, weaknesses

REPO = Path(__file__).resolve().parents[1]
DP_SCRIPT = REPO / "data_processing" / "data_processing.py"
FTP_SCRIPT = REPO / "data_processing" / "format_tool_poke.py"
BUNDLED = REPO / "data_processing" / "data.csv"
HEADER = "姓名,属性,弱点,特征,数据\n"


@pytest.fixture
def cli(capsys):
    """Run a script's main() in-process: cli(module, *args) -> (exit status, stdout, stderr)."""
    def call(module, *args):
        code = module.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err
    return call


def assert_clean_failure(result, *needles):
    """Exit 1 and one bilingual line on stderr naming what went wrong (never a traceback)."""
    code, out, err = result
    assert code == 1, out + err
    message = err.strip()
    assert len(message.splitlines()) == 1 and " / " in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def first_user(sample):
    return next(m["content"] for m in sample["conversations"] if m["role"] == "user")


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


# ------------------------------------------------------------------------------------------- type chart

@pytest.mark.parametrize("text, expected", [
    ("一般飞行", ["一般", "飞行"]), ("草毒", ["草", "毒"]), ("草、毒", ["草", "毒"]), ("草/毒", ["草", "毒"]),
    ("草, 毒", ["草", "毒"]), ("草 毒", ["草", "毒"]), ("超能力妖精", ["超能力", "妖精"]),
    ("飞行龙", ["飞行", "龙"]), ("冰岩", ["冰", "岩石"]), ("Grass/Poison", ["草", "毒"]),
    ("火属性", ["火"]), ("幽靈", ["幽灵"]),
    ("超能\uf98a", ["超能力"]),  # the CJK compatibility ideograph of 力, as in the crawled table
    ("水水", ["水"]), ("", []), ("草/无", ["草"]), ("草-毒", ["草", "毒"]), ("火(x2)、冰（4倍）", ["火", "冰"]),
])
def test_split_types(text, expected):
    assert split_types(text) == expected


def test_split_types_names_the_unknown_word():
    with pytest.raises(UnknownTypeError) as e:
        split_types("水光明")
    assert e.value.word == "光明" and "光明" in str(e.value)


def test_weaknesses_follow_the_full_chart():
    assert weaknesses(["草", "毒"]) == ["火", "冰", "飞行", "超能力"]
    assert weaknesses("一般飞行") == ["电", "冰", "岩石"]
    assert weaknesses(["妖精"]) == ["毒", "钢"]
    assert weaknesses(["一般", "妖精"]) == ["毒", "钢"]
    assert weaknesses(["龙", "飞行"]) == ["冰", "岩石", "龙", "妖精"]
    assert weaknesses(["虫", "草"], min_multiplier=4) == ["火", "飞行"]
    assert weaknesses(["钢", "妖精"]) == ["火", "地面"]
    assert effectiveness("电", ["水", "地面"]) == 0
    assert effectiveness("格斗", ["一般", "幽灵"]) == 0
    assert effectiveness("冰", ["龙", "飞行"]) == 4
    # Every single type has at least one weakness and the chart is 18x18.
    assert len(TYPES) == 18 and all(weaknesses([t]) for t in TYPES)


# ------------------------------------------------------------------------------------------- bundled data

def test_bundled_table_is_complete_and_consistent():
    with open(BUNDLED, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["姓名", "属性", "弱点", "特征", "数据"]
    body = rows[1:]
    assert len(body) >= 151 and body[0][0] == "妙蛙种子" and body[150][0] == "梦幻"
    names = [r[0] for r in body]
    assert len(set(names)) == len(names)
    by_name = {r[0]: r for r in body}
    for name, types, weak, ability, desc in body:
        parsed = types.split("、")
        assert 1 <= len(parsed) <= 2 and all(t in TYPES for t in parsed), name
        assert weak == "、".join(weaknesses(parsed)), name  # derived from the chart, not typed by hand
        assert ability and 10 <= len(desc) <= 80, name
    for name, types, ability in [("妙蛙种子", "草、毒", "茂盛"), ("小火龙", "火", "猛火"), ("杰尼龟", "水", "激流"),
                                 ("皮卡丘", "电", "静电"), ("皮皮", "妖精", None), ("胖丁", "一般、妖精", None),
                                 ("魔墙人偶", "超能力、妖精", None), ("喷火龙", "火、飞行", None),
                                 ("耿鬼", "幽灵、毒", None), ("快龙", "龙、飞行", None), ("超梦", "超能力", None)]:
        assert by_name[name][1] == types
        assert ability is None or by_name[name][3] == ability
    BUNDLED.read_text(encoding="utf-8").encode("gbk")  # a GBK copy must be possible


@pytest.mark.slow
def test_bundled_data_round_trips_through_both_scripts(tmp_path):
    """The real command lines, as quickstart.sh runs them, from a folder outside the repository."""
    out_json, out_jsonl = tmp_path / "poke.json", tmp_path / "poke.jsonl"
    result = subprocess.run([sys.executable, str(DP_SCRIPT), "--output", str(out_json)], capture_output=True,
                            text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "读取 151 行" in result.stdout and "wrote 151 conversations" in result.stdout
    samples = json.loads(out_json.read_text(encoding="utf-8"))
    table = load_table(BUNDLED)
    assert len(samples) == len(table.rows) == 151
    for row, sample in zip(table.rows, samples):
        conv = sample["conversations"]
        users = [m for m in conv if m["role"] == "user"]
        assert 2 <= len(users) <= 4
        assert row.name in users[0]["content"]  # named in the user turn, not only a system prompt
        assert [m["role"] for m in conv if m["role"] != "system"] == ["user", "assistant"] * len(users)
        for question, reply in zip(users, [m for m in conv if m["role"] == "assistant"]):
            if "弱点" in question["content"]:
                assert "、".join(row.weaknesses) in reply["content"]
    assert len({first_user(s) for s in samples}) > 100  # phrasing varies
    assert any("它" in m["content"] for s in samples for m in s["conversations"] if m["role"] == "user")

    result = subprocess.run([sys.executable, str(FTP_SCRIPT), "--path", str(out_json), "--output", str(out_jsonl)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "train_examples: 151" in result.stdout and "conversation distribution" in result.stdout
    lines = out_jsonl.read_text(encoding="utf-8").splitlines()
    assert [json.loads(l) for l in lines] == samples


def test_rich_style_is_deterministic_and_seeded(tmp_path, cli):
    outs = []
    for name, seed in [("a", 1), ("b", 1), ("c", 2)]:
        out = tmp_path / f"{name}.json"
        assert cli(dp_cli, "--output", out, "--seed", seed)[0] == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] and outs[0] != outs[2]


def test_lookup_pokemon_gives_the_row_facts():
    table = load_table(BUNDLED)
    facts = lookup_pokemon(table, " 妙蛙种子 ")
    assert facts["姓名"] == "妙蛙种子" and facts["属性"] == ["草", "毒"]
    assert facts["弱点"] == ["火", "冰", "飞行", "超能力"] and facts["特性"] == "茂盛" and facts["简介"]
    assert "四倍弱点" not in facts
    assert lookup_pokemon(table, "派拉斯")["四倍弱点"] == ["火", "飞行"]
    missing = lookup_pokemon(table, "不存在兽")
    assert missing["姓名"] == "不存在兽" and "错误" in missing and "属性" not in missing


# The schema the tool-calling training samples (and the models trained on them) have offered since before the
# plug-ins: the plug-in's, derived from pokedex_lookup's signature, must be this, key order included (it is rendered
# into the system prompt as JSON).
TRAINED_SCHEMA = {
    "name": "pokedex_lookup",
    "description": "查询宝可梦图鉴，返回这只宝可梦的属性、弱点、特性和简介",
    "parameters": {
        "type": "object",
        "properties": {"name": {"type": "string", "description": "宝可梦的中文名字，例如 皮卡丘"}},
        "required": ["name"],
    },
}
PLUGIN = REPO / "data_processing" / "pokedex_tool.py"


def test_the_pokedex_plugin_offers_the_schema_models_were_trained_with():
    tools = load_tool_files([PLUGIN])
    assert list(tools.tools) == ["pokedex_lookup"]
    for schema in (tools.tools["pokedex_lookup"].schema, pokedex.POKEDEX_TOOL):
        assert json.dumps(schema, ensure_ascii=False) == json.dumps(TRAINED_SCHEMA, ensure_ascii=False)
    assert [m.__name__ for m in tools.metrics] == ["type_answer_metrics"]


def test_pokedex_tool_answers_as_the_training_samples_and_never_raises():
    tools = load_tool_files([PLUGIN]).tools

    def call(name, parameters):
        return execute({"name": name, "parameters": parameters}, tools).observation

    answer = call("pokedex_lookup", {"name": "皮卡丘"})
    assert json.loads(answer) == lookup_pokemon(load_table(BUNDLED), "皮卡丘") and "\\u" not in answer
    assert "没有找到" in json.loads(call("pokedex_lookup", {"name": "不存在兽"}))["错误"]
    assert "没有名为 'weather'" in json.loads(call("weather", {"city": "北京"}))["错误"]
    for parameters in [{}, {"name": 25}, {"name": "皮卡丘", "extra": 1}, "皮卡丘", {"name": {1, 2}}]:
        assert json.loads(call("pokedex_lookup", parameters))["错误"].startswith("参数应为 name")


def test_pokedex_plugin_reads_the_table_its_variable_names_and_a_bad_one_is_one_line(tmp_path):
    own = write(tmp_path / "own.csv", HEADER + "皮卡丘,水,,,\n")
    bad = write(tmp_path / "nocol.csv", "姓名,类别\n皮卡丘,电\n")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from chatglm3.tools import load_tool_files; "
            "from chatglm3.serving.tool_loop import execute; "
            "tools = load_tool_files([sys.argv[2]]).tools; "
            "print(execute({'name': 'pokedex_lookup', 'parameters': {'name': '皮卡丘'}}, tools).observation)")
    env = {**os.environ, "POKEDEX_TABLE": str(own)}
    run = subprocess.run([sys.executable, "-c", code, str(REPO / "finetune_chatmodel_demo"), str(PLUGIN)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["属性"] == ["水"]
    # A bad table stops the plug-in loading, in one line naming the table and line (before any model would load).
    run = subprocess.run([sys.executable, str(REPO / "finetune_chatmodel_demo" / "inference.py"), "--model", "nowhere",
                          "--tools", str(PLUGIN)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "POKEDEX_TABLE": str(bad)})
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and "nocol.csv" in lines[0] and "line 1" in lines[0], run.stderr
    with pytest.raises(TableError):
        load_table(bad)


def test_tool_samples(tmp_path, cli):
    out = tmp_path / "tools.jsonl"
    code, stdout, err = cli(ftp_cli, "--tools", "--output", out)
    assert code == 0, err
    assert "built 158 tool-calling conversations" in stdout and "with tools: 158" in stdout
    samples = [json.loads(l) for l in out.read_text(encoding="utf-8").splitlines()]
    table = load_table(BUNDLED)
    assert len(samples) == 151 + 7  # one per row, one not-found lookup per 20 rows
    for i, sample in enumerate(samples):
        check_conversation(sample, f"sample {i}")  # the training reader accepts them
        assert sample["tools"] == [pokedex.POKEDEX_TOOL]
        user, call, reply = sample["conversations"][:3]
        assert (user["role"], call["role"], reply["role"]) == ("user", "tool", "assistant")
        name = call["parameters"]["name"]
        assert call["name"] == "pokedex_lookup" and name in user["content"]
        assert call["observation"] == lookup_pokemon(table, name)
        if "错误" in call["observation"]:
            assert "没有找到" in reply["content"]
        else:  # the answer only states facts from the observation
            row = table.by_name()[name]
            assert any(fact in reply["content"] for fact in
                       ["、".join(row.types), "和".join(row.types), "、".join(row.weaknesses), row.ability,
                        row.description])
    with_path = tmp_path / "both.jsonl"
    convs = write(tmp_path / "c.jsonl", json.dumps(samples[0], ensure_ascii=False) + "\n")
    assert cli(ftp_cli, "--tools", "--path", convs, "--output", with_path, "--seed", 1)[0] == 0
    both = [json.loads(l) for l in with_path.read_text(encoding="utf-8").splitlines()]
    assert both[0] == samples[0] and len(both) == 1 + 158 and both[1:] != samples


# ------------------------------------------------------------------------------------------- the seed table

def test_seed_table_every_row_accounted_for(shared, tmp_path, cli):
    seed_csv = shared / "pokemon" / "seed_data.csv"
    with open(seed_csv, encoding="utf-8-sig", newline="") as f:
        raw = list(csv.reader(f))[1:]
    out, report = tmp_path / "out.json", tmp_path / "report.json"
    code, stdout, err = cli(dp_cli, "--input", seed_csv, "--output", out, "--report", report, "--keep-weaknesses")
    assert code == 0, err
    assert "读取 1050 行" in stdout
    samples = json.loads(out.read_text(encoding="utf-8"))
    issues = json.loads(report.read_text(encoding="utf-8"))["issues"]
    skipped = [i for i in issues if i["skipped"]]
    # 魔尼尼 has the word 弱点 in its weakness cell: reported with its line, not dropped silently.
    assert [(i["line"], i["name"], i["reason"]) for i in skipped] == [(479, "魔尼尼", "bad_weakness")]
    assert "479" in stdout
    assert len(samples) + len(skipped) == len(raw) == 1050
    named = {first_user(s) for s in samples}
    for line, row in enumerate(raw, 2):
        name = clean_text(row[0])
        assert line == 479 or any(name in q for q in named), name


def test_seed_table_normalisation(shared, tmp_path, cli):
    seed_csv = shared / "pokemon" / "seed_data.csv"
    table = load_table(seed_csv)
    rows = table.by_name()
    assert len(table.rows) == 1050 and not table.skipped
    assert rows["波波"].types == ["一般", "飞行"]
    assert rows["妙蛙种子"].weaknesses == ["火", "冰", "飞行", "超能力"]
    assert rows["腕力"].ability == "毅力"  # both written with the compatibility ideograph of 力 in the CSV
    assert rows["魔尼尼"].types == ["超能力", "妖精"] and not rows["魔尼尼"].description.endswith("nan")
    assert rows["超级喷火龙X"].types == ["火", "龙"] and rows["超级喷火龙Y"].types == ["火", "飞行"]
    assert {i["line"] for i in table.issues if i["reason"] == "cleaned"} >= {479}
    kept = load_table(seed_csv, keep_weaknesses=True).by_name()
    assert kept["妙蛙种子"].weaknesses == ["火", "冰"] and kept["快龙"].weaknesses == ["冰", "岩石"]
    out = tmp_path / "out.json"
    code, stdout, err = cli(dp_cli, "--input", seed_csv, "--output", out)  # the default (rich) run
    assert code == 0, err
    assert "used 1050 rows, skipped 0" in stdout and len(json.loads(out.read_text(encoding="utf-8"))) == 1050


def test_seed_style_reproduces_the_original_conversation(shared, tmp_path, cli):
    seed_csv = shared / "pokemon" / "seed_data.csv"
    out = tmp_path / "seed.json"
    code, _, err = cli(dp_cli, "--input", seed_csv, "--output", out, "--style", "seed")
    assert code == 0, err
    samples = json.loads(out.read_text(encoding="utf-8"))
    with open(seed_csv, encoding="utf-8-sig", newline="") as f:
        raw = list(csv.DictReader(f))
    assert len(samples) == 1050
    for row, sample in zip(raw[:20], samples[:20]):
        assert sample == {"conversations": [
            {"role": "system", "content": "描述一个宝可梦：" + row["姓名"] + "。"},
            {"role": "user", "content": "它有什么特性和弱点？"},
            {"role": "assistant", "content": row["姓名"] + "的属性是" + row["属性"] + "，弱点是" + row["弱点"]
             + "，特性是" + row["特征"] + "。"},
            {"role": "user", "content": "有更多的信息吗？"},
            {"role": "assistant", "content": row["数据"]},
        ]}
    assert samples[0]["conversations"][2]["content"] == "妙蛙种子的属性是草毒，弱点是火冰，特性是茂盛。"
    # Same wording as the reference conversation made in that style.
    reference = json.loads((shared / "parity" / "cases.json").read_text(encoding="utf-8"))["multiturn"][0]
    ref = reference["conversations"]
    mine = dialogues.seed_conversation("杰尼龟", "水", "草和电", "激流", ref[4]["content"])["conversations"]
    assert mine == ref

    normalised = dialogues.build_samples(load_table(seed_csv, normalize=True), style="seed", normalize=True)
    assert normalised[0][1]["conversations"][2]["content"] == \
        "妙蛙种子的属性是草、毒，弱点是火、冰、飞行、超能力，特性是茂盛。"


def test_upstream_format_samples_pass_format_tool_poke(shared, tmp_path, cli):
    cases = json.loads((shared / "parity" / "cases.json").read_text(encoding="utf-8"))["multiturn"]
    src, out = write(tmp_path / "upstream.json", json.dumps(cases, ensure_ascii=False)), tmp_path / "up.jsonl"
    code, stdout, err = cli(ftp_cli, "--path", src, "--output", out)
    assert code == 0, err
    assert f"train_examples: {len(cases)}" in stdout
    assert [json.loads(l) for l in out.read_text(encoding="utf-8").splitlines()] == cases


def test_gbk_copy_gives_the_same_result(shared, tmp_path, cli):
    for source, codec in [(BUNDLED, "gbk"), (shared / "pokemon" / "seed_data.csv", "gb18030")]:
        text = source.read_text(encoding="utf-8-sig")
        gbk = write(tmp_path / f"{source.stem}-gbk.csv", text, codec)
        outs = []
        for src in (source, gbk):
            out = tmp_path / f"{src.stem}.json"
            code, stdout, err = cli(dp_cli, "--input", src, "--output", out)
            assert code == 0, err
            outs.append(out.read_bytes())
        assert "GBK" in stdout
        assert outs[0] == outs[1]


# ------------------------------------------------------------------------------------------- messy tables

MESSY = (
    "姓名,属性,弱点,特征,数据\r\n"
    "妙蛙种子,草毒,火冰,茂盛,种子宝可梦。\r\n"          # 2
    "\r\n"                                              # 3 blank
    "波波,一般飞行,电冰,锐利目光,小鸟宝可梦。nan\r\n"    # 4 stray nan cleaned
    "妙蛙种子,草毒,火冰,茂盛,重复了。\r\n"              # 5 duplicate
    ",水,草,激流,没有名字\r\n"                          # 6 empty name
    "小火龙,火,水\r\n"                                  # 7 ability/description missing: kept, reported
    "喷火龙,火飞行,水,猛火,会喷火,很热\r\n"              # 8 unquoted comma
    "怪兽,光明,暗,无,未知属性\r\n"                      # 9 unknown type
    "三系,火水草,电,无,三种属性\r\n"                    # 10 three types
    "姓名,属性,弱点,特征,数据\r\n"                      # 11 header again
    "腕\uf98a,格斗,飞行,毅\uf98a,肌肉发达。\r\n"        # 12 compatibility ideographs
    "卡咪龟,水 / 冰 ,草电,激流,\"有尾巴，很长寿。\"\r\n"  # 13 separators, quoted comma
    "鬼斯,,,飘浮,气体。\r\n"                           # 14 missing types
)


def test_messy_table_reports_every_row(tmp_path, cli):
    src = write(tmp_path / "messy.csv", MESSY)
    out, report = tmp_path / "out.json", tmp_path / "report.json"
    code, stdout, err = cli(dp_cli, "--input", src, "--output", out, "--report", report)
    assert code == 0, err
    assert "读取 12 行" in stdout and "skipped 7" in stdout and "blank lines 1" in stdout
    issues = json.loads(report.read_text(encoding="utf-8"))["issues"]
    got = {(i["line"], i["reason"]) for i in issues}
    assert got == {(3, "blank_line"), (4, "cleaned"), (5, "duplicate_name"), (6, "empty_name"), (7, "partial"),
                   (8, "too_many_cells"), (9, "unknown_type"), (10, "too_many_types"), (11, "repeated_header"),
                   (14, "missing_cells")}
    assert next(i for i in issues if i["line"] == 5)["detail"].startswith("与第 2 行重复")
    assert "光明" in next(i for i in issues if i["line"] == 9)["detail"]
    for line in ("5", "6", "8", "9", "10", "11", "14"):
        assert line in stdout
    samples = json.loads(out.read_text(encoding="utf-8"))
    assert len(samples) == 5
    table = load_table(src).by_name()
    assert list(table) == ["妙蛙种子", "波波", "小火龙", "腕力", "卡咪龟"]
    assert table["腕力"].ability == "毅力" and table["卡咪龟"].types == ["水", "冰"]
    assert table["卡咪龟"].description == "有尾巴，很长寿。" and table["波波"].description == "小鸟宝可梦。"
    # 小火龙 has no ability or description: only type and weakness questions.
    xiao = next(s for s in samples if "小火龙" in first_user(s))
    assert len([m for m in xiao["conversations"] if m["role"] == "user"]) == 2


def test_configurable_columns_and_delimiter(tmp_path, cli):
    src = write(tmp_path / "en.tsv", "Name\tType\tSkill\tText\nPikachu\tElectric\tStatic\tA mouse.\n")
    out = tmp_path / "out.json"
    code, _, err = cli(dp_cli, "--input", src, "--output", out, "--ability-col", "Skill", "--desc-col", "Text")
    assert code == 0, err
    assert "Pikachu" in first_user(json.loads(out.read_text(encoding="utf-8"))[0])
    row = load_table(src, columns={"ability": "Skill", "description": "Text"}).rows[0]
    assert (row.name, row.types, row.weaknesses, row.ability, row.description) == \
        ("Pikachu", ["电"], ["地面"], "Static", "A mouse.")

    assert_clean_failure(cli(dp_cli, "--input", src, "--output", out, "--type-col", "属性"),
                         "line 1", "属性", "--type-col")
    tools = tmp_path / "tools.jsonl"  # format_tool_poke.py takes the same column flags for --table
    code, _, err = cli(ftp_cli, "--tools", "--table", src, "--ability-col", "Skill", "--output", tools)
    assert code == 0, err
    assert "Pikachu" in tools.read_text(encoding="utf-8")

    # Traditional header names and an extra column; the optional columns may be absent.
    extra = write(tmp_path / "trad.csv", "编号,名稱,屬性\n25,皮卡丘,电\n26,雷丘,電\n")
    rows = load_table(extra).rows
    assert [(r.name, r.types, r.ability) for r in rows] == [("皮卡丘", ["电"], ""), ("雷丘", ["电"], "")]


def test_dev_split_by_pokemon(tmp_path, cli):
    train, dev = tmp_path / "train.json", tmp_path / "dev.json"
    args = ["--output", train, "--dev-ratio", "0.2", "--dev-output", dev, "--variants", "2"]
    code, _, err = cli(dp_cli, *args)
    assert code == 0, err
    names = {row.name for row in load_table(BUNDLED).rows}

    def pokemon(path):  # the longest name in the first question (拉达 is inside 小拉达)
        return [max((n for n in names if n in first_user(s)), key=len)
                for s in json.loads(path.read_text(encoding="utf-8"))]

    t, d = pokemon(train), pokemon(dev)
    assert len(t) + len(d) == 2 * 151 and len(set(d)) == round(0.2 * 151)
    assert not set(t) & set(d)
    first = (train.read_bytes(), dev.read_bytes())
    assert cli(dp_cli, *args)[0] == 0
    assert (train.read_bytes(), dev.read_bytes()) == first
    assert dialogues.split_dev(["a", "b", "c"], 0.5, seed=3) == dialogues.split_dev(["c", "b", "a"], 0.5, seed=3)


# ------------------------------------------------------------------------------------------- bad input

def test_bad_tables_fail_cleanly_and_write_nothing(tmp_path, cli):
    out = tmp_path / "out.json"
    out.write_text("previous", encoding="utf-8")
    cases = [
        (tmp_path / "missing.csv", ["not found", "missing.csv"]),
        (write(tmp_path / "empty.csv", ""), ["empty", "empty.csv"]),
        (write(tmp_path / "blank.csv", "\ufeff\n  \n"), ["empty"]),
        (write(tmp_path / "nocol.csv", "姓名,类别\n皮卡丘,电\n"), ["line 1", "属性", "--type-col"]),
        (write(tmp_path / "fullwidth.csv", "姓名，属性，弱点\n皮卡丘，电，地面\n"), ["full-width"]),
        (tmp_path / "undecodable.csv", ["line 3", "UTF-8"]),
        (write(tmp_path / "utf16.csv", HEADER + "皮卡丘,电,地面,静电,老鼠\n", "utf-16"), ["UTF-16"]),
        (write(tmp_path / "big5.csv", "姓名,屬性,弱點,特性,資料\n妙蛙種子,草毒,火,茂盛,種子寶可夢會長大。\n", "big5"),
         ["neither UTF-8 nor plausible GBK", "--encoding"]),
        (write(tmp_path / "nothing.csv", HEADER + "怪兽,光明,暗,无,未知\n"), ["no usable rows", "line 2"]),
    ]
    (tmp_path / "undecodable.csv").write_bytes((HEADER + "皮卡丘,电,地面,静电,老鼠\n").encode("utf-8")
                                              + b"\xb2\xbb,\xff\xfe,x,y,z\n")
    for src, needles in cases:
        message = assert_clean_failure(cli(dp_cli, "--input", src, "--output", out), *needles)
        assert message.startswith("错误：") and "Error:" in message, message
        assert out.read_text(encoding="utf-8") == "previous"
    assert_clean_failure(cli(dp_cli, "--output", out, "--dev-ratio", "0.1"), "--dev-output")
    assert_clean_failure(cli(dp_cli, "--output", out, "--variants", "0"), "--variants")
    assert_clean_failure(cli(dp_cli, "--input", BUNDLED, "--output", BUNDLED), "input")
    assert_clean_failure(cli(dp_cli, "--output", tmp_path), "directory")
    assert not list(tmp_path.glob(".*.tmp"))


def test_bad_conversation_files_fail_cleanly(tmp_path, cli):
    out = tmp_path / "out.jsonl"
    good = {"conversations": [{"role": "user", "content": "皮卡丘是什么属性？"},
                              {"role": "assistant", "content": "电。"}]}
    bad_role = {"conversations": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]}
    bad_tool = {"conversations": [{"role": "user", "content": "查"}, {"role": "tool", "name": "x",
                                                                      "parameters": "name=1"}]}
    listing = json.dumps([good, good, bad_role], ensure_ascii=False, indent=2)
    bad_role_line = listing[:listing.rindex('{\n    "conversations"')].count("\n") + 1
    cases = [
        (write(tmp_path / "role.json", listing), [f"role.json:{bad_role_line}", "unknown role 'bot'"]),
        (write(tmp_path / "role.jsonl", "\n".join(json.dumps(s) for s in (good, bad_role)) + "\n"),
         ["role.jsonl:2", "unknown role 'bot'"]),
        (write(tmp_path / "tool.jsonl", json.dumps(bad_tool) + "\n"), ["tool.jsonl:1", "\"parameters\""]),
        (write(tmp_path / "object.json", '{"conversations": "x", "b": 2}'), ["object.json:1", "\"conversations\""]),
        (write(tmp_path / "numbers.json", "[1, 2]"), ["numbers.json:1", "must be a JSON object"]),
        (write(tmp_path / "broken.jsonl", json.dumps(good) + "\n{oops\n"), ["broken.jsonl:2", "invalid JSON"]),
        (write(tmp_path / "broken.json", "[\n" + json.dumps(good) + "\n" + json.dumps(good) + "\n]"),
         ["broken.json:3", "','"]),
        (write(tmp_path / "empty.json", ""), ["empty.json", "no samples"]),
        (tmp_path / "absent.json", ["absent.json", "not found"]),
    ]
    for src, needles in cases:
        assert_clean_failure(cli(ftp_cli, "--path", src, "--output", out), *needles)
        assert not out.exists()
    code, stdout, _ = cli(ftp_cli, "--path", write(tmp_path / "ok.json", json.dumps([good, good])), "--output", out)
    assert code == 0 and "{2: 2}" in stdout
    assert_clean_failure(cli(ftp_cli, "--path", out, "--output", out), "is an input file")


def test_default_paths_do_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    """Upstream's layout: data_processing.py writes formatted_data/pokemon_data.json, which format_tool_poke.py
    reads by default and turns into formatted_data/pokemon_conversations.jsonl, wherever they are run from."""
    monkeypatch.chdir(tmp_path)
    formatted = REPO / "finetune_chatmodel_demo" / "formatted_data"
    dp_args, ftp_args = dp_cli.build_parser().parse_args([]), ftp_cli.build_parser().parse_args([])
    assert Path(dp_args.input) == BUNDLED and Path(dp_args.output) == formatted / "pokemon_data.json"
    assert Path(ftp_args.output) == formatted / "pokemon_conversations.jsonl"
    assert Path(ftp_args.table) == BUNDLED and ftp_args.path is None
    path_help = next(a.help for a in ftp_cli.build_parser()._actions if "--path" in a.option_strings)
    assert str(formatted / "pokemon_data.json") in path_help


@pytest.mark.parametrize("module, flags", [
    (dp_cli, ["--input", "--output", "--style", "--keep-weaknesses", "--seed", "--dev-ratio", "--dev-output",
              "--report", "--encoding", "--name-col", "--type-col", "--weakness-col", "--ability-col", "--desc-col",
              "--normalize", "--variants"]),
    (ftp_cli, ["--path", "--output", "--tools", "--table", "--seed", "--encoding", "--name-col", "--type-col",
               "--weakness-col", "--ability-col", "--desc-col"]),
])
def test_help_explains_each_flag(module, flags):
    parser = module.build_parser()
    documented = {opt: action.help for action in parser._actions for opt in action.option_strings}
    for flag in flags:
        assert flag in documented and " / " in documented[flag], flag  # Chinese / English
