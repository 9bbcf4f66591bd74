"""Training datasets for ChatGLM3: samples (read and checked by chatglm3.data.reader) become token ids and labels exactly
as upstream's finetune_chatmodel_demo made them (chatglm3.model.conversation.encode_sample), then are truncated,
padded or packed into batches.

Datasets tokenize once, at construction; each item is {"input_ids": [...], "labels": [...]} without padding, and
labels are aligned with input_ids (the model shifts them): label i is token i when token i-1 belongs to a
loss-bearing reply, else -100.

Several training files (MixedDataset) are sampled by weight afresh each epoch (WeightedEpochSampler).
"""
import math
from bisect import bisect_left, insort

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from chatglm3.model.conversation import IGNORE_INDEX, encode_sample
from chatglm3.data.reader import (DataFormatError, INPUT_OUTPUT_KEYS, Records, as_records, check_conversation,
                           check_input_output, load_conversations, load_input_output)


# --- datasets ------------------------------------------------------------------------------------------------------
class _TokenizedDataset(Dataset):
    """Items tokenized once; `lengths` (token counts) serves group_by_length and packing."""

    def __init__(self):
        self.items: list[dict] = []
        self.num_samples = 0  # samples given, before dropping
        self.num_truncated = 0
        self.num_dropped = 0
        self.dropped: list[str] = []  # where each dropped sample came from

    @property
    def lengths(self) -> list[int]:
        return [len(item["input_ids"]) for item in self.items]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i) -> dict:
        return self.items[i]

    def _finish(self, max_length, verbose: bool):
        if not self.items:
            raise DataFormatError(
                f"错误：{self.num_samples} 条样本全部被丢弃（没有需要学习的回复，或截断到 {max_length} 个 token 后没有剩下回复），"
                f"数据集为空 / Error: the dataset is empty: all {self.num_samples} samples were dropped (no reply to learn "
                f"within {max_length} tokens); check the data or raise the max length. First: {', '.join(self.dropped[:3])}"
            )
        if verbose:
            print(self.summary())

    def summary(self) -> str:
        text = (
            f"数据：{self.num_samples} 条样本，保留 {len(self.items)} 条，截断 {self.num_truncated} 条，丢弃 {self.num_dropped} 条 / "
            f"data: {self.num_samples} samples, {len(self.items)} kept, {self.num_truncated} truncated, {self.num_dropped} dropped"
        )
        if self.dropped:
            more = " ..." if len(self.dropped) > 5 else ""
            text += f" (没有可学习的回复 / no reply left to learn: {', '.join(self.dropped[:5])}{more})"
        return text


class MultiTurnDataset(_TokenizedDataset):
    """Multi-turn samples -> {"input_ids", "labels"}, cut to max_seq_length by whole turns (None: no limit).

    A sample whose labels are all -100 (no assistant reply to learn, or none left after truncation) is dropped
    and counted in `num_dropped`; `dropped` lists where those samples came from."""

    def __init__(self, data, tokenizer, max_seq_length, verbose=True):
        super().__init__()
        self.max_seq_length = max_seq_length
        records = as_records(data, check_conversation)
        self.num_samples = len(records)
        for sample, where in zip(records, records.locations):
            tokens, labels = encode_sample(tokenizer, sample)
            if max_seq_length is not None and len(tokens) > max_seq_length:
                # Whole turns dropped from the end, never half a reply: each reply learnt ends with its stop token.
                tokens, labels = encode_sample(tokenizer, sample, max_seq_length)
                self.num_truncated += 1
            if all(label == IGNORE_INDEX for label in labels):
                self.num_dropped += 1
                self.dropped.append(where)
                continue
            self.items.append({"input_ids": tokens, "labels": labels})
        self._finish(max_seq_length, verbose)


class InputOutputDataset(_TokenizedDataset):
    """{"prompt", "response"} samples -> `[gMASK] sop` + prompt (context, at most max_source_length tokens with
    the prefix) + response (at most max_target_length tokens) + eos, the last two learnt."""

    def __init__(self, data, tokenizer, max_source_length, max_target_length, verbose=True):
        super().__init__()
        self.max_seq_length = max_source_length + max_target_length + 1
        records = as_records(data, check_input_output)
        self.num_samples = len(records)
        prompt_key, response_key = INPUT_OUTPUT_KEYS
        for sample in records:
            source = tokenizer.encode(sample[prompt_key], add_special_tokens=True)
            target = tokenizer.encode(sample[response_key], add_special_tokens=False)
            if len(source) > max_source_length or len(target) > max_target_length:
                self.num_truncated += 1
                source, target = source[:max_source_length], target[:max_target_length]
            target = target + [tokenizer.eos_token_id]
            self.items.append({"input_ids": source + target, "labels": [IGNORE_INDEX] * len(source) + target})
        self._finish(self.max_seq_length, verbose)


def build_dataset(path, tokenizer, train_format="multi-turn", max_seq_length=None, max_source_length=None,
                  max_target_length=None, limit=None, packing=False, verbose=True, data_format="auto"):
    """Load, check and tokenize a data file in `train_format` ("multi-turn" or "input-output"), once: only its
    first `limit` samples if given, packed into rows of max_seq_length tokens if `packing`. `data_format`: the
    file's format, "auto" or one of chatglm3.data.formats.FORMATS (converted to ours as it is read)."""
    if train_format not in ("multi-turn", "input-output"):
        raise DataFormatError(f"未知数据格式 {train_format!r}，应为 multi-turn 或 input-output / unknown train format {train_format!r}, expected multi-turn or input-output")
    if train_format == "input-output" and (max_source_length is None or max_target_length is None):
        raise DataFormatError("input-output 格式需要 max_source_length 和 max_target_length / the input-output format needs max_source_length and max_target_length")
    records = (load_conversations if train_format == "multi-turn" else load_input_output)(path, data_format)
    if verbose and records.data_format != "chatglm3":
        print(f"{path}: {records.data_format} 格式，已转换为 ChatGLM3 格式 / {records.data_format} format, converted to ChatGLM3's")
    if limit is not None and limit < len(records):
        if verbose:
            print(f"只使用 {path} 的前 {limit} 条样本 / Using the first {limit} samples of {path}")
        records = Records(records[:limit], records.locations[:limit])
    if train_format == "multi-turn":
        dataset = MultiTurnDataset(records, tokenizer, max_seq_length, verbose=verbose)
    else:
        dataset = InputOutputDataset(records, tokenizer, max_source_length, max_target_length, verbose=verbose)
    return PackedDataset(dataset, dataset.max_seq_length, verbose=verbose) if packing else dataset


# --- several files, sampled by weight --------------------------------------------------------------------------------
class MixedDataset(Dataset):
    """Several tokenized datasets (one per training file) as one: item i is item i of their concatenation, and
    `counts[k]` says how many items file k gives each epoch (WeightedEpochSampler draws them).

    Weight: file k gives round(w_k / sum(w) * N) items per epoch, N being the items of all files together (its
    samples, or its packed rows with --packing): the share of each epoch drawn from it. Without weights each file
    gives all its items once (plain concatenation). A file asked for more items than it has repeats (each pass in a
    new order); fewer: a different subset each epoch."""

    def __init__(self, parts, names, weights=None, verbose=True):
        self.parts, self.names = list(parts), list(names)
        sizes = [len(part) for part in self.parts]
        total = sum(sizes)
        weights = sizes if weights is None else weights
        self.counts = [max(1, round(w / sum(weights) * total)) for w in weights]
        self.offsets = [sum(sizes[:k]) for k in range(len(sizes))]
        limits = [part.max_seq_length for part in self.parts]
        self.max_seq_length = None if None in limits else max(limits)  # None: no limit
        self.summary_lines = [
            f"  {name}: 每轮 {count} 条（文件共 {size} 条，权重 {w:g}，占 {count / sum(self.counts):.1%}）/ {count} per epoch "
            f"(of {size} in the file, weight {w:g}, {count / sum(self.counts):.1%})"
            for name, size, count, w in zip(self.names, sizes, self.counts, weights)
        ]
        if verbose:
            print(self.summary())

    def summary(self) -> str:
        return (f"混合训练数据：每轮 {len(self)} 条，各文件用的条数 / mixed training data: {len(self)} items per epoch, "
                "items used per file:\n" + "\n".join(self.summary_lines))

    @property
    def lengths(self) -> list[int]:
        return [length for part in self.parts for length in part.lengths]

    def __len__(self):
        """Items per epoch (what the Trainer counts epochs by)."""
        return sum(self.counts)

    def __getitem__(self, i) -> dict:
        k = bisect_left(self.offsets, i + 1) - 1
        return self.parts[k][i - self.offsets[k]]


class WeightedEpochSampler(Sampler):
    """Each epoch, `dataset.counts[k]` items of file k (MixedDataset), in a shuffled order; deterministic for a
    seed and an epoch (the Trainer calls set_epoch), so every process of a distributed run draws the same."""

    def __init__(self, dataset: MixedDataset, seed: int = 0):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def indices(self) -> list[int]:
        chosen = []
        for k, (part, count) in enumerate(zip(self.dataset.parts, self.dataset.counts)):
            # Its own generator per file and epoch: one file's draw does not change when another file changes.
            rng = np.random.default_rng([self.seed, self.epoch, 0, k])
            passes = [rng.permutation(len(part)) for _ in range(math.ceil(count / len(part)))]
            chosen += (np.concatenate(passes)[:count] + self.dataset.offsets[k]).tolist()
        order = np.random.default_rng([self.seed, self.epoch, 1]).permutation(len(chosen))
        return [chosen[j] for j in order]

    def __iter__(self):
        return iter(self.indices())


def build_training_set(paths, tokenizer, weights=None, **kwargs):
    """build_dataset for one training file (as it always was), a MixedDataset of one per file for several
    (`weights`: one per file, see MixedDataset; None: each file once per epoch)."""
    if len(paths) == 1 and weights is None:
        return build_dataset(paths[0], tokenizer, **kwargs)
    verbose = kwargs.get("verbose", True)
    parts = []
    for path in paths:
        if verbose:
            print(f"训练文件 / training file {path}:")
        parts.append(build_dataset(path, tokenizer, **kwargs))
    return MixedDataset(parts, [str(path) for path in paths], weights, verbose=verbose)


# --- packing -------------------------------------------------------------------------------------------------------
def pack_samples(items, max_seq_length: int) -> list[dict]:
    """Pack tokenized items into rows of at most max_seq_length tokens (best-fit decreasing, deterministic).

    Each row is {"input_ids", "labels", "attention_mask"}; attention_mask holds the segment id 1, 2, 3, ... of the
    item each token comes from, so the model attends within a conversation and restarts its positions. Every
    item lands in exactly one row. Items must start with an unlabelled token (`[gMASK]`), so no label ever asks
    the model to predict one conversation from the previous one."""
    lengths = []
    for i, item in enumerate(items):
        n = len(item["input_ids"])
        if n > max_seq_length:
            raise ValueError(f"第 {i} 条样本有 {n} 个 token，超过打包长度 {max_seq_length}（应先截断）/ item {i} has {n} tokens, more than the packing length {max_seq_length} (truncate it first)")
        if len(item["labels"]) != n:
            raise ValueError(f"第 {i} 条样本 input_ids 与 labels 长度不同 / item {i}: input_ids and labels differ in length ({n} vs {len(item['labels'])})")
        if n and item["labels"][0] != IGNORE_INDEX:
            raise ValueError(f"第 {i} 条样本的第一个 label 不是 -100，打包会跨样本泄漏 / item {i}: its first label is not -100, packing would leak across samples")
        lengths.append(n)

    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted: the first entry with room >= n fits best
    for i in sorted(range(len(items)), key=lambda i: (-lengths[i], i)):
        k = bisect_left(free, (lengths[i], -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = max_seq_length, len(rows)
            rows.append([])
        rows[r].append(i)
        insort(free, (room - lengths[i], r))

    packed = []
    for members in rows:
        row = {"input_ids": [], "labels": [], "attention_mask": []}
        for segment, i in enumerate(members, start=1):
            row["input_ids"] += items[i]["input_ids"]
            row["labels"] += items[i]["labels"]
            row["attention_mask"] += [segment] * lengths[i]
        packed.append(row)
    return packed


class PackedDataset(Dataset):
    """Rows of several conversations from a tokenized dataset (see pack_samples); use with DataCollatorForPacking."""

    def __init__(self, dataset, max_seq_length: int, verbose=True):
        items = [dataset[i] for i in range(len(dataset))]
        self.rows = pack_samples(items, max_seq_length)
        self.num_samples = len(items)
        self.max_seq_length = max_seq_length
        if verbose:
            tokens = sum(self.lengths)
            fill = tokens / (len(self.rows) * max_seq_length) if self.rows else 0.0
            print(
                f"打包：{self.num_samples} 条样本 → {len(self.rows)} 行（每行 ≤ {max_seq_length} token，填充率 {fill:.1%}）/ "
                f"packing: {self.num_samples} samples -> {len(self.rows)} rows of <= {max_seq_length} tokens, {fill:.1%} full"
            )

    @property
    def lengths(self) -> list[int]:
        return [len(row["input_ids"]) for row in self.rows]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i) -> dict:
        return self.rows[i]


# --- collators -----------------------------------------------------------------------------------------------------
class DataCollatorForChatGLM:
    """Pad a list of items into tensors input_ids, labels (padding -100) and attention_mask (1 token, 0 padding;
    an item's own attention_mask, e.g. packing's segment ids, is kept).

    padding="longest" pads to the batch's longest item rounded up to pad_to_multiple_of; "max_length" pads every
    batch to max_length (upstream's behaviour). Training pads on the right by default: the model takes position
    ids from attention_mask, and right padding keeps every sample's tokens at the same offsets as unpadded."""

    def __init__(self, tokenizer, pad_to_multiple_of=8, padding="longest", max_length=None, padding_side="right"):
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding 应为 'longest' 或 'max_length'，实际是 {padding!r} / padding must be 'longest' or 'max_length', got {padding!r}")
        if padding == "max_length" and not max_length:
            raise ValueError("padding='max_length' 需要 max_length / padding='max_length' needs max_length")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side 应为 'left' 或 'right' / padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id = tokenizer.pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding = padding
        self.max_length = max_length
        self.padding_side = padding_side

    def target_length(self, longest: int) -> int:
        if self.padding == "max_length":
            if longest > self.max_length:
                raise ValueError(f"批内样本有 {longest} 个 token，超过 max_length={self.max_length} / a sample has {longest} tokens, more than max_length={self.max_length}")
            return self.max_length
        multiple = self.pad_to_multiple_of
        return -(-longest // multiple) * multiple if multiple else longest

    def __call__(self, features: list[dict]) -> dict:
        length = self.target_length(max(len(f["input_ids"]) for f in features))
        batch = {"input_ids": [], "labels": [], "attention_mask": []}
        for f in features:
            n = len(f["input_ids"])
            if len(f["labels"]) != n:
                raise ValueError(f"input_ids 与 labels 长度不同 / input_ids and labels differ in length ({n} vs {len(f['labels'])})")
            columns = {"input_ids": list(f["input_ids"]), "labels": list(f["labels"]), "attention_mask": list(f.get("attention_mask", [1] * n))}
            fill = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX, "attention_mask": 0}
            for key, values in columns.items():
                pad = [fill[key]] * (length - n)
                batch[key].append(values + pad if self.padding_side == "right" else pad + values)
        return {key: torch.tensor(values, dtype=torch.long) for key, values in batch.items()}


class DataCollatorForPacking(DataCollatorForChatGLM):
    """Collator for PackedDataset rows: attention_mask keeps their segment ids 1, 2, 3, ... and pads with 0;
    no position_ids (the model restarts them per segment)."""

    def __call__(self, features: list[dict]) -> dict:
        for f in features:
            if "attention_mask" not in f:
                raise ValueError("打包的行缺少 attention_mask（段编号），请用 PackedDataset / a packed row lacks its attention_mask (segment ids): use PackedDataset")
        return super().__call__(features)
