"""Tool use: the training data (held-out Pokémon in no sample, their names writable), the tool loop (its prompts
are training's ids token for token; bad calls become error observations), the metrics, evaluate.py --tools, and
truncation by whole turns."""
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import pytest

import build_tool_data
import pokedex_tool
import tool_data
import tool_eval
from chatglm3 import ChatGLMError, ChatGLMTokenizer, register_tool
from chatglm3.model.conversation import encode_messages, encode_sample, sample_to_messages, stop_token_ids
from chatglm3.data.reader import check_conversation
from build_tiny_model import build_tiny_model, single_token_list
from chatglm3.serving.tool_loop import MAX_ERROR_OBSERVATIONS, ToolTurn, execute, is_error_observation
from chatglm3.tools import load_tool_files, run_metrics, tool_of
from pokedex import POKEDEX_TOOL, load_table

REPO = Path(__file__).resolve().parents[1]
TABLE = REPO / "data_processing" / "data.csv"
PLUGIN = REPO / "data_processing" / "pokedex_tool.py"


@pytest.fixture(scope="module")
def table():
    return load_table(TABLE)


@pytest.fixture(scope="module")
def held_out(table):
    return tool_data.held_out_names(table, 0.1, seed=0)


@pytest.fixture(scope="module")
def training(table, held_out):
    return tool_data.build_training_samples(table, held_out, synthetic=1500, real_variants=1, seed=0)[0]


@pytest.fixture(scope="module")
def pokedex():
    """The Pokédex plug-in's tools, {name: Tool}, as inference.py and evaluate.py --tools load them."""
    return load_tool_files([PLUGIN]).tools


def lookup(tools, name):
    """The observation the loop feeds back for pokedex_lookup(name=...)."""
    return execute({"name": "pokedex_lookup", "parameters": {"name": name}}, tools).observation


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return ChatGLMTokenizer.from_pretrained(str(tiny_model))


# --- the data -----------------------------------------------------------------------------------------------------
def test_held_out_pokemon_are_in_no_training_sample(table, held_out, training):
    assert len(held_out) >= 15 and "嘟嘟利" in held_out  # holds the held-out 嘟嘟, so it is held out too
    text = [json.dumps(s, ensure_ascii=False) for s in training]
    assert not [n for n in held_out if any(n in t for t in text)]
    assert tool_data.mentioning(training + [{"conversations": [{"role": "user", "content": "怪力"}]}], held_out) == [len(training)]
    for i, sample in enumerate(training):
        check_conversation(sample, f"sample {i}")


def test_training_set_holds_every_kind_of_sample(table, training, pokedex):
    real = {row.name for row in table.rows}
    tool_samples = [s for s in training if "tools" in s]
    calls = [[m for m in s["conversations"] if m["role"] == "tool"] for s in tool_samples]
    called = {c["parameters"]["name"] for cs in calls for c in cs}
    assert len(called - real) >= 1500  # synthetic Pokémon
    assert any(len(cs) >= 2 for cs in calls)  # several calls in one conversation
    assert any(not cs for cs in calls)  # the tool offered, no call needed
    assert any("错误" in c["observation"] for cs in calls for c in cs)  # lookups that find nothing
    assert any(s["conversations"][-1]["role"] == "assistant" and s["conversations"][-2]["role"] == "user"
               and cs for s, cs in zip(tool_samples, calls))  # a follow-up answered from the earlier observation
    assert any("tools" not in s for s in training)  # ordinary conversations
    for sample, cs in zip(tool_samples, calls):  # every observation is what the tool answers for that name
        for c in cs:
            if c["parameters"]["name"] in real:
                assert c["observation"] == json.loads(lookup(pokedex, c["parameters"]["name"]))


def test_synthetic_pokemon_follow_the_type_chart(table, held_out):
    rows = tool_data.synthetic_rows(2000, table, held_out, random.Random(1))
    chars = {ch for row in table.rows for ch in row.name}
    held_chars = {ch for name in held_out for ch in name}
    assert held_chars <= {ch for row in rows for ch in row.name} <= chars
    for row in rows:
        assert row.name not in {r.name for r in table.rows} and not any(h in row.name for h in held_out)
        assert row.weaknesses == tool_data.weaknesses(row.types)
        observation = tool_data.lookup(row)
        assert observation["姓名"] == row.name and observation["属性"] == row.types
    # Descriptions are spliced from clauses of several training Pokémon: hardly any is a real one the model could
    # recall whole (two clauses can happen to make one), and almost every one is new text.
    real_descriptions = {r.description for r in table.rows}
    assert sum(row.description in real_descriptions for row in rows) < 0.01 * len(rows)
    assert len({row.description for row in rows}) > 0.95 * len(rows)


def test_held_out_names_are_writable_with_a_tokenizer_of_the_training_set(tmp_path, tokenizer, table, held_out,
                                                                         training):
    # The tokenizer trained on data.csv (held-out names included) has pieces such as 刺龙 (海刺龙) that no
    # training reply holds: the model could never write them. One trained on the training set has none; there,
    # without synthetic Pokémon, some held-out names' characters (嘟, 豪, ...) would never be written either.
    assert tool_data.unlearnt_name_tokens(tokenizer, held_out, training)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in training), encoding="utf-8")
    own = ChatGLMTokenizer.from_pretrained(str(build_tiny_model(path, tmp_path / "m", layers=1, hidden=32, heads=2,
                                                                kv_groups=1, vocab_size=2000)))
    assert tool_data.unlearnt_name_tokens(own, held_out, training) == {}
    real_only = tool_data.build_training_samples(table, held_out, synthetic=0, real_variants=1, seed=0)[0]
    assert tool_data.unlearnt_name_tokens(own, held_out, real_only)


def test_copy_units_are_the_same_tokens_in_the_observation_and_the_answer(tmp_path, table, held_out, training):
    # A tokenizer trained freely merges a type with its neighbours (是水, 火属性的宝可梦): the answer then holds
    # other tokens than the observation, and copying a type is a lookup the model learns per type and template.
    # Kept as single tokens (build_tiny_model.py --single-tokens), every type and name is copied token for token.
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in training), encoding="utf-8")
    units = tmp_path / "single_tokens.txt"
    units.write_text("\n".join(tool_data.copy_units(table)) + "\n", encoding="utf-8")
    answers = [(reply["content"], call["observation"]) for s in training
               for call, reply in zip(s["conversations"], s["conversations"][1:])
               if call["role"] == "tool" and "属性" in call["observation"] and reply["role"] == "assistant"
               and all(v in reply["content"] for v in [call["observation"]["姓名"], *call["observation"]["属性"]])]

    def misfits(folder):
        sp = ChatGLMTokenizer.from_pretrained(str(folder)).tokenizer.sp_model
        bad = 0
        for text, observation in answers[:300]:
            answer = sp.encode_as_pieces(text)
            for value in [observation["姓名"], *observation["属性"]]:
                pieces = [p for p in sp.encode_as_pieces(json.dumps(value, ensure_ascii=False)) if p not in ('▁"', '"')]
                bad += not any(answer[i:i + len(pieces)] == pieces for i in range(len(answer)))
        return bad

    free = build_tiny_model(path, tmp_path / "free", layers=1, hidden=32, heads=2, kv_groups=1, vocab_size=3000)
    kept = build_tiny_model(path, tmp_path / "kept", layers=1, hidden=32, heads=2, kv_groups=1, vocab_size=3000,
                            single_tokens=single_token_list(units))
    assert misfits(free) > 50 and misfits(kept) == 0


# --- the tool loop ------------------------------------------------------------------------------------------------
def _replay(tokenizer, sample, tools):
    """Drive the tool loop through `sample` with the replies training learns as the model's output; assert every
    prompt the loop builds is training's ids up to that reply. Returns the turns."""
    ids, labels = encode_sample(tokenizer, sample)
    stops = stop_token_ids(tokenizer)
    history = sample_to_messages({"tools": sample["tools"], "conversations": []})
    history = [{k: v for k, v in m.items() if k != "loss"} for m in history]
    turns = []
    for message in sample["conversations"]:
        if message["role"] != "user":
            continue
        turn = ToolTurn(history, message["content"], tools)
        while not turn.done:
            prompt = turn.prompt(tokenizer)
            assert prompt == ids[:len(prompt)], "the loop's prompt differs from training's ids"
            end = next(k for k in range(len(prompt), len(ids)) if ids[k] in stops)
            assert labels[len(prompt):end + 1] == ids[len(prompt):end + 1]  # the reply and its stop are learnt
            turn.feed_text(tokenizer.decode(ids[len(prompt):end]), stopped=True)
        turns.append(turn)
        history = turn.history
    assert encode_messages(tokenizer, history)[0] + [tokenizer.eos_token_id] == ids  # the whole conversation too
    return turns


def _real_sample(table, seed=3):
    rows = table.by_name()
    sample = tool_data.lookup_conversation([rows["皮卡丘"], rows["妙蛙种子"], rows["可达鸭"]], random.Random(seed))
    return sample


@pytest.mark.parametrize("which", ["tiny", "real"])
def test_tool_loop_prompts_equal_training_ids_multi_turn_multi_call(which, request, table, pokedex):
    tokenizer = request.getfixturevalue("tokenizer" if which == "tiny" else "real_tokenizer")
    sample = _real_sample(table)
    assert sum(m["role"] == "tool" for m in sample["conversations"]) == 3
    assert sum(m["role"] == "user" for m in sample["conversations"]) > 3  # follow-ups without a call
    turns = _replay(tokenizer, sample, pokedex)
    assert [len(t.calls) for t in turns if t.calls] == [1, 1, 1] and all(c.ok for t in turns for c in t.calls)
    assert [t.answer for t in turns] == [m["content"] for m, n in zip(sample["conversations"], sample["conversations"][1:] + [None])
                                         if m["role"] == "assistant" and (n is None or n["role"] == "user")]


def test_bad_calls_are_failed_calls_with_error_observations(tmp_path, pokedex):
    marker = tmp_path / "pwned"

    @register_tool
    def broken(name: Annotated[str, "名字", True]):
        """总是出错"""
        raise RuntimeError("table offline")

    tools = {**pokedex, "broken": tool_of(broken)}
    turn = ToolTurn([], "皮卡丘是什么属性？", tools)
    replies = [
        f"pokedex_lookup\n```python\ntool_call(name=__import__('os').system('touch {marker}'))\n```",  # not a literal
        "weather\n```python\ntool_call(city='北京')\n```",  # no such tool
        "broken\n```python\ntool_call(name='皮卡丘')\n```",  # the tool raises
    ]
    for text in replies:
        assert not turn.done
        result = turn.feed_text(text, stopped=True)
        assert not result.ok and is_error_observation(result.observation) and turn.content == result.observation
    assert turn.given_up and turn.errors == MAX_ERROR_OBSERVATIONS + 1 and not marker.exists()
    assert "tool_call" in turn.calls[0].observation and "weather" in turn.calls[1].observation
    assert "RuntimeError: table offline" in turn.calls[2].observation

    unknown = ToolTurn([], "小火鸡是什么属性？", tools)
    result = unknown.feed_text("pokedex_lookup\n```python\ntool_call(name='小火鸡')\n```", stopped=True)
    assert not result.ok and "没有找到" in result.observation and not unknown.done
    unknown.feed_text("图鉴里没有找到「小火鸡」。", stopped=True)
    assert unknown.answer == "图鉴里没有找到「小火鸡」。" and unknown.errors == 1


def test_calls_beyond_the_limit_give_the_turn_up(pokedex):
    turn = ToolTurn([], "皮卡丘是什么属性？", pokedex, max_calls=2)
    call = "pokedex_lookup\n```python\ntool_call(name='皮卡丘')\n```"
    assert turn.feed_text(call, True).ok and turn.feed_text(call, True).ok and not turn.done
    assert turn.feed_text(call, True) is None and turn.given_up and len(turn.calls) == 2


# --- the metrics --------------------------------------------------------------------------------------------------
def test_tool_metrics_follow_their_definitions(tmp_path, table, pokedex, held_out):
    path = tmp_path / "heldout.jsonl"
    samples = tool_data.build_eval_samples(table, held_out, seed=0)
    path.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples), encoding="utf-8")
    items = tool_eval.load_items(path)
    expecting = [i for i in items if i.expected]
    assert len(expecting) == 3 * len(held_out) and len(items) - len(expecting) == 2 * len(held_out)
    tools = pokedex
    turns = []
    for k, item in enumerate(items):  # a scripted "model": right on even items, wrong in various ways on odd ones
        turn = ToolTurn(list(item.history), item.query, tools)
        if item.expected:
            name = item.expected[0]["parameters"]["name"]
            turn.feed_text(f"pokedex_lookup\n```python\ntool_call(name='{name if k % 2 == 0 else name + '兽'}')\n```", True)
            if k % 3 == 2:  # a second lookup nobody asked for, as a half-trained model makes
                turn.feed_text("pokedex_lookup\n```python\ntool_call(name='人狗人')\n```", True)
            types = item.expected[0]["observation"]["属性"]
            turn.feed_text(f"{name}是{'和'.join(types) if k % 2 == 0 else '一般'}属性的宝可梦。", k % 4 != 1)
        else:
            turn.feed_text("pokedex_lookup\n```python\ntool_call(name='皮卡丘')\n```" if k % 3 == 0 else "好的。", True)
            if not turn.done:
                turn.feed_text("好的。", True)
        turns.append(turn)
    m = {**tool_eval.tool_metrics(items, turns),
         **run_metrics([pokedex_tool.type_answer_metrics], [tool_eval.turn_record(i, t) for i, t in zip(items, turns)])}
    even = [k % 2 == 0 for k, i in enumerate(items) if i.expected]
    assert m["tool_call_rate"] == 1.0 and m["tool_name_accuracy"] == 1.0
    extra = [k % 3 == 2 for k, i in enumerate(items) if i.expected]
    assert 0 < m["tool_extra_call_rate"] == round(sum(extra) / len(extra), 4) < 1
    assert m["tool_args_exact"] == round(sum(even) / len(even), 4)
    assert m["answer_types_correct"] == m["tool_args_exact"]
    # A wrong name finds nothing: no observation to ground the answer in.
    assert m["tool_answer_grounded"] == m["tool_args_exact"]
    nocall = [k for k, i in enumerate(items) if not i.expected]
    assert m["tool_false_call_rate"] == round(sum(k % 3 == 0 for k in nocall) / len(nocall), 4)
    replies = sum(t.replies for t in turns)
    assert m["stopped_share"] == round((replies - sum(k % 4 == 1 for k, i in enumerate(items) if i.expected)) / replies, 4)


def test_type_answer_other_field_counts_answers_to_another_question(tmp_path, table, pokedex, held_out):
    # A model that copies can still answer the weaknesses or the ability when asked the types (the field choice
    # that swung between checkpoints: docs/tool_demo.md); the right lookup, then four kinds of answer.
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in tool_data.build_eval_samples(table, held_out)),
                    encoding="utf-8")
    items = [i for i in tool_eval.load_items(path) if i.expected][:8]
    answers = [lambda n, o: f"{n}的属性是{'、'.join(o['属性'])}。",  # grounded
               lambda n, o: f"{n}被{'、'.join(o['弱点'])}属性克制。",  # its weaknesses, in words without 弱点
               lambda n, o: f"{n}有「{o['特性']}」这个特性。",  # its ability
               lambda n, o: f"{n}的特性是「复眼」。"]  # an ability, not even its own
    turns = []
    for k, item in enumerate(items):
        name, observation = item.expected[0]["parameters"]["name"], item.expected[0]["observation"]
        turn = ToolTurn(list(item.history), item.query, pokedex)
        turn.feed_text(f"pokedex_lookup\n```python\ntool_call(name='{name}')\n```", True)
        turn.feed_text(answers[k % 4](name, observation), True)
        turns.append(turn)
    m = run_metrics([pokedex_tool.type_answer_metrics], [tool_eval.turn_record(i, t) for i, t in zip(items, turns)])
    assert m["type_questions"] == 8 and m["tool_answer_grounded"] == 0.25 and m["type_answer_other_field"] == 0.75


def test_types_named_ignores_the_pokemon_name():
    assert pokedex_tool.types_named("海刺龙是水属性的宝可梦。", ["海刺龙"]) == {"水"}
    assert pokedex_tool.types_named("超梦是超能力属性的宝可梦。", ["超梦"]) == {"超能力"}


def test_hidden_tools_ask_the_same_questions_without_the_tool(tmp_path, table, held_out):
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in tool_data.build_eval_samples(table, held_out)),
                    encoding="utf-8")
    shown, hidden = tool_eval.load_items(path), tool_eval.load_items(path, hide_tools=True)
    assert [i.query for i in shown] == [i.query for i in hidden]
    assert [i.expected for i in shown] == [i.expected for i in hidden]
    assert all(m["role"] != "observation" and "tools" not in m for i in hidden for m in i.history)
    assert shown[0].history[0]["tools"] == [POKEDEX_TOOL]


# --- evaluate.py --tools: the real loop with a real (rewired) model -----------------------------------------------
@pytest.fixture(scope="module")
def calling_model_dir(shared, tmp_path_factory):
    """The reference tiny model rewired to always answer with the call pokedex_lookup(name='皮卡丘')."""
    from test_inference import _tool_calling_model

    model, tokenizer = _tool_calling_model(shared)
    out = tmp_path_factory.mktemp("calling-model")
    model.save_pretrained(out)
    tokenizer.save_pretrained(str(out))
    return out


def _eval_file(path, table):
    rows = table.by_name()
    samples = [tool_data.lookup_conversation([rows[n]], random.Random(0)) for n in ("皮卡丘", "妙蛙种子")]
    samples.append({"tools": [POKEDEX_TOOL], "conversations": [{"role": "user", "content": "你好"},
                                                                {"role": "assistant", "content": "你好！"}]})
    for s in samples[:2]:
        s["conversations"] = s["conversations"][:3]
    path.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples), encoding="utf-8")
    return path


def test_evaluate_tools_runs_the_real_loop(calling_model_dir, tmp_path, table, capsys):
    import evaluate

    data, predictions = _eval_file(tmp_path / "eval.jsonl", table), tmp_path / "pred.jsonl"
    args = ["--data", str(data), "--model", str(calling_model_dir), "--tools", str(PLUGIN), "--max-new-tokens", "30",
            "--output", str(predictions)]
    assert evaluate.main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # It always calls for 皮卡丘: right for the first question, wrong for the second, a false call on "你好"; every
    # reply ends on <|observation|>, and no turn gets an answer (the model's 256-token context fills up first).
    assert summary["tool_call_rate"] == 1.0 and summary["tool_name_accuracy"] == 1.0
    assert summary["tool_args_exact"] == 0.5 and summary["tool_false_call_rate"] == 1.0
    # 皮卡丘 written for 皮卡丘 (3 of 3 characters) and for 妙蛙种子 (none of 4 in place): 3 / 7
    assert summary["tool_args_chars"] == round(3 / 7, 4)
    assert summary["tool_answer_grounded"] == 0.0 and summary["stopped_share"] == 1.0
    assert {"rouge-1", "bleu-4", "samples"} <= set(summary)
    records = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines()]
    first = records[0]["calls"]
    assert first and all(c["call"]["parameters"] == {"name": "皮卡丘"} and c["ok"] for c in first)
    assert json.loads(first[0]["observation"])["属性"] == ["电"] and records[0]["given_up"]

    assert evaluate.main(args + ["--hide-tools"]) == 0  # no tool offered: the call is not executed
    hidden = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert hidden["tool_call_rate"] == 0.0 and hidden["answer_types_correct"] == 0.0


def test_copy_categories_name_what_each_token_writes(tokenizer, table):
    row = table.by_name()["妙蛙种子"]
    sample = {"tools": [POKEDEX_TOOL], "conversations": [
        {"role": "user", "content": "妙蛙种子是什么属性的？"}, tool_data._call(row, tool_data.lookup(row)),
        {"role": "assistant", "content": "妙蛙种子的属性是草、毒。"}]}
    ids, labels = encode_sample(tokenizer, sample)
    categories = tool_eval.copy_categories(tokenizer, sample, ids, labels)
    assert sorted(categories) == [t for t, label in enumerate(labels) if label != -100]  # every learnt token, only

    def written(*kinds):
        return tokenizer.decode([ids[t] for t in sorted(categories) if categories[t] in kinds])

    assert written("call_first", "call_rest").strip() == "妙蛙种子"  # the name in the call, nothing else
    assert written("call_first").strip() and "妙蛙种子".startswith(written("call_first").strip())
    assert "妙蛙种子" in written("echo")  # the name again in the answer
    observed = written("observation")
    assert "草" in observed and "毒" in observed  # the types the answer copies from the observation
    assert "tool_call" in written("other") and "的属性是" in written("other") and "妙" not in written("other")


def test_copy_loss_splits_the_training_loss(calling_model_dir, tmp_path, table, capsys):
    import evaluate
    import torch
    from chatglm3.checkpoint.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(calling_model_dir))[:2]
    rows = table.by_name()
    samples = {n: tool_data.lookup_conversation([rows[n]], random.Random(0)) for n in ("皮卡丘", "妙蛙种子")}
    for s in samples.values():
        s["conversations"] = s["conversations"][:3]
    losses = {n: tool_eval.copy_losses(model, tok, [s], 256) for n, s in samples.items()}
    # copy_loss_all is the training loss of the sample (the model's own loss over its labels).
    for name, sample in samples.items():
        ids, labels = encode_sample(tok, sample, 256)
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
        assert losses[name]["copy_loss_all"] == pytest.approx(loss, abs=1e-3)
    # The model always calls for 皮卡丘: that name's characters are certain, 妙蛙种子's are not.
    assert losses["皮卡丘"]["copy_loss_call_first"] < 0.1 < losses["妙蛙种子"]["copy_loss_call_first"]
    assert losses["皮卡丘"]["copy_loss_call_rest"] < 0.1 < losses["妙蛙种子"]["copy_loss_call_rest"]

    data = _eval_file(tmp_path / "eval.jsonl", table)
    args = ["--data", str(data), "--model", str(calling_model_dir), "--tools", str(PLUGIN), "--max-new-tokens", "8",
            "--output", str(tmp_path / "pred.jsonl")]
    assert evaluate.main(args + ["--copy-loss"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(tool_eval.COPY_LOSS_KEYS) <= set(summary) and summary["copy_loss_all"] > 0
    # --max-samples limits the loss to the conversations of the turns asked: here 皮卡丘's alone.
    assert summary["copy_loss_all"] != pytest.approx(losses["皮卡丘"]["copy_loss_all"], abs=1e-3)
    assert evaluate.main(args + ["--copy-loss", "--max-samples", "1"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["copy_loss_all"] == pytest.approx(
        losses["皮卡丘"]["copy_loss_all"], abs=1e-3)
    assert "--max-samples" in err
    assert evaluate.main(args + ["--copy-loss", "--hide-tools"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--copy-loss" in err and "\n" not in err


def test_evaluate_tools_bad_input_is_one_line(tmp_path, table, tiny_model, capsys):
    import evaluate

    data = _eval_file(tmp_path / "eval.jsonl", table)
    assert evaluate.main(["--data", str(data), "--model", str(tiny_model), "--tools", str(tmp_path / "no.py")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no.py" in err and "\n" not in err and "Traceback" not in err
    # A table given as it used to be: one line pointing to tool files.
    assert evaluate.main(["--data", str(data), "--model", str(tiny_model), "--tools", str(TABLE)]) == 2
    err = capsys.readouterr().err.strip()
    assert "data.csv" in err and ".py" in err and "docs/tools.md" in err and "\n" not in err
    assert evaluate.main(["--data", str(data), "--model", str(tiny_model), "--hide-tools"]) == 2
    assert "--tools" in capsys.readouterr().err


# --- truncation by whole turns ------------------------------------------------------------------------------------
def test_truncation_drops_whole_turns_and_every_learnt_reply_ends_with_a_stop(tokenizer, table):
    from preprocess_utils import MultiTurnDataset

    sample = _real_sample(table)
    ids, _ = encode_sample(tokenizer, sample)
    messages = sample_to_messages(sample)
    ends = {len(encode_messages(tokenizer, messages[:k])[0]): messages[k - 1] for k in range(1, len(messages) + 1)}
    stops, eos = set(stop_token_ids(tokenizer)), tokenizer.eos_token_id
    kept_some = 0
    for limit in range(20, len(ids) + 8, 5):
        cut, labels = encode_sample(tokenizer, sample, max_length=limit)
        assert len(cut) <= limit and len(cut) == len(labels)
        if len(ids) <= limit:
            assert (cut, labels) == encode_sample(tokenizer, sample)
            continue
        if all(label == -100 for label in labels):  # not even the first reply fits
            continue
        kept_some += 1
        # Whole messages up to a learnt reply, then eos: never half a reply.
        assert cut[-1] == eos and cut[:-1] == ids[:len(cut) - 1]
        last = ends[len(cut) - 1]
        assert last["role"] == "assistant" and last["loss"]
        # Each learnt run of labels ends on a stop token (the next role token, or eos).
        for k, label in enumerate(labels):
            if label != -100 and (k + 1 == len(labels) or labels[k + 1] == -100):
                assert cut[k] in stops
        dataset = MultiTurnDataset([sample], tokenizer, max_seq_length=limit, verbose=False)
        assert dataset[0] == {"input_ids": cut, "labels": labels} and dataset.num_truncated == 1
    assert kept_some >= 5


# --- the data CLI ---------------------------------------------------------------------------------------------------
def test_build_tool_data_cli(tmp_path, tiny_model):
    script = REPO / "data_processing" / "build_tool_data.py"
    run = subprocess.run([sys.executable, str(script), "--out-dir", str(tmp_path), "--synthetic", "40",
                          "--real-variants", "1"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    names = (tmp_path / "heldout_names.txt").read_text(encoding="utf-8").split()
    assert "超梦" in names and "超梦" not in (tmp_path / "train.jsonl").read_text(encoding="utf-8")
    assert f"held out {len(names)} real Pokémon" in run.stdout
    # The bundled tokenizer (trained on data.csv, held-out names included) fails the check, in one line.
    assert build_tool_data.main(["--out-dir", str(tmp_path), "--check-tokenizer", str(tiny_model)]) == 1
    assert build_tool_data.main(["--out-dir", str(tmp_path), "--held-out-ratio", "1.5"]) == 1
    # A table inside --out-dir under an output's name is refused before anything is written.
    table = tmp_path / "train.jsonl"
    table.write_bytes((REPO / "data_processing" / "data.csv").read_bytes())
    assert build_tool_data.main(["--out-dir", str(tmp_path), "--table", str(table)]) == 1
    assert table.read_bytes() == (REPO / "data_processing" / "data.csv").read_bytes()


# --- tool plug-ins: the schema from the signature, bad tool files, the worked example ------------------------------
EXAMPLE = REPO / "examples" / "tools" / "convert_length.py"
DEMO = REPO / "finetune_chatmodel_demo"


def test_the_schema_comes_from_the_signature_in_the_training_datas_form():
    @register_tool
    def plan_trip(city: Annotated[str, "城市名", True],
                  days: Annotated[int, "天数"],
                  budget: Annotated[float, "预算（元）", False] = 0.0,
                  tags: Annotated[list[str], "标签"] = (),
                  span: Annotated[tuple[int, int], "日期范围"] = (1, 2),
                  options: Annotated[dict, "其他选项", False] = None,
                  *, hurry: Annotated[bool, "是否赶时间", True]):
        """安排一次旅行。

        第二段说明也是描述的一部分。"""
        return {"city": city, "span": span}

    tool = tool_of(plan_trip)
    assert tool.schema == {
        "name": "plan_trip", "description": "安排一次旅行。\n\n第二段说明也是描述的一部分。",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "城市名"}, "days": {"type": "integer", "description": "天数"},
            "budget": {"type": "number", "description": "预算（元）"}, "tags": {"type": "array", "description": "标签"},
            "span": {"type": "array", "description": "日期范围"}, "options": {"type": "object", "description": "其他选项"},
            "hurry": {"type": "boolean", "description": "是否赶时间"}},
            "required": ["city", "days", "hurry"]}}  # required left out: required unless it has a default
    assert plan_trip("北京", 2, hurry=True) == {"city": "北京", "span": (1, 2)}  # still a plain function
    tools = {"plan_trip": tool}
    ok = execute({"name": "plan_trip", "parameters": {"city": "北京", "days": 3, "span": [3, 5], "hurry": False}}, tools)
    assert ok.ok and json.loads(ok.observation) == {"city": "北京", "span": [3, 5]}  # a tuple parameter gets a tuple
    for bad in ({"city": "北京", "hurry": False}, {"city": "北京", "days": True, "hurry": False},
                {"city": "北京", "days": 3, "hurry": False, "extra": 1}, {"city": 3, "days": 3, "hurry": False}):
        result = execute({"name": "plan_trip", "parameters": bad}, tools)
        assert not result.ok and json.loads(result.observation)["错误"].startswith("参数应为 city（string：城市名）")
    assert "budget（number，可不填：预算（元））" in result.observation


BAD_TOOL_FILES = {  # name: (source, what the line names besides the file, the line it names)
    "import fails": ("import json\nimport no_such_module_for_tools\n", "no_such_module_for_tools", 2),
    "syntax error": ("from chatglm3 import register_tool\n\ndef f(:\n    pass\n", "SyntaxError", 3),
    "raises at import": ("from chatglm3 import register_tool\nVALUE = 1 / 0\n", "ZeroDivisionError", 2),
    "no annotation": ('from chatglm3 import register_tool\n\n@register_tool\ndef get_time(zone):\n    """时间"""\n',
                      "Annotated", 3),
    "annotation without description": ('from chatglm3 import register_tool\n\n@register_tool\n'
                                       'def get_time(zone: str):\n    """时间"""\n', "'zone'", 3),
    "two tools with one name": ('from typing import Annotated\nfrom chatglm3 import register_tool\n\n@register_tool\n'
                                'def f(x: Annotated[str, "x", True]):\n    """一"""\n\n@register_tool\n'
                                'def f(x: Annotated[str, "x", True]):\n    """二"""\n', "'f'", 8),
    "no tools": ("from chatglm3 import register_tool\n\ndef helper():\n    pass\n", "no tool", None),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD_TOOL_FILES))
def test_a_bad_tool_file_is_one_line_naming_it(case, tmp_path, tiny_model, table):
    source, fragment, line = BAD_TOOL_FILES[case]
    path = tmp_path / "my_tools.py"
    path.write_text(source, encoding="utf-8")
    script = "inference.py" if sorted(BAD_TOOL_FILES).index(case) % 2 else "evaluate.py"  # both, in turn
    flags = ["--prompt", "你好"] if script == "inference.py" else ["--data", str(_eval_file(tmp_path / "d.jsonl", table))]
    run = subprocess.run([sys.executable, str(DEMO / script), "--model", str(tiny_model), *flags, "--tools", str(path)],
                         capture_output=True, text=True, timeout=300)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert str(path) in lines[0] and fragment in lines[0] and lines[0].startswith("错误："), lines[0]
    if line is not None:
        assert f"line {line}" in lines[0], lines[0]
    assert "ChatGLM：" not in run.stdout  # the model never answered: the file is checked first


def test_tool_files_that_are_no_python_files_or_clash_are_refused(tmp_path):
    with pytest.raises(ChatGLMError, match="not found"):
        load_tool_files([tmp_path / "missing.py"])
    with pytest.raises(ChatGLMError, match=r"\.py.*docs/tools.md"):
        load_tool_files([TABLE])
    twin = tmp_path / "twin.py"
    twin.write_text("from pokedex import pokedex_lookup\n", encoding="utf-8")  # a tool imported from a module
    assert list(load_tool_files([twin]).tools) == ["pokedex_lookup"]
    with pytest.raises(ChatGLMError, match="pokedex_lookup"):
        load_tool_files([PLUGIN, twin])  # the same name from two files
    both = load_tool_files([EXAMPLE, PLUGIN])
    assert list(both.tools) == ["convert_length", "pokedex_lookup"] and len(both.metrics) == 1


@pytest.fixture(scope="module")
def length_model_dir(shared, tmp_path_factory):
    """The reference tiny model rewired to always answer with the call convert_length(value=3, unit='km')."""
    from test_inference import _tool_calling_model

    model, tokenizer = _tool_calling_model(shared, "convert_length\ntool_call(value=3, unit='km')")
    out = tmp_path_factory.mktemp("length-model")
    model.save_pretrained(out)
    tokenizer.save_pretrained(str(out))
    return out


@pytest.mark.slow
def test_the_worked_example_a_non_pokemon_plugin_runs_through_the_loop(length_model_dir, tmp_path):
    """docs/tools.md's example: inference.py and evaluate.py with examples/tools/convert_length.py, the calls
    executed by the plug-in through the tool loop."""
    run = subprocess.run([sys.executable, str(DEMO / "inference.py"), "--model", str(length_model_dir), "--tools",
                          str(EXAMPLE), "--prompt", "3 千米是多少米？", "--greedy", "--max-new-tokens", "30"],
                         capture_output=True, text=True, timeout=300)
    observation = '[工具结果 / observation] {"米": 3000.0, "英尺": 9842.5197, "英里": 1.8641}'
    assert '[调用工具 / tool call] {"name": "convert_length", "parameters": {"value": 3, "unit": "km"}}' in run.stdout
    assert observation in run.stdout, run.stdout
    # It only ever calls: the second round's prompt overflows the 256-token context, and the turn ends in one line.
    assert run.returncode == 2 and "prompt too long" in run.stderr.strip().splitlines()[-1]
    assert "工具 / Tools: convert_length" in run.stderr

    # evaluate.py: the generic tool metrics for any plug-in (no metric function: no type keys).
    data = tmp_path / "length.jsonl"
    call = {"role": "tool", "name": "convert_length", "parameters": {"value": 3, "unit": "km"},
            "observation": {"米": 3000.0, "英尺": 9842.5197, "英里": 1.8641}}
    samples = [{"tools": [tool_of(load_tool_files([EXAMPLE]).tools["convert_length"].function).schema],
                "conversations": [{"role": "user", "content": question}, {**call, "parameters": parameters},
                                  {"role": "assistant", "content": "是 3000 米。"}]}
               for question, parameters in (("3 千米是多少米？", {"value": 3, "unit": "km"}),
                                            ("5 英里是多少米？", {"value": 5, "unit": "mi"}))]
    data.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples), encoding="utf-8")
    run = subprocess.run([sys.executable, str(DEMO / "evaluate.py"), "--data", str(data), "--model",
                          str(length_model_dir), "--tools", str(EXAMPLE), "--max-new-tokens", "30", "--output",
                          str(tmp_path / "pred.jsonl")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["tool_call_rate"] == 1.0 and summary["tool_name_accuracy"] == 1.0
    assert summary["tool_args_exact"] == 0.5 and "answer_types_correct" not in summary


def test_the_example_training_data_is_what_the_example_plugin_offers_and_answers():
    tool = load_tool_files([EXAMPLE]).tools["convert_length"]
    samples = [json.loads(line) for line in EXAMPLE.with_suffix(".jsonl").read_text(encoding="utf-8").splitlines()]
    for i, sample in enumerate(samples):
        check_conversation(sample, f"sample {i}")
        assert json.dumps(sample["tools"], ensure_ascii=False) == json.dumps([tool.schema], ensure_ascii=False)
        for call in (m for m in sample["conversations"] if m["role"] == "tool"):
            assert tool.argument_problem(call["parameters"]) is None
            assert call["observation"] == tool.run(call["parameters"])
