"""Correctness of the benchmarks (not their speed): every strategy trains the same samples, packed loss equals
unpacked loss, and the scripts run end to end with the documented output."""
import argparse
import io
import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import _common  # noqa: E402
import _docs  # noqa: E402
import bench_memory  # noqa: E402
import bench_train  # noqa: E402
from chatglm3 import ChatGLMError, ChatGLMForConditionalGeneration, ChatGLMTokenizer  # noqa: E402
from preprocess_utils import build_dataset  # noqa: E402

MAX_LEN = 256
TINY_SHAPE = ["--layers", "1", "--hidden", "32", "--heads", "2", "--kv-channels", "16", "--kv-groups", "1", "--ffn", "64"]


@pytest.fixture(scope="module")
def pokemon_jsonl(tmp_path_factory) -> Path:
    """The Pokémon conversations, produced by the data pipeline exactly as bench_train.py does without --data."""
    return _common.pokemon_conversations(tmp_path_factory.mktemp("pokemon"))


@pytest.fixture(scope="module")
def tiny(tiny_model, pokemon_jsonl):
    tokenizer = ChatGLMTokenizer.from_pretrained(str(tiny_model))
    items = build_dataset(pokemon_jsonl, tokenizer, max_seq_length=MAX_LEN, verbose=False).items
    return tokenizer, items


def samples_in(batches) -> Counter:
    """Each (input_ids, labels) sequence the batches hold, recovered from the tensors: the non-padding positions
    of every row, split by packing segment id."""
    found = Counter()
    for batch in batches:
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            for segment in mask.unique().tolist():
                if segment > 0:
                    keep = mask == segment
                    found[(tuple(ids[keep].tolist()), tuple(labels[keep].tolist()))] += 1
    return found


def test_every_strategy_trains_each_sample_exactly_once(tiny):
    tokenizer, items = tiny
    expected = Counter((tuple(item["input_ids"]), tuple(item["labels"])) for item in items)
    assert len(items) > 100 and sum(expected.values()) == len(items)
    padding = {}
    for strategy in bench_train.STRATEGIES:
        batches = bench_train.epoch_batches(strategy, items, tokenizer, batch_size=4, max_seq_length=MAX_LEN, seed=0)
        assert samples_in(batches) == expected, strategy
        assert all(b["input_ids"].shape[0] <= 4 for b in batches)
        widths = {b["input_ids"].shape[1] for b in batches}
        if strategy.startswith("pad_to_max"):
            assert widths == {MAX_LEN}
        else:
            assert all(w % 8 == 0 and w <= MAX_LEN for w in widths), (strategy, widths)
        counts = [bench_train.batch_counts(b) for b in batches]
        padding[strategy] = 1 - sum(c["useful"] for c in counts) / sum(c["padded"] for c in counts)
    # What each strategy is for: less padding than the one before it.
    assert padding["pad_to_max"] > padding["dynamic"] > padding["grouped"] > padding["packing"]
    assert len(bench_train.epoch_batches("packing", items, tokenizer, 4, MAX_LEN)) < len(items) / 4


def test_spread_covers_the_epoch():
    assert bench_train.spread(38, 8) == [0, 4, 9, 14, 19, 23, 28, 33]
    assert bench_train.spread(3, 5) == [0, 1, 2, 0, 1]


def test_packed_loss_equals_unpacked(tiny, tiny_model):
    tokenizer, items = tiny
    items = items[:12]
    model = ChatGLMForConditionalGeneration.from_pretrained(str(tiny_model), pre_seq_len=8)
    torch.manual_seed(1)
    with torch.no_grad():  # a prefix that matters, whatever the fresh encoder's initial values
        model.transformer.prefix_encoder.embedding.weight.normal_(std=0.5)
    model.eval()  # no prefix dropout: the runs must compute the same function

    def loss_and_prefix_grad(strategy):
        (batch,) = bench_train.epoch_batches(strategy, items, tokenizer, batch_size=len(items), max_seq_length=MAX_LEN)
        model.zero_grad()
        loss = bench_train.strategy_loss(strategy, model, batch)
        loss.backward()
        return loss.item(), model.transformer.prefix_encoder.embedding.weight.grad.clone(), batch

    packed, packed_grad, packed_batch = loss_and_prefix_grad("packing")
    unpacked, unpacked_grad, _ = loss_and_prefix_grad("dynamic")
    upstream, upstream_grad, _ = loss_and_prefix_grad("pad_to_max")
    assert packed_batch["input_ids"].shape[0] < len(items)  # several conversations did share rows
    assert int(packed_batch["attention_mask"].max()) > 1
    assert math.isfinite(packed) and abs(packed - unpacked) < 1e-5
    assert abs(upstream - unpacked) < 1e-5  # the upstream-style loss of the baseline is the same quantity
    torch.testing.assert_close(packed_grad, unpacked_grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(upstream_grad, unpacked_grad, rtol=1e-4, atol=1e-6)
    assert unpacked_grad.abs().sum() > 0


def run(script, *args, timeout=600):
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, cwd=REPO, timeout=timeout)


@pytest.mark.slow
def test_bench_train_json_smoke(shared, pokemon_jsonl):
    result = run("bench_train.py", "--tokenizer", str(shared / "chatglm3-tokenizer"), "--data", str(pokemon_jsonl),
                 *TINY_SHAPE, "--batch-size", "2", "--max-seq-length", "128", "--max-samples", "12", "--pre-seq-len", "4",
                 "--warmup", "1", "--steps", "1", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert list(report) == list(bench_train.STRATEGIES)
    for name, row in report.items():
        assert set(bench_train.JSON_KEYS) <= set(row), name
        assert row["useful_tokens_per_s"] > 0 and row["padded_tokens_per_s"] >= row["useful_tokens_per_s"], name
        assert 0 <= row["padding_share"] < 1 and row["peak_mem_mb"] > 0 and math.isfinite(row["loss"]), name
    assert report["pad_to_max"]["ratio_to_pad_to_max"] == 1.0
    assert "pad_to_max" in result.stdout and "upstream" in result.stdout  # the table says how the baseline's loss is computed


def test_bench_train_bad_inputs_say_what_to_do(tmp_path, pokemon_jsonl, capsys):
    # The script prints a ChatGLMError's message and exits 2; a bad flag is argparse's exit 2.
    with pytest.raises(ChatGLMError, match="tokenizer.model.*--tokenizer"):
        bench_train.main(["--tokenizer", str(tmp_path), "--data", str(pokemon_jsonl)])
    with pytest.raises(SystemExit) as exit_:
        bench_train.main(["--strategies", "dynamic,fastest"])
    assert exit_.value.code == 2 and "fastest" in capsys.readouterr().err


def test_bench_generate_cache_matches_no_cache(shared):
    # Exit 0 means the KV-cache and the re-run-everything decodes produced the same tokens, left padding included.
    result = run("bench_generate.py", "--tokenizer", str(shared / "chatglm3-tokenizer"), *TINY_SHAPE,
                 "--new-tokens", "4", "--repeats", "1", "--batch-sizes", "1,3", "--pre-seq-len", "4", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report) == {"batch1_kv_cache", "batch1_no_cache", "batch3_kv_cache", "batch3_no_cache"}
    assert all(r["same_tokens_as_no_cache"] and r["decode_tokens_per_s"] > 0 and r["ttft_ms"] > 0 for r in report.values())


@pytest.mark.slow
def test_gpu_bench_dry_run():
    result = subprocess.run(["bash", str(BENCH / "gpu_bench.sh"), "--dry-run"], capture_output=True, text=True, cwd=REPO,
                            timeout=600, env={**__import__("os").environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    rows = report["rows"]
    assert [(r.get("method"), r.get("strategy")) for r in rows[:6]] == [
        *(("P-Tuning v2", s) for s in ("pad_to_max", "dynamic", "grouped", "packing")), ("LoRA", "dynamic"), ("LoRA", "packing")]
    assert all(not r["oom"] and r["useful_tokens_per_s"] > 0 and 0 <= r["mfu"] < 1 and math.isfinite(r["loss"]) for r in rows[:6])
    assert [r["batch"] for r in rows[6:]] == [1, 16]
    assert all(r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in rows[6:])
    # One Markdown table: a header, its rule, a row per training run and two per generation batch size.
    tables = "\n".join(lines[:-1]).split("\n\n")
    table = [line for line in next(t for t in tables if "| run |" in t).splitlines() if line.startswith("|")]
    assert len(table) == 2 + 6 + 4 and table[1].startswith("| ---") and "1.00×" in table[2]
    # Then bench_memory.py's rows (its tiny shape in a dry run), each run to the end, its table printed too.
    memory = report["memory"]["rows"]
    assert list(memory) == ["chat_bf16", "lora_bf16"] and all(r["ok"] and r["peak_gb"] > 0 for r in memory.values()), memory
    assert memory["chat_bf16"]["new_tokens"] == 3 and len(memory["lora_bf16"]["losses"]) == 2
    assert "memory needed" in result.stdout and "| LoRA r8, bf16 |" in result.stdout



@pytest.mark.slow
def test_bench_memory_tiny_rows_write_the_table(shared, tmp_path):
    # The real harness end to end at the tiny shape: the random model written in the official layout, each row
    # in a fresh process through the project's entry points (a chat through the loader and generation loop, a
    # LoRA merge through scripts/export.py), the peaks measured, the table written.
    model_dir, out = tmp_path / "model", tmp_path / "results" / "memory.md"
    result = run("bench_memory.py", "--shape", "tiny", "--model-dir", str(model_dir), "--tokenizer",
                 str(shared / "chatglm3-tokenizer"), "--rows", "chat_bf16,export_merge", "--new-tokens", "3",
                 "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    chat, export = summary["rows"]["chat_bf16"], summary["rows"]["export_merge"]
    assert chat["ok"] and export["ok"], summary["rows"]
    assert chat["new_tokens"] == 3 and chat["tokens_per_s"] > 0 and chat["first_token_s"] > 0
    assert chat["peak_gb"] >= chat["rss_after_load_gb"] > 0 and export["peak_gb"] > 0 and export["output_gb"] > 0
    assert summary["context"]["sample_tokens"] == [bench_memory.SEQ_LEN] * 4  # every training sample is 512 tokens
    # The official layout: shards + index + config + the tokenizer; it loads, in bf16, with the tiny shape.
    assert {"model.safetensors.index.json", "config.json", "tokenizer.model", "bench_memory.json"} <= {p.name for p in model_dir.iterdir()}
    model = ChatGLMForConditionalGeneration.from_pretrained(str(model_dir), dtype="auto")
    assert model.dtype == torch.bfloat16 and model.config.num_layers == 2 and model.config.padded_vocab_size == 65024
    table = out.read_text(encoding="utf-8")
    assert table == result.stdout.strip().rsplit("\n", 1)[0].strip() + "\n"
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 2 + 2 and "ran to the end" in rows[2] and "ran to the end" in rows[3]
    assert "python benchmarks/bench_memory.py --shape tiny" in table and "cores" in table
    # A second run finds the model complete and does not write it again.
    again = run("bench_memory.py", "--shape", "tiny", "--model-dir", str(model_dir), "--tokenizer", str(shared / "chatglm3-tokenizer"),
                "--rows", "load", "--out", str(out))
    assert again.returncode == 0 and "already written" in again.stderr, again.stderr


def test_bench_memory_failures_are_one_line():
    # A launcher ignores an unknown variable, so a row whose variable it does not read is refused, not mis-measured.
    row = bench_memory.Row("x", "x", "train", launcher="finetune_lora.sh", env={"NO_SUCH_SETTING": "4"})
    assert "NO_SUCH_SETTING" in bench_memory.precheck(row)
    # The reason of a failed training row is its own last line, not the launcher's summary after it.
    log = "loading ...\n错误：内存不够 / Error: not enough memory\n训练失败，退出码 1 / Training failed with exit status 1\n"
    assert bench_memory.failure_reason(log, 1) == "错误：内存不够 / Error: not enough memory"
    assert "out of memory" in bench_memory.failure_reason("", -9)


def test_bench_memory_bad_flags_and_docs_markers(tmp_path, capsys):
    assert bench_memory.main(["--rows", "chat_bf16,chat_2bit"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "chat_2bit" in err and err.startswith("错误")
    # --update-docs puts the table between the memory-table markers; --update-readme, the old name, still works.
    assert bench_memory.parse_args(["--update-readme"]).update_docs and bench_memory.parse_args(["--update-docs"]).update_docs
    assert bench_memory.command_line(bench_memory.parse_args(["--update-readme"])).endswith("--update-docs")
    start, end = _docs.markers(bench_memory.MARKER)
    doc = tmp_path / "performance.md"
    doc.write_text(f"before\n{start}\nold table\n{end}\nafter\n", encoding="utf-8")
    bench_memory.update_docs("| new | table |\n", doc)
    assert doc.read_text(encoding="utf-8") == f"before\n{start}\n| new | table |\n{end}\nafter\n"
    for broken in ("no markers\n", f"{end}\n{start}\n", f"{start}\n{end}\n{start}\n{end}\n"):
        doc.write_text(broken, encoding="utf-8")
        with pytest.raises(bench_memory.BenchError, match="memory-table"):
            bench_memory.update_docs("| t |\n", doc)
        assert doc.read_text(encoding="utf-8") == broken  # a refused update writes nothing


def test_every_update_docs_marker_is_in_the_docs_once():
    # Each script's --update-docs names a block of docs/performance.md: a pair of markers, present exactly once.
    text = _docs.PERFORMANCE.read_text(encoding="utf-8")
    for name in (bench_memory.MARKER, "bench-train", "bench-generate", "bench-gguf", "bench-server", "gpu-bench"):
        start, end = _docs.markers(name)
        assert text.count(start) == 1 and text.count(end) == 1 and text.index(start) < text.index(end), name


def test_bench_generate_update_docs_writes_its_table(shared, tmp_path, monkeypatch, capsys):
    # The real script, in-process, with --update-docs: what it printed (less the JSON line), headed by the command,
    # replaces its block of a copy of docs/performance.md; nothing outside the markers changes.
    doc = tmp_path / "performance.md"
    doc.write_text(_docs.PERFORMANCE.read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setattr(_docs, "PERFORMANCE", doc)
    import bench_generate

    argv = ["--tokenizer", str(shared / "chatglm3-tokenizer"), *TINY_SHAPE, "--new-tokens", "3", "--repeats", "1",
            "--batch-sizes", "1", "--json", "--update-docs"]
    bench_generate.main(argv)
    printed = capsys.readouterr().out.strip().splitlines()
    start, end = _docs.markers("bench-generate")
    text = doc.read_text(encoding="utf-8")
    block = text[text.index(start) + len(start):text.index(end)].strip().splitlines()
    assert block[0] == "```" and block[-1] == "```"
    assert block[1] == "$ python benchmarks/bench_generate.py " + " ".join(argv)
    assert block[2:-1] == printed[:-1] and printed[-1].startswith("{")  # the table, not the JSON line
    assert any(line.startswith("batch1_kv_cache") for line in block)
    before = (REPO / "docs" / "performance.md").read_text(encoding="utf-8")
    assert text[:text.index(start)] == before[:before.index(start)] and text[text.index(end):] == before[before.index(end):]


def test_markdown_reports_keep_their_table_and_list_their_header_lines(tmp_path, monkeypatch, capsys):
    start, end = _docs.markers("bench-server")
    doc = tmp_path / "performance.md"
    doc.write_text(f"x\n{start}\nold\n{end}\n", encoding="utf-8")
    monkeypatch.setattr(_docs, "PERFORMANCE", doc)
    args = argparse.Namespace(update_docs=True, json=False)
    recorder = _docs.Recorder("bench-server", args, "bench_server.py", ["--rounds", "5"], markdown=True)
    print("# machine line")
    print("| a | b |\n|---|---|\n| 1 | 2 |")
    recorder.publish()
    assert capsys.readouterr().out.startswith("# machine line")  # printed as usual
    assert doc.read_text(encoding="utf-8") == (f"x\n{start}\n`python benchmarks/bench_server.py --rounds 5`\n\n- machine line\n"
                                               f"| a | b |\n|---|---|\n| 1 | 2 |\n{end}\n")


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_bench_memory_heartbeat_quiet_in_a_log_redrawn_on_a_terminal():
    # A log (not a terminal): nothing in the first 10 s, then one plain line every 30 s, never a carriage return.
    log = io.StringIO()
    beat = bench_memory.Heartbeat(log)
    for second in range(0, 75):
        beat.beat(second, f"[2/9] lora_bf16: {second} s")
    beat.done()
    assert log.getvalue() == "[2/9] lora_bf16: 10 s\n[2/9] lora_bf16: 40 s\n[2/9] lora_bf16: 70 s\n"
    # A terminal: the same status redrawn in place every 2 s after 10 s, and cleared when the row ends.
    terminal = _Terminal()
    beat = bench_memory.Heartbeat(terminal)
    for second in range(0, 15):
        beat.beat(second, f"s{second}")
    beat.done()
    assert terminal.getvalue() == "\rs10\033[K\rs12\033[K\rs14\033[K\r\033[K" and "\n" not in terminal.getvalue()


def test_bench_memory_row_status_names_the_row_and_the_time_left(tmp_path):
    # A real child in its own process group: while it runs, the heartbeat line names the row, the time left by the
    # estimates, the elapsed seconds and the tree's resident memory.
    log, out = tmp_path / "row.log", io.StringIO()
    result = bench_memory.run_measured([sys.executable, "-c", "import time; time.sleep(1.5)"], dict(__import__("os").environ),
                                       log, lambda elapsed: f"[1/2] load: about {bench_memory.minutes(30 - elapsed)} left",
                                       bench_memory.Heartbeat(out, first=0.5, log_every=0.5))
    assert result["returncode"] == 0 and result["seconds"] >= 1.5 and result["peak_gb"] > 0
    lines = out.getvalue().splitlines()
    assert lines and all(line.startswith("    [1/2] load: about ") and " s left, " in line and "RSS" in line for line in lines)


def test_gpu_bench_dry_run_figures_stay_out_of_the_docs(capsys):
    # --dry-run measures a tiny shape on the CPU: refused with --update-docs before anything runs.
    import gpu_bench

    with pytest.raises(SystemExit) as exit_:
        gpu_bench.main(["--dry-run", "--update-docs"])
    assert exit_.value.code == 2 and "--dry-run" in capsys.readouterr().err


def test_bench_precision_pairs_fp32_and_bf16_on_one_model(tmp_path):
    """The paired precision benchmark at a toy shape: every method trains in both precisions from the same weights
    on the same batches (equal first losses), the curves stay close, and --update-docs writes its table."""
    docs = tmp_path / "training.md"
    docs.write_text("x\n<!-- precision-table:start -->\nold\n<!-- precision-table:end -->\ny\n", encoding="utf-8")
    code = ("import sys, bench_precision; bench_precision.DOCS = __import__('pathlib').Path(sys.argv[1]); "
            "sys.exit(bench_precision.main(sys.argv[2:]))")
    result = subprocess.run([sys.executable, "-c", code, str(docs), "--layers", "1", "--hidden", "64", "--heads", "4",
                             "--kv-channels", "16", "--ffn", "128", "--vocab", "1024", "--steps", "3", "--pairs", "1",
                             "--seq", "32", "--pre-seq-len", "4", "--update-docs"],
                            capture_output=True, text=True, timeout=600, cwd=BENCH)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and " s |" in line]
    assert len(rows) == 3
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        fp32_first, bf16_first = cells[4].split(" → ")[0], cells[5].split(" → ")[0]
        assert fp32_first == bf16_first or abs(float(fp32_first) - float(bf16_first)) < 0.02
        assert float(cells[6]) < 0.05
    written = docs.read_text(encoding="utf-8")
    assert "old" not in written and "bench_precision.py" in written and written.count("| ") >= 3 * 7
    bad = subprocess.run([sys.executable, str(BENCH / "bench_precision.py"), "--methods", "dora"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--methods" in bad.stderr and "Traceback" not in bad.stderr
