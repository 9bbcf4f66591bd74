"""inference.py: piped multi-turn chat with history, --prompt, P-Tuning pick-up, history trimming, the tool loop
and bad input, on tiny models."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import inference
from chatglm3 import ChatGLMError, ChatGLMTokenizer
from chatglm3.model.conversation import encode_message, prompt_ids, tool_system_message
from chatglm3.checkpoint.loading import load_model_and_tokenizer
from chatglm3.serving.tool_loop import execute
from chatglm3.tools import load_tool_files
from pokedex import POKEDEX_TOOL

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "finetune_chatmodel_demo" / "inference.py"
BUNDLED_TABLE = REPO / "data_processing" / "data.csv"
POKEDEX_PLUGIN = REPO / "data_processing" / "pokedex_tool.py"


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
    assert first == prompt_ids(tokenizer, [], "皮卡丘是什么属性？")
    # The second prompt is the first one, the first answer, then the new question (the failed turn left no trace).
    assert second[:len(first)] == first
    assert second.count(tokenizer.get_command("<|user|>")) == 2
    tail = encode_message(tokenizer, "user", "", "那它的弱点呢？") + [tokenizer.get_command("<|assistant|>")]
    assert second[-len(tail):] == tail


def test_prompt_mode_reads_the_ptuning_config_and_offers_the_tool(tiny, shared, tokenizer, capsys):
    pt = shared / "parity" / "tiny-ptuning"
    code = inference.main(["--model", str(tiny), "--pt-checkpoint", str(pt), "--prompt", "皮卡丘是什么属性？",
                           "--max-new-tokens", "5", "--greedy", "--tools", str(POKEDEX_PLUGIN), "--verbose"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "pre_seq_len 4" in err
    assert out.startswith(inference.ANSWER_PREFIX)
    # The system message carries the pokedex_lookup tool as the tool-calling training samples do.
    assert debug_ids(err)[0] == prompt_ids(tokenizer, [tool_system_message([POKEDEX_TOOL])], "皮卡丘是什么属性？")


@pytest.mark.slow
def test_interactive_chat_in_a_terminal(tiny, tokenizer):
    import os
    import pty

    controller, terminal = pty.openpty()
    process = subprocess.Popen([sys.executable, str(SCRIPT), "--model", str(tiny), "--max-new-tokens", "4",
                                "--verbose"], stdin=terminal, stdout=terminal, stderr=terminal, cwd=REPO)
    os.close(terminal)
    os.write(controller, "你好\n\nclear\n那你呢\nexit\n".encode())  # typed ahead; the terminal buffers it
    output = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the script exited and closed the terminal
            break
        if not chunk:
            break
        output += chunk
    os.close(controller)
    assert process.wait(timeout=300) == 0
    text = output.decode("utf-8", "replace")
    assert text.count(inference.ANSWER_PREFIX) == 2
    assert "Started a new conversation" in text and "empty lines are ignored" in text
    # After `clear` the second question starts a fresh conversation.
    assert debug_ids(text)[1] == prompt_ids(tokenizer, [], "那你呢")


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
    assert str(tmp_path / "missing") in error("--model", tmp_path / "missing")
    if not torch.cuda.is_available():
        assert "CUDA" in error("--model", tiny, "--device", "cuda")
    assert "empty" in error("--model", tiny, "--prompt", "  ")
    assert "top-p" in error("--model", tiny, "--top-p", 0)
    assert "not found" in error("--model", tiny, "--tools", tmp_path / "missing.py")


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
    full = len(prompt_ids(tokenizer, history, query))
    assert inference.trim_history(tokenizer, query, history, "user", full) is history

    kept_last = _history(turns[-1:])
    limit = len(prompt_ids(tokenizer, kept_last, query))
    assert inference.trim_history(tokenizer, query, history, "user", limit) == kept_last
    assert inference.trim_history(tokenizer, query, history, "user", limit - 1) == _history([])

    alone = len(prompt_ids(tokenizer, _history([]), query))
    with pytest.raises(ChatGLMError, match="prompt too long"):
        inference.trim_history(tokenizer, query, history, "user", alone - 1)


def test_trim_history_keeps_the_current_turn_while_answering_an_observation(tokenizer):
    history = _history([("皮卡丘是什么属性？", "电属性。")]) + [
        {"role": "user", "content": "查一下胖丁"},
        {"role": "assistant", "metadata": "pokedex_lookup", "content": "```python\ntool_call(name='胖丁')\n```"},
    ]
    observation = json.dumps({"name": "胖丁"}, ensure_ascii=False)
    current = [history[0]] + history[3:]
    limit = len(prompt_ids(tokenizer, current, observation, "observation"))
    assert inference.trim_history(tokenizer, observation, history, "observation", limit) == current
    with pytest.raises(ChatGLMError):
        inference.trim_history(tokenizer, observation, history, "observation", limit - 1)


def test_initial_history_puts_the_tool_system_message_first(tokenizer):
    tools = [{"name": "pokedex_lookup", "parameters": {"type": "object"}}]
    history = inference.initial_history("你是宝可梦图鉴。", tools)
    assert history[0] == tool_system_message(tools)
    assert history[1] == {"role": "system", "content": "你是宝可梦图鉴。"}
    assert inference.initial_history(None, None) == []


# --- the pokedex_lookup tool ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pokedex():
    return load_tool_files([POKEDEX_PLUGIN]).tools


def _tool_calling_model(shared, call_text=None):
    """The reference tiny model rewired into a bigram machine that always answers a tool call then <|observation|>
    (by default "pokedex_lookup\\n tool_call(name='皮卡丘')"; `call_text`: another call, tokenized as the tokenizer
    does): every layer's output projection is zeroed, so each position's logits depend on its own token only, and
    the output layer maps each token of that reply to the next one. (A repeated "_" is the byte token <0x5F>, so
    that no token repeats.)"""
    model, tokenizer = load_model_and_tokenizer(str(shared / "parity" / "tiny-chatglm3"), device="cpu")
    if call_text is None:
        call_text = "pokedex_lookup\ntool_call(name='皮卡丘')"
        reply = [281, 9066, 914, 30962, 5072, 455, 13, 2583, tokenizer.convert_tokens_to_ids("<0x5F>"), 10372, 30946,
                 2323, 6521, 55350, 55259, 56729, 3387]
    else:
        reply = tokenizer.tokenizer.encode(call_text)
        underscore = tokenizer.convert_tokens_to_ids("_")
        reply[reply.index(underscore) + 1:] = [tokenizer.convert_tokens_to_ids("<0x5F>") if t == underscore else t
                                               for t in reply[reply.index(underscore) + 1:]]
    program = [tokenizer.get_command("<|assistant|>"), *reply, tokenizer.get_command("<|observation|>")]
    assert len(set(program)) == len(program), "a repeated token: the bigram machine cannot say this"
    assert tokenizer.decode(program[1:-1]).replace(" ", "") == call_text.replace(" ", "")
    with torch.no_grad():
        for layer in model.transformer.encoder.layers:
            layer.self_attention.dense.weight.zero_()
            layer.mlp.dense_4h_to_h.weight.zero_()
        model.transformer.encoder.final_layernorm.weight.fill_(1.0)
        embedding = model.transformer.embedding.word_embeddings.weight
        output = model.transformer.output_layer.weight
        output.zero_()
        for k, (token, successor) in enumerate(zip(program, program[1:])):
            embedding[token].zero_()
            embedding[token, k] = 1.0
            output[successor, k] = 10.0
    return model, tokenizer


def test_tool_loop_answers_the_call_and_bounds_the_rounds(shared, pokedex, capsys):
    model, tokenizer = _tool_calling_model(shared)
    history = inference.initial_history(None, [tool.schema for tool in pokedex.values()])
    display = inference.Display(stream=False, verbose=True)
    with pytest.raises(ChatGLMError, match="more than 1 times"):
        inference.chat_turn(model, tokenizer, "皮卡丘是什么属性？", history, {"max_new_tokens": 30, "do_sample": False},
                            max_prompt_tokens=400, tools=pokedex, display=display, max_tool_rounds=1)
    err = capsys.readouterr().err
    first, second = debug_ids(err)
    assert first == prompt_ids(tokenizer, history, "皮卡丘是什么属性？")
    # The second round sees the call and the observation from the table, and again asks for a reply.
    observation = execute({"name": "pokedex_lookup", "parameters": {"name": "皮卡丘"}}, pokedex).observation
    tail = encode_message(tokenizer, "observation", "", observation) + [tokenizer.get_command("<|assistant|>")]
    assert second[:len(first)] == first and second[-len(tail):] == tail
    assert "pokedex_lookup" in err and "皮卡丘" in err  # the call and its observation are shown (stderr when piped)
