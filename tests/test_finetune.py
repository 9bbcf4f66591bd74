"""finetune.py on tiny models (CPU). Bad input: one line on stderr and exit status 1, checked in-process through
main(argv). End to end as real subprocesses (slow): resume after SIGKILL, padding, packing, P-Tuning from an
existing prefix."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import finetune

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "finetune_chatmodel_demo"
FINETUNE = DEMO / "finetune.py"
PREFIX_WEIGHT = "transformer.prefix_encoder.embedding.weight"


@pytest.fixture(scope="session")
def pokemon_jsonl(tmp_path_factory) -> Path:
    """The data pipeline's Pokémon conversations (bundled table -> JSON -> JSONL), first 48 of them."""
    work = tmp_path_factory.mktemp("pokemon-data")
    subprocess.run(
        [sys.executable, str(REPO / "data_processing" / "data_processing.py"), "--output", str(work / "data.json")],
        check=True, capture_output=True, cwd=work,
    )
    subprocess.run(
        [sys.executable, str(REPO / "data_processing" / "format_tool_poke.py"), "--path", str(work / "data.json"),
         "--output", str(work / "all.jsonl")],
        check=True, capture_output=True, cwd=work,
    )
    lines = (work / "all.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) >= 96
    (work / "dev.jsonl").write_text("\n".join(lines[48:64]) + "\n", encoding="utf-8")
    path = work / "pokemon.jsonl"
    path.write_text("\n".join(lines[:48]) + "\n", encoding="utf-8")
    return path


def base_args(model: Path, data: Path, out: Path, *extra: str) -> list:
    return [
        "--model_name_or_path", str(model), "--train_file", str(data), "--output_dir", str(out),
        "--max_seq_length", "256", "--per_device_train_batch_size", "4", "--logging_steps", "1",
        "--report_to", "none", "--use_cpu", "--disable_tqdm", "true", "--dataloader_num_workers", "0",
        "--seed", "7", *extra,
    ]


def run_finetune(args, timeout=600) -> subprocess.CompletedProcess:
    """A real run, from the directory above --output_dir (so nothing lands in the repository)."""
    cwd = Path(args[args.index("--output_dir") + 1]).parent
    return subprocess.run(
        [sys.executable, str(FINETUNE), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def train_losses(output_dir: Path) -> list:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def prefix_of(checkpoint: Path) -> torch.Tensor:
    return torch.load(checkpoint / "pytorch_model.bin", map_location="cpu", weights_only=True)[PREFIX_WEIGHT]


# ---- resume ---------------------------------------------------------------------------------------------------
def kill_after_checkpoint(argv, cwd, checkpoint: Path) -> int:
    """Run finetune.py with `argv` in its own process group and SIGKILL the group as soon as `checkpoint` is
    complete (trainer_state.json is the last file a checkpoint gets); returns the exit status."""
    proc = subprocess.Popen([sys.executable, str(FINETUNE), *argv], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while not (checkpoint / "trainer_state.json").exists():
            assert proc.poll() is None, f"the run ended before writing {checkpoint.name}"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    return proc.returncode


@pytest.mark.slow
def test_run_killed_with_sigkill_resumes_to_the_same_weights(tiny_model, pokemon_jsonl, tmp_path):
    """P-Tuning with the prefix dropout active, so the data order and the RNG state must both be restored."""
    args = ["--pre_seq_len", "4", "--learning_rate", "5e-2", "--max_steps", "10", "--save_steps", "2"]
    straight = tmp_path / "straight"
    ok(run_finetune(base_args(tiny_model, pokemon_jsonl, straight, *args)))

    killed = tmp_path / "killed"
    assert kill_after_checkpoint(base_args(tiny_model, pokemon_jsonl, killed, *args), tmp_path, killed / "checkpoint-2") == -signal.SIGKILL
    assert not (killed / "pytorch_model.bin").exists(), "the run finished before it was killed"

    resumed = ok(run_finetune(base_args(tiny_model, pokemon_jsonl, killed, *args, "--resume_from_checkpoint", "true")))
    assert "Resuming from" in resumed.stdout
    torch.testing.assert_close(prefix_of(killed), prefix_of(straight), atol=1e-5, rtol=0)
    # The losses logged after the resume are the uninterrupted run's.
    n = len(train_losses(killed))
    assert n > 0 and train_losses(killed) == pytest.approx(train_losses(straight)[-n:], abs=1e-4)


@pytest.mark.slow
def test_fresh_start_then_continue_from_its_prefix(tiny_model, pokemon_jsonl, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    args = ["--pre_seq_len", "4", "--save_steps", "100", "--max_steps", "2"]
    result = ok(run_finetune(base_args(tiny_model, pokemon_jsonl, first, *args, "--learning_rate", "5e-2",
                                       "--resume_from_checkpoint", "true", "--group_by_length")))
    assert "starting from scratch" in result.stdout
    # --ptuning_checkpoint starts from a saved prefix; with a zero learning rate it passes through unchanged.
    ok(run_finetune(base_args(tiny_model, pokemon_jsonl, second, *args, "--learning_rate", "0",
                              "--ptuning_checkpoint", str(first))))
    torch.testing.assert_close(prefix_of(second), prefix_of(first), atol=0, rtol=0)


# ---- padding and packing ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_dynamic_padding_trains_exactly_like_padding_to_max_length(tiny_model, pokemon_jsonl, tmp_path):
    args = ["--pre_seq_len", "4", "--learning_rate", "5e-2", "--max_steps", "3", "--save_steps", "100",
            "--gradient_accumulation_steps", "2"]
    ok(run_finetune(base_args(tiny_model, pokemon_jsonl, tmp_path / "dynamic", *args)))
    ok(run_finetune(base_args(tiny_model, pokemon_jsonl, tmp_path / "padded", *args, "--pad_to_max_length")))
    losses = train_losses(tmp_path / "dynamic")
    assert losses == pytest.approx(train_losses(tmp_path / "padded"), abs=1e-5)
    # With gradient accumulation the logged loss is still the per-token mean (about ln(vocab) for a random
    # model), not the sum over the accumulated micro-batches.
    assert all(6 < loss < 9 for loss in losses), losses
    torch.testing.assert_close(prefix_of(tmp_path / "dynamic"), prefix_of(tmp_path / "padded"), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_packing_trains_on_fewer_rows_and_logs_tokens_per_second(tiny_model, pokemon_jsonl, tmp_path):
    out = tmp_path / "packed"
    result = ok(run_finetune(base_args(tiny_model, pokemon_jsonl, out, "--packing", "--learning_rate", "1e-2",
                                       "--max_steps", "4", "--save_steps", "100")))
    assert "packing: 48 samples ->" in result.stdout
    rows = int(result.stdout.split("packing: 48 samples -> ")[1].split(" rows")[0])
    assert rows < 48
    state = json.loads((out / "trainer_state.json").read_text())
    logs = [entry for entry in state["log_history"] if "loss" in entry]
    # A random model starts near ln(vocab) and full fine-tuning at this rate lowers the loss within 4 steps.
    assert len(logs) == 4 and 6 < logs[0]["loss"] < 9 and logs[-1]["loss"] < logs[0]["loss"] - 0.1, logs
    assert all(entry["tokens_per_second"] > entry["labelled_tokens_per_second"] > 0 for entry in logs)
    # Full fine-tuning writes the whole model, which loads back.
    from chatglm3 import ChatGLMForConditionalGeneration

    model = ChatGLMForConditionalGeneration.from_pretrained(out)
    base = ChatGLMForConditionalGeneration.from_pretrained(tiny_model)
    assert not torch.equal(model.transformer.output_layer.weight, base.transformer.output_layer.weight)


# ---- bad input (in-process) ---------------------------------------------------------------------------------
GOOD = {"conversations": [{"role": "user", "content": "皮卡丘是什么属性？"}, {"role": "assistant", "content": "电属性。"}]}

# tests/test_preprocess.py checks every data message in detail (missing "conversations", non-string content, ...);
# these check that finetune.py passes such errors on: file:line, the reason, exit status 1, one line, no traceback.
BAD_DATA = {
    "bad_json": ("{\"conversations\": [", "data.jsonl:2", "JSON"),
    "unknown_role": (json.dumps({"conversations": [{"role": "bot", "content": "x"}]}), "data.jsonl:2", "'bot'"),
    "tool_without_name": (json.dumps({"conversations": [{"role": "tool", "parameters": {}}]}), "data.jsonl:2", "name"),
}


@pytest.fixture
def good_jsonl(tmp_path) -> Path:
    path = tmp_path / "good.jsonl"
    path.write_text((json.dumps(GOOD, ensure_ascii=False) + "\n") * 8, encoding="utf-8")
    return path


def fails_cleanly(capsys, args, *fragments: str) -> str:
    """Runs finetune.main(args): exit status 1 and one error line on stderr holding every fragment."""
    code = finetune.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 1, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    for fragment in fragments:
        assert fragment in last, (fragment, err[-2000:])
    return last


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_training_data_is_reported_with_file_and_line(tiny_model, tmp_path, capsys, case):
    line, where, what = BAD_DATA[case]
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(GOOD, ensure_ascii=False) + "\n" + line + "\n", encoding="utf-8")
    fails_cleanly(capsys, base_args(tiny_model, data, tmp_path / "out", "--pre_seq_len", "4", "--max_steps", "1"), where, what)
    assert not (tmp_path / "out" / "checkpoint-1").exists()


def test_missing_train_file_and_empty_dataset(tiny_model, tmp_path, capsys):
    fails_cleanly(capsys, base_args(tiny_model, tmp_path / "nope.jsonl", tmp_path / "out", "--max_steps", "1"), "nope.jsonl", "not found")
    # Only a user turn: nothing to learn, the sample is dropped and nothing is left.
    data = tmp_path / "nothing.jsonl"
    data.write_text(json.dumps({"conversations": [{"role": "user", "content": "你好"}]}) + "\n", encoding="utf-8")
    fails_cleanly(capsys, base_args(tiny_model, data, tmp_path / "out", "--max_steps", "1"), "nothing.jsonl:1", "empty")


def test_flags_that_cannot_work_are_refused(tiny_model, good_jsonl, tmp_path, capsys):
    out = tmp_path / "out"
    fails_cleanly(capsys, base_args(tmp_path / "no-model", good_jsonl, out), "no-model", "not found", "BASE_MODEL_PATH")
    # Quantized weights do not train: full fine-tuning with --quantization_bit names the two ways that work.
    fails_cleanly(capsys, base_args(tiny_model, good_jsonl, out, "--quantization_bit", "4"),
                  "--quantization_bit", "--pre_seq_len", "--lora_rank")
    fails_cleanly(capsys, base_args(tiny_model, good_jsonl, out, "--eval_strategy", "steps", "--eval_steps", "1"),
                  "--eval_strategy steps", "--validation_file")
    fails_cleanly(capsys, base_args(tiny_model, good_jsonl, out, "--pre_seq_len", "0"), "--pre_seq_len", "0")
    fails_cleanly(capsys, base_args(tiny_model, good_jsonl, out, "--resume_from_checkpoint", tmp_path / "nope"),
                  "--resume_from_checkpoint", "trainer_state.json")
    with pytest.raises(SystemExit) as exit_info:
        finetune.main([str(a) for a in base_args(tiny_model, good_jsonl, out, "--no_such_flag", "8")])
    assert exit_info.value.code == 2 and "--no_such_flag" in capsys.readouterr().err


@pytest.mark.slow
def test_resuming_with_another_prefix_length_is_one_line(tiny_model, good_jsonl, tmp_path, capsys):
    out = tmp_path / "out"
    assert finetune.main([str(a) for a in base_args(tiny_model, good_jsonl, out, "--pre_seq_len", "4", "--max_steps", "1", "--save_steps", "1")]) == 0
    capsys.readouterr()
    fails_cleanly(capsys, base_args(tiny_model, good_jsonl, out, "--pre_seq_len", "8", "--max_steps", "2", "--resume_from_checkpoint", "true"),
                  str(out / "checkpoint-1"), "pre_seq_len")


# ---- several training files -------------------------------------------------------------------------------------
def _labelled_files(tmp_path, sizes: dict) -> dict:
    """One JSONL file per label, its samples' user turns naming the file ("甲3"), so a batch says where it came from."""
    files = {}
    for label, size in sizes.items():
        files[label] = tmp_path / f"{label}.jsonl"
        files[label].write_text("".join(json.dumps({"conversations": [
            {"role": "user", "content": f"{label}{i}"}, {"role": "assistant", "content": "好"}]}, ensure_ascii=False) + "\n"
            for i in range(size)), encoding="utf-8")
    return files


def test_several_training_files_are_drawn_by_weight_each_epoch_through_the_trainer(tiny_model, tmp_path, capsys):
    from chatglm3.checkpoint.loading import load_tokenizer
    from preprocess_utils import WeightedEpochSampler
    from transformers import Seq2SeqTrainingArguments

    files = _labelled_files(tmp_path, {"甲": 30, "乙": 6})
    args = base_args(tiny_model, f"{files['甲']},{files['乙']}", tmp_path / "out", "--train_weights", "1,1")
    model_args, data_args, _ = finetune.parse_args([str(a) for a in args])
    tokenizer = load_tokenizer(str(tiny_model))
    training_args = Seq2SeqTrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=1, use_cpu=True,
                                             report_to="none", seed=7, dataloader_num_workers=0)
    files_, weights = finetune.train_files(data_args)
    dataset = finetune.read_data(files_, None, data_args, tokenizer, training_args, weights)
    assert "甲.jsonl: 每轮 18 条" in capsys.readouterr().out
    from chatglm3 import ChatGLMForConditionalGeneration
    trainer = finetune.Trainer(model=ChatGLMForConditionalGeneration.from_pretrained(tiny_model), args=training_args,
                               train_dataset=dataset, data_collator=finetune.make_collator(data_args, tokenizer, dataset))
    assert isinstance(trainer._get_train_sampler(), WeightedEpochSampler)
    loader = trainer.get_train_dataloader()  # accelerate's wrapping, as the Trainer iterates it
    file_of = {tuple(dataset[i]["input_ids"]): "甲" if i < 30 else "乙" for i in range(36)}
    assert len(file_of) == 36
    seen = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        drawn = [file_of[tuple(batch["input_ids"][0][batch["attention_mask"][0] == 1].tolist())] for batch in loader]
        assert (drawn.count("甲"), drawn.count("乙")) == (18, 18)  # equal weights: half each, the small file repeated
        seen.append(drawn)
    assert seen[0] != seen[1]


def test_train_weights_must_match_the_files(tiny_model, tmp_path, capsys):
    files = _labelled_files(tmp_path, {"甲": 3, "乙": 3})
    both = f"{files['甲']},{files['乙']}"
    fails_cleanly(capsys, base_args(tiny_model, both, tmp_path / "out", "--train_weights", "3"), "--train_weights", "1 weights", "2 files")
    fails_cleanly(capsys, base_args(tiny_model, both, tmp_path / "out", "--train_weights", "3,inf"), "--train_weights (DATASET_WEIGHTS)[2]", "inf")
    fails_cleanly(capsys, base_args(tiny_model, f"{both},{tmp_path / 'nope.jsonl'}", tmp_path / "out"), "nope.jsonl")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_full_determinism_repeats_a_seeded_run_bit_for_bit(tiny_model, pokemon_jsonl, tmp_path):
    """--full_determinism (launching.make_repeatable): two seeded runs in separate processes, two threads each,
    end in the same weights to the bit (full fine-tuning with packing, as the tool demo trains)."""
    from safetensors.torch import load_file

    weights = []
    for run in ("a", "b"):
        out = tmp_path / run
        args = base_args(tiny_model, pokemon_jsonl, out, "--max_steps", "6", "--packing", "1",
                         "--learning_rate", "3e-3", "--save_steps", "1000", "--full_determinism")
        result = subprocess.run([sys.executable, str(FINETUNE), *args], cwd=tmp_path, capture_output=True, text=True,
                                timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
        ok(result)
        weights.append({k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()})
    assert weights[0].keys() == weights[1].keys() and weights[0]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
