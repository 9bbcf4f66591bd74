"""Hostile settings of a training run (issue 21), one table per kind: numbers (flags and launcher variables, one
check: chatglm3/limits.py), non-finite training (NaN/inf loss, gradient or weights stop the run, nothing of it is
saved), the output folder's lock (finetune.py takes it itself, portable: filelock), damaged checkpoints (every
file whole, or the one before is taken), unwritable output folders, flag abbreviations.

Every row: the exit status, one line naming the flag, variable or file (Chinese and English), no traceback, the
files it was given unchanged. finetune.py rows run in-process through main(argv); launchers and trainings run as
real subprocesses (slow).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import finetune
import inference
import launching
from chatglm3 import limits
from chatglm3.checkpoint import torch_files
from test_finetune import pokemon_jsonl  # noqa: F401  (a fixture)
from test_hardening import assert_one_line_error, cli, snapshot  # noqa: F401  (cli is a fixture)

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "finetune_chatmodel_demo"
SCRIPTS = DEMO / "scripts"
FINETUNE = DEMO / "finetune.py"
DS_CONFIG = DEMO / "configs" / "deepspeed.json"


def finetune_argv(model, data, out, *extra) -> list:
    return ["--model_name_or_path", model, "--train_file", data, "--output_dir", out, "--max_seq_length", "128",
            "--per_device_train_batch_size", "2", "--max_steps", "2", "--logging_steps", "1", "--report_to", "none",
            "--use_cpu", "--disable_tqdm", "true", "--dataloader_num_workers", "0", "--sanity_check", "false",
            "--seed", "7", *extra]


def unwritable_folder(tmp_path: Path) -> Path:
    """An existing folder this process cannot write into: a read-only one, or (as root, whom permissions do not
    stop) /sys."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            (candidate / ".probe").touch()
        except OSError:
            return candidate
        (candidate / ".probe").unlink()
    pytest.skip("no folder this process cannot write into")


def deepspeed_config(tmp_path: Path, **changes) -> Path:
    """The project's ZeRO-2 config with `changes` (key path with '__' -> value), written as JSON."""
    config = json.loads(DS_CONFIG.read_text(encoding="utf-8"))
    for path, value in changes.items():
        *parents, last = path.split("__")
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    file = tmp_path / "ds.json"
    file.write_text(json.dumps(config), encoding="utf-8")  # json writes NaN and Infinity as such
    return file


# ---- 1. numbers: one check for every flag, and the launchers' variables ------------------------------------------
NUMBER_FLAG_CASES = {
    # name: (flags, the flag the one line names)
    "LoRA alpha nan": (["--lora_rank", "2", "--lora_alpha", "nan"], "--lora_alpha"),
    "LoRA alpha inf": (["--lora_rank", "2", "--lora_alpha", "inf"], "--lora_alpha"),
    "LoRA alpha 0": (["--lora_rank", "2", "--lora_alpha", "0"], "--lora_alpha"),
    "LoRA rank 0": (["--lora_rank", "0"], "--lora_rank"),
    "LoRA dropout 1": (["--lora_rank", "2", "--lora_dropout", "1"], "--lora_dropout"),
    "LoRA dropout nan": (["--lora_rank", "2", "--lora_dropout", "nan"], "--lora_dropout"),
    "prefix length 0": (["--pre_seq_len", "0"], "--pre_seq_len"),
    "prefix longer than any context": (["--pre_seq_len", str(10**9)], "pre_seq_len"),
    "LoRA rank above hidden_size (would allocate gigabytes)": (["--lora_rank", str(10**8)], "--lora_rank"),
    "max length negative": (["--max_seq_length", "-1"], "--max_seq_length"),
    "max steps 0 (would train for 3 epochs)": (["--max_steps", "0"], "--max_steps"),
    "max steps -5 (would train for 3 epochs)": (["--max_steps", "-5"], "--max_steps"),
    "epochs 0": (["--max_steps", "-1", "--num_train_epochs", "0"], "--num_train_epochs"),
    "seed 10**30": (["--seed", str(10**30)], "--seed"),
    "data seed negative": (["--data_seed", "-3"], "--data_seed"),
    "warmup inf": (["--warmup_steps", "inf"], "--warmup_steps"),
    "warmup ratio 2": (["--warmup_ratio", "2"], "--warmup_ratio"),
    "accumulation beyond int64": (["--gradient_accumulation_steps", str(2**64)], "--gradient_accumulation_steps"),
    "batch size beyond int64": (["--per_device_train_batch_size", str(2**70)], "--per_device_train_batch_size"),
    "weight decay negative": (["--weight_decay", "-0.1"], "--weight_decay"),
    "label smoothing nan": (["--label_smoothing_factor", "nan"], "--label_smoothing_factor"),
    "eval steps inf": (["--eval_steps", "inf"], "--eval_steps"),
    "abbreviated flag": (["--output_di", "{tmp}/elsewhere"], "--output_di"),
}


@pytest.mark.parametrize("case", sorted(NUMBER_FLAG_CASES))
def test_bad_numbers_in_finetune_flags_are_one_line_naming_the_flag(tiny_model, pokemon_jsonl, tmp_path, cli,  # noqa: F811
                                                                    case):
    flags, flag = NUMBER_FLAG_CASES[case]
    out = tmp_path / "out"
    before = snapshot(tmp_path)
    code, stdout, err = cli(finetune.main, finetune_argv(tiny_model, pokemon_jsonl, out,
                                                         *(f.format(tmp=tmp_path) for f in flags)))
    assert code in (1, 2), stdout + err
    assert_one_line_error(err, flag, " / ")  # Chinese / English
    assert not out.exists() and not (tmp_path / "elsewhere").exists()  # refused before anything was written
    assert snapshot(tmp_path) == before


DEEPSPEED_CASES = {
    # name: (changes to the ZeRO-2 config, or a callable writing the file; fragment of the one line)
    "NaN learning rate": ({"optimizer__type": "AdamW", "optimizer__params__lr": float("nan")}, "NaN"),
    "negative learning rate": ({"optimizer__type": "AdamW", "optimizer__params__lr": -1e-4}, "optimizer.params.lr"),
    "infinite clipping": ({"gradient_clipping": float("inf")}, "Infinity"),
    "ZeRO stage 7": ({"zero_optimization__stage": 7}, "zero_optimization.stage"),
    "micro batch 0": ({"train_micro_batch_size_per_gpu": 0}, "train_micro_batch_size_per_gpu"),
    "not an object": (lambda path: path.write_text("[1, 2]", encoding="utf-8"), "ds.json"),
    "not JSON": (lambda path: path.write_text("{stage: 2", encoding="utf-8"), "ds.json"),
}


def _deepspeed_file(tmp_path, change) -> Path:
    if callable(change):
        change(tmp_path / "ds.json")
        return tmp_path / "ds.json"
    return deepspeed_config(tmp_path, **change)


@pytest.mark.parametrize("case", sorted(DEEPSPEED_CASES))
def test_a_bad_deepspeed_config_is_one_line_naming_the_file(tiny_model, pokemon_jsonl, tmp_path, cli, case):  # noqa: F811
    change, fragment = DEEPSPEED_CASES[case]
    config = _deepspeed_file(tmp_path, change)
    before = snapshot(tmp_path)
    code, stdout, err = cli(finetune.main, finetune_argv(tiny_model, pokemon_jsonl, tmp_path / "out",
                                                         "--deepspeed", config))
    assert code in (1, 2), stdout + err
    assert_one_line_error(err, "ds.json", fragment)
    assert not (tmp_path / "out").exists() and snapshot(tmp_path) == before


def test_one_number_check_for_every_entry_point():
    """The launcher checks finetune.py's flags with the same table, naming the variable the value came from."""
    assert limits.FLAG_LIMITS["max_steps"].check("x", "-1") == -1
    assert limits.AT_LEAST_1.check("x", " 4 ") == 4 and limits.POSITIVE.check("x", "2e-2") == 0.02
    for limit, bad in ((limits.AT_LEAST_1, "1e3"), (limits.AT_LEAST_1, True), (limits.SEED, 2**32),
                       (limits.FRACTION, 1.0), (limits.NON_NEGATIVE, float("nan")), (limits.PORT, "0")):
        with pytest.raises(limits.NumberError):
            limit.check("x", bad)
    with pytest.raises(limits.NumberError, match=r"LORA_ALPHA \(--lora_alpha\)"):
        launching.check_numbers(["--lora_rank", "8", "--lora_alpha", "nan"])
    with pytest.raises(limits.NumberError, match=r"MAX_STEP \(--max_steps\)"):
        launching.check_numbers(["--max_steps", "2", "--max_steps=0"])  # the value that takes effect: the last
    launching.check_numbers(["--max_steps", "0", "--max_steps", "3"])


# ---- 2. the output folder: one live run, writable ----------------------------------------------------------------
def test_a_folder_another_run_holds_is_refused(tiny_model, pokemon_jsonl, tmp_path, cli):  # noqa: F811
    out = tmp_path / "out"
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from launching import claim; "
            "lock = claim(sys.argv[2], '--output_dir'); print('locked', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(DEMO), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(out)
        status, stdout, err = cli(finetune.main, finetune_argv(tiny_model, pokemon_jsonl, out))
        assert status == 1, stdout + err
        assert_one_line_error(err, str(out), "in use")
        assert snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()
    launching.claim(out).release()  # a dead holder leaves no lock


def test_an_unwritable_output_folder_is_one_line(tiny_model, pokemon_jsonl, tmp_path, cli):  # noqa: F811
    folder = unwritable_folder(tmp_path)
    code, stdout, err = cli(finetune.main, finetune_argv(tiny_model, pokemon_jsonl, folder))
    assert code == 1, stdout + err
    assert_one_line_error(err, str(folder), "--output_dir", "cannot write")
    code, stdout, err = cli(finetune.main, finetune_argv(tiny_model, pokemon_jsonl, folder / "sub" / "run"))
    assert code == 1, stdout + err
    assert_one_line_error(err, "--output_dir")


def test_every_entry_point_imports_without_fcntl():
    """Windows has no fcntl: every script (drop-in folder, its scripts/, the data pipeline, the tool report) and every
    library module must import without it, each with its own folder first on sys.path as `python script.py` has it."""
    repo = DEMO.parent
    scripts = sorted([*DEMO.glob("*.py"), *SCRIPTS.glob("*.py"), *(repo / "data_processing").glob("*.py"),
                      *(repo / "scripts").glob("*.py")])
    code = f"""
import importlib, importlib.util, pkgutil, sys
sys.modules['fcntl'] = None  # import fcntl now raises ImportError, as on Windows
for path in {[str(p) for p in scripts]!r}:
    sys.path.insert(0, path.rsplit('/', 1)[0])
    spec = importlib.util.spec_from_file_location('script_' + path.replace('/', '_'), path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    sys.path.pop(0)
import chatglm3
for module in pkgutil.walk_packages(chatglm3.__path__, 'chatglm3.'):
    importlib.import_module(module.name)
print('imported')
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "imported" in result.stdout, result.stderr[-3000:]


def test_no_abbreviated_flags_in_the_launcher_and_the_shared_model_flags(tiny_model, cli):
    code, _, err = cli(inference.main, ["--mod", tiny_model, "--prompt", "你好"])  # --model, abbreviated
    assert code == 2 and "--mod" in err
    result = subprocess.run([sys.executable, str(SCRIPTS / "launch.py"), "--num-gpu", "1", "--", "finetune.py"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "--num-gpu" in result.stderr


# ---- 3. checkpoints: complete means every file is whole -----------------------------------------------------------
def _checkpoint(folder: Path, step: int) -> Path:
    """A checkpoint with the files a P-Tuning checkpoint holds, written by torch and json as the Trainer does."""
    checkpoint = folder / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    torch.save({"state": {0: {"exp_avg": torch.ones(4)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
               checkpoint / "optimizer.pt")
    torch.save({"last_epoch": step}, checkpoint / "scheduler.pt")
    torch.save({"python": [1, 2], "cpu": torch.get_rng_state()}, checkpoint / "rng_state.pth")
    torch.save({"transformer.prefix_encoder.embedding.weight": torch.zeros(4, 8)}, checkpoint / "pytorch_model.bin")
    (checkpoint / "config.json").write_text(json.dumps({"pre_seq_len": 4}), encoding="utf-8")
    (checkpoint / "tokenizer.model").write_bytes(b"\x0a\x05piece")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}),
                                                   encoding="utf-8")
    return checkpoint


DAMAGE_CASES = {
    # name: (file in the newest checkpoint, what is done to it)
    "empty optimizer.pt": ("optimizer.pt", lambda data: b""),
    "empty rng_state.pth": ("rng_state.pth", lambda data: b""),
    "truncated rng_state.pth": ("rng_state.pth", lambda data: data[: len(data) // 2]),
    "scheduler.pt short of its last bytes": ("scheduler.pt", lambda data: data[:-30]),
    "optimizer.pt not a torch file": ("optimizer.pt", lambda data: b"not a pickle"),
    "empty tokenizer.model": ("tokenizer.model", lambda data: b""),
    "empty config.json": ("config.json", lambda data: b""),
    "empty trainer_state.json": ("trainer_state.json", lambda data: b""),
}


@pytest.mark.parametrize("case", sorted(DAMAGE_CASES))
def test_resume_skips_a_checkpoint_with_any_damaged_file(tmp_path, capsys, case):
    name, damage = DAMAGE_CASES[case]
    _checkpoint(tmp_path, 2)
    newest = _checkpoint(tmp_path, 4)
    assert launching.find_last_checkpoint(tmp_path) == newest  # whole, it is the one taken
    (newest / name).write_bytes(damage((newest / name).read_bytes()))
    assert launching.find_last_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    out = capsys.readouterr().out
    assert_one_line_error(out, "Skipping", str(newest / name))
    with pytest.raises(torch_files.CorruptFileError):
        torch_files.verify_checkpoint(newest)


def _train(*args, cwd, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(FINETUNE), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.slow
def test_a_real_resume_falls_back_past_an_empty_optimizer_state(tiny_model, pokemon_jsonl, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    argv = finetune_argv(tiny_model, pokemon_jsonl, out, "--pre_seq_len", "4", "--save_steps", "2",
                         "--learning_rate", "1e-2")
    first = _train(*argv[:argv.index("--max_steps")], "--max_steps", "4", *argv[argv.index("--max_steps") + 2:],
                   cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (out / "checkpoint-4" / "optimizer.pt").write_bytes(b"")
    (out / "trainer_state.json").unlink()  # as if killed after checkpoint-4
    resumed = _train(*argv[:argv.index("--max_steps")], "--max_steps", "4", *argv[argv.index("--max_steps") + 2:],
                     "--resume_from_checkpoint", "true", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert_one_line_error(resumed.stdout + resumed.stderr, "Skipping", str(out / "checkpoint-4" / "optimizer.pt"))
    assert f"Resuming from {out / 'checkpoint-2'}" in resumed.stdout


# ---- 4. training that is not finite stops, and saves nothing of it ------------------------------------------------
NOT_FINITE_CASES = {
    # name: (flags, fragments of the one line). A learning rate beyond float32 (1e39) turns the weights into inf at
    # the first update: saved at step 1 it is caught at the save, otherwise the next loss is NaN. A LoRA alpha of
    # 1e38 scales the adapter's gradient past float32 at the first step.
    "loss after weights overflow": (["--learning_rate", "1e39", "--save_steps", "100", "--max_steps", "3"],
                                    ["loss at step 2"]),
    "weights at a save": (["--learning_rate", "1e39", "--save_steps", "1", "--max_steps", "3"],
                          ["after step 1", "weights"]),
    "gradient of a LoRA scaled past float32": (["--lora_rank", "2", "--lora_alpha", "1e38", "--save_steps", "1"],
                                               ["gradient at step 1"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(NOT_FINITE_CASES))
def test_training_that_is_not_finite_stops_and_saves_nothing(tiny_model, pokemon_jsonl, tmp_path, case):  # noqa: F811
    flags, fragments = NOT_FINITE_CASES[case]
    out = tmp_path / "out"
    before = snapshot(tiny_model)
    result = _train(*finetune_argv(tiny_model, pokemon_jsonl, out), *flags, cwd=tmp_path)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert_one_line_error(result.stderr, *fragments, "--learning_rate")
    assert "Training finished" not in result.stdout
    assert not out.exists()  # no checkpoint, no model, no state: the folder the run made went with it
    assert snapshot(tiny_model) == before


# ---- 5. the launchers: every numeric variable, the folder, NUM_GPUS -----------------------------------------------
LAUNCHER_CASES = {
    # name: (launcher, variables, exit status, fragments of the one line on stderr)
    "LORA_ALPHA=nan (issue 21)": ("finetune_lora.sh", {"LORA_ALPHA": "nan"}, 2, ["LORA_ALPHA", "nan"]),
    "LORA_RANK=0": ("finetune_lora.sh", {"LORA_RANK": "0"}, 2, ["LORA_RANK"]),
    "LORA_DROPOUT=1.5": ("finetune_lora.sh", {"LORA_DROPOUT": "1.5"}, 2, ["LORA_DROPOUT"]),
    "LR=inf": ("finetune_pt.sh", {"LR": "inf"}, 2, ["LR (--learning_rate)"]),
    "LR=-1": ("finetune_ps_pt_m.sh", {"LR": "-1"}, 2, ["LR"]),
    "PRE_SEQ_LEN=1e3": ("finetune_pt.sh", {"PRE_SEQ_LEN": "1e3"}, 2, ["PRE_SEQ_LEN"]),
    "MAX_SOURCE_LEN=0": ("finetune_pt.sh", {"MAX_SOURCE_LEN": "0"}, 2, ["MAX_SOURCE_LEN"]),
    "MAX_SEQ_LEN=-1": ("finetune_pt_multiturn.sh", {"MAX_SEQ_LEN": "-1"}, 2, ["MAX_SEQ_LEN"]),
    "DEV_BATCH_SIZE=0": ("finetune_ds.sh", {"DEV_BATCH_SIZE": "0"}, 2, ["DEV_BATCH_SIZE"]),
    "GRAD_ACCUMULATION_STEPS huge": ("finetune_lora.sh", {"GRAD_ACCUMULATION_STEPS": str(10**30)}, 2,
                                     ["GRAD_ACCUMULATION_STEPS"]),
    "MAX_STEP=0": ("finetune_ds_multiturn.sh", {"MAX_STEP": "0"}, 2, ["MAX_STEP"]),
    "SAVE_INTERVAL=0": ("finetune_ps_pt_m.sh", {"SAVE_INTERVAL": "0"}, 2, ["SAVE_INTERVAL"]),
    "LOG_INTERVAL=nan": ("finetune_pt.sh", {"LOG_INTERVAL": "nan"}, 2, ["LOG_INTERVAL"]),
    "seed in EXTRA_ARGS": ("finetune_pt.sh", {"EXTRA_ARGS": f"--seed {10**30}"}, 2, ["--seed"]),
    "NUM_GPUS=99 on a machine without GPUs": ("finetune_lora.sh", {"NUM_GPUS": "99"}, 2, ["NUM_GPUS=99", "CPU"]),
    "NUM_GPUS=nan": ("finetune_lora.sh", {"NUM_GPUS": "nan"}, 2, ["NUM_GPUS"]),
    "NODE_RANK beyond NNODES": ("finetune_pt.sh", {"NNODES": "2", "NODE_RANK": "2"}, 2, ["NODE_RANK"]),
    "NNODES=0": ("finetune_pt.sh", {"NNODES": "0"}, 2, ["NNODES"]),
    "MASTER_PORT=70000": ("finetune_pt.sh", {"MASTER_PORT": "70000"}, 2, ["MASTER_PORT"]),
    "DS_CONFIG with a NaN learning rate": ("finetune_ds.sh", {"DS_CONFIG": "{ds_nan}"}, 2, ["ds.json", "NaN"]),
    "DS_CONFIG missing": ("finetune_lora.sh", {"DS_CONFIG": "{tmp}/none.json"}, 2, ["none.json", "not found"]),
    "OUTPUT_DIR is a file": ("finetune_pt.sh", {"OUTPUT_DIR": "{data}"}, 2, ["OUTPUT_DIR", "pokemon.jsonl"]),
    "OUTPUT_DIR cannot be written": ("finetune_lora.sh", {"OUTPUT_DIR": "{unwritable}"}, 2,
                                     ["OUTPUT_DIR", "cannot write"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(LAUNCHER_CASES))
def test_bad_launcher_settings_are_one_line_naming_the_variable(tiny_model, pokemon_jsonl, tmp_path, case):  # noqa: F811
    script, variables, status, fragments = LAUNCHER_CASES[case]
    needs_unwritable = any("{unwritable}" in v for v in variables.values())
    names = dict(tmp=tmp_path, data=pokemon_jsonl, unwritable=unwritable_folder(tmp_path) if needs_unwritable else "",
                 ds_nan=deepspeed_config(tmp_path, optimizer__type="AdamW", optimizer__params__lr=float("nan")))
    env = {**os.environ, "BASE_MODEL_PATH": str(tiny_model), "DATASET_PATH": str(pokemon_jsonl),
           "OUTPUT_DIR": str(tmp_path / "out"), "EXTRA_ARGS": "--disable_tqdm true"}
    env.update({k: v.format(**names) for k, v in variables.items()})
    before, data_before = snapshot(tmp_path), snapshot(pokemon_jsonl.parent)
    result = subprocess.run(["bash", str(SCRIPTS / script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == status, result.stdout[-3000:] + result.stderr[-3000:]
    assert_one_line_error(result.stderr, *fragments, " / ")  # Chinese / English
    assert snapshot(tmp_path) == before and snapshot(pokemon_jsonl.parent) == data_before
    assert not (tmp_path / "out").exists()  # refused before any folder was made or process started


@pytest.mark.slow
def test_finetune_is_refused_on_the_folder_a_launched_run_trains_in(tiny_model, pokemon_jsonl, tmp_path, cli):  # noqa: F811
    """The launcher's run holds the lock through its finetune.py (no deadlock between the two); a second
    finetune.py, started by hand on the same folder, is refused and changes nothing."""
    out = tmp_path / "out"
    env = {**os.environ, "BASE_MODEL_PATH": str(tiny_model), "DATASET_PATH": str(pokemon_jsonl), "OUTPUT_DIR": str(out),
           "MAX_STEP": "100000", "SAVE_INTERVAL": "100000", "MAX_SEQ_LEN": "128", "PRE_SEQ_LEN": "4",
           "EXTRA_ARGS": "--disable_tqdm true"}
    launcher = subprocess.Popen(["bash", str(SCRIPTS / "finetune_ps_pt_m.sh")], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        for line in launcher.stdout:  # the launcher's own child got the lock and is training
            if "'loss'" in line:
                break
        else:
            pytest.fail("the launched training never logged a loss")
        before = snapshot(out)
        code, stdout, err = cli(finetune.main, finetune_argv(tiny_model, pokemon_jsonl, out))
        assert code == 1, stdout + err
        assert_one_line_error(err, str(out), "in use")
        assert not (out / "trainer_state.json").exists()
        assert {k: v for k, v in snapshot(out).items() if k != "train.log"} == \
            {k: v for k, v in before.items() if k != "train.log"}
    finally:
        os.killpg(launcher.pid, 9)
        launcher.wait()
