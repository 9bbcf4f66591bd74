"""构建一个小型随机权重 ChatGLM3 模型（官方格式），用于测试、快速上手和基准测试。
Build a tiny random-weight ChatGLM3 (official checkpoint format) with a SentencePiece tokenizer trained on a
corpus (.txt, .csv or .jsonl/.json), for tests, the quick start and benchmarks."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatglm3 import ChatGLMError  # noqa: E402
from chatglm3.tiny import build_tiny_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, nargs="+", help="训练分词器的语料（可多个）/ corpus file(s) for the tokenizer (.txt .csv .jsonl .json)")
    p.add_argument("--out", required=True, help="输出目录 / output directory")
    p.add_argument("--layers", type=int, default=2, help="层数 / number of layers (default 2)")
    p.add_argument("--hidden", type=int, default=64, help="隐藏维度 / hidden size (default 64)")
    p.add_argument("--heads", type=int, default=4, help="注意力头数 / attention heads (default 4)")
    p.add_argument("--kv-groups", type=int, default=2, help="KV 组数（multi-query）/ key-value groups (default 2)")
    p.add_argument("--ffn-hidden", type=int, default=None, help="MLP 维度 / MLP size (default about 8/3 x hidden)")
    p.add_argument("--vocab-size", type=int, default=2000, help="SentencePiece 词表大小 / SentencePiece vocabulary size (default 2000)")
    p.add_argument("--seq-length", type=int, default=2048, help="上下文长度 / context length recorded in config.json")
    p.add_argument("--seed", type=int, default=0, help="随机种子 / random seed")
    a = p.parse_args(argv)
    try:
        out = build_tiny_model(a.corpus, a.out, layers=a.layers, hidden=a.hidden, heads=a.heads, kv_groups=a.kv_groups,
                               ffn_hidden=a.ffn_hidden, vocab_size=a.vocab_size, seq_length=a.seq_length, seed=a.seed)
    except ChatGLMError as e:
        print(f"错误 / Error: {e}", file=sys.stderr)
        return 1
    print(f"已写入小模型 / tiny model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
