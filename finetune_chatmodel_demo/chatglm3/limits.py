"""The one check of a number a user gives (a flag, an environment variable, a value in a config file): the right
kind (integer or real), finite, within its range; otherwise one line naming where it came from.

`Limit(int, low=1)` and the like describe a range; `Limit.check(label, value)` takes the value as typed (a string)
or as parsed (a number) and returns the number or raises `NumberError`; `Limit.argument_type()` is the same
check as an argparse `type=` (argparse names the flag). `FLAG_LIMITS` holds the ranges of finetune.py's numeric
flags, its own and transformers' (the launchers pass their variables as these flags, and scripts/launch.py checks
them under the variable's name before anything starts); `check_flags` applies them to parsed arguments.
"""
import argparse
import math
from dataclasses import dataclass
from typing import Optional

from chatglm3.errors import ChatGLMError

INT64_MAX = 2**63 - 1  # beyond it torch and numpy overflow silently or raise deep inside


class NumberError(ChatGLMError):
    """A number out of its range, not finite or not a number; the message names the flag, variable or file."""


def _fmt(x) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


@dataclass(frozen=True)
class Limit:
    kind: type = float        # int or float
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False    # low itself excluded
    high_open: bool = False
    special: tuple = ()       # values accepted outside the range, with their meaning (e.g. max_steps -1)

    def describe(self) -> tuple:
        """(Chinese, English) description of the values accepted."""
        what_zh, what_en = ("整数", "an integer") if self.kind is int else ("有限数", "a finite number")
        high = None if self.kind is int and self.high == INT64_MAX else self.high
        if self.low is not None and high is not None:
            interval = f"{'(' if self.low_open else '['}{_fmt(self.low)}, {_fmt(high)}{')' if self.high_open else ']'}"
            zh, en = f"{interval} 内的{what_zh}", f"{what_en} in {interval}"
        elif self.low is not None:
            zh = f"{'大于' if self.low_open else '不小于'} {_fmt(self.low)} 的{what_zh}"
            en = f"{what_en} {'>' if self.low_open else '>='} {_fmt(self.low)}"
        else:
            zh, en = what_zh, what_en
        for value, meaning_zh, meaning_en in self.special:
            zh += f"（或 {value}：{meaning_zh}）"
            en += f" (or {value}: {meaning_en})"
        return zh, en

    def _parse(self, value):
        if isinstance(value, bool):  # a JSON true is not the number 1
            raise ValueError
        if isinstance(value, str):
            text = value.strip()
            if self.kind is int:
                return int(text, 10)  # no "1e3", "1.0", "0x10": an integer as typed
            return float(text)
        if isinstance(value, (int, float)):
            if self.kind is int and not (isinstance(value, int) or float(value).is_integer()):
                raise ValueError
            return int(value) if self.kind is int and math.isfinite(value) else value
        raise ValueError

    def ok(self, number) -> bool:
        if not math.isfinite(number):
            return False
        if any(number == value for value, *_ in self.special):
            return True
        high = INT64_MAX if self.kind is int and self.high is None else self.high
        if self.low is not None and (number < self.low or (self.low_open and number == self.low)):
            return False
        return high is None or (number < high if self.high_open else number <= high)

    def parse(self, value):
        """`value` (a string as typed, or a number) as a number of this kind in range, else None."""
        try:
            number = self._parse(value)
        except (ValueError, OverflowError):
            return None
        return number if self.ok(number) else None

    def check(self, label: str, value):
        """`value` (a string as typed, or a number) as a number of this kind in range; NumberError naming
        `label` otherwise."""
        number = self.parse(value)
        if number is None:
            zh, en = self.describe()
            raise NumberError(f"错误：{label} 必须是{zh}，收到 {value!r} / Error: {label} must be {en}, got {value!r}")
        return number

    def argument_type(self):
        """This check as argparse's `type=`: argparse reports a bad value in one line naming the flag."""
        def number(text: str):
            value = self.parse(text)
            if value is None:
                zh, en = self.describe()
                raise argparse.ArgumentTypeError(f"须是{zh} / must be {en}, got {text!r}")
            return value

        return number


AT_LEAST_1 = Limit(int, low=1)
AT_LEAST_0 = Limit(int, low=0)
NON_NEGATIVE = Limit(float, low=0)
POSITIVE = Limit(float, low=0, low_open=True)
FRACTION = Limit(float, low=0, high=1, high_open=True)          # [0, 1)
UNIT = Limit(float, low=0, high=1)                              # [0, 1]
TOP_P = Limit(float, low=0, low_open=True, high=1)              # (0, 1]
SEED = Limit(int, low=0, high=2**32 - 1)                        # numpy's seed range
PORT = Limit(int, low=1, high=65535)
TIMEOUT_SECONDS = Limit(float, low=0, low_open=True, high=3600)  # (0, 3600]: a timeout of up to an hour

# finetune.py's numeric flags (dataclass field names). transformers' own: the values that would fail deep inside
# the Trainer or PyTorch, or pass silently (a --max_steps 0 trains for --num_train_epochs instead).
FLAG_LIMITS = {
    # ours (arguments.py)
    "pre_seq_len": AT_LEAST_1, "lora_rank": AT_LEAST_1, "lora_alpha": POSITIVE, "lora_dropout": FRACTION,
    "max_seq_length": AT_LEAST_1, "max_source_length": AT_LEAST_1, "max_target_length": AT_LEAST_1,
    "max_train_samples": AT_LEAST_1, "max_eval_samples": AT_LEAST_1, "preprocessing_num_workers": AT_LEAST_0,
    # transformers' Seq2SeqTrainingArguments
    "per_device_train_batch_size": AT_LEAST_1, "per_device_eval_batch_size": AT_LEAST_1,
    "gradient_accumulation_steps": AT_LEAST_1, "eval_accumulation_steps": AT_LEAST_1,
    "dataloader_num_workers": AT_LEAST_0, "save_total_limit": AT_LEAST_0,
    "max_steps": Limit(int, low=1, special=((-1, "按 --num_train_epochs 训练", "train for --num_train_epochs"),)),
    "num_train_epochs": POSITIVE, "learning_rate": NON_NEGATIVE, "weight_decay": NON_NEGATIVE,
    "max_grad_norm": NON_NEGATIVE, "warmup_steps": NON_NEGATIVE, "warmup_ratio": UNIT, "adam_epsilon": POSITIVE,
    "adam_beta1": FRACTION, "adam_beta2": FRACTION, "label_smoothing_factor": FRACTION,
    "logging_steps": POSITIVE, "save_steps": POSITIVE, "eval_steps": POSITIVE,
    "seed": SEED, "data_seed": SEED, "ddp_timeout": AT_LEAST_1, "generation_max_length": AT_LEAST_1,
    "generation_num_beams": AT_LEAST_1,
}


def check_flags(*argument_sets) -> None:
    """Every FLAG_LIMITS field of the given dataclasses (or namespaces) that is set is in range; flags a
    transformers release lacks are skipped."""
    for args in argument_sets:
        for name, limit in FLAG_LIMITS.items():
            value = getattr(args, name, None)
            if value is not None:
                limit.check(f"--{name}", value)
