"""Tiny ChatGLM3 models for tests, the quick start and benchmarks: a SentencePiece tokenizer trained on a
corpus and random weights, written in the official checkpoint format. Built in seconds."""
import csv
import io
import json
import math
from pathlib import Path
from typing import Iterator, Optional

import sentencepiece as spm
import torch

from . import json_files
from .configuration import ChatGLMConfig
from .conversation import CONVERSATION_KEY, TOOL_SYSTEM_PROMPT, format_tool_call, message_text, sample_to_messages
from .data import read_json_records
from .errors import ChatGLMError


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _record_texts(record) -> list[str]:
    """A record's text as the model reads it: a conversation sample message by message as the chat format writes
    it (the tool list as JSON, tool calls, observations), so that the tokenizer learns those pieces; any other
    record, every string value."""
    if isinstance(record, dict) and CONVERSATION_KEY in record:
        try:
            return [message_text(m) for m in sample_to_messages(record)]
        except (KeyError, TypeError, AttributeError):  # not a well-formed sample: its strings will do
            pass
    return list(_strings(record))


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


def train_tokenizer(lines: list[str], model_prefix: Path, vocab_size: int):
    """A BPE SentencePiece model with the real ChatGLM3 tokenizer's settings (byte fallback, digits split,
    whitespace kept)."""
    # Chat-format and tool-call text the corpus may lack, so that they encode compactly too.
    extra = [*format_tool_call({"name": "皮卡丘"}).split("\n"), "{\"name\": \"pokedex_lookup\"}", TOOL_SYSTEM_PROMPT]
    for coverage in (1.0, 0.9995, 0.995, 0.98):  # SentencePiece accepts 0.98..1
        try:
            return _train(lines + extra, model_prefix, vocab_size, coverage)
        except RuntimeError as e:
            if "required_chars" not in str(e):
                raise
    raise ChatGLMError(f"词表 {vocab_size} 太小 / vocabulary size {vocab_size} too small for this corpus: raise --vocab-size")


def _train(lines: list[str], model_prefix: Path, vocab_size: int, coverage: float):
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
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=2,
        minloglevel=2,
    )


def build_tiny_model(corpus, out, layers: int = 2, hidden: int = 64, heads: int = 4, kv_groups: int = 2,
                     ffn_hidden: Optional[int] = None, vocab_size: int = 2000, seq_length: int = 2048, seed: int = 0) -> Path:
    """Writes tokenizer.model, tokenizer_config.json, config.json and model.safetensors to `out`.
    `corpus`: one file or a list of files (.txt .csv .json .jsonl)."""
    from .model import ChatGLMForConditionalGeneration
    from .tokenizer import ChatGLMTokenizer

    if hidden % heads or heads % kv_groups:
        raise ChatGLMError(f"hidden ({hidden}) 须能被 heads ({heads}) 整除，heads 须能被 kv_groups ({kv_groups}) 整除 / "
                           "hidden must divide by heads and heads by kv_groups")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpora = [corpus] if isinstance(corpus, (str, Path)) else list(corpus)
    train_tokenizer([line for c in corpora for line in corpus_lines(c)], out / "tokenizer", vocab_size)
    (out / "tokenizer.vocab").unlink(missing_ok=True)
    tokenizer = ChatGLMTokenizer(vocab_file=str(out / "tokenizer.model"))
    tokenizer.save_pretrained(str(out))
    padded_vocab = math.ceil(len(tokenizer) / 64) * 64
    config = ChatGLMConfig(
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads, kv_channels=hidden // heads,
        multi_query_attention=True, multi_query_group_num=kv_groups,
        ffn_hidden_size=ffn_hidden or int(math.ceil(hidden * 8 / 3 / 8) * 8),
        padded_vocab_size=padded_vocab, seq_length=seq_length, add_qkv_bias=True, add_bias_linear=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = ChatGLMForConditionalGeneration(config)
    model.save_pretrained(out)
    generation = {"eos_token_id": model.config.eos_token_id, "pad_token_id": model.config.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    return out
