"""The bash launchers in finetune_chatmodel_demo/scripts, run as users run them (from another directory, with
environment overrides) on a tiny model on CPU, and what scripts/launch.py decides for them (NUM_GPUS, the output
folder's lock, continuing an unfinished run)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_finetune import PREFIX_WEIGHT, pokemon_jsonl, train_losses  # noqa: F401  (pokemon_jsonl is a fixture)

SCRIPTS = Path(__file__).resolve().parents[1] / "finetune_chatmodel_demo" / "scripts"
pytestmark = pytest.mark.slow  # every test here runs a launcher (bash, Python, often torchrun and DeepSpeed)


def launch(script: str, cwd: Path, timeout=600, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "EXTRA_ARGS": "--disable_tqdm true", **{k: str(v) for k, v in env.items()}}
    return subprocess.run(
        ["bash", str(SCRIPTS / script)], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def test_ptuning_launcher_learns_and_saves_only_the_prefix(tiny_model, pokemon_jsonl, tmp_path):
    from chatglm3 import ChatGLMForConditionalGeneration, load_model_and_tokenizer

    # Relative paths from an unrelated working directory: the launcher resolves them against the caller's.
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    os.symlink(tiny_model, cwd / "model")
    os.symlink(pokemon_jsonl, cwd / "train.jsonl")
    os.symlink(pokemon_jsonl.parent / "dev.jsonl", cwd / "dev.jsonl")
    ok(launch(
        "finetune_ps_pt_m.sh", cwd, BASE_MODEL_PATH="model", DATASET_PATH="train.jsonl", VALIDATION_PATH="dev.jsonl",
        OUTPUT_DIR="out", MAX_STEP=40, LR="5e-1", PRE_SEQ_LEN=16, MAX_SEQ_LEN=256, DEV_BATCH_SIZE=4,
        GRAD_ACCUMULATION_STEPS=1, SAVE_INTERVAL=20, LOG_INTERVAL=5,
    ))
    out = cwd / "out"

    # The loss falls. (A random tiny model leaves the prefix little to steer, so the fall is modest: about
    # 7.55 -> 7.35 here. On ChatGLM3-6B the same recipe moves it several times as far.)
    losses = train_losses(out)
    assert len(losses) == 8
    assert losses[-1] < losses[0] - 0.1, losses
    state = json.loads((out / "trainer_state.json").read_text())
    evals = [entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry]
    assert len(evals) == 2 and evals[1] < evals[0]
    assert all(entry["tokens_per_second"] > entry["labelled_tokens_per_second"] > 0
               for entry in state["log_history"] if "loss" in entry)
    assert "'loss'" in (out / "train.log").read_text(encoding="utf-8")

    # Checkpoints hold exactly the prefix, in upstream's format.
    for checkpoint in (out / "checkpoint-20", out / "checkpoint-40", out):
        saved = torch.load(checkpoint / "pytorch_model.bin", map_location="cpu", weights_only=True)
        assert list(saved) == [PREFIX_WEIGHT]
        assert saved[PREFIX_WEIGHT].dtype == torch.float32 and saved[PREFIX_WEIGHT].shape[0] == 16
        config = json.loads((checkpoint / "config.json").read_text())
        assert config["pre_seq_len"] == 16 and config["prefix_projection"] is False and config["use_cache"] is True
        assert (checkpoint / "tokenizer.model").is_file()
        assert not list(checkpoint.glob("*.safetensors"))

    # It reloads to the same logits as the trained prefix placed by hand, and differs from a fresh prefix.
    loaded, tokenizer = load_model_and_tokenizer(str(tiny_model), pt_checkpoint=str(out), device="cpu")
    by_hand = ChatGLMForConditionalGeneration.from_pretrained(tiny_model, pre_seq_len=16).eval()
    fresh_logits_model = ChatGLMForConditionalGeneration.from_pretrained(tiny_model, pre_seq_len=16).eval()
    by_hand.transformer.prefix_encoder.embedding.weight.data.copy_(saved[PREFIX_WEIGHT])
    ids = tokenizer.build_chat_input("皮卡丘是什么属性的宝可梦？")["input_ids"]
    with torch.no_grad():
        logits = loaded(ids).logits
        torch.testing.assert_close(logits, by_hand(ids).logits, atol=1e-5, rtol=0)
        assert not torch.allclose(logits, fresh_logits_model(ids).logits, atol=1e-3)


def test_launcher_exits_with_the_training_status_and_keeps_the_log(tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n", encoding="utf-8")
    result = launch("finetune_pt_multiturn.sh", tmp_path, BASE_MODEL_PATH=tiny_model, DATASET_PATH=bad,
                    OUTPUT_DIR=tmp_path / "out", MAX_STEP=1)
    assert result.returncode == 1
    log = (tmp_path / "out" / "train.log").read_text(encoding="utf-8")
    assert f"{bad}:1" in log and "JSON" in log
    assert "exit status 1" in result.stderr


@pytest.mark.parametrize("script", ["finetune_ps_pt_m.sh", "finetune_ds_multiturn.sh"])
def test_launcher_names_a_missing_model_or_dataset(tmp_path, pokemon_jsonl, script):
    no_model = launch(script, tmp_path, BASE_MODEL_PATH=tmp_path / "chatglm3-6b", DATASET_PATH=pokemon_jsonl)
    assert no_model.returncode == 2
    assert str(tmp_path / "chatglm3-6b") in no_model.stderr and "BASE_MODEL_PATH" in no_model.stderr
    no_data = launch(script, tmp_path, BASE_MODEL_PATH=tmp_path, DATASET_PATH="missing.jsonl")
    assert no_data.returncode == 2
    assert str(tmp_path / "missing.jsonl") in no_data.stderr and "DATASET_PATH" in no_data.stderr


@pytest.fixture(scope="module")
def deepspeed_runs(tiny_model, pokemon_jsonl, tmp_path_factory):
    """Full fine-tuning in two CPU processes with ZeRO-2 and with ZeRO-3, same data and seed."""
    outputs = {}
    for stage, config in (("zero2", "deepspeed.json"), ("zero3", "deepspeed_zero3.json")):
        out = tmp_path_factory.mktemp(stage) / "out"
        ok(launch(
            "finetune_ds_multiturn.sh", out.parent, NUM_GPUS=2, BASE_MODEL_PATH=tiny_model,
            DATASET_PATH=pokemon_jsonl, OUTPUT_DIR=out, MAX_STEP=6, LR="1e-2", MAX_SEQ_LEN=256, DEV_BATCH_SIZE=2,
            SAVE_INTERVAL=3, LOG_INTERVAL=1, DS_CONFIG=SCRIPTS.parent / "configs" / config,
        ))
        outputs[stage] = out
    return outputs


def test_deepspeed_zero2_on_two_processes_saves_a_full_model(deepspeed_runs, tiny_model):
    from chatglm3 import ChatGLMForConditionalGeneration

    out = deepspeed_runs["zero2"]
    losses = train_losses(out)
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5, losses
    assert (out / "checkpoint-3" / "global_step3").is_dir()  # DeepSpeed's own state, for resuming
    trained = ChatGLMForConditionalGeneration.from_pretrained(out)
    base = ChatGLMForConditionalGeneration.from_pretrained(tiny_model)
    assert not torch.equal(trained.transformer.output_layer.weight, base.transformer.output_layer.weight)
    assert (out / "tokenizer.model").is_file()
    assert json.loads((out / "config.json").read_text())["use_cache"] is True


def test_deepspeed_zero3_gathers_the_same_model(deepspeed_runs):
    from chatglm3 import ChatGLMForConditionalGeneration

    assert train_losses(deepspeed_runs["zero3"]) == pytest.approx(train_losses(deepspeed_runs["zero2"]), abs=1e-4)
    zero2 = ChatGLMForConditionalGeneration.from_pretrained(deepspeed_runs["zero2"]).state_dict()
    zero3 = ChatGLMForConditionalGeneration.from_pretrained(deepspeed_runs["zero3"]).state_dict()
    assert zero2.keys() == zero3.keys()
    for key in zero2:
        # Reductions run in another order under ZeRO-3; Adam turns that float noise into differences of
        # ~1e-4 in a few elements, against updates of ~1e-2 per step.
        torch.testing.assert_close(zero3[key], zero2[key], atol=5e-4, rtol=0, msg=key)


# --- what scripts/launch.py decides (launching.py) --------------------------------------------------------
LAUNCH = SCRIPTS / "launch.py"
DATESTR = "20261129-120000"


@pytest.mark.parametrize("value", ["abc", "0"])
def test_num_gpus_is_checked(tmp_path, value):
    result = launch("finetune_pt.sh", tmp_path, NUM_GPUS=value)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "NUM_GPUS" in lines[0] and repr(value) in lines[0], result.stderr


def test_num_gpus_defaults_to_the_visible_gpus():
    from chatglm3 import ChatGLMError
    from launching import LaunchError, cpu_cores, process_count

    assert process_count("", 0) == 1 and process_count("", 4) == 4 and process_count(str(cpu_cores()), 0) == cpu_cores()
    with pytest.raises(LaunchError, match="NUM_GPUS=8"):
        process_count("8", 4)
    with pytest.raises(LaunchError, match="CPU cores"):  # a CPU machine: at most one process per core
        process_count(str(cpu_cores() + 1), 0)
    for bad in ("-1", "1.5", "2 GPUs", "nan", "1e3"):
        with pytest.raises(ChatGLMError, match="NUM_GPUS"):
            process_count(bad, 0)


def make_run(parent: Path, name: str, checkpoint=True, finished=False) -> Path:
    run = parent / name
    (run / "checkpoint-2").mkdir(parents=True)
    if checkpoint:  # as the Trainer writes it (a checkpoint is checked whole before it is continued from)
        (run / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2, "log_history": []}')
    if finished:
        (run / "trainer_state.json").write_text("{}")
    return run


def test_resume_continues_the_newest_unfinished_run_of_the_same_name(tmp_path, capsys):
    from launching import choose_output_dir, claim

    make_run(tmp_path, "tool_alpaca_pt-20261101-000000-128-2e-2", finished=True)
    wanted = make_run(tmp_path, "tool_alpaca_pt-20261102-000000-128-2e-2")
    make_run(tmp_path, "tool_alpaca_pt-20261103-000000-128-2e-2", checkpoint=False)  # nothing to continue from
    make_run(tmp_path, "tool_alpaca_pt-20261104-000000-128-2e-2", finished=True)
    make_run(tmp_path, "tool_alpaca_pt-20261105-000000-128-1e-2")  # other settings
    make_run(tmp_path, "advertise_gen_pt-20261106-000000-128-2e-2")  # another RUN_NAME
    fresh = tmp_path / f"tool_alpaca_pt-{DATESTR}-128-2e-2"
    args = ["--output_dir", str(fresh), "--resume_from_checkpoint"]

    assert choose_output_dir(args + ["True"], DATESTR) == wanted
    assert str(wanted) in capsys.readouterr().out
    assert choose_output_dir(args + ["false"], DATESTR) == fresh
    assert choose_output_dir(["--output_dir", str(tmp_path / "mine"), "--resume_from_checkpoint", "true"], DATESTR) == tmp_path / "mine"
    live = claim(wanted)  # a live run's folder is not taken over
    try:
        assert choose_output_dir(args + ["true"], DATESTR) == fresh
    finally:
        live.release()


def hold_lock(folder: Path) -> subprocess.Popen:
    """A process that locks `folder` as finetune.py does and sleeps."""
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from launching import claim; "
            "from pathlib import Path; lock = claim(Path(sys.argv[2])); print('locked', flush=True); time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", code, str(SCRIPTS.parent), str(folder)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


def test_an_output_dir_in_use_is_refused_and_a_killed_run_leaves_no_lock(tmp_path):
    from launching import LaunchError, claim

    out = tmp_path / "out"
    holder = hold_lock(out)
    try:
        with pytest.raises(LaunchError, match="in use"):
            claim(out)
    finally:
        holder.kill()
        holder.wait()
    claim(out).release()


def test_the_training_keeps_the_lock_when_the_launcher_is_killed(tmp_path):
    """The training started by launch.py holds the lock itself (as finetune.py does): killing only the launcher
    does not free the folder, and the launcher's own check does not refuse its child."""
    from launching import LaunchError, claim

    trainer = tmp_path / "train.py"
    trainer.write_text(f"import sys, time\nsys.path.insert(0, {str(SCRIPTS.parent)!r})\nfrom launching import claim\n"
                       "lock = claim(sys.argv[sys.argv.index('--output_dir') + 1])\n"
                       "print('training', flush=True)\ntime.sleep(600)\n")
    out = tmp_path / "out"
    launcher = subprocess.Popen([sys.executable, str(LAUNCH), "--num-gpus", "1", "--", str(trainer), "--output_dir", str(out)],
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in launcher.stdout:
            if line.strip() == "training":
                break
        launcher.kill()
        launcher.wait()
        with pytest.raises(LaunchError, match="in use"):
            claim(out)
    finally:
        os.killpg(launcher.pid, signal.SIGKILL)  # the training, left behind in the launcher's session
    for _ in range(100):
        try:
            claim(out).release()
            break
        except LaunchError:
            time.sleep(0.1)
    else:
        pytest.fail("the lock outlived the training")


def test_rerunning_a_launcher_continues_its_killed_run(tiny_model, pokemon_jsonl, tmp_path):
    """Upstream's timestamped folders: RESUME=true (the default) finds the unfinished run by itself."""
    demo = tmp_path / "demo"
    shutil.copytree(SCRIPTS.parent, demo, ignore=shutil.ignore_patterns("__pycache__", "output"))
    settings = dict(BASE_MODEL_PATH=tiny_model, DATASET_PATH=pokemon_jsonl, PRE_SEQ_LEN=4, MAX_SEQ_LEN=256,
                    DEV_BATCH_SIZE=4, GRAD_ACCUMULARION_STEPS=1, SAVE_INTERVAL=2, LOG_INTERVAL=1)
    env = {**os.environ, "EXTRA_ARGS": "--disable_tqdm true", **{k: str(v) for k, v in settings.items()}}
    first = subprocess.run(["bash", str(demo / "scripts" / "finetune_pt_multiturn.sh")], cwd=tmp_path,
                           env={**env, "MAX_STEP": "2"}, capture_output=True, text=True, timeout=600)
    ok(first)
    (run,) = (demo / "output").glob("tool_alpaca_pt-*-4-2e-2")
    (run / "trainer_state.json").unlink()  # as if it had been killed after its checkpoint
    second = subprocess.run(["bash", str(demo / "scripts" / "finetune_pt_multiturn.sh")], cwd=tmp_path,
                            env={**env, "MAX_STEP": "4"}, capture_output=True, text=True, timeout=600)
    ok(second)
    assert f"Continuing the unfinished run {run}" in second.stdout
    assert list((demo / "output").iterdir()) == [run]
    assert json.loads((run / "trainer_state.json").read_text())["global_step"] == 4


@pytest.mark.parametrize("script", ["finetune_lora.sh", "finetune_ds_multiturn.sh"])
def test_dataset_path_takes_several_files_with_checked_weights(tiny_model, pokemon_jsonl, tmp_path, script):
    other = tmp_path / "other.jsonl"
    other.write_text(pokemon_jsonl.read_text(encoding="utf-8"), encoding="utf-8")
    both = f"{pokemon_jsonl},{other}"
    for weights, fragments in {"3": ("DATASET_WEIGHTS", "1 weights", "2 files"), "3,0": ("DATASET_WEIGHTS (--train_weights)[2]", "> 0"),
                               "3,nan": ("DATASET_WEIGHTS", "nan"), "a,1": ("DATASET_WEIGHTS (--train_weights)[1]", "'a'")}.items():
        result = launch(script, tmp_path, BASE_MODEL_PATH=tiny_model, DATASET_PATH=both, DATASET_WEIGHTS=weights,
                        OUTPUT_DIR=tmp_path / "out")
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        line = result.stderr.strip()
        assert len(line.splitlines()) == 1 and all(f in line for f in fragments), (weights, line)
    missing = launch(script, tmp_path, BASE_MODEL_PATH=tiny_model, DATASET_PATH=f"{pokemon_jsonl},{tmp_path / 'nope.jsonl'}")
    assert missing.returncode == 2 and str(tmp_path / "nope.jsonl") in missing.stderr and "DATASET_PATH" in missing.stderr
    assert not (tmp_path / "out").exists()


def test_a_launcher_trains_on_two_weighted_files(tiny_model, pokemon_jsonl, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(pokemon_jsonl.read_text(encoding="utf-8").splitlines()[:8]) + "\n", encoding="utf-8")
    result = ok(launch("finetune_ps_pt_m.sh", tmp_path, BASE_MODEL_PATH=tiny_model, DATASET_PATH=f"{pokemon_jsonl},{other}",
                       DATASET_WEIGHTS="1,1", OUTPUT_DIR=tmp_path / "out", MAX_STEP=2, PRE_SEQ_LEN=4, MAX_SEQ_LEN=256,
                       DEV_BATCH_SIZE=2, GRAD_ACCUMULATION_STEPS=1, SAVE_INTERVAL=2, LOG_INTERVAL=1))
    # 48 + 8 samples per epoch, half from each file: the 8-sample file four times over (the log says so per file).
    assert "pokemon.jsonl: 每轮 28 条" in result.stdout and "other.jsonl: 每轮 28 条（文件共 8 条" in result.stdout
    assert "--train_weights 1,1" in result.stdout
    assert (tmp_path / "out" / "pytorch_model.bin").is_file()
