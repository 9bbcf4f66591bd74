#! /usr/bin/env python
"""把 ToolAlpaca 转换成多轮对话格式 / Convert ToolAlpaca into the multi-turn training format (upstream's command):

    ./scripts/format_tool_alpaca.py --path "ToolAlpaca/data/train_data.json"   # -> formatted_data/tool_alpaca.jsonl

Each tool's documentation becomes the sample's `tools` (natural language, as upstream), each instance one
conversation. Instances that cannot be converted are skipped and listed; a malformed file or record stops with
one line naming file:line, and nothing is written.
"""
import argparse
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1]
import _bootstrap  # noqa: E402,F401  (puts the drop-in folder first on sys.path)

from chatglm3 import ChatGLMError  # noqa: E402
from chatglm3.output_files import check_outputs  # noqa: E402
from chatglm3.data.example_data import conversation_lengths, tool_alpaca_samples, write_jsonl  # noqa: E402

SHOWN_SKIPS = 10


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", required=True, help="ToolAlpaca 的 train_data.json / ToolAlpaca's train_data.json")
    parser.add_argument("--output", default=str(DEMO / "formatted_data" / "tool_alpaca.jsonl"),
                        help="输出 JSONL / output JSONL (default: formatted_data/tool_alpaca.jsonl in this folder)")
    args = parser.parse_args(argv)
    try:
        check_outputs({"--path": args.path}, {"--output": args.output})  # before reading: /dev/zero is endless
        samples, skipped = tool_alpaca_samples(args.path)
        if not samples:
            raise ChatGLMError(f"错误：{args.path} 中没有可用的实例 / Error: no usable instance in {args.path}")
        write_jsonl(samples, args.output)
    except ChatGLMError as e:
        print(e, file=sys.stderr)
        return 1
    for reason in skipped[:SHOWN_SKIPS]:
        print(f"跳过 / skipped {reason}", file=sys.stderr)
    if len(skipped) > SHOWN_SKIPS:
        print(f"... 另有 {len(skipped) - SHOWN_SKIPS} 个 / and {len(skipped) - SHOWN_SKIPS} more", file=sys.stderr)
    print(f"err_count（跳过的实例 / skipped instances）: {len(skipped)}")
    print(f"train_examples（样本 / samples）: {len(samples)} -> {args.output}")
    print(f"conversation distribution（消息数: 样本数 / messages: samples）: {dict(sorted(conversation_lengths(samples).items()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
