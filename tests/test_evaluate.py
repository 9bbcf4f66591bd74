"""evaluate.py, metrics.py and chatglm3.serving.batch_replies: scores, prompts laid out as in training, batched generation, the
script end to end, and bad dev files."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import evaluate
from chatglm3 import ChatGLMTokenizer
from chatglm3.serving.batch_replies import generate_replies
from chatglm3.model.conversation import encode_message, prompt_ids
from chatglm3.checkpoint.loading import load_model_and_tokenizer
from metrics import METRIC_KEYS, compute_metrics, score_pair, segment

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "finetune_chatmodel_demo" / "evaluate.py"


@pytest.fixture(scope="module")
def tiny(shared):
    return shared / "parity" / "tiny-chatglm3"


@pytest.fixture(scope="module")
def dev_file(shared, tmp_path_factory):
    """The reference conversations (system prompts, a tool call, a reply without loss) as a JSONL dev file."""
    path = tmp_path_factory.mktemp("dev") / "dev.jsonl"
    cases = json.loads((shared / "parity" / "cases.json").read_text(encoding="utf-8"))["multiturn"]
    path.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in cases), encoding="utf-8")
    return path


@pytest.mark.parametrize("text", ["皮卡丘是电属性的宝可梦，弱点是地面。", "Pikachu is an Electric type Pokémon"])
def test_identical_texts_of_four_words_or_more_score_100(text):
    assert score_pair(text, text) == {key: 100.0 for key in METRIC_KEYS}


def test_rouge_1_is_the_f_score_of_shared_words_and_empty_predictions_score_0():
    # rouge_chinese (as upstream) counts distinct words: "是" twice in the reference counts once.
    prediction, reference = "皮卡丘是电属性的宝可梦。", "皮卡丘是一只电属性宝可梦，弱点是地面。"
    pred_words, ref_words = set(segment(prediction)), set(segment(reference))
    partial = score_pair(prediction, reference)
    assert partial["rouge-1"] == round(200 * len(pred_words & ref_words) / (len(pred_words) + len(ref_words)), 4)
    assert 0 < partial["bleu-4"] < partial["rouge-1"]  # no 4-gram in common: smoothed BLEU-4 lies below
    assert score_pair("", "皮卡丘是电属性的宝可梦。") == {key: 0.0 for key in METRIC_KEYS}
    assert score_pair("  \n", "") == {key: 100.0 for key in METRIC_KEYS}
    assert score_pair("今天天气晴朗", "皮卡丘是电属性的宝可梦。")["rouge-1"] == 0.0

    text = "杰尼龟的属性是水，弱点是草和电。"
    summary = compute_metrics([text, ""], [text, text])
    assert summary == {"rouge-1": 50.0, "rouge-2": 50.0, "rouge-l": 50.0, "bleu-4": 50.0, "samples": 2}
    with pytest.raises(ValueError):
        compute_metrics([], [])


def test_prompts_are_the_training_ids_up_to_each_reply(shared, dev_file):
    """The prompt for each scored reply is exactly the start of the upstream training ids of its conversation."""
    tokenizer = ChatGLMTokenizer.from_pretrained(str(shared / "chatglm3-tokenizer"))
    golden = json.loads((shared / "parity" / "tokenizer_golden.json").read_text(encoding="utf-8"))["multiturn"]
    samples = evaluate.load_samples(str(dev_file))
    # Every assistant reply except the one with "loss": false (4th conversation, first reply).
    assert [(s.location.rsplit(":", 1)[1], s.turn) for s in samples] == [
        ("1", 2), ("1", 4), ("2", 1), ("2", 3), ("3", 5), ("4", 3)]
    for sample in samples:
        case = golden[int(sample.location.rsplit(":", 1)[1]) - 1]
        prompt = prompt_ids(tokenizer, sample.history)
        assert prompt == case["input_ids"][:len(prompt)]
        assert prompt[-1] == tokenizer.get_command("<|assistant|>")
        reply = encode_message(tokenizer, "assistant", "", sample.reference)[1:]
        assert case["input_ids"][len(prompt):len(prompt) + len(reply)] == reply


@pytest.mark.parametrize("ptuning", [False, True], ids=["base", "ptuning"])
def test_batched_left_padded_generation_equals_one_prompt_at_a_time(tiny, shared, dev_file, ptuning):
    pt = str(shared / "parity" / "tiny-ptuning") if ptuning else None
    model, tokenizer = load_model_and_tokenizer(str(tiny), pt_checkpoint=pt, device="cpu")
    prompts = [prompt_ids(tokenizer, s.history) for s in evaluate.load_samples(str(dev_file))]
    assert len({len(p) for p in prompts}) > 1  # different lengths, so batches are padded
    kwargs = {"max_new_tokens": 6, "do_sample": False}
    one_by_one = generate_replies(model, tokenizer, prompts, 1, kwargs, progress=False)
    batched = generate_replies(model, tokenizer, prompts, 4, kwargs, progress=False)
    assert batched == one_by_one
    assert all(isinstance(r, str) for r in batched)


def test_evaluate_script_prints_a_json_summary_and_writes_predictions(tiny, dev_file, tmp_path):
    output = tmp_path / "out" / "predictions.jsonl"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--data", str(dev_file), "--model", str(tiny), "--max-new-tokens", "6",
         "--batch-size", "3", "--max-samples", "4", "--output", str(output)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(summary) == {*METRIC_KEYS, "samples"} and summary["samples"] == 4
    assert "first 4 of 6" in result.stderr and "device cpu" in result.stderr
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [r["reference"] for r in records] == [s.reference for s in evaluate.load_samples(str(dev_file))][:4]
    assert all({"prediction", "reference", "query", "location", *METRIC_KEYS} <= set(r) for r in records)
    assert summary == compute_metrics([r["prediction"] for r in records], [r["reference"] for r in records])


def test_bad_dev_files_give_a_clear_error(tiny, tmp_path, capsys):
    def error(content: str) -> str:
        path = tmp_path / "dev.jsonl"
        path.write_text(content, encoding="utf-8")
        code = evaluate.main(["--data", str(path), "--model", str(tiny), "--output", str(tmp_path / "p.jsonl")])
        err = capsys.readouterr().err
        assert code != 0, err
        return err

    good = json.dumps({"conversations": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]},
                      ensure_ascii=False)
    assert "no samples" in error("")
    assert "dev.jsonl:2" in error(good + "\n" + json.dumps({"prompt": "你好", "response": "你好！"}) + "\n")
    assert "dev.jsonl:2" in error(good + "\n" + '{"conversations": [\n')
    assert "dev.jsonl:1" in error(json.dumps({"conversations": [{"role": "user", "content": 3}]}) + "\n")
    assert "no assistant reply" in error(json.dumps({"conversations": [{"role": "user", "content": "你好"}]}) + "\n")
    code = evaluate.main(["--data", str(tmp_path / "missing.jsonl"), "--model", str(tiny)])
    assert code != 0 and "not found" in capsys.readouterr().err
    assert not (tmp_path / "p.jsonl").exists()
