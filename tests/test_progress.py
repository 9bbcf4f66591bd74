"""chatglm3.progress on the stages that take long: a bar on a terminal, plain `done/total` lines with the time left
in a log (every CHATGLM3_PROGRESS_SECONDS; 0 here, so that short runs print them), for training (finetune.py
piped, as the launchers and scripts/tool_demo.sh run it), evaluation batches and exports."""
import io
import subprocess
import sys

import pytest

from chatglm3.checkpoint.export import export
from chatglm3.checkpoint.loading import load_model_and_tokenizer
from chatglm3.model.conversation import prompt_ids
from chatglm3.progress import SECONDS_ENV, Progress
from chatglm3.serving.batch_replies import generate_replies
from conftest import DEMO
from test_finetune import pokemon_jsonl  # noqa: F401  (fixture)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_a_line_per_interval_and_one_at_the_end(monkeypatch):
    monkeypatch.setenv(SECONDS_ENV, "0")
    log = io.StringIO()
    with Progress(3, "任务 / jobs", file=log) as progress:
        for _ in range(3):
            progress.update()
            progress.write("between", file=log)
    lines = log.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines if line != "between"] == [
        "任务 / jobs: 1/3 (33%)", "任务 / jobs: 2/3 (67%)", "任务 / jobs: 3/3 (100%)"]
    assert all("剩余 / left" in line for line in lines if line != "between")
    assert "\r" not in log.getvalue()


def test_a_short_stage_writes_nothing_to_a_log_and_a_terminal_gets_tqdm(monkeypatch):
    monkeypatch.delenv(SECONDS_ENV, raising=False)  # 30 s
    log = io.StringIO()
    with Progress(2, "x", file=log) as progress:
        progress.update(2)
    assert log.getvalue() == ""
    monkeypatch.setenv(SECONDS_ENV, "0")
    terminal = Terminal()
    progress = Progress(2, "x", file=terminal)
    assert progress.bar is not None  # a redrawn bar, not lines
    progress.close()


def test_a_resumed_run_counts_from_its_step(monkeypatch):
    monkeypatch.setenv(SECONDS_ENV, "0")
    log = io.StringIO()
    with Progress(10, "训练步 / training steps", initial=8, file=log) as progress:
        progress.update()
    assert log.getvalue().startswith("训练步 / training steps: 9/10 (90%)")


@pytest.mark.parametrize("value", ["abc", "-1", "nan"])
def test_a_bad_interval_is_one_line_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(SECONDS_ENV, value)
    with pytest.raises(Exception) as info:
        Progress(2, "x", file=io.StringIO())
    assert SECONDS_ENV in str(info.value) and "\n" not in str(info.value)


@pytest.mark.slow
def test_training_piped_to_a_log_prints_steps_of_max_steps(tiny_model, pokemon_jsonl, tmp_path):  # noqa: F811
    env = {**__import__("os").environ, SECONDS_ENV: "0"}
    result = subprocess.run(
        [sys.executable, str(DEMO / "finetune.py"), "--model_name_or_path", str(tiny_model), "--train_file",
         str(pokemon_jsonl), "--output_dir", str(tmp_path / "out"), "--max_seq_length", "128", "--pre_seq_len", "4",
         "--per_device_train_batch_size", "4", "--max_steps", "3", "--logging_steps", "1", "--report_to", "none",
         "--use_cpu", "--dataloader_num_workers", "0", "--learning_rate", "1e-2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [line.split(" (")[0] for line in result.stderr.splitlines() if line.startswith("训练步 / training steps:")]
    assert steps == ["训练步 / training steps: 1/3", "训练步 / training steps: 2/3", "训练步 / training steps: 3/3"]
    assert "\r" not in result.stderr
    assert result.stdout.count("{'loss': ") == 3  # transformers' log lines stay on stdout


def test_evaluation_batches_print_replies_done(tiny_model, monkeypatch, capsys):
    model, tokenizer = load_model_and_tokenizer(str(tiny_model), device="cpu")
    monkeypatch.setenv(SECONDS_ENV, "0")
    prompts = [prompt_ids(tokenizer, [{"role": "user", "content": q}]) for q in ("皮卡丘", "妙蛙种子", "小火龙")]
    generate_replies(model, tokenizer, prompts, 2, {"max_new_tokens": 2})
    lines = [line.split(" (")[0] for line in capsys.readouterr().err.splitlines()]
    assert lines == ["已生成回复 / replies generated: 2/3", "已生成回复 / replies generated: 3/3"]


def test_export_prints_weight_files_written(tiny_model, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv(SECONDS_ENV, "0")
    export(tiny_model, tmp_path / "merged", max_shard_size="100KB")
    err = capsys.readouterr().err
    written = [line for line in err.splitlines() if "已写权重文件 / weight files written" in line]
    assert written and written[-1].split(" (")[0].endswith(f"{len(written)}/{len(written)}") and len(written) > 1
    assert any("已读权重文件 / weight files read: 1/1" in line for line in err.splitlines())
