"""Data formats besides ChatGLM3's (chatglm3/data/formats.py, read through chatglm3/data/reader.py): OpenAI chat,
ShareGPT and Alpaca files give the same training ids as the equivalent ChatGLM3 sample (real tokenizer, real
dataset and collator); a file's format is detected and must be one; a sample that cannot be converted is one line
naming file:line in finetune.py, evaluate.py and scripts/convert_data.py (a real subprocess)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import evaluate
import finetune
from chatglm3.data import formats
from chatglm3.data.reader import DataFormatError, load_conversations, load_input_output
from preprocess_utils import DataCollatorForChatGLM, build_dataset

CONVERT = Path(__file__).resolve().parents[1] / "finetune_chatmodel_demo" / "scripts" / "convert_data.py"
WEATHER = {"name": "get_weather", "description": "查询天气", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}

# Each case: (format, the sample in that format, the equivalent ChatGLM3 sample).
OPENAI = {
    "tools": [{"type": "function", "function": WEATHER}],
    "messages": [
        {"role": "system", "content": "回答要简短。"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！", "weight": 0},
        {"role": "user", "content": "北京和上海的天气？"},
        # Two calls in one message, answered out of order: each result goes to its call (tool_call_id).
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"北京\"}"}},
            {"id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"上海\"}"}}]},
        {"role": "tool", "tool_call_id": "call_b", "content": "上海：雨"},
        {"role": "tool", "tool_call_id": "call_a", "content": "北京：晴"},
        {"role": "assistant", "content": [{"type": "text", "text": "北京晴，"}, {"type": "text", "text": "上海有雨。"}]},
    ],
}
OPENAI_AS_CHATGLM3 = {
    "tools": [WEATHER],
    "conversations": [
        {"role": "system", "content": "回答要简短。"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！", "loss": False},
        {"role": "user", "content": "北京和上海的天气？"},
        {"role": "tool", "name": "get_weather", "parameters": {"city": "北京"}, "observation": "北京：晴"},
        {"role": "tool", "name": "get_weather", "parameters": {"city": "上海"}, "observation": "上海：雨"},
        {"role": "assistant", "content": "北京晴，上海有雨。"},
    ],
}
SHAREGPT = {
    "system": "回答要简短。",
    "tools": json.dumps([WEATHER], ensure_ascii=False),  # LLaMA-Factory writes them as a JSON string
    "conversations": [
        {"from": "human", "value": "北京和上海的天气？"},
        {"from": "function_call", "value": json.dumps([{"name": "get_weather", "arguments": {"city": "北京"}},
                                                       {"name": "get_weather", "arguments": {"city": "上海"}}], ensure_ascii=False)},
        {"from": "observation", "value": "北京：晴"},
        {"from": "observation", "value": "上海：雨"},
        {"from": "gpt", "value": "北京晴，上海有雨。"},
        {"from": "human", "value": "明天呢？"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "北京"}}, ensure_ascii=False)},
        {"from": "observation", "value": "北京：多云"},
        {"from": "gpt", "value": "北京明天多云。"},
    ],
}
SHAREGPT_AS_CHATGLM3 = {
    "tools": [WEATHER],
    "conversations": [
        {"role": "system", "content": "回答要简短。"},
        {"role": "user", "content": "北京和上海的天气？"},
        {"role": "tool", "name": "get_weather", "parameters": {"city": "北京"}, "observation": "北京：晴"},
        {"role": "tool", "name": "get_weather", "parameters": {"city": "上海"}, "observation": "上海：雨"},
        {"role": "assistant", "content": "北京晴，上海有雨。"},
        {"role": "user", "content": "明天呢？"},
        {"role": "tool", "name": "get_weather", "parameters": {"city": "北京"}, "observation": "北京：多云"},
        {"role": "assistant", "content": "北京明天多云。"},
    ],
}
ALPACA = {"system": "你是翻译。", "history": [["hi", "嗨"], ["thanks", "谢谢"]], "instruction": "翻译成中文", "input": "good night",
          "output": "晚安"}
ALPACA_AS_CHATGLM3 = {"conversations": [
    {"role": "system", "content": "你是翻译。"},
    {"role": "user", "content": "hi"}, {"role": "assistant", "content": "嗨"},
    {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "谢谢"},
    {"role": "user", "content": "翻译成中文\ngood night"}, {"role": "assistant", "content": "晚安"},
]}
CASES = {"openai": (OPENAI, OPENAI_AS_CHATGLM3), "sharegpt": (SHAREGPT, SHAREGPT_AS_CHATGLM3),
         "alpaca": (ALPACA, ALPACA_AS_CHATGLM3)}


def write_jsonl(path: Path, samples) -> Path:
    path.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples), encoding="utf-8")
    return path


def collated(dataset, tokenizer) -> dict:
    return DataCollatorForChatGLM(tokenizer)([dataset[i] for i in range(len(dataset))])


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_each_format_trains_on_the_ids_of_its_chatglm3_equivalent(real_tokenizer, tmp_path, fmt):
    sample, equivalent = CASES[fmt]
    other = write_jsonl(tmp_path / f"{fmt}.jsonl", [sample, sample])
    ours = write_jsonl(tmp_path / "chatglm3.jsonl", [equivalent, equivalent])
    assert list(load_conversations(other)) == [equivalent, equivalent]
    assert load_conversations(other).data_format == fmt and load_conversations(ours).data_format == "chatglm3"
    theirs_set = build_dataset(other, real_tokenizer, max_seq_length=1024, verbose=False)
    ours_set = build_dataset(ours, real_tokenizer, max_seq_length=1024, verbose=False)
    assert theirs_set.items == ours_set.items
    a, b = collated(theirs_set, real_tokenizer), collated(ours_set, real_tokenizer)
    assert all(a[key].equal(b[key]) for key in ("input_ids", "labels", "attention_mask"))
    # Something is learnt, and the tool calls are in the ids (the observation is context).
    labels = ours_set.items[0]["labels"]
    assert sum(label != -100 for label in labels) > 5
    assert "tool_call(city='上海')" in real_tokenizer.decode(ours_set.items[0]["input_ids"]) or fmt == "alpaca"
    # As the forced format too, and evaluate.py reads the same references from either file.
    assert list(load_conversations(other, fmt)) == [equivalent, equivalent]
    assert [(s.turn, s.reference) for s in evaluate.load_samples(str(other))] == \
        [(s.turn, s.reference) for s in evaluate.load_samples(str(ours))]


def test_alpaca_as_input_output_is_prompt_and_response(real_tokenizer, tmp_path):
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "写一句广告", "input": "类型#裙", "output": "这条裙子很美。"},
                                                     {"instruction": "写一句广告", "output": "好。", "history": []}])
    ours = write_jsonl(tmp_path / "io.jsonl", [{"prompt": "写一句广告\n类型#裙", "response": "这条裙子很美。"},
                                               {"prompt": "写一句广告", "response": "好。"}])
    kwargs = dict(train_format="input-output", max_source_length=64, max_target_length=64, verbose=False)
    assert build_dataset(alpaca, real_tokenizer, **kwargs).items == build_dataset(ours, real_tokenizer, **kwargs).items
    assert load_input_output(alpaca).data_format == "alpaca"
    # A history or a system prompt has no place in a raw prompt; a conversation format is multi-turn data.
    with_history = write_jsonl(tmp_path / "h.jsonl", [{"instruction": "a", "output": "b", "history": [["q", "a"]]}])
    with pytest.raises(DataFormatError, match=r"h\.jsonl:1: history: .*multi-turn"):
        load_input_output(with_history)
    openai = write_jsonl(tmp_path / "o.jsonl", [OPENAI])
    with pytest.raises(DataFormatError, match=r"o\.jsonl:1: openai .*multi-turn"):
        load_input_output(openai)


def test_detection_per_sample_and_per_file(tmp_path):
    assert [formats.detect(s) for s in (OPENAI, SHAREGPT, ALPACA, OPENAI_AS_CHATGLM3)] == ["openai", "sharegpt", "alpaca", "chatglm3"]
    assert formats.detect({"prompt": "a", "response": "b"}) is None
    assert formats.detect({"prompt": "a", "response": "b"}, multi_turn=False) == "chatglm3"
    assert formats.detect(["not", "a", "dict"]) is None
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [ALPACA, ALPACA, OPENAI])
    with pytest.raises(DataFormatError, match=r"mixed\.jsonl:3: .*openai.*line 1 is alpaca"):
        load_conversations(mixed)
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"question": "?", "answer": "!"}, {"q": 1}])
    with pytest.raises(DataFormatError, match=r"unknown\.jsonl:1: .*fits no known format"):
        load_conversations(unknown)
    # A sample in no format, in a file of a known one, is checked as that format: the field it lacks is named.
    partly = write_jsonl(tmp_path / "partly.jsonl", [ALPACA, {"instruction": "a", "answer": "!"}])
    with pytest.raises(DataFormatError, match=r"partly\.jsonl:2: output: .*must be a string, got nothing"):
        load_conversations(partly)
    io = write_jsonl(tmp_path / "io.jsonl", [{"prompt": "a", "response": "b"}])
    with pytest.raises(DataFormatError, match=r"io\.jsonl:1: .*is input-output data"):
        load_conversations(io)
    # A forced format that does not fit: the sample's own fields are named.
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [ALPACA])
    with pytest.raises(DataFormatError, match=r"alpaca\.jsonl:1: messages: .*must be a list"):
        load_conversations(alpaca, "openai")
    with pytest.raises(DataFormatError, match="unknown data format 'yaml'"):
        load_conversations(alpaca, "yaml")


def _openai(*messages):
    return {"messages": [{"role": "user", "content": "天气？"}, *messages]}


def _call(arguments, call_id="c1"):
    return {"role": "assistant", "tool_calls": [{"id": call_id, "type": "function", "function": {"name": "w", "arguments": arguments}}]}


BAD_SAMPLES = {
    "openai arguments not JSON": (_openai(_call("{city: 北京}"), {"role": "tool", "tool_call_id": "c1", "content": "晴"}),
                                  "messages[1].tool_calls[0].function.arguments", "not valid JSON"),
    "openai arguments not an object": (_openai(_call("[1]"), {"role": "tool", "tool_call_id": "c1", "content": "晴"}),
                                       "messages[1].tool_calls[0].function.arguments", "JSON object"),
    "openai call without result": (_openai(_call("{}"), {"role": "assistant", "content": "晴"}), "messages[2]", "no tool result"),
    "openai result for no call": (_openai(_call("{}"), {"role": "tool", "tool_call_id": "zz", "content": "晴"}),
                                  "messages[2].tool_call_id", "answers no tool call"),
    "openai duplicate call id": (_openai({"role": "assistant", "tool_calls": [
        {"id": "c1", "function": {"name": "w", "arguments": "{}"}}, {"id": "c1", "function": {"name": "w", "arguments": "{}"}}]}),
        "messages[1].tool_calls[1].id", "no other call has"),
    "openai call id not a string": (_openai(_call("{}", call_id=[1]), {"role": "tool", "tool_call_id": [1], "content": "晴"}),
                                    "messages[1].tool_calls[0].id", "got [1]"),
    "openai unknown role": (_openai({"role": "narrator", "content": "…"}), "messages[1].role", "unknown role 'narrator'"),
    "openai order": ({"messages": [{"role": "assistant", "content": "先说"}]}, "conversations[0]", "must follow a user"),
    "sharegpt observation first": ({"conversations": [{"from": "human", "value": "?"}, {"from": "observation", "value": "晴"}]},
                                   "conversations[1]", "must follow a function_call"),
    "sharegpt call without observation": ({"conversations": [{"from": "human", "value": "?"}, {
        "from": "function_call", "value": "{\"name\": \"w\", \"arguments\": {}}"}, {"from": "gpt", "value": "晴"}]},
        "conversations[2]", "followed by its observation"),
    "sharegpt from not a string": ({"conversations": [{"from": "human", "value": "?"}, {"from": ["gpt"], "value": "!"}]},
                                   "conversations[1].from", "unknown role ['gpt']"),
    "sharegpt unknown from": ({"conversations": [{"from": "bard", "value": "?"}]}, "conversations[0].from", "unknown role 'bard'"),
    "alpaca history not pairs": ({"instruction": "a", "output": "b", "history": [["only one"]]}, "history[0]", "[query, answer]"),
    "alpaca output not a string": ({"instruction": "a", "output": 3}, "output", "must be a string"),
}


@pytest.mark.parametrize("case", sorted(BAD_SAMPLES))
def test_a_sample_that_cannot_be_converted_is_one_line_with_file_and_line(tmp_path, case):
    sample, field, what = BAD_SAMPLES[case]
    good = {"openai": _openai({"role": "assistant", "content": "晴"}), "sharegpt": {"conversations": [
        {"from": "human", "value": "?"}, {"from": "gpt", "value": "!"}]}, "alpaca": {"instruction": "a", "output": "b"}}[case.split()[0]]
    path = write_jsonl(tmp_path / "data.jsonl", [good, sample])
    with pytest.raises(DataFormatError) as error:
        load_conversations(path)
    message = str(error.value)
    assert message.startswith(f"{path}:2: ") and field in message and what in message and "\n" not in message, message


def test_finetune_names_the_bad_sample_in_one_line(tiny_model, tmp_path, capsys):
    path = write_jsonl(tmp_path / "chat.jsonl", [OPENAI, _openai(_call("{oops"), {"role": "tool", "tool_call_id": "c1", "content": "晴"})])
    argv = ["--model_name_or_path", str(tiny_model), "--train_file", str(path), "--output_dir", str(tmp_path / "out"),
            "--max_steps", "1", "--use_cpu", "--report_to", "none"]
    assert finetune.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{path}:2: messages[1].tool_calls[0].function.arguments") and "\n" not in err, err
    assert finetune.main(argv + ["--data_format", "alpaca"]) == 1
    assert f"{path}:1: instruction" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def run_convert(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CONVERT), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_convert_data_writes_chatglm3_jsonl(tmp_path):
    source = tmp_path / "sharegpt.json"
    source.write_text(json.dumps([SHAREGPT, SHAREGPT], ensure_ascii=False, indent=2), encoding="utf-8")  # a JSON list
    out = tmp_path / "out.jsonl"
    result = run_convert(source, out)
    assert result.returncode == 0, result.stderr
    assert "sharegpt" in result.stdout and "2" in result.stdout
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == [SHAREGPT_AS_CHATGLM3] * 2
    # What it wrote is ChatGLM3's own format: read back as it is.
    assert load_conversations(out).data_format == "chatglm3"

    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "广告", "input": "裙", "output": "美"}])
    result = run_convert(alpaca, tmp_path / "io.jsonl", "--train_format", "input-output")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "io.jsonl").read_text(encoding="utf-8")) == {"prompt": "广告\n裙", "response": "美"}


def test_convert_data_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path):
    source = write_jsonl(tmp_path / "mixed.jsonl", [OPENAI, SHAREGPT])
    result = run_convert(source, tmp_path / "out.jsonl")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith(f"{source}:2: ") and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.jsonl").exists()
    # The input is never the output.
    good = write_jsonl(tmp_path / "good.jsonl", [OPENAI])
    before = good.read_bytes()
    result = run_convert(good, good)
    assert result.returncode == 1 and "Traceback" not in result.stderr and "good.jsonl" in result.stderr
    assert good.read_bytes() == before
    result = run_convert(good, tmp_path / "x.jsonl", "--data_format", "yaml")
    assert result.returncode == 2 and "yaml" in result.stderr


def test_the_format_scripts_read_every_format(tmp_path):
    """data_processing/format_tool_poke.py --path reads through the same reader: an OpenAI file comes out as ChatGLM3
    JSONL, a file mixing formats is one line."""
    script = CONVERT.parents[2] / "data_processing" / "format_tool_poke.py"
    source = write_jsonl(tmp_path / "openai.jsonl", [OPENAI])
    result = subprocess.run([sys.executable, str(script), "--path", str(source), "--output", str(tmp_path / "out.jsonl")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out.jsonl").read_text(encoding="utf-8")) == OPENAI_AS_CHATGLM3
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [OPENAI, ALPACA])
    result = subprocess.run([sys.executable, str(script), "--path", str(mixed), "--output", str(tmp_path / "m.jsonl")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr and f"{mixed}:2:" in result.stderr
