"""The helper scripts as a user runs them (one real run each), and their bad input in-process: tiny-model
builder, loss plot, type quiz."""
import json
import os
import subprocess
import sys

import pytest

from conftest import DATA, DEMO, REPO

sys.path.insert(0, str(DEMO / "scripts"))
import build_tiny_model  # noqa: E402
import plot_loss  # noqa: E402
import quiz_types  # noqa: E402


def run(script, *args):
    folder = DATA if script == "quiz_types.py" else DEMO / "scripts"  # the quiz is Pokémon code, beside the pipeline
    return subprocess.run([sys.executable, str(folder / script), *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def error(capsys, main, *args) -> str:
    """stderr of a failed in-process run (exit status 1, no traceback)."""
    assert main(list(map(str, args))) == 1
    return capsys.readouterr().err


def test_build_tiny_model_cli(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"conversations": [{"role": "user", "content": f"第{i}只宝可梦叫什么？ 🙂"}]}, ensure_ascii=False) for i in range(200)), encoding="utf-8")
    out = tmp_path / "m"
    r = run("build_tiny_model.py", "--corpus", corpus, DATA / "data.csv", "--out", out, "--layers", "1", "--hidden", "32", "--heads", "2", "--kv-groups", "1", "--vocab-size", "2500")
    assert r.returncode == 0, r.stderr
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "chatglm" and config["num_layers"] == 1 and config["padded_vocab_size"] % 64 == 0
    from chatglm3.checkpoint.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(out)
    ids = tokenizer.encode("皮卡丘 🙂")  # byte fallback: any text encodes, nothing becomes <unk>
    assert 0 not in ids[2:] and tokenizer.decode(ids[2:]) == "皮卡丘 🙂"
    assert len(tokenizer) <= model.config.padded_vocab_size
    # bad input: a missing corpus, heads that do not divide hidden, a vocabulary too large for the corpus
    assert "nope.txt" in error(capsys, build_tiny_model.main, "--corpus", tmp_path / "nope.txt", "--out", tmp_path / "x")
    assert "hidden" in error(capsys, build_tiny_model.main, "--corpus", corpus, "--out", tmp_path / "y", "--hidden", "30", "--heads", "4")
    assert "--vocab-size" in error(capsys, build_tiny_model.main, "--corpus", DATA / "data.csv", "--out", tmp_path / "z", "--vocab-size", "300")
    units = tmp_path / "units.txt"
    units.write_text("水\n火 龙\n", encoding="utf-8")
    assert "units.txt:2" in error(capsys, build_tiny_model.main, "--corpus", corpus, "--out", tmp_path / "u", "--single-tokens", units)
    for flag, value in (("--heads", "0"), ("--kv-channels", "-4"), ("--layers", "0"), ("--init-std", "0")):  # exit 2
        r = run("build_tiny_model.py", "--corpus", corpus, "--out", tmp_path / "s", flag, value)
        assert r.returncode == 2 and flag in r.stderr and "Traceback" not in r.stderr and not (tmp_path / "s").exists()


def test_build_tiny_model_single_tokens_and_head_size(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("皮卡丘是电属性的宝可梦。\n" * 50 + "小火龙是火属性的宝可梦。\n" * 50, encoding="utf-8")
    units = tmp_path / "units.txt"
    units.write_text("电\n火\n", encoding="utf-8")
    out = tmp_path / "m"
    r = run("build_tiny_model.py", "--corpus", corpus, "--out", out, "--layers", "1", "--hidden", "32", "--heads", "4",
            "--kv-channels", "16", "--kv-groups", "2", "--vocab-size", "400", "--single-tokens", units, "--init-std", "0.1")
    assert r.returncode == 0, r.stderr
    from chatglm3 import ChatGLMTokenizer
    from safetensors.torch import load_file

    # --init-std: recorded as HF's initializer_range and used for every matrix (default 0.02 below)
    assert json.loads((out / "config.json").read_text())["initializer_range"] == 0.1
    weight = load_file(out / "model.safetensors")["transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"]
    assert abs(weight.std().item() - 0.1) < 0.01

    sp = ChatGLMTokenizer.from_pretrained(str(out)).tokenizer.sp_model
    assert "电" in sp.encode_as_pieces("皮卡丘是电属性的宝可梦。") and "火" in sp.encode_as_pieces("小火龙是火属性")
    assert json.loads((out / "config.json").read_text())["kv_channels"] == 16
    free = build_tiny_model.build_tiny_model(corpus, tmp_path / "free", layers=1, hidden=32, heads=2, kv_groups=1, vocab_size=400)
    sp_free = ChatGLMTokenizer.from_pretrained(str(free)).tokenizer.sp_model
    weight = load_file(free / "model.safetensors")["transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"]
    assert abs(weight.std().item() - 0.02) < 0.002
    assert "电" not in sp_free.encode_as_pieces("皮卡丘是电属性的宝可梦。")  # merged with a neighbour when free


def test_plot_loss_from_trainer_state(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint-20").mkdir(parents=True)
    history = [{"step": s, "loss": 5.0 / s} for s in range(1, 21)] + [{"step": 20, "eval_loss": 0.4}]
    (run_dir / "checkpoint-20" / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    out = tmp_path / "loss.png"
    r = run("plot_loss.py", run_dir, "--out", out, "--original")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "5.000" in r.stdout and "0.250" in r.stdout
    state = run_dir / "checkpoint-20" / "trainer_state.json"
    assert "is an input file" in error(capsys, plot_loss.main, run_dir, "--out", state)
    assert json.loads(state.read_text())["log_history"] == history  # the log is untouched
    (run_dir / "checkpoint-20" / "trainer_state.json").write_text(json.dumps({"log_history": []}))
    assert "no loss was logged" in error(capsys, plot_loss.main, run_dir, "--out", out)
    assert "trainer_state.json" in error(capsys, plot_loss.main, tmp_path / "empty-dir", "--out", out)


def test_quiz_types_reports_a_figure(tiny_model, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"conversations": [{"role": "user", "content": "皮卡丘和妙蛙种子"}, {"role": "assistant", "content": "好"}]}, ensure_ascii=False) + "\n", encoding="utf-8")
    r = run("quiz_types.py", "--model", tiny_model, "--data", data, "--json", "--show", "2")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert "妙蛙种子是什么属性的？" in r.stdout and "草、毒" in r.stdout
    # The figure is the share of the answers shown as right (both are shown).
    right = sum(line.startswith("✓") for line in r.stdout.splitlines())
    assert summary == {"type_accuracy": 50.0 * right, "pokemon": 2}
    assert "missing.jsonl" in error(capsys, quiz_types.main, "--model", tiny_model, "--data", tmp_path / "missing.jsonl")


@pytest.mark.parametrize("script", ["inference", "evaluate"])
def test_every_script_decodes_greedily_unless_do_sample(script, capsys):
    """One default (cli.add_generation_args): greedy; --do-sample draws with upstream's 0.8/0.8; --greedy (the
    default, kept for the commands written with it) and --do-sample exclude each other."""
    import importlib

    from chatglm3.cli import generation_kwargs

    parser = importlib.import_module(script).build_parser()
    argv = ["--model", "M"] + (["--data", "d.jsonl"] if script == "evaluate" else [])
    assert generation_kwargs(parser.parse_args(argv))["do_sample"] is False
    assert generation_kwargs(parser.parse_args(argv + ["--greedy"]))["do_sample"] is False
    assert generation_kwargs(parser.parse_args(argv + ["--do-sample"])) == {
        "max_new_tokens": parser.get_default("max_new_tokens"), "do_sample": True, "temperature": 0.8, "top_p": 0.8}
    with pytest.raises(SystemExit):
        parser.parse_args(argv + ["--do-sample", "--greedy"])
    assert "not allowed with" in capsys.readouterr().err


def test_inference_answers_repeat_by_default_and_differ_by_seed_when_sampling(tiny_model, capsys):
    import inference

    def answer(*flags):
        assert inference.main(["--model", str(tiny_model), "--prompt", "皮卡丘", "--max-new-tokens", "12", *flags]) == 0
        return capsys.readouterr().out

    assert answer() == answer() == answer("--greedy")
    assert answer("--do-sample", "--seed", "1") == answer("--do-sample", "--seed", "1") != answer("--do-sample", "--seed", "2")
    assert "--temperature" in error(capsys, quiz_types.main, "--model", tiny_model, "--data", DATA / "data.csv",
                                    "--do-sample", "--temperature", "0")


def test_tool_report_mean_and_its_bad_input(tmp_path):
    """scripts/tool_report.py (the tool demo's summary): the mean of the last summary line of each seed; an empty
    summary (a failed evaluation), an --out that is an input (or a hard link to one) or a folder, or a curve of a
    file without steps is one line naming the file, exit 1, inputs intact."""
    report = [sys.executable, str(DEMO.parent / "scripts" / "tool_report.py")]
    a, b, empty = tmp_path / "eval-s0.json", tmp_path / "eval-s1.json", tmp_path / "eval-s2.json"
    a.write_text(json.dumps({"tool_args_exact": 1.0, "tool_answer_grounded": 0.5, "stopped_share": 1.0}) + "\n")
    b.write_text(json.dumps({"tool_args_exact": 0.5, "tool_answer_grounded": 0.25}) + "\n")
    empty.write_text("")
    r = subprocess.run([*report, "mean", a, b], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["tool_args_exact"] == 0.75 and summary["tool_answer_grounded"] == 0.375
    assert summary["stopped_share"] == 1.0 and summary["tool_call_rate"] is None and summary["seeds"] == 2
    linked, folder = tmp_path / "linked.png", tmp_path / "plots"
    os.link(a, linked)
    folder.mkdir()
    cases = ((["mean", a, empty], empty), (["curve", a, "--out", a], a), (["curve", a, "--out", linked], linked),
             (["curve", a, "--out", folder], folder), (["curve", a, "--out", tmp_path / "c.png"], a))  # a: no "step"
    for args, named in cases:
        before = a.read_bytes()
        r = subprocess.run([*report, *map(str, args)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and str(named) in r.stderr
        assert a.read_bytes() == before and empty.read_bytes() == b"" and folder.is_dir()
        assert not (tmp_path / "c.png").exists()


def test_tool_report_table_has_a_row_per_seed_min_mean_max_and_the_copy_step(tmp_path):
    """scripts/tool_report.py table: the per-seed table of a tool_demo.sh folder, written into a docs file between
    its markers; the targets are judged per seed and for the mean."""
    import json

    def summary(args_exact, grounded, false_calls=0.0, stopped=1.0):
        return {"tool_call_rate": 1.0, "tool_false_call_rate": false_calls, "tool_name_accuracy": 1.0,
                "tool_args_exact": args_exact, "tool_answer_grounded": grounded, "answer_types_correct": grounded,
                "type_answer_other_field": round(1 - grounded, 4), "stopped_share": stopped}

    out = tmp_path / "demo"
    out.mkdir()
    for seed, (final, curve) in {0: (summary(1.0, 0.9), [0.0, 0.2, 0.6, 1.0]),
                                 1: (summary(0.96, 0.8), [0.0, 0.0, 0.1, 0.96]),
                                 2: (summary(0.98, 0.95, false_calls=0.05), [0.0, 0.7, 0.9, 0.98])}.items():
        (out / f"eval-s{seed}.json").write_text(json.dumps(final) + "\n", encoding="utf-8")
        (out / f"curve-s{seed}.jsonl").write_text(
            "".join(json.dumps({"step": 250 * (i + 1), **summary(v, v)}) + "\n" for i, v in enumerate(curve)),
            encoding="utf-8")
    doc = tmp_path / "tool_demo.md"
    doc.write_text("a\n<!-- tool-demo-seeds:start -->\nold\n<!-- tool-demo-seeds:end -->\nb\n", encoding="utf-8")
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "tool_report.py"), "table", str(out),
                          "--update-docs", str(doc)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")[1:]]
            for line in run.stdout.splitlines() if line.startswith("| ")}
    assert rows["0"] == ["1.000", "0.900", "0.100", "0.000", "1.000", "750"]
    assert rows["1"][-1] == "1000" and rows["2"][-1] == "500"  # the first step at tool_args_exact >= 0.5
    assert rows["最小 / min"][:2] == ["0.960", "0.800"] and rows["最大 / max"][:2] == ["1.000", "0.950"]
    assert rows["平均 / mean"][1] == "0.883"
    verdict = run.stdout.strip().splitlines()[-1]
    assert "seed 1 tool_answer_grounded" in verdict and "seed 2 tool_false_call_rate" in verdict
    assert "mean tool_answer_grounded" in verdict and "seed 0" not in verdict
    written = doc.read_text(encoding="utf-8")
    assert "old" not in written and "| 0 | 1.000 |" in written and written.startswith("a\n") and written.endswith("b\n")
    empty = subprocess.run([sys.executable, str(REPO / "scripts" / "tool_report.py"), "table", str(tmp_path)],
                           capture_output=True, text=True, timeout=300)
    assert empty.returncode != 0 and "eval-s" in empty.stderr and "Traceback" not in empty.stderr

    # 8 seeds run as two halves: one table from both folders (curves found beside each seed's eval); a seed twice is refused
    other = tmp_path / "demo-b"
    other.mkdir()
    for name in ("eval-s2.json", "curve-s2.jsonl"):
        (out / name).rename(other / name)
    split = subprocess.run([sys.executable, str(REPO / "scripts" / "tool_report.py"), "table", str(out), str(other)],
                           capture_output=True, text=True, timeout=300)
    assert split.returncode == 0 and split.stdout == run.stdout, split.stderr
    (out / "eval-s2.json").write_text((other / "eval-s2.json").read_text(encoding="utf-8"), encoding="utf-8")
    twice = subprocess.run([sys.executable, str(REPO / "scripts" / "tool_report.py"), "table", str(out), str(other)],
                           capture_output=True, text=True, timeout=300)
    assert twice.returncode != 0 and "seed 2 is in both" in twice.stderr and "demo-b" in twice.stderr and "Traceback" not in twice.stderr


def tool_demo(env, timeout=120):
    return subprocess.run(["bash", str(REPO / "scripts" / "tool_demo.sh")], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("setting, named", [
    ({"SEEDS": "0 x"}, "x"), ({"STEPS": "0"}, "STEPS"), ({"THREADS": "two"}, "THREADS"),
    ({"SAVE_EVERY": "1e3"}, "SAVE_EVERY"), ({"SYNTHETIC": "-5"}, "SYNTHETIC"), ({"FROM_STAGE": "3"}, "FROM_STAGE"),
    ({"FROM_STAGE": "4"}, "s0/config.json"),  # no earlier run in that folder
    ({}, "TOOL_DEMO_OUT"),  # a folder with files that no demo wrote is not emptied
])
def test_tool_demo_refuses_bad_settings_in_one_line_before_touching_its_folder_or_the_environment(tmp_path, setting,
                                                                                                 named):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier run's file", encoding="utf-8")
    # No active environment and no usable Python: setup_env.sh would try to create one (and fail), so a refusal that
    # comes first is one line before anything is installed.
    venv = tmp_path / "venv"
    r = tool_demo({"TOOL_DEMO_OUT": str(out), "SEEDS": "0", "VIRTUAL_ENV": "", "VENV_DIR": str(venv),
                   "PYTHON": "false", **setting})
    assert r.returncode == 2 and named in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert (out / "keep.txt").exists()  # refused before stage 1 empties the folder
    assert not venv.exists() and r.stdout == ""


def test_setup_env_sourced_under_newest_does_not_reinstall_an_environment_it_installed(tmp_path):
    """.ci/refresh_lock.sh runs the tests with NEWEST=1 in its own environment; tool_demo.sh sources setup_env.sh
    there, and pip must not run again on every call (it did, and its warnings broke the one-line refusals)."""
    env_dir = tmp_path / "env"
    env_dir.mkdir()
    script = ('echo "$(cat requirements-lock.txt requirements-dev-lock.txt | cksum) $PWD dev=1 newest=1" '
              '> "$VIRTUAL_ENV/.chatglm3-installed"; source ./setup_env.sh; echo sourced')
    r = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "VIRTUAL_ENV": str(env_dir), "NEWEST": "1", "WITH_DEV": "0",
                            "PIP_NO_INDEX": "1"})  # should pip run after all, it installs nothing new
    assert r.returncode == 0 and r.stdout.strip() == "sourced", r.stdout + r.stderr


@pytest.mark.slow
def test_tool_demo_from_stage_evaluates_an_earlier_run_again_without_retraining(tmp_path):
    """A whole (tiny) tool_demo.sh run, then FROM_STAGE=5 on its folder: the checkpoints are evaluated again
    (the curve rewritten, not appended to) and the trained model is left as it was."""
    out = tmp_path / "demo"
    env = {"TOOL_DEMO_OUT": str(out), "SEEDS": "0", "STEPS": "4", "SAVE_EVERY": "2", "SYNTHETIC": "300", "THREADS": "1"}
    first = tool_demo(env, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "[6/6]" in first.stdout and (out / "seeds.md").exists()
    steps = [json.loads(line)["step"] for line in (out / "curve-s0.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(steps) == [2, 4]
    model = out / "s0" / "model.safetensors"
    trained = (model.stat().st_mtime_ns, model.read_bytes())

    again = tool_demo({**env, "FROM_STAGE": "5"}, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "[3/6]" not in again.stdout and "[4/6]" not in again.stdout and "[5/6]" in again.stdout
    steps = [json.loads(line)["step"] for line in (out / "curve-s0.jsonl").read_text(encoding="utf-8").splitlines()]
    assert sorted(steps) == [2, 4]
    assert (model.stat().st_mtime_ns, model.read_bytes()) == trained
    assert (out / "seeds.md").read_text(encoding="utf-8").startswith("| 种子 / seed |")
