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

from .configuration import ChatGLMConfig
from .conversation import SPECIAL_TOKENS
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


def corpus_lines(path: Path) -> list[str]:
    """Text lines from a .txt, .csv (every cell) or .json/.jsonl (every string value) file."""
    path = Path(path)
    if not path.is_file():
        raise ChatGLMError(f"找不到语料文件 / corpus file not found: {path}")
    raw = path.read_bytes()
    for encoding in ("utf-8-sig", "gb18030"):
        try:
            text = raw.decode(encoding)
            break
        except UnicodeDecodeError:
            continue
    else:
        raise ChatGLMError(f"{path}: 无法解码（需要 UTF-8 或 GBK）/ cannot decode (UTF-8 or GBK expected)")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        values = [cell for row in csv.reader(io.StringIO(text)) for cell in row]
    elif suffix == ".jsonl":
        values = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    values.extend(_strings(json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ChatGLMError(f"{path}:{n}: 不是合法的 JSON / not valid JSON: {e.msg}") from None
    elif suffix == ".json":
        try:
            values = list(_strings(json.loads(text)))
        except json.JSONDecodeError as e:
            raise ChatGLMError(f"{path}:{e.lineno}: 不是合法的 JSON / not valid JSON: {e.msg}") from None
    else:
        values = [text]
    lines = [line for v in values for line in v.splitlines() if line.strip()]
    if not lines:
        raise ChatGLMError(f"{path}: 语料为空 / the corpus holds no text")
    return lines


def train_tokenizer(lines: list[str], model_prefix: Path, vocab_size: int) -> int:
    """A BPE SentencePiece model with the real ChatGLM3 tokenizer's settings (byte fallback, digits split,
    whitespace kept). Returns the vocabulary size it reached."""
    # Chat-format and tool-call text the corpus may lack, so that they encode compactly too.
    extra = ["```python", "tool_call(name='皮卡丘')", "{\"name\": \"pokedex_lookup\"}", "Answer the following questions as best as you can."]
    for coverage in (1.0, 0.9995, 0.995, 0.98):  # SentencePiece accepts 0.98..1
        try:
            _train(lines + extra, model_prefix, vocab_size, coverage)
            break
        except RuntimeError as e:
            if "required_chars" not in str(e):
                raise
    else:
        raise ChatGLMError(f"词表 {vocab_size} 太小 / vocabulary size {vocab_size} too small for this corpus: raise --vocab-size")
    return spm.SentencePieceProcessor(model_file=f"{model_prefix}.model").vocab_size()


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
    sp_size = train_tokenizer([line for c in corpora for line in corpus_lines(c)], out / "tokenizer", vocab_size)
    (out / "tokenizer.vocab").unlink(missing_ok=True)
    tokenizer = ChatGLMTokenizer(vocab_file=str(out / "tokenizer.model"))
    tokenizer.save_pretrained(str(out))
    padded_vocab = math.ceil((sp_size + len(SPECIAL_TOKENS)) / 64) * 64
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
