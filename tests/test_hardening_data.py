"""Hostile data and files, round 2 (issue 21): one table per kind, each row a bad input through a real entry point.

Kinds: JSON nested too deep, JSON of the wrong shape, text that is not valid Unicode, sizes and file kinds that
cannot be read, outputs that are not all-or-nothing or would replace a loaded file, NaN written as JSON, turns
out of order, a tokenizer's remote code, abbreviated flags. For every row: the exit status, one line naming the
file/line/flag/field, no traceback, and every file given to the command byte-identical afterwards (the helpers
come from test_hardening). Rows run in-process through main(argv); piped input and tool_report in subprocesses.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import build_tool_data as btd_cli
import data_processing as dp_cli
import evaluate
import format_tool_poke as ftp_cli
import inference
import quiz_types
from chatglm3 import ChatGLMError, json_files
from chatglm3.output_files import write_all_atomic
from test_hardening import _script_main, assert_one_line_error, cli, snapshot  # noqa: F401  (cli: a fixture)

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "finetune_chatmodel_demo"
DEEP = "[" * 100_000 + "]" * 100_000  # a RecursionError in json.loads without the depth check
PLOT, EXPORT = _script_main("plot_loss"), _script_main("export")
ALPACA, QUIZ = _script_main("format_tool_alpaca"), quiz_types.main
EV, FTP, DP, INF = evaluate.main, ftp_cli.main, dp_cli.main, inference.main


def _conversation(*roles) -> dict:
    turns = []
    for role in roles:
        turns.append({"role": "tool", "name": "pokedex_lookup", "parameters": {"name": "皮卡丘"}, "observation": "{}"}
                     if role == "tool" else {"role": role, "content": f"{role} 的话"})
    return {"conversations": turns}


GOOD = json.dumps(_conversation("user", "assistant"), ensure_ascii=False)


@pytest.fixture
def work(tmp_path, tiny_model):
    """A copy of the tiny model (with a finished checkpoint's trainer_state.json), a good dev set, a table."""
    work = tmp_path / "work"
    shutil.copytree(tiny_model, work / "model")
    (work / "model" / "trainer_state.json").write_text('{"global_step": 1, "log_history": [{"step": 1, "loss": 2.5}]}',
                                                        encoding="utf-8")
    (work / "data.jsonl").write_text(GOOD + "\n", encoding="utf-8")
    shutil.copy(REPO / "data_processing" / "data.csv", work / "table.csv")
    return work


def _write(path: Path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")


def _edit_json(path: Path, **fields) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(fields)
    path.write_text(json.dumps(data), encoding="utf-8")


EVAL = ["--model", "{w}/model", "--max-new-tokens", "2", "--output", "{w}/pred.jsonl"]
INFER = ["--model", "{w}/model", "--prompt", "你好", "--max-new-tokens", "2", "--greedy"]
STATE = {"log_history": [{"step": 1, "loss": 2.0}]}

# name: (main, {file under work: content}, argv, exit status, fragments of the one line)
CASES = {
    # -- JSON nested 100,000 deep, wherever a JSON file or value is read --
    "deep: a data line": (EV, {"bad.jsonl": GOOD + "\n" + DEEP + "\n"}, ["--data", "{w}/bad.jsonl", *EVAL], 2,
                          ["bad.jsonl:2", "nested deeper"]),
    "deep: a JSON-list train file": (FTP, {"bad.json": "[\n" + GOOD + ",\n" + DEEP + "]"},
                                     ["--path", "{w}/bad.json", "--output", "{w}/new.jsonl"], 1, ["bad.json:3", "nested"]),
    "deep: config.json": (INF, {"model/config.json": DEEP}, INFER, 2, ["config.json", "nested"]),
    "deep: tokenizer_config.json": (INF, {"model/tokenizer_config.json": DEEP}, INFER, 2,
                                    ["tokenizer_config.json", "nested"]),
    "deep: trainer_state.json": (PLOT, {"run/trainer_state.json": DEEP}, ["{w}/run", "--out", "{w}/loss.png"], 1,
                                 ["trainer_state.json", "nested"]),
    "deep: a tool call's arguments": (ALPACA, {"alpaca.json": json.dumps([{
        "NLDocumentation": "d", "Function_Description": {}, "Instances": [{
            "input": "q", "output": "a", "Final Thought": "t",
            "intermediate_steps": [[["tool", DEEP, "Action: tool"], "obs"]]}]}])},
        ["--path", "{w}/alpaca.json", "--output", "{w}/new.jsonl"], 1, ["alpaca.json", "no usable instance"]),
    # -- well-formed JSON of the wrong shape --
    "shape: weight_map a list": (INF, {"model/model.safetensors.index.json": '{"weight_map": ["a"]}'}, INFER, 2,
                                 ["model.safetensors.index.json", "weight_map", "list"]),
    "shape: weight_map of numbers": (INF, {"model/model.safetensors.index.json": '{"weight_map": {"w": 1}}'}, INFER, 2,
                                     ["model.safetensors.index.json", "weight_map['w']", "number"]),
    "shape: trainer_state.json a list": (PLOT, {"run/trainer_state.json": "[]"}, ["{w}/run", "--out", "{w}/loss.png"],
                                         1, ["trainer_state.json", "top level", "list"]),
    "shape: a loss that is a string": (PLOT, {"run/trainer_state.json": '{"log_history": [{"step": 1, "loss": "x"}]}'},
                                       ["{w}/run", "--out", "{w}/loss.png"], 1, ["log_history[0].loss", "number"]),
    "shape: log_history of strings": (PLOT, {"run/trainer_state.json": '{"log_history": ["loss 1"]}'},
                                      ["{w}/run", "--out", "{w}/loss.png"], 1, ["log_history[0]", "object"]),
    "shape: tokenizer_config.json a list": (INF, {"model/tokenizer_config.json": "[1]"}, INFER, 2,
                                            ["tokenizer_config.json", "top level"]),
    # -- text that is not valid Unicode --
    "unicode: a lone surrogate in a data line": (EV, {"bad.jsonl": GOOD + "\n" + GOOD.replace("user 的话", "\\ud800")},
                                                 ["--data", "{w}/bad.jsonl", *EVAL], 2, ["bad.jsonl:2", "\\ud800"]),
    "unicode: invalid UTF-8 in a data file": (EV, {"bad.jsonl": (GOOD + "\n\n").encode() + b'{"x": "\xff"}\n'},
                                              ["--data", "{w}/bad.jsonl", *EVAL], 2, ["bad.jsonl:3", "UTF-8"]),
    "unicode: a lone surrogate in a JSON-list file": (FTP, {"bad.json": "[" + GOOD + ",\n" + GOOD.replace("的", "\\udfff")
                                                            + "]"}, ["--path", "{w}/bad.json", "--output",
                                                                     "{w}/new.jsonl"], 1, ["bad.json:2", "\\udfff"]),
    "unicode: --prompt": (INF, {}, ["--model", "{w}/model", "--prompt", "问\udcff"], 2, ["--prompt", "\\udcff"]),
    "unicode: --system": (INF, {}, [*INFER, "--system", "\ud800"], 2, ["--system"]),
    # -- sizes from a config, files that are not regular files --
    "size: 10^6 layers": (INF, {"model/config.json": {"num_layers": 10**6}}, INFER, 2, ["config.json", "num_layers"]),
    "size: pre_seq_len 10^9 in a checkpoint": (INF, {"pt/config.json": {"pre_seq_len": 10**9}},
                                               [*INFER, "--pt-checkpoint", "{w}/pt"], 2, ["pt/config.json", "pre_seq_len"]),
    "size: pre_seq_len 10^9 as a flag": (INF, {"pt/config.json": {}}, [*INFER, "--pt-checkpoint", "{w}/pt",
                                                                       "--pt-pre-seq-len", "1000000000"], 2, ["pre_seq_len"]),
    "size: context 10^9": (INF, {"model/config.json": {"seq_length": 10**9}}, INFER, 2, ["seq_length"]),
    "file: data in a directory": (EV, {"dir/x": ""}, ["--data", "{w}/dir", *EVAL], 2, ["dir", "directory"]),
    "file: config.json a directory": (INF, {"model/config.json/x": ""}, INFER, 2, ["config.json", "directory"]),
    "file: held-out names a directory": (btd_cli.main, {"btd/heldout_names.txt/x": "", "btd/train.jsonl": GOOD},
                                         ["--out-dir", "{w}/btd", "--check-tokenizer", "{w}/model"], 1,
                                         ["heldout_names.txt", "directory"]),
    "file: quiz data in a directory": (QUIZ, {"dir/x": ""}, ["--model", "{w}/model", "--data", "{w}/dir"], 1,
                                       ["dir", "directory"]),
    # -- found in this round: more of the same kinds --
    "found: a 5,000-digit number in a data line": (EV, {"bad.jsonl": '{"n": ' + "7" * 5000 + "}\n"},
                                                   ["--data", "{w}/bad.jsonl", *EVAL], 2, ["bad.jsonl:1", "invalid JSON"]),
    "found: NaN in a data line": (EV, {"bad.jsonl": '{"conversations": NaN}\n'}, ["--data", "{w}/bad.jsonl", *EVAL], 2,
                                  ["bad.jsonl:1", "NaN"]),
    "found: a shard outside the folder": (INF, {"model/model.safetensors.index.json":
                                                '{"weight_map": {"w": "/dev/zero"}}'}, INFER, 2, ["/dev/zero", "shard"]),
    # -- turns out of order (the server's rule) --
    "order: assistant first": (EV, {"bad.jsonl": GOOD + "\n" + json.dumps(_conversation("assistant", "user"))},
                               ["--data", "{w}/bad.jsonl", *EVAL], 2, ["bad.jsonl:2", "conversations[0]", "assistant"]),
    "order: a system turn mid-conversation": (EV, {"bad.jsonl": json.dumps(_conversation("user", "assistant", "system",
                                                                                         "user", "assistant"))},
                                              ["--data", "{w}/bad.jsonl", *EVAL], 2,
                                              ["bad.jsonl:1", "conversations[2]", "system"]),
    "order: two assistant turns": (FTP, {"bad.json": json.dumps([_conversation("user", "assistant", "assistant")])},
                                   ["--path", "{w}/bad.json", "--output", "{w}/new.jsonl"], 1,
                                   ["bad.json:1", "conversations[2]"]),
    "order: an observation without a call": (FTP, {"bad.json": json.dumps([_conversation("user", "observation",
                                                                                          "assistant")])},
                                             ["--path", "{w}/bad.json", "--output", "{w}/new.jsonl"], 1,
                                             ["conversations[1]", "observation"]),
    # -- outputs that would replace a file of the loaded model or checkpoint --
    "output: the checkpoint's trainer_state.json": (EV, {}, ["--data", "{w}/data.jsonl", *EVAL[:-2], "--output",
                                                             "{w}/model/trainer_state.json"], 2, ["--output", "--model"]),
    "output: the model's generation_config.json": (EV, {}, ["--data", "{w}/data.jsonl", *EVAL[:-2], "--output",
                                                            "{w}/model/generation_config.json"], 2, ["--model"]),
    "output: export over its tokenizer folder": (EXPORT, {}, ["--model", "{w}/model", "--tokenizer", "{w}/tok",
                                                              "--output", "{w}/tok", "--force"], 1, ["--output", "tok"]),
}


def _prepare(work: Path, files: dict) -> None:
    for name, content in files.items():
        if name == "model/config.json/x":
            (work / "model" / "config.json").unlink()
        if isinstance(content, dict):  # fields written into a copy of the model's config.json
            base = work / "model" / "config.json"
            _write(work / name, base.read_text(encoding="utf-8") if not (work / name).exists() else (work / name).read_text())
            _edit_json(work / name, **content)
        else:
            _write(work / name, content)
    shutil.copytree(work / "model", work / "tok", ignore=shutil.ignore_patterns("*.safetensors*", "config.json"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_data_and_files_are_one_line(work, cli, case):
    main, files, argv, status, fragments = CASES[case]
    _prepare(work, files)
    before = snapshot(work)
    code, out, err = cli(main, [a.format(w=work) for a in argv])
    assert code == status, out + err
    assert_one_line_error(err, *fragments)
    assert "Loaded model" not in err and "已加载模型" not in err  # refused before the model was built
    assert snapshot(work) == before
    assert not (work / "new.jsonl").exists() and not (work / "pred.jsonl").exists()


def test_the_deep_rows_would_fail_without_the_depth_check():
    """The rows above can fail: json's own parser recurses and gives up on this input."""
    with pytest.raises(RecursionError):
        json.loads(DEEP)
    assert json_files.loads('{"a": "' + "[" * 1000 + '"}', "x") == {"a": "[" * 1000}  # brackets in strings are text
    assert json_files.loads("[" * 100 + "]" * 100, "x") is not None  # 100 levels are fine


# ---- files that are not regular files: never read for ever -------------------------------------------------------
@pytest.mark.parametrize("kind", ["link to /dev/zero", "named pipe"])
def test_a_device_or_pipe_as_data_never_hangs(work, kind):
    """A link to /dev/zero is refused; a named pipe nobody writes to reads as empty. Subprocess with a timeout: a
    regression hangs instead of passing."""
    data = work / "data-in"
    if kind == "named pipe":
        os.mkfifo(data)
    else:
        os.symlink("/dev/zero", data)
    run = subprocess.run([sys.executable, str(DEMO / "evaluate.py"), "--data", str(data), "--model", str(work / "model"),
                          "--output", str(work / "pred.jsonl")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert_one_line_error(run.stderr, str(data))
    assert not (work / "pred.jsonl").exists()


def test_reading_is_bounded(tmp_path):
    big = tmp_path / "big.json"
    big.write_bytes(b" " * 2048)
    with pytest.raises(ChatGLMError, match="larger than"):
        json_files.read_bytes(big, limit=1024)


# ---- piped input that is not text ---------------------------------------------------------------------------------
def test_a_piped_line_that_is_not_utf8_is_skipped_with_its_number(work):
    run = subprocess.run([sys.executable, str(DEMO / "inference.py"), "--model", str(work / "model"), "--greedy",
                          "--max-new-tokens", "2"], input="你好\n".encode() + b"\xff\xfe\n" + "再见\n".encode(),
                         capture_output=True, timeout=300)
    err = run.stderr.decode("utf-8", "replace")
    assert run.returncode == 1, err
    assert_one_line_error(err, "input line 2", "not valid")
    assert run.stdout.decode().count("ChatGLM：") == 2  # lines 1 and 3 answered


def test_tokenized_text_with_a_lone_surrogate_is_one_clear_error(real_tokenizer):
    with pytest.raises(ChatGLMError, match="not valid Unicode"):
        real_tokenizer.encode("皮卡丘\ud800")
    with pytest.raises(ChatGLMError, match="not valid Unicode"):
        real_tokenizer.tokenizer.encode("皮卡丘\ud800")


def test_hand_written_tool_observations_of_any_shape_are_context_not_a_crash(tmp_path):
    """evaluate.py --tools reads expected calls from the dev set: an observation that is deep JSON text, or whose
    types and name are numbers, is no type question (it used to be a RecursionError or a TypeError)."""
    import pokedex_tool
    import tool_eval

    samples = [{"conversations": [{"role": "user", "content": "查"},
                                  {"role": "tool", "name": "pokedex_lookup", "parameters": {"name": 3},
                                   "observation": observation},
                                  {"role": "assistant", "content": "电"}]}
               for observation in (DEEP, {"属性": 5, "姓名": 7}, {"属性": ["电"], "姓名": 7})]
    data = tmp_path / "dev.jsonl"
    data.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples), encoding="utf-8")
    items = tool_eval.load_items(data)
    assert items[0].expected[0]["observation"] == DEEP  # text, as written
    records = [{"expected_calls": i.expected, "reference": i.reference} for i in items]
    assert [pokedex_tool.is_type_question(r) for r in records] == [False, False, False]
    assert pokedex_tool.types_named("电属性", [3, None, "皮卡丘"]) == {"电"}


def test_training_reads_turns_in_the_servers_order_only(tiny_model, tmp_path):
    """finetune.py's dataset (preprocess_utils.build_dataset, from a file or from samples in memory) uses the same
    rule as evaluation and the server."""
    import preprocess_utils
    from chatglm3.data.reader import DataFormatError
    from chatglm3.checkpoint.loading import load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    data = tmp_path / "train.jsonl"
    data.write_text(GOOD + "\n" + json.dumps(_conversation("user", "assistant", "system", "assistant")) + "\n",
                    encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"train.jsonl:2: conversations\[2\]: .*system"):
        preprocess_utils.build_dataset(data, tokenizer, "multi-turn", max_seq_length=64)
    with pytest.raises(DataFormatError, match=r"sample 1: conversations\[0\]: .*assistant"):
        preprocess_utils.MultiTurnDataset([_conversation("assistant", "user", "assistant")], tokenizer, 64)
    good = tmp_path / "ok.jsonl"  # every order the rule allows: system, user, a tool call, answers
    good.write_text(json.dumps(_conversation("system", "user", "tool", "assistant", "user", "assistant")) + "\n",
                    encoding="utf-8")
    assert len(preprocess_utils.build_dataset(good, tokenizer, "multi-turn", max_seq_length=256, verbose=False)) == 1


# ---- all or nothing ----------------------------------------------------------------------------------------------
def test_several_outputs_are_written_all_or_nothing(tmp_path):
    """The second output cannot be made (its folder would be under a file): the first keeps its old content and
    no temporary file is left."""
    first = tmp_path / "first.json"
    first.write_text("old", encoding="utf-8")
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    with pytest.raises(OSError):
        write_all_atomic({first: "new", tmp_path / "afile" / "second.json": "new"})
    assert first.read_text(encoding="utf-8") == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "first.json"]
    write_all_atomic({first: "new", tmp_path / "second.json": b"2"})
    assert first.read_text(encoding="utf-8") == "new" and (tmp_path / "second.json").read_bytes() == b"2"


def test_a_failure_on_the_last_output_leaves_the_first_as_it_was(tmp_path, cli, monkeypatch):
    """data_processing.py with three outputs; writing the third fails (a full disk, injected where the bytes are
    written): the earlier --output keeps its old content, nothing else appears, one line names the error."""
    from chatglm3 import output_files

    real = output_files._write_temporary

    def disk_full_for_the_report(path, data):
        if Path(path).name == "r.json":
            raise OSError(28, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(output_files, "_write_temporary", disk_full_for_the_report)
    (tmp_path / "c.json").write_text("old", encoding="utf-8")
    code, out, err = cli(DP, ["--input", REPO / "data_processing" / "data.csv", "--output", tmp_path / "c.json",
                              "--dev-ratio", "0.2", "--dev-output", tmp_path / "d.json", "--report", tmp_path / "r.json"])
    assert code == 1
    assert_one_line_error(err, "r.json", "No space left")
    assert (tmp_path / "c.json").read_text(encoding="utf-8") == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]


# ---- NaN is never written as JSON --------------------------------------------------------------------------------
def test_non_finite_numbers_are_refused_by_the_writer_and_the_reader(tmp_path):
    with pytest.raises(ChatGLMError, match="NaN"):
        json_files.dumps({"loss": float("nan")}, "out.jsonl")
    with pytest.raises(ChatGLMError, match="NaN"):
        json_files.dumps([float("inf")], "out.jsonl")
    assert json_files.dumps({"名": 1.5}) == '{"名": 1.5}'
    state = tmp_path / "trainer_state.json"
    state.write_text('{"log_history": [{"step": 1, "loss": NaN}]}', encoding="utf-8")
    assert json_files.read_trainer_state(state)["log_history"][0]["loss"] != 0  # the Trainer's own NaN is read


def test_tool_report_refuses_a_metric_that_is_a_string_or_nan(tmp_path):
    good = tmp_path / "good.json"
    good.write_text('{"tool_call_rate": 0.5}\n', encoding="utf-8")
    for name, line, fragments in (("str.json", '{"tool_call_rate": "0.5"}', ["str.json", "tool_call_rate", "string"]),
                                  ("nan.json", '{"tool_call_rate": NaN}', ["nan.json:1", "NaN"]),
                                  ("deep.json", DEEP, ["deep.json:1", "nested"])):
        (tmp_path / name).write_text(line + "\n", encoding="utf-8")
        run = subprocess.run([sys.executable, str(REPO / "scripts" / "tool_report.py"), "mean", str(good),
                              str(tmp_path / name)], capture_output=True, text=True, timeout=120)
        assert run.returncode == 1 and not run.stdout
        assert_one_line_error(run.stderr, *fragments)


# ---- the tokenizer's remote code -------------------------------------------------------------------------------
PLANTED = "open({marker!r}, 'w').write('imported')\nfrom transformers import PreTrainedTokenizer\n" \
          "class ChatGLMTokenizer(PreTrainedTokenizer):\n    pass\n"


def test_auto_tokenizer_with_trust_remote_code_never_imports_the_folders_code(tiny_model, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from chatglm3 import ChatGLMForConditionalGeneration, ChatGLMTokenizer

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    marker = tmp_path / "imported"
    (folder / "tokenization_chatglm.py").write_text(PLANTED.format(marker=str(marker)), encoding="utf-8")
    _edit_json(folder / "tokenizer_config.json", tokenizer_class="ChatGLMTokenizer",
               auto_map={"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]})
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    assert type(tokenizer) is ChatGLMTokenizer and not marker.exists()
    assert isinstance(AutoModel.from_pretrained(str(folder), trust_remote_code=True), ChatGLMForConditionalGeneration)
    # The planted file does what the test says when it is imported (the assertion above can fail).
    spec = importlib.util.spec_from_file_location("planted", folder / "tokenization_chatglm.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert marker.exists()


# ---- abbreviated flags -----------------------------------------------------------------------------------------
# script: (main, argv whose last flag is an abbreviation of one of the script's flags; the rest is valid)
ABBREVIATIONS = {
    "evaluate.py": (EV, ["--data", "{w}/data.jsonl", "--model", "{w}/model", "--outp", "{w}/x"]),
    "inference.py": (INF, ["--model", "{w}/model", "--promp", "hi"]),
    "data_processing.py": (DP, ["--dev-out", "{w}/x"]),
    "format_tool_poke.py": (FTP, ["--outp", "{w}/x"]),
    "build_tool_data.py": (btd_cli.main, ["--out-dir", "{w}/x", "--synth", "1"]),
    "plot_loss.py": (PLOT, ["{w}/model", "--ou", "{w}/x"]),
    "export.py": (EXPORT, ["--model", "{w}/model", "--output", "{w}/x", "--forc"]),
    "quiz_types.py": (QUIZ, ["--model", "{w}/model", "--data", "{w}/data.jsonl", "--tab", "{w}/x"]),
    "format_tool_alpaca.py": (ALPACA, ["--path", "{w}/data.jsonl", "--outp", "{w}/x"]),
    "format_advertise_gen.py": (_script_main("format_advertise_gen"), ["--path", "{w}/data.jsonl", "--outp", "{w}/x"]),
    "build_tiny_model.py": (_script_main("build_tiny_model"), ["--corpus", "{w}/data.jsonl", "--out", "{w}/x",
                                                               "--lay", "3"]),
}


@pytest.mark.parametrize("script", sorted(ABBREVIATIONS))
def test_abbreviated_flags_are_refused(work, cli, script):
    main, argv = ABBREVIATIONS[script]
    before = snapshot(work)
    code, out, err = cli(main, [a.format(w=work) for a in argv])
    abbreviation = [a for a in argv if a.startswith("--")][-1]
    assert code == 2 and f"unrecognized arguments: {abbreviation}" in err, err
    assert snapshot(work) == before and not (work / "x").exists()


def test_tool_report_and_benchmarks_refuse_abbreviations():
    for path, argv in ((REPO / "scripts" / "tool_report.py", ["curve", "a.jsonl", "--out", "x.png", "--ke", "stopped_share"]),
                       (REPO / "benchmarks" / "bench_generate.py", ["--new-tok", "2"])):
        run = subprocess.run([sys.executable, str(path), *argv], capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and f"unrecognized arguments: {argv[-2]}" in run.stderr, run.stderr
