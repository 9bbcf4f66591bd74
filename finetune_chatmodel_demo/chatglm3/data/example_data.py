"""Upstream's two example data sets turned into the training formats (scripts/format_tool_alpaca.py and
scripts/format_advertise_gen.py are their command lines):

- ToolAlpaca (`ToolAlpaca/data/train_data.json`: a list of tools, each with its "NLDocumentation" and
  "Instances") -> multi-turn samples: the tool's documentation as `tools`, the user's input, for every
  intermediate step the assistant's thought and a `tool` entry (call + observation), and the final thought
  with the answer.
- AdvertiseGen (`AdvertiseGen/train.json`: JSON lines {"content", "summary"}) -> {"prompt", "response"}.

A record that is not shaped like the data set (a broken file, a tool without "Instances", an AdvertiseGen line
without "content") is an error naming file:line. A ToolAlpaca instance whose steps cannot become a conversation
(upstream counted these as `err_count`; e.g. an "Action Input" that is not a JSON object) is skipped, and each
one is reported with its location.
"""
from collections import Counter

from chatglm3 import json_files
from chatglm3.data.reader import DataFormatError, check_conversation, check_input_output, read_json_records
from chatglm3.output_files import write_atomic


def _tool_alpaca_conversation(instance) -> list:
    """One instance as a conversation; KeyError/TypeError/ValueError say what is wrong with it."""
    if not isinstance(instance, dict):
        raise TypeError(f"实例应为 JSON 对象 / an instance must be a JSON object, got {type(instance).__name__}")
    conversation = [{"role": "user", "content": instance["input"]}]
    for j, step in enumerate(instance["intermediate_steps"]):
        try:
            (tool_name, action_input, reasoning), observation = step
        except (TypeError, ValueError):
            raise ValueError(f"intermediate_steps[{j}] 应为 [[工具名, 参数, 思考], 观察] / must be "
                             "[[tool, action input, reasoning], observation]") from None
        try:  # bounded nesting, no NaN: the arguments become a tool call the model learns
            parameters = json_files.loads(action_input, "action input") if isinstance(action_input, str) else None
        except json_files.JSONFileError:
            parameters = None
        if not isinstance(parameters, dict):
            raise ValueError(f"intermediate_steps[{j}] 的参数不是 JSON 对象 / the action input is not a JSON object: "
                             f"{str(action_input)[:60]!r}")
        conversation.append({"role": "assistant", "content": str(reasoning).split("Action:")[0].strip()})
        conversation.append({"role": "tool", "name": tool_name, "parameters": parameters, "observation": observation})
    conversation.append({"role": "assistant", "content": instance["Final Thought"] + "\n" + instance["output"]})
    return conversation


def tool_alpaca_samples(path):
    """(samples, skipped): multi-turn samples, and "file:line: Instances[k]: reason" for each instance left out."""
    samples, skipped = [], []
    for line, tool in read_json_records(path):
        where = f"{path}:{line}"
        if not isinstance(tool, dict) or not isinstance(tool.get("Instances"), list) or "NLDocumentation" not in tool:
            raise DataFormatError(f"{where}: 不是 ToolAlpaca 的工具记录（需要 \"NLDocumentation\" 和 \"Instances\" 列表）/ not a "
                                  "ToolAlpaca tool record (needs \"NLDocumentation\" and an \"Instances\" list)")
        for k, instance in enumerate(tool["Instances"]):
            here = f"{where}: Instances[{k}]"
            try:
                sample = {"tools": [tool["NLDocumentation"]], "conversations": _tool_alpaca_conversation(instance)}
                check_conversation(sample, here)
            except DataFormatError as e:  # check_conversation's message starts with `here`
                skipped.append(str(e))
            except KeyError as e:
                skipped.append(f"{here}: 缺少 / missing {e}")
            except (TypeError, ValueError) as e:
                skipped.append(f"{here}: {e}")
            else:
                samples.append(sample)
    return samples, skipped


def advertise_gen_samples(path) -> list:
    """{"prompt", "response"} samples; a line without string "content" and "summary" is an error."""
    samples = []
    for line, record in read_json_records(path):
        where = f"{path}:{line}"
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("content", "summary")):
            raise DataFormatError(f"{where}: 不是 AdvertiseGen 记录（需要字符串 \"content\" 和 \"summary\"）/ not an AdvertiseGen "
                                  "record (needs string \"content\" and \"summary\")")
        sample = {"prompt": record["content"], "response": record["summary"]}
        check_input_output(sample, where)
        samples.append(sample)
    return samples


def conversation_lengths(samples) -> Counter:
    return Counter(len(s["conversations"]) for s in samples)


def write_jsonl(samples, path) -> None:
    """All samples or nothing (the scripts check the path against their input before reading it)."""
    write_atomic(path, "".join(json_files.dumps(sample, str(path)) + "\n" for sample in samples))
