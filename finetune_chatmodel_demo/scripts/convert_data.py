#! /usr/bin/env python
"""把 OpenAI、ShareGPT 或 Alpaca 格式的数据写成 ChatGLM3 的 JSONL，便于查看 / Write OpenAI, ShareGPT or Alpaca data as
ChatGLM3 JSONL, to see what training will read:

    python scripts/convert_data.py chat_openai.jsonl formatted_data/chat.jsonl
    python scripts/convert_data.py alpaca.json formatted_data/ad.jsonl --train_format input-output

finetune.py and evaluate.py read these formats directly (the same conversion, chatglm3.data.formats); this script
only shows its result. The format is detected from the file (every sample must share it) unless --data_format
names it. A sample that cannot be converted stops with one line naming file:line, and nothing is written.
"""
import argparse
import sys

import _bootstrap  # noqa: F401  (puts the drop-in folder first on sys.path)

from chatglm3 import ChatGLMError  # noqa: E402
from chatglm3.data import formats  # noqa: E402
from chatglm3.data.example_data import write_jsonl  # noqa: E402
from chatglm3.data.reader import load_conversations, load_input_output  # noqa: E402
from chatglm3.data.train_format import FORMATS as TRAIN_FORMATS  # noqa: E402
from chatglm3.output_files import check_outputs  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="输入数据（JSON 列表或 JSONL）/ input data (a JSON list or JSONL)")
    parser.add_argument("output", help="输出的 ChatGLM3 JSONL / ChatGLM3 JSONL written")
    parser.add_argument("--data_format", default="auto", choices=formats.CHOICES,
                        help="输入的格式，默认自动识别 / the input's format (default: detected)")
    parser.add_argument("--train_format", default="multi-turn", choices=TRAIN_FORMATS,
                        help="写成多轮对话，或 input-output 的 {prompt, response} / write conversations, or input-output "
                             "{prompt, response} pairs")
    args = parser.parse_args(argv)
    try:
        check_outputs({"IN": args.input}, {"OUT": args.output})  # never overwrite the input
        load = load_conversations if args.train_format == "multi-turn" else load_input_output
        records = load(args.input, args.data_format)
        write_jsonl(records, args.output)
    except ChatGLMError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"{args.input}: {records.data_format} 格式，{len(records)} 条样本 → {args.output} / {records.data_format} format, "
          f"{len(records)} samples -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
