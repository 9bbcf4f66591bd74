"""Hostile and broken inputs, one table per kind (issue 10): the next bug of a kind is a new row.

Every row gives a bad input, the exit status and fragments of the one-line message. For every row the files the
command was given (inputs and earlier outputs) are hashed before and after and must be byte-identical, stderr
holds no traceback, and a planted pickle never runs (its marker file never appears). Rows run in-process
through main(argv); trainings and resumes run as real subprocesses (slow).
"""
import hashlib
import importlib.util
import io
import json
import os
import pickle
import resource
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data_processing as dp_cli
import evaluate
import finetune
import format_tool_poke as ftp_cli
import inference
from chatglm3.model import conversation
from chatglm3.checkpoint import memory, torch_files
from test_finetune import pokemon_jsonl  # noqa: F401  (a fixture)

REPO = Path(__file__).resolve().parents[1]
FINETUNE = REPO / "finetune_chatmodel_demo" / "finetune.py"
DS_CONFIG = REPO / "finetune_chatmodel_demo" / "configs" / "deepspeed.json"


# ---- helpers --------------------------------------------------------------------------------------------------
def snapshot(root: Path) -> dict:
    """sha256 of every regular file under root (links followed), by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_one_line_error(err: str, *fragments: str):
    assert "Traceback" not in err, err[-3000:]
    assert "weights_only=False" not in err and "set to `False`" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if all(f in line for f in fragments)]
    assert len(lines) == 1, (fragments, err[-3000:])


class Evil:
    """A pickle that creates `marker` when it is loaded unsafely."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(path: Path, marker: Path, zip_format: bool):
    """Replace `path` by a pickle that would create `marker`: in torch.save's zip format, or a bare pickle (the
    old format, which only the loader itself can check)."""
    if zip_format:
        torch.save({"module": Evil(marker), "optimizer_state_dict": Evil(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(Evil(marker), protocol=2))


def test_planted_pickles_would_run_if_loaded_unsafely(tmp_path):
    """The rows below can fail: an unsafe load of what they plant creates the marker."""
    for zip_format in (True, False):
        marker = tmp_path / f"marker-{zip_format}"
        plant(tmp_path / "file.pt", marker, zip_format)
        try:
            torch.load(tmp_path / "file.pt", weights_only=False)
        except RuntimeError:  # the old format's loader complains only after unpickling ran the code
            pass
        assert marker.exists()


@pytest.fixture
def cli(capsys):
    """cli(main, argv) -> (exit status, stdout, stderr), in-process; argparse's exit counts as a status."""
    def call(main, argv):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err
    return call


# ---- 1. outputs never clobber inputs or each other --------------------------------------------------------------
@pytest.fixture
def workspace(tmp_path, tiny_model):
    """Inputs and earlier outputs of the data scripts and evaluate.py, plus a folder, a file to nest under, a
    symbolic link to the table and a hard link to an earlier output."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(REPO / "data_processing" / "data.csv", work / "table.csv")
    assert dp_cli.main(["--input", str(work / "table.csv"), "--output", str(work / "conv.json")]) == 0
    assert ftp_cli.main(["--path", str(work / "conv.json"), "--output", str(work / "data.jsonl")]) == 0
    shutil.copytree(tiny_model, work / "model")
    (work / "folder").mkdir()
    (work / "afile").write_text("x", encoding="utf-8")
    os.symlink(work / "table.csv", work / "symlink.csv")
    os.link(work / "conv.json", work / "hardlink.json")
    (work / "adv.json").write_text(json.dumps({"content": "类型#裙", "summary": "一条裙子"}, ensure_ascii=False) + "\n",
                                   encoding="utf-8")
    return work


def _script_main(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "finetune_chatmodel_demo" / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


DP, FTP, EV = dp_cli.main, ftp_cli.main, evaluate.main
ADV, ALPACA = _script_main("format_advertise_gen"), _script_main("format_tool_alpaca")
# Devices as inputs are /dev/null, not /dev/zero: where the check were missing, the row fails instead of reading
# forever.
EVAL = ["--data", "{w}/data.jsonl", "--model", "{w}/model", "--max-new-tokens", "2"]
OUTPUT_CASES = {
    # name: (main, argv, exit status, fragments of the one line)
    "dev-output is the output": (DP, ["--input", "{w}/table.csv", "--output", "{w}/new.json", "--dev-ratio", "0.1",
                                      "--dev-output", "{w}/new.json"], 1, ["--dev-output", "--output"]),
    "dev-output is an earlier output": (DP, ["--input", "{w}/table.csv", "--output", "{w}/conv.json",
                                             "--dev-ratio", "0.1", "--dev-output", "{w}/conv.json"], 1, ["--dev-output"]),
    "report is the output": (DP, ["--input", "{w}/table.csv", "--output", "{w}/conv.json", "--report",
                                  "{w}/conv.json"], 1, ["--report", "--output"]),
    "report is a hard link to the output": (DP, ["--input", "{w}/table.csv", "--output", "{w}/conv.json",
                                                 "--report", "{w}/hardlink.json"], 1, ["--report", "hardlink.json"]),
    "output is the input": (DP, ["--input", "{w}/table.csv", "--output", "{w}/table.csv"], 1, ["--input"]),
    "output is a link to the input": (DP, ["--input", "{w}/table.csv", "--output", "{w}/symlink.csv"], 1, ["--input"]),
    "output is the input, spelled differently": (DP, ["--input", "{w}/table.csv", "--output",
                                                      "{w}/folder/../table.csv"], 1, ["--input"]),
    "output is a folder": (DP, ["--input", "{w}/table.csv", "--output", "{w}/folder"], 1, ["is a directory"]),
    "output is a device": (DP, ["--input", "{w}/table.csv", "--output", "/dev/null"], 1, ["not a regular file"]),
    "output under a file": (DP, ["--input", "{w}/table.csv", "--output", "{w}/afile/x.json"], 1, ["not a directory"]),
    "input is a device": (DP, ["--input", "/dev/null", "--output", "{w}/new.json"], 1, ["/dev/null", "device"]),
    "jsonl output is --path": (FTP, ["--path", "{w}/conv.json", "--output", "{w}/conv.json"], 1, ["--path"]),
    "jsonl output is a hard link to --path": (FTP, ["--path", "{w}/conv.json", "--output", "{w}/hardlink.json"], 1,
                                              ["--path"]),
    "tool data output is the table": (FTP, ["--tools", "--table", "{w}/table.csv", "--output", "{w}/symlink.csv"], 1,
                                      ["--table"]),
    "jsonl output is a folder": (FTP, ["--path", "{w}/conv.json", "--output", "{w}/folder"], 1, ["is a directory"]),
    "conversations from a device": (FTP, ["--path", "/dev/null", "--output", "{w}/new.json"], 1, ["--path", "device"]),
    "AdvertiseGen output is its input": (ADV, ["--path", "{w}/adv.json", "--output", "{w}/adv.json"], 1, ["--path"]),
    "AdvertiseGen from a device": (ADV, ["--path", "/dev/null", "--output", "{w}/new.json"], 1, ["device"]),
    "ToolAlpaca output is a link to its input": (ALPACA, ["--path", "{w}/conv.json", "--output", "{w}/hardlink.json"], 1,
                                                 ["--path"]),
    "ToolAlpaca from a device": (ALPACA, ["--path", "/dev/null", "--output", "{w}/new.json"], 1, ["device"]),
    "predictions over the dev set": (EV, [*EVAL, "--output", "{w}/data.jsonl"], 2, ["--output", "--data"]),
    "predictions into a folder": (EV, [*EVAL, "--output", "{w}/folder"], 2, ["--output", "is a directory"]),
    "predictions over the model": (EV, [*EVAL, "--output", "{w}/model/config.json"], 2, ["--output", "--model"]),
    "predictions over the weights": (EV, [*EVAL, "--output", "{w}/model/model.safetensors"], 2, ["--model"]),
    "tool table from a device": (inference.main, ["--model", "{w}/model", "--prompt", "你好", "--tools", "/dev/null"], 2,
                                 ["--tools", "device"]),
    "dev set from a device": (EV, [*EVAL, "--data", "/dev/null", "--output", "{w}/new.json"], 2, ["--data", "device"]),
}


@pytest.mark.parametrize("case", sorted(OUTPUT_CASES))
def test_outputs_never_overwrite_inputs_or_each_other(workspace, cli, case):
    main, argv, status, fragments = OUTPUT_CASES[case]
    before = snapshot(workspace)
    code, out, err = cli(main, [a.format(w=workspace) for a in argv])
    assert code == status, out + err
    assert_one_line_error(err, *fragments)
    assert "Loaded model" not in err  # refused before anything slow ran
    assert snapshot(workspace) == before
    assert not (workspace / "new.json").exists()


def test_atomic_write_keeps_links_and_permissions_and_leaves_no_temporary_file(tmp_path):
    from chatglm3.output_files import write_atomic

    target = tmp_path / "data.json"
    target.write_text("old", encoding="utf-8")
    target.chmod(0o640)
    os.symlink(target, tmp_path / "link.json")
    write_atomic(tmp_path / "link.json", "new\n")
    assert (tmp_path / "link.json").is_symlink() and target.read_text(encoding="utf-8") == "new\n"
    assert target.stat().st_mode & 0o777 == 0o640
    write_atomic(tmp_path / "sub" / "fresh.json", b"\x00")
    assert (tmp_path / "sub" / "fresh.json").stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["data.json", "fresh.json", "link.json", "sub"]


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


# ---- 2. config.json, tokenizer.model and flag values -------------------------------------------------------------
CONFIG_CASES = {
    # name: (field, value written into the model's config.json; None = the whole file is `value`)
    "layers not a number": ("num_layers", "abc"),
    "negative hidden size": ("hidden_size", -1),
    "zero heads": ("num_attention_heads", 0),
    "fractional vocabulary": ("padded_vocab_size", 1.5),
    "context length as text": ("seq_length", "8192"),
    "boolean layer count": ("num_layers", True),
    "negative epsilon": ("layernorm_epsilon", -1),
    "epsilon not a number": ("layernorm_epsilon", float("nan")),
    "dropout above 1": ("hidden_dropout", 2),
    "flag as text": ("multi_query_attention", "yes"),
    "groups do not divide heads": ("multi_query_group_num", 3),
    "negative prefix": ("pre_seq_len", -4),
    "infinite rope ratio": ("rope_ratio", float("inf")),
}


def _model_with(tiny_model: Path, root: Path, field, value) -> Path:
    model = root / "model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    config[field] = value
    (model / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return model


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_values_are_one_line_naming_the_field(tiny_model, tmp_path, cli, case):
    field, value = CONFIG_CASES[case]
    model = _model_with(tiny_model, tmp_path, field, value)
    before = snapshot(tmp_path)
    code, out, err = cli(inference.main, ["--model", model, "--prompt", "你好", "--max-new-tokens", "2"])
    assert code == 2, out + err
    assert_one_line_error(err, "config.json", field)
    assert snapshot(tmp_path) == before


CONFIG_FILE_CASES = {"a list": "[1, 2]", "a string": '"chatglm"', "empty": "", "not UTF-8": b"\xff\xfe{"}


@pytest.mark.parametrize("case", sorted(CONFIG_FILE_CASES))
def test_config_file_that_is_not_an_object_is_one_line(tiny_model, tmp_path, cli, case):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    content = CONFIG_FILE_CASES[case]
    (model / "config.json").write_bytes(content if isinstance(content, bytes) else content.encode())
    code, out, err = cli(inference.main, ["--model", model, "--prompt", "你好"])
    assert code == 2, out + err
    assert_one_line_error(err, "config.json")


TOKENIZER_CASES = {
    "garbage": lambda data: b"\x00garbage" * 100,
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "a pickle": lambda data: pickle.dumps({"vocab": 1}),
}


TOKENIZER_CASES.update({f"tokenizer_config.json {name}": change for name, change in CONFIG_FILE_CASES.items()})


@pytest.mark.parametrize("case", sorted(TOKENIZER_CASES))
def test_corrupt_tokenizer_files_are_one_line(tiny_model, tmp_path, cli, case):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    name = "tokenizer_config.json" if case.startswith("tokenizer_config.json") else "tokenizer.model"
    change = TOKENIZER_CASES[case]
    content = change((model / name).read_bytes()) if callable(change) else change
    (model / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    code, out, err = cli(inference.main, ["--model", model, "--prompt", "你好"])
    assert code == 2, out + err
    assert_one_line_error(err, name)


FLAG_CASES = {
    # name: (flags, the flag the message names); DEV_BATCH_SIZE, LR, ... of the launchers arrive as these flags
    "batch size 0": (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size"),
    "eval batch size 0": (["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size"),
    "learning rate nan": (["--learning_rate", "nan"], "--learning_rate"),
    "learning rate inf": (["--learning_rate", "inf"], "--learning_rate"),
    "negative learning rate": (["--learning_rate", "-1"], "--learning_rate"),
    "no accumulation steps": (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps"),
    "epochs nan": (["--max_steps", "-1", "--num_train_epochs", "nan"], "--num_train_epochs"),
    "clipping nan": (["--max_grad_norm", "nan"], "--max_grad_norm"),
    "weight decay inf": (["--weight_decay", "inf"], "--weight_decay"),
    "negative seed": (["--seed", "-1"], "--seed"),
    "negative workers": (["--dataloader_num_workers", "-1"], "--dataloader_num_workers"),
    "log every 0 steps": (["--logging_steps", "0"], "--logging_steps"),
    "save every -3 steps": (["--save_steps", "-3"], "--save_steps"),
    "beta above 1": (["--adam_beta2", "1.5"], "--adam_beta2"),
    "zero epsilon": (["--adam_epsilon", "0"], "--adam_epsilon"),
    "training data from a device": (["--train_file", "/dev/null"], "--train_file"),
    "output_dir is a file": (["--output_dir", "{data}"], "--output_dir"),
    "output_dir is the base model": (["--output_dir", "{model}"], "--model_name_or_path"),
}


@pytest.mark.parametrize("case", sorted(FLAG_CASES))
def test_bad_training_flags_are_one_line_naming_the_flag(tiny_model, pokemon_jsonl, tmp_path, cli, case):  # noqa: F811
    flags, flag = FLAG_CASES[case]
    out_dir = tmp_path / "out"
    before = snapshot(tiny_model)
    argv = ["--model_name_or_path", tiny_model, "--train_file", pokemon_jsonl, "--output_dir", out_dir,
            "--pre_seq_len", "4", "--max_steps", "1", "--use_cpu", "--report_to", "none",
            *(str(f).format(data=pokemon_jsonl, model=tiny_model) for f in flags)]
    code, out, err = cli(finetune.main, argv)
    assert code in (1, 2), out + err
    assert_one_line_error(err, flag)
    assert "可训练参数" not in out  # refused before the model was loaded
    assert not out_dir.exists() or not any(out_dir.iterdir())
    assert snapshot(tiny_model) == before


# ---- 3. a model that clearly cannot fit -----------------------------------------------------------------------
HUGE = {"num_layers": 64, "hidden_size": 65536, "ffn_hidden_size": 262144, "num_attention_heads": 512,
        "kv_channels": 128}  # about 3.9e12 parameters: 15 TB in float32


def _huge_model(tiny_model: Path, root: Path) -> Path:
    model = _model_with(tiny_model, root, "num_layers", HUGE["num_layers"])
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    config.update(HUGE)
    (model / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return model


def test_a_model_too_large_for_memory_is_refused_before_loading(tiny_model, pokemon_jsonl, tmp_path, cli,  # noqa: F811
                                                                 monkeypatch):
    model = _huge_model(tiny_model, tmp_path)
    code, out, err = cli(inference.main, ["--model", model, "--prompt", "你好"])
    assert code == 2
    assert_one_line_error(err, "GiB", memory.SKIP_ENV)
    code, out, err = cli(finetune.main, ["--model_name_or_path", model, "--train_file", pokemon_jsonl,
                                         "--output_dir", tmp_path / "out", "--use_cpu", "--report_to", "none"])
    assert code == 1
    assert_one_line_error(err, "GiB", memory.SKIP_ENV)
    # The override skips the estimate; the loader then finds the weights do not match config.json (nothing
    # of the 15 TB is allocated: the model is built on the meta device).
    monkeypatch.setenv(memory.SKIP_ENV, "1")
    code, out, err = cli(inference.main, ["--model", model, "--prompt", "你好"])
    assert code == 2
    assert_one_line_error(err, "model.safetensors", "config.json")


def test_training_estimate_splits_states_as_zero_does():
    n = 6_000_000_000
    assert memory.training_bytes(n, 4) == 16 * n
    assert memory.training_bytes(n, 2, world_size=4, zero_stage=2) == int(2 * n + (2 + 8) * n / 4)
    assert memory.training_bytes(n, 2, world_size=4, zero_stage=3) == int((2 + 2 + 8) * n / 4)
    # DeepSpeed's bf16/fp16 keeps float32 master weights beside Adam's states, split like them.
    assert memory.training_bytes(n, 2, world_size=4, zero_stage=2, master_copy=True) == int(2 * n + (2 + 12) * n / 4)


# ---- 4. chat and evaluation survive any model output and any input line ------------------------------------------
HOSTILE_REPLIES = {
    "deep parentheses": "tool_call(a=" + "(" * 9_000 + "1" + ")" * 9_000 + ")",
    "deep unary minus": "tool_call(a=" + "-" * 19_000 + "1)",
    "unary minus deeper than literal_eval recurses": "tool_call(a=" + "-" * 3_000 + "1)",
    "long text": "tool_call(a=" + "-" * 100_000 + "1)",
    "deep lists": "tool_call(a=" + "[" * 5_000 + "]" * 5_000 + ")",
    "deep dicts": "tool_call(a=" + "{'k':" * 3_000 + "1" + "}" * 3_000 + ")",
    "huge integer": "tool_call(a=" + "9" * 10_000 + ")",
    "huge exponent": "tool_call(a=1e99999999)",
    "power": "tool_call(a=2**10**10)",
    "repeated string": "tool_call(a='x'*10**10)",
    "a set": "tool_call(a={1, 2})",
    "bytes": "tool_call(a=b'\\x00')",
    "complex": "tool_call(a=1j)",
    "ellipsis": "tool_call(a=...)",
    "dict with int keys": "tool_call(a={1: 2})",
    "null bytes": "tool_call(a='\x00')\x00",
    "lone surrogate": "tool_call(a='\ud800')",
    "keyword repeated": "tool_call(a=1, a=2)",
    "star-star": "tool_call(**{'a': 1})",
    "call inside": "tool_call(a=__import__('os').system('true'))",
    "unclosed": "tool_call(a='",
    "empty": "",
    "only a fence": "```",
    "many lines": "\n".join(["tool_call(a=1)"] * 50_000),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_REPLIES))
def test_tool_call_parser_never_lets_anything_but_valueerror_escape(case):
    text = HOSTILE_REPLIES[case]
    try:
        parameters = conversation.parse_tool_call(text)
    except ValueError:
        pass
    else:
        json.dumps(parameters)  # what the chat shows and the tool receives
    # The chat reads a reply with a tool name as a call: whatever the text, it gives a response it can print.
    response, history = conversation.process_response("pokedex_lookup\n" + text, [])
    json.dumps(response)
    assert history[-1]["metadata"] == "pokedex_lookup"


STDIN_LINES = {
    # name: (a bad line of piped input, a fragment of its report)
    "not UTF-8": (b"\xff\xfe\xfd", "line 2"),
    "half a character": ("皮卡丘".encode("utf-8")[:-1], "line 2"),
    "overlong": ("问" * 5000).encode("utf-8"),
}
STDIN_LINES["overlong"] = (STDIN_LINES["overlong"], "too long")


@pytest.mark.parametrize("case", sorted(STDIN_LINES))
def test_a_bad_input_line_is_reported_and_the_chat_goes_on(tiny_model, capsys, monkeypatch, case):
    line, fragment = STDIN_LINES[case]
    data = "皮卡丘是什么属性？\n".encode("utf-8") + line + "\n那它的弱点呢？\n".encode("utf-8")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
    code = inference.main(["--model", str(tiny_model), "--max-new-tokens", "2", "--greedy"])
    out, err = capsys.readouterr()
    assert out.count(inference.ANSWER_PREFIX) == 2, out + err
    assert code == 1
    assert_one_line_error(err, fragment)


# ---- 5. checkpoints: no code runs from them, a damaged one is skipped, a failed save is one line -----------------
def _ptuning_checkpoint(tiny_model: Path, folder: Path) -> Path:
    folder.mkdir()
    config = json.loads((tiny_model / "config.json").read_text(encoding="utf-8"))
    (folder / "config.json").write_text(json.dumps({**config, "pre_seq_len": 4}), encoding="utf-8")
    return folder / "pytorch_model.bin"


def _lora_adapter(tiny_model: Path, folder: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    from chatglm3 import ChatGLMForConditionalGeneration

    model = get_peft_model(ChatGLMForConditionalGeneration.from_pretrained(tiny_model),
                           LoraConfig(r=2, target_modules=["query_key_value"]))
    model.save_pretrained(str(folder), safe_serialization=False)
    return folder / "adapter_model.bin"


LOADED_FILE_CASES = {
    # name: (builds the folder and returns the file to plant, the flag that passes the folder)
    "P-Tuning prefix": (_ptuning_checkpoint, "--pt-checkpoint"),
    "LoRA adapter": (_lora_adapter, "--adapter"),
}


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "old-format"])
@pytest.mark.parametrize("case", sorted(LOADED_FILE_CASES))
def test_a_pickle_in_a_loaded_checkpoint_never_runs(tiny_model, tmp_path, cli, case, zip_format):
    build, flag = LOADED_FILE_CASES[case]
    planted = build(tiny_model, tmp_path / "checkpoint")
    marker = tmp_path / "marker"
    plant(planted, marker, zip_format)
    before = snapshot(tmp_path)
    code, out, err = cli(inference.main, ["--model", tiny_model, flag, tmp_path / "checkpoint", "--prompt", "你好"])
    assert code == 2, out + err
    assert_one_line_error(err, str(planted), "not allowed")
    assert not marker.exists() and snapshot(tmp_path) == before



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(model, data, out, *extra, deepspeed=False, fsize_limit=None) -> subprocess.CompletedProcess:
    """finetune.py as a subprocess (DeepSpeed: one process, with the variables its launcher sets)."""
    env = dict(os.environ)
    args = ["--model_name_or_path", str(model), "--train_file", str(data), "--output_dir", str(out),
            "--max_seq_length", "256", "--per_device_train_batch_size", "2", "--logging_steps", "1",
            "--report_to", "none", "--use_cpu", "--disable_tqdm", "true", "--dataloader_num_workers", "0",
            "--seed", "7", "--learning_rate", "1e-2", "--save_steps", "2", *map(str, extra)]
    if deepspeed:
        args += ["--deepspeed", str(DS_CONFIG)]
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(_free_port()))

    def limit_file_size():  # a full disk, as far as this process can tell: writes past the limit fail
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))

    return subprocess.run([sys.executable, str(FINETUNE), *args], cwd=Path(out).parent, env=env, text=True,
                          capture_output=True, timeout=900, preexec_fn=limit_file_size if fsize_limit else None)


def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _losses(out: Path) -> list:
    state = json.loads((out / "trainer_state.json").read_text(encoding="utf-8"))
    return [(entry["step"], entry["loss"]) for entry in state["log_history"] if "loss" in entry]


@pytest.fixture(scope="module")
def runs(tiny_model, pokemon_jsonl, tmp_path_factory):  # noqa: F811
    """Checkpoints 2 and 4 of a DeepSpeed (ZeRO-2, one CPU process) full fine-tuning and of a P-Tuning run."""
    root = tmp_path_factory.mktemp("runs")
    _ok(_train(tiny_model, pokemon_jsonl, root / "ds", "--max_steps", "4", deepspeed=True))
    _ok(_train(tiny_model, pokemon_jsonl, root / "pt", "--max_steps", "4", "--pre_seq_len", "4"))
    return root


def _truncate(path: Path, marker):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CHECKPOINT_CASES = {
    # name: (run, file in checkpoint-4, what is done to it, refused? (else: resumed from checkpoint-2))
    "pickle in DeepSpeed model states": ("ds", "global_step4/mp_rank_00_model_states.pt",
                                         lambda p, m: plant(p, m, True), True),
    "pickle in DeepSpeed optimizer states": ("ds", "global_step4/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                             lambda p, m: plant(p, m, True), True),
    "old-format pickle in DeepSpeed model states": ("ds", "global_step4/mp_rank_00_model_states.pt",
                                                    lambda p, m: plant(p, m, False), True),
    "old-format pickle in rng_state.pth": ("ds", "rng_state.pth", lambda p, m: plant(p, m, False), True),
    "pickle in scheduler.pt": ("pt", "scheduler.pt", lambda p, m: plant(p, m, True), True),
    "old-format pickle in optimizer.pt": ("pt", "optimizer.pt", lambda p, m: plant(p, m, False), True),
    "pickle in the P-Tuning prefix": ("pt", "pytorch_model.bin", lambda p, m: plant(p, m, True), True),
    "truncated DeepSpeed optimizer states": ("ds", "global_step4/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                             _truncate, False),
    "truncated model.safetensors": ("ds", "model.safetensors", _truncate, False),
    "truncated trainer_state.json": ("pt", "trainer_state.json", _truncate, False),
    "latest names a missing step": ("ds", "latest", lambda p, m: p.write_text("global_step9"), False),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_resume_refuses_code_in_a_checkpoint_and_skips_a_damaged_one(runs, tiny_model, pokemon_jsonl,  # noqa: F811
                                                                     tmp_path, case):
    run, name, damage, refused = CHECKPOINT_CASES[case]
    out = tmp_path / run
    shutil.copytree(runs / run, out)
    marker = tmp_path / "marker"
    damage(out / "checkpoint-4" / name, marker)
    before = snapshot(out)
    extra = ["--max_steps", "4"] + (["--pre_seq_len", "4"] if run == "pt" else [])
    result = _train(tiny_model, pokemon_jsonl, out, *extra, "--resume_from_checkpoint", "true",
                    deepspeed=run == "ds")
    assert not marker.exists()
    if refused:
        assert result.returncode != 0
        assert_one_line_error(result.stderr, str(out / "checkpoint-4" / name), "not allowed")
        assert snapshot(out) == before
    else:
        _ok(result)
        assert_one_line_error(result.stdout + result.stderr, "Skipping", str(out / "checkpoint-4" / name))
        assert "Resuming from " + str(out / "checkpoint-2") in result.stdout
        # Resumed through the allow-listed loader, the run continues exactly as the uninterrupted one did.
        straight = dict(_losses(runs / run))
        resumed = dict(_losses(out))
        assert resumed[3] == pytest.approx(straight[3], abs=1e-4) and resumed[4] == pytest.approx(straight[4], abs=1e-4)


@pytest.mark.slow
def test_a_save_that_runs_out_of_space_is_one_line_and_keeps_the_previous_checkpoint(tiny_model, pokemon_jsonl,  # noqa: F811
                                                                                     tmp_path):
    out = tmp_path / "ft"
    _ok(_train(tiny_model, pokemon_jsonl, out, "--max_steps", "2"))
    before = snapshot(out / "checkpoint-2")
    limit = (out / "checkpoint-2" / "model.safetensors").stat().st_size // 2
    result = _train(tiny_model, pokemon_jsonl, out, "--max_steps", "4", "--resume_from_checkpoint", "true",
                    fsize_limit=limit)
    assert result.returncode == 1
    assert_one_line_error(result.stderr, str(out / "checkpoint-4"), "intact")
    assert snapshot(out / "checkpoint-2") == before
    resumed = _ok(_train(tiny_model, pokemon_jsonl, out, "--max_steps", "4", "--resume_from_checkpoint", "true"))
    assert "Resuming from " + str(out / "checkpoint-2") in resumed.stdout


@pytest.mark.slow
def test_allow_list_loads_the_files_of_a_real_deepspeed_checkpoint(runs):
    """Every file a resume reads is whole and within the allow-list (DeepSpeed imported, as during training)."""
    import deepspeed  # noqa: F401

    for run in ("ds", "pt"):
        for checkpoint in (runs / run / "checkpoint-2", runs / run / "checkpoint-4"):
            torch_files.verify_checkpoint(checkpoint)
            for file in checkpoint.rglob("*.pt*"):
                torch_files.torch_load(file)
