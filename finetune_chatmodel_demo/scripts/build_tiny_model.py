"""构建一个小型随机权重 ChatGLM3 模型（官方格式），用于测试、快速上手和基准测试。
Build a tiny random-weight ChatGLM3 (official checkpoint format) with a SentencePiece tokenizer trained on a
corpus (.txt, .csv or .jsonl/.json), for tests, the quick start and benchmarks."""
import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Optional

import sentencepiece as spm
import torch

import _bootstrap  # noqa: F401  (the drop-in folder's chatglm3, also when copied alone)
from chatglm3 import json_files, limits
from chatglm3.model.configuration import ChatGLMConfig
from chatglm3.model.conversation import CONVERSATION_KEY, TOOL_SYSTEM_PROMPT, format_tool_call, message_text, sample_to_messages
from chatglm3.data.reader import read_json_records
from chatglm3.errors import ChatGLMError


def _record_texts(record) -> list[str]:
    """A record's text as the model reads it: a conversation sample message by message as the chat format writes
    it (the tool list as JSON, tool calls, observations), so that the tokenizer learns those pieces; any other
    record, every string value."""
    if isinstance(record, dict) and CONVERSATION_KEY in record:
        try:
            return [message_text(m) for m in sample_to_messages(record)]
        except (KeyError, TypeError, AttributeError):  # not a well-formed sample: its strings will do
            pass
    return list(json_files.string_values(record))


def corpus_lines(path: Path) -> list[str]:
    """Text lines from a .txt, .csv (every cell, UTF-8 or GBK) or .json/.jsonl data file (conversation samples as
    the model reads them, other records every string value)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        values = [text for _, record in read_json_records(path) for text in _record_texts(record)]
    elif not path.is_file():
        raise ChatGLMError(f"找不到语料文件 / corpus file not found: {path}")
    else:
        text = _decode(path)
        values = [cell for row in csv.reader(io.StringIO(text)) for cell in row] if suffix == ".csv" else [text]
    lines = [line for v in values for line in v.splitlines() if line.strip()]
    if not lines:
        raise ChatGLMError(f"{path}: 语料为空 / the corpus holds no text")
    return lines


def _decode(path: Path) -> str:
    raw = json_files.read_bytes(path, json_files.DATA_LIMIT)  # a regular file or pipe, bounded
    for encoding in ("utf-8-sig", "gb18030"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    raise ChatGLMError(f"{path}: 无法解码（需要 UTF-8 或 GBK）/ cannot decode (UTF-8 or GBK expected)")


def train_tokenizer(lines: list[str], model_prefix: Path, vocab_size: int, single_tokens: tuple[str, ...] = ()):
    """A BPE SentencePiece model with the real ChatGLM3 tokenizer's settings (byte fallback, digits split,
    whitespace kept). Each of `single_tokens` is always one token, never merged with its neighbours: a value a
    model must copy (a name's characters, a tool's answers) is then the same tokens wherever it is written."""
    # Chat-format and tool-call text the corpus may lack, so that they encode compactly too.
    extra = [*format_tool_call({"name": "皮卡丘"}).split("\n"), "{\"name\": \"pokedex_lookup\"}", TOOL_SYSTEM_PROMPT]
    for coverage in (1.0, 0.9995, 0.995, 0.98):  # SentencePiece accepts 0.98..1
        try:
            return _train(lines + extra, model_prefix, vocab_size, coverage, single_tokens)
        except RuntimeError as e:
            if "required_chars" not in str(e):
                raise
    raise ChatGLMError(f"词表 {vocab_size} 太小 / vocabulary size {vocab_size} too small for this corpus: raise --vocab-size")


def _train(lines: list[str], model_prefix: Path, vocab_size: int, coverage: float, single_tokens: tuple[str, ...]):
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(model_prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus may not support the requested size
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        # Rare characters fall back to bytes, so a small vocabulary still covers a Chinese corpus.
        character_coverage=coverage,
        max_sentence_length=16384,
        user_defined_symbols=list(single_tokens),
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=2,
        minloglevel=2,
    )


def single_token_list(path) -> tuple[str, ...]:
    """--single-tokens FILE: one entry a line (blank lines skipped); an entry with a space is refused (SentencePiece
    keeps whitespace as its own piece)."""
    lines = [line.strip() for line in _decode(Path(path)).splitlines()]
    entries = [line for line in lines if line]
    spaced = [i for i, line in enumerate(lines, 1) if " " in line or "\t" in line]
    if spaced:
        raise ChatGLMError(f"{path}:{spaced[0]}: 一行只能是一个不含空格的词 / one word without spaces a line")
    if not entries:
        raise ChatGLMError(f"{path}: 文件为空 / the file holds no entry")
    return tuple(dict.fromkeys(entries))


def build_tiny_model(corpus, out, layers: int = 2, hidden: int = 64, heads: int = 4, kv_groups: int = 2,
                     ffn_hidden: Optional[int] = None, vocab_size: int = 2000, seq_length: int = 2048, seed: int = 0,
                     single_tokens: tuple[str, ...] = (), kv_channels: Optional[int] = None,
                     init_std: float = 0.02) -> Path:
    """Writes tokenizer.model, tokenizer_config.json, config.json and model.safetensors to `out`.
    `corpus`: one file or a list of files (.txt .csv .json .jsonl); `single_tokens`: see train_tokenizer."""
    from chatglm3.model.modeling import ChatGLMForConditionalGeneration
    from chatglm3.model.tokenizer import ChatGLMTokenizer

    if (kv_channels is None and hidden % heads) or heads % kv_groups:
        raise ChatGLMError(f"hidden ({hidden}) 须能被 heads ({heads}) 整除，heads 须能被 kv_groups ({kv_groups}) 整除 / "
                           "hidden must divide by heads and heads by kv_groups")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpora = [corpus] if isinstance(corpus, (str, Path)) else list(corpus)
    train_tokenizer([line for c in corpora for line in corpus_lines(c)], out / "tokenizer", vocab_size, tuple(single_tokens))
    (out / "tokenizer.vocab").unlink(missing_ok=True)
    tokenizer = ChatGLMTokenizer(vocab_file=str(out / "tokenizer.model"))
    tokenizer.save_pretrained(str(out))
    padded_vocab = math.ceil(len(tokenizer) / 64) * 64
    config = ChatGLMConfig(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads, kv_channels=kv_channels or hidden // heads,
        multi_query_attention=True, multi_query_group_num=kv_groups,
        ffn_hidden_size=ffn_hidden or int(math.ceil(hidden * 8 / 3 / 8) * 8),
        padded_vocab_size=padded_vocab, seq_length=seq_length, add_qkv_bias=True, add_bias_linear=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, initializer_range=init_std,
    )
    torch.manual_seed(seed)
    model = ChatGLMForConditionalGeneration(config)
    model.save_pretrained(out)
    generation = {"eos_token_id": model.config.eos_token_id, "pad_token_id": model.config.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    return out


def main(argv=None) -> int:
    size = limits.AT_LEAST_1.argument_type()  # a size of 0 or below is one argparse line, not a traceback
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, nargs="+", help="训练分词器的语料（可多个）/ corpus file(s) for the tokenizer (.txt .csv .jsonl .json)")
    p.add_argument("--out", required=True, help="输出目录 / output directory")
    p.add_argument("--layers", type=size, default=2, help="层数 / number of layers (default 2)")
    p.add_argument("--hidden", type=size, default=64, help="隐藏维度 / hidden size (default 64)")
    p.add_argument("--heads", type=size, default=4, help="注意力头数 / attention heads (default 4)")
    p.add_argument("--kv-channels", type=size, default=None,
                   help="每个注意力头的维度 / dimensions per attention head (default hidden / heads)")
    p.add_argument("--kv-groups", type=size, default=2, help="KV 组数（multi-query）/ key-value groups (default 2)")
    p.add_argument("--ffn-hidden", type=size, default=None, help="MLP 维度 / MLP size (default about 8/3 x hidden)")
    p.add_argument("--vocab-size", type=size, default=2000, help="SentencePiece 词表大小 / SentencePiece vocabulary size (default 2000)")
    p.add_argument("--seq-length", type=size, default=2048, help="上下文长度 / context length recorded in config.json")
    p.add_argument("--seed", type=int, default=0, help="随机种子 / random seed")
    p.add_argument("--single-tokens", metavar="FILE",
                   help="每行一个词或字，分词时总是单独成一个 token、不与前后合并（模型要照抄的值，如名字的字、工具返回的取值）/ "
                        "one word or character a line, always one token, never merged with its neighbours (values a "
                        "model must copy: a name's characters, a tool's answers)")
    p.add_argument("--init-std", type=limits.POSITIVE.argument_type(), default=0.02,
                   help="初始权重的标准差（默认 0.02，宽 768 的 GPT-2 的取值）；宽 128 的模型只学复述练习时 0.05 学会照抄早得多，"
                        "在工具数据上效果不一（docs/tool_demo.md）/ standard deviation of the initial weights (default 0.02, GPT-2's "
                        "at width 768); at width 128, 0.05 learned pure copy drills much sooner but was mixed on the tool data "
                        "(docs/tool_demo.md)")
    a = p.parse_args(argv)
    try:
        single = single_token_list(a.single_tokens) if a.single_tokens else ()
        out = build_tiny_model(a.corpus, a.out, layers=a.layers, hidden=a.hidden, heads=a.heads, kv_groups=a.kv_groups,
                               ffn_hidden=a.ffn_hidden, vocab_size=a.vocab_size, seq_length=a.seq_length, seed=a.seed,
                               single_tokens=single, kv_channels=a.kv_channels, init_std=a.init_std)
    except ChatGLMError as e:
        print(f"错误 / Error: {e}", file=sys.stderr)
        return 1
    print(f"已写入小模型 / tiny model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
