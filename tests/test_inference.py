"""inference.py: piped multi-turn chat with history, --prompt, P-Tuning pick-up, history trimming, the tool loop
and bad input, on tiny models."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import inference
from chatglm3 import ChatGLMError, ChatGLMTokenizer, process_response

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "finetune_chatmodel_demo" / "inference.py"


def run_script(*args, stdin=""):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=300, cwd=REPO)


def debug_ids(stderr: str):
    return [json.loads(line.split("input_ids:", 1)[1]) for line in stderr.splitlines() if "input_ids:" in line]


@pytest.fixture(scope="module")
def tiny(shared):
    return shared / "parity" / "tiny-chatglm3"


@pytest.fixture(scope="module")
def tokenizer(shared):
    return ChatGLMTokenizer.from_pretrained(str(shared / "chatglm3-tokenizer"))


def test_piped_turns_answer_each_line_keep_history_and_survive_bad_lines(tiny, tokenizer):
    # An empty line is not a turn; an overlong line fails alone (seq_length 256) and the chat goes on.
    # No --device: the CPU is picked on this machine.
    overlong = "皮卡丘" * 300
    result = run_script("--model", tiny, "--greedy", "--max-new-tokens", 8, "--verbose",
                        stdin=f"皮卡丘是什么属性？\n\n{overlong}\n那它的弱点呢？\n")
    assert result.returncode == 1, result.stderr  # one turn failed: scripts can tell
    assert "prompt too long" in result.stderr and "Traceback" not in result.stderr
    answers = result.stdout.splitlines()
    assert len(answers) == 2 and all(a.startswith(inference.ANSWER_PREFIX) for a in answers), result.stdout
    assert "device cpu" in result.stderr and "float32" in result.stderr
    first, second = debug_ids(result.stderr)
    assert first == tokenizer.build_chat_input("皮卡丘是什么属性？")["input_ids"][0].tolist()
    # The second prompt is the first one, the first answer, then the new question (the failed turn left no trace).
    assert second[:len(first)] == first
    assert second.count(tokenizer.get_command("<|user|>")) == 2
    tail = tokenizer.build_single_message("user", "", "那它的弱点呢？") + [tokenizer.get_command("<|assistant|>")]
    assert second[-len(tail):] == tail


def test_prompt_mode_reads_the_ptuning_config(tiny, shared):
    pt = shared / "parity" / "tiny-ptuning"
    result = run_script("--model", tiny, "--pt-checkpoint", pt, "--prompt", "你好", "--max-new-tokens", 5, "--greedy")
    assert result.returncode == 0, result.stderr
    assert "pre_seq_len 4" in result.stderr
    assert result.stdout.startswith(inference.ANSWER_PREFIX) and len(result.stdout.splitlines()) >= 1


def test_bad_model_flags_give_a_clear_error(tiny, shared, tmp_path, capsys):
    def error(*argv):
        code = inference.main(["--prompt", "你好", "--max-new-tokens", "2", *map(str, argv)])  # later flags win
        err = capsys.readouterr().err
        assert code != 0, err
        return err

    assert "disagrees" in error("--model", tiny, "--pt-checkpoint", shared / "parity" / "tiny-ptuning",
                                "--pt-pre-seq-len", 8)
    assert "--pt-checkpoint" in error("--model", tiny, "--pt-pre-seq-len", 4)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny / "config.json").read_text(encoding="utf-8"), encoding="utf-8")
    assert "no weights" in error("--model", no_weights, "--tokenizer", tiny)
    assert "not found" in error("--model", tmp_path / "missing")
    if not torch.cuda.is_available():
        assert "CUDA" in error("--model", tiny, "--device", "cuda")
    assert "empty" in error("--model", tiny, "--prompt", "  ")
    assert "top-p" in error("--model", tiny, "--top-p", 0)
    assert "not found" in error("--model", tiny, "--tools", tmp_path / "missing.csv")


def test_tokenizer_that_does_not_fit_the_model_is_an_error(tiny_model, shared, capsys):
    # The tiny model has a small vocabulary; the real ChatGLM3 tokenizer has 64,798 tokens.
    code = inference.main(["--model", str(tiny_model), "--tokenizer", str(shared / "chatglm3-tokenizer"),
                           "--prompt", "你好"])
    assert code != 0
    assert "tokenizer" in capsys.readouterr().err


def _history(turns):
    history = [{"role": "system", "content": "你是宝可梦图鉴。"}]
    for question, answer in turns:
        history += [{"role": "user", "content": question}, {"role": "assistant", "metadata": "", "content": answer}]
    return history


def test_trim_history_drops_oldest_turns_and_keeps_the_system_prompt(tokenizer):
    turns = [("皮卡丘是什么属性？", "电属性。"), ("它的弱点呢？", "地面。"), ("杰尼龟呢？", "水属性，弱点是草和电。")]
    history = _history(turns)
    query = "妙蛙种子呢？"
    full = len(inference.prompt_ids(tokenizer, query, history))
    assert inference.trim_history(tokenizer, query, history, "user", full) is history

    kept_last = _history(turns[-1:])
    limit = len(inference.prompt_ids(tokenizer, query, kept_last))
    assert inference.trim_history(tokenizer, query, history, "user", limit) == kept_last
    assert inference.trim_history(tokenizer, query, history, "user", limit - 1) == _history([])

    alone = len(inference.prompt_ids(tokenizer, query, _history([])))
    with pytest.raises(ChatGLMError, match="prompt too long"):
        inference.trim_history(tokenizer, query, history, "user", alone - 1)


def test_trim_history_keeps_the_current_turn_while_answering_an_observation(tokenizer):
    history = _history([("皮卡丘是什么属性？", "电属性。")]) + [
        {"role": "user", "content": "查一下胖丁"},
        {"role": "assistant", "metadata": "pokedex_lookup", "content": "```python\ntool_call(name='胖丁')\n```"},
    ]
    observation = json.dumps({"name": "胖丁"}, ensure_ascii=False)
    current = [history[0]] + history[3:]
    limit = len(inference.prompt_ids(tokenizer, observation, current, "observation"))
    assert inference.trim_history(tokenizer, observation, history, "observation", limit) == current
    with pytest.raises(ChatGLMError):
        inference.trim_history(tokenizer, observation, history, "observation", limit - 1)


def test_initial_history_puts_the_tool_system_message_first(tokenizer):
    tools = [{"name": "pokedex_lookup", "parameters": {"type": "object"}}]
    history = inference.initial_history("你是宝可梦图鉴。", tools)
    assert history[0] == {"role": "system", "content": inference.TOOL_SYSTEM_PROMPT, "tools": tools}
    assert history[1] == {"role": "system", "content": "你是宝可梦图鉴。"}
    assert inference.initial_history(None, None) == []
