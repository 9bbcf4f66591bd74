"""PrefixTrainer: transformers' Seq2SeqTrainer with ChatGLM3 checkpoints in upstream's format.

- P-Tuning v2 (`save_prefix_only=True`): a checkpoint holds only the prefix encoder, as upstream wrote it:
  `pytorch_model.bin` with `transformer.prefix_encoder.*` (float32) and `config.json` with `pre_seq_len` /
  `prefix_projection`, plus the tokenizer files. Upstream's inference.py loads it unchanged.
- Full fine-tuning: the whole model via `model.save_pretrained` (sharded safetensors, upstream tensor names).
- LoRA: the adapter only, by PEFT's save_pretrained (adapter_config.json + adapter_model.safetensors); resuming
  loads it back through the Trainer's PEFT support.
- Resuming a prefix-only checkpoint loads the prefix strictly, with chatglm3.loading's P-Tuning loader (the
  Trainer's default would load it non-strictly and warn about every frozen tensor).
- Logs tokens per second: all real (non-padding) tokens and labelled tokens, summed over all processes.
"""
import os
import re
import time
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist
from transformers import Seq2SeqTrainer
from transformers.utils import logging

from chatglm3.carry import carry_upstream_files
from chatglm3.checkpoint import PREFIX_KEY
from chatglm3.errors import ChatGLMError
from chatglm3.loading import load_ptuning_checkpoint
from chatglm3.safe_io import reported_write_errors, share_weight_files
from chatglm3.safe_load import CorruptFileError, verify_checkpoint

logger = logging.get_logger(__name__)

WEIGHTS_NAME = "pytorch_model.bin"
TRAINING_ARGS_NAME = "training_args.bin"
# The Trainer writes trainer_state.json last: a checkpoint without it was cut short (e.g. the run was killed).
TRAINER_STATE_NAME = "trainer_state.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def find_last_checkpoint(output_dir) -> Optional[Path]:
    """The complete `checkpoint-N` with the largest N in `output_dir` whose files are whole, or None: a damaged one
    is reported and skipped for the one before; one holding code (UnsafeFileError) stops the run.

    Built with pathlib, so it works on any OS (upstream joined paths with a backslash)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    complete = []
    for path in output_dir.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and path.is_dir():
            if (path / TRAINER_STATE_NAME).is_file():
                complete.append((int(match.group(1)), path))
            else:
                print(
                    f"跳过不完整的检查点 {path}（缺少 {TRAINER_STATE_NAME}）/ "
                    f"Skipping incomplete checkpoint {path} (no {TRAINER_STATE_NAME})"
                )
    for _, path in sorted(complete, reverse=True):
        try:
            verify_checkpoint(path)
        except CorruptFileError as e:
            print(f"跳过损坏的检查点 / Skipping the damaged checkpoint {path}: {e}")
            continue
        return path
    return None


def prefix_state_dict(model, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """Only the P-Tuning prefix, float32 on CPU, under upstream's key names."""
    if state_dict is None:
        state_dict = model.state_dict()
    prefix = {k: v.detach().float().cpu().contiguous() for k, v in state_dict.items() if k.startswith(PREFIX_KEY)}
    if not prefix:
        raise ChatGLMError(f"模型中没有 P-Tuning 前缀参数 / The model has no P-Tuning prefix ({PREFIX_KEY}*)")
    return prefix


class PrefixTrainer(Seq2SeqTrainer):
    def __init__(self, *args, save_prefix_only: bool = False, carry_from: Optional[str] = None, **kwargs):
        self.save_prefix_only = save_prefix_only
        self.carry_from = carry_from  # the base model folder whose code files etc. full checkpoints carry
        super().__init__(*args, **kwargs)
        self._tokens = torch.zeros(2, dtype=torch.float64)  # [all real tokens, labelled tokens] since last log
        self._last_log_time: Optional[float] = None

    # ---- saving -------------------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial, *args, **kwargs):
        # A checkpoint that cannot be written (disk full, ...) ends the run with one line; earlier ones stay whole.
        target = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        with reported_write_errors(target, ("；之前的检查点完好", "; the earlier checkpoints are intact")):
            return super()._save_checkpoint(model, trial, *args, **kwargs)

    def _save(self, output_dir: Optional[str] = None, state_dict=None):
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        # The Trainer switches use_cache off for training; a saved config.json is for inference, where
        # upstream's code reads it, so write it as the official config has it.
        use_cache = getattr(model.config, "use_cache", None)
        model.config.use_cache = True
        try:
            if self.save_prefix_only:
                logger.info(f"Saving the P-Tuning v2 prefix to {output_dir}")
                # Written by hand rather than via save_pretrained: upstream's loader expects exactly one
                # pytorch_model.bin (never sharded, never safetensors) holding the prefix.
                torch.save(prefix_state_dict(model, state_dict), os.path.join(output_dir, WEIGHTS_NAME))
                model.config.save_pretrained(output_dir)
            else:
                # PEFT's LoRA model writes only its adapter (PEFT's format); ours writes every weight.
                logger.info(f"Saving {type(model).__name__} to {output_dir}")
                model.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)
                share_weight_files(output_dir)  # for PEFT's adapter file (our save_pretrained does its own)
        finally:
            model.config.use_cache = use_cache
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        if self.carry_from is not None:
            carry_upstream_files(self.carry_from, output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not self.save_prefix_only:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_ptuning_checkpoint(model, resume_from_checkpoint)
        logger.info(f"Loaded the P-Tuning prefix from {resume_from_checkpoint}")

    # ---- tokens per second ----------------------------------------------------------------------------------
    def training_step(self, model, inputs, *args, **kwargs):
        if self._last_log_time is None:
            self._last_log_time = time.perf_counter()
        mask = inputs.get("attention_mask")
        labels = inputs.get("labels")
        if mask is not None:
            self._tokens[0] += float((mask != 0).sum())
        else:
            self._tokens[0] += float(inputs["input_ids"].numel())
        if labels is not None:
            # Token i is trained to predict label i+1 (shifted in the model), so count labels[:, 1:].
            self._tokens[1] += float((labels[:, 1:] != -100).sum())
        return super().training_step(model, inputs, *args, **kwargs)

    def log(self, logs, *args, **kwargs):
        # Training logs (the ones with "loss") are made on every process together, so a collective is safe here.
        if "loss" in logs and self._last_log_time is not None:
            tokens = self._tokens.clone()
            if dist.is_available() and dist.is_initialized():
                device = self.args.device if dist.get_backend() == "nccl" else torch.device("cpu")
                tokens = tokens.to(device)
                dist.all_reduce(tokens)
                tokens = tokens.cpu()
            now = time.perf_counter()
            elapsed = max(now - self._last_log_time, 1e-9)
            logs["tokens_per_second"] = round(float(tokens[0]) / elapsed, 1)
            logs["labelled_tokens_per_second"] = round(float(tokens[1]) / elapsed, 1)
            self._tokens.zero_()
            self._last_log_time = now
        return super().log(logs, *args, **kwargs)
