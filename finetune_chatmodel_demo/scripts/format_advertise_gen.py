#! /usr/bin/env python
"""把 AdvertiseGen 转换成输入-输出格式 / Convert AdvertiseGen into the input-output format (upstream's command):

    ./scripts/format_advertise_gen.py --path "AdvertiseGen/train.json"   # -> formatted_data/advertise_gen.jsonl

Each line {"content", "summary"} becomes {"prompt", "response"}. A malformed line stops with one line naming
file:line, and nothing is written.
"""
import argparse
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[1]
import _bootstrap  # noqa: E402,F401  (puts the drop-in folder first on sys.path)

from chatglm3 import ChatGLMError  # noqa: E402
from chatglm3.output_files import check_outputs  # noqa: E402
from chatglm3.data.example_data import advertise_gen_samples, write_jsonl  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", required=True, help="AdvertiseGen 的 train.json / AdvertiseGen's train.json")
    parser.add_argument("--output", default=str(DEMO / "formatted_data" / "advertise_gen.jsonl"),
                        help="输出 JSONL / output JSONL (default: formatted_data/advertise_gen.jsonl in this folder)")
    args = parser.parse_args(argv)
    try:
        check_outputs({"--path": args.path}, {"--output": args.output})  # before reading: /dev/zero is endless
        samples = advertise_gen_samples(args.path)
        if not samples:
            raise ChatGLMError(f"错误：{args.path} 中没有记录 / Error: {args.path} holds no records")
        write_jsonl(samples, args.output)
    except ChatGLMError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"train_examples（样本 / samples）: {len(samples)} -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
