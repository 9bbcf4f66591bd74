"""The batching strategies the training benchmarks compare (bench_train.py on the CPU, gpu_bench.py on a GPU):
one epoch of collated batches per strategy, and the loss each strategy trains with.

Every strategy trains each sample exactly once per epoch (checked by tests/test_benchmarks.py).
"""
import random

import torch
import torch.nn.functional as F
from _common import BenchError  # importing _common puts finetune_chatmodel_demo/ on sys.path
from transformers.trainer_pt_utils import LengthGroupedSampler

from chatglm3.model.conversation import IGNORE_INDEX
from preprocess_utils import DataCollatorForChatGLM, DataCollatorForPacking, pack_samples

STRATEGIES = {
    "pad_to_max": "补齐到最大长度 + 上游损失 / pad to max_seq_length + upstream loss (fp32 logits, full vocabulary)",
    "pad_to_max_our_loss": "补齐到最大长度 + 本项目损失 / pad to max_seq_length + our loss (labelled positions only)",
    "dynamic": "动态补齐 / dynamic padding (batch longest, multiple of 8)",
    "grouped": "按长度分组 + 动态补齐 / length-grouped batches + dynamic padding",
    "packing": "序列打包 / packing (several conversations per row)",
}
BASELINE = "pad_to_max"


# --- batches -------------------------------------------------------------------------------------------------------
def epoch_batches(strategy: str, items: list[dict], tokenizer, batch_size: int, max_seq_length: int, seed: int = 0) -> list[dict]:
    """One epoch of collated batches (input_ids, labels, attention_mask tensors) holding every item exactly once.
    Items are already truncated to max_seq_length."""
    if strategy not in STRATEGIES:
        raise BenchError(f"错误：未知策略 {strategy!r} / Error: unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    rng = random.Random(seed)
    if strategy == "packing":
        rows = pack_samples(items, max_seq_length)
        rng.shuffle(rows)
        collator = DataCollatorForPacking(tokenizer)
        return [collator(rows[k:k + batch_size]) for k in range(0, len(rows), batch_size)]
    if strategy == "grouped":
        generator = torch.Generator().manual_seed(seed)
        order = list(LengthGroupedSampler(batch_size, lengths=[len(item["input_ids"]) for item in items], generator=generator))
    else:
        order = list(range(len(items)))
        rng.shuffle(order)
    if strategy.startswith("pad_to_max"):
        collator = DataCollatorForChatGLM(tokenizer, padding="max_length", max_length=max_seq_length)
    else:
        collator = DataCollatorForChatGLM(tokenizer)
    return [collator([items[i] for i in order[k:k + batch_size]]) for k in range(0, len(order), batch_size)]


def spread(num_batches: int, count: int) -> list[int]:
    """`count` batch indices spaced evenly over the epoch (wrapping when the epoch is shorter), so that the timed
    steps see short and long batches alike whatever order the strategy produces them in."""
    return [(i * num_batches // count if count <= num_batches else i) % num_batches for i in range(count)]


def batch_counts(batch: dict) -> dict:
    """Tokens in a batch: useful = not padding; padded = every position the model computes; labelled = the
    positions that carry a loss (shifted labels)."""
    return {
        "useful": int((batch["attention_mask"] > 0).sum()),
        "padded": batch["input_ids"].numel(),
        "labelled": int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()),
    }


# --- losses --------------------------------------------------------------------------------------------------------
def upstream_loss(model, batch: dict) -> torch.Tensor:
    """The loss as upstream's modeling_chatglm computes it: logits at every position over the whole vocabulary,
    cast to float32, shifted, cross-entropy ignoring -100."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, return_logits=True).logits
    logits = logits.float()
    shift_logits = logits[:, :-1].contiguous()
    shift_labels = batch["labels"][:, 1:].contiguous()
    return F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1), ignore_index=IGNORE_INDEX)


def strategy_loss(strategy: str, model, batch: dict) -> torch.Tensor:
    if strategy == BASELINE:
        return upstream_loss(model, batch)
    return model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"], use_cache=False).loss
