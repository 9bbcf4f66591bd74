"""PrefixTrainer: transformers' Seq2SeqTrainer with ChatGLM3 checkpoints in upstream's format.

- P-Tuning v2 (`save_prefix_only=True`): a checkpoint holds only the prefix encoder, as upstream wrote it:
  `pytorch_model.bin` with `transformer.prefix_encoder.*` (float32) and `config.json` with `pre_seq_len` /
  `prefix_projection`, plus the tokenizer files. Upstream's inference.py loads it unchanged.
- Full fine-tuning: the whole model via `model.save_pretrained` (sharded safetensors, upstream tensor names).
- LoRA: the adapter only, by PEFT's save_pretrained (adapter_config.json + adapter_model.safetensors); resuming
  loads it back through the Trainer's PEFT support.
- Resuming a prefix-only checkpoint loads the prefix strictly, with chatglm3.checkpoint.loading's P-Tuning loader (the
  Trainer's default would load it non-strictly and warn about every frozen tensor).
- Logs tokens per second: all real (non-padding) tokens and labelled tokens, summed over all processes.
- Progress (steps done of --max_steps, time left) through chatglm3.progress: a bar on a terminal, a plain line
  every 30 s in a log file (CHATGLM3_PROGRESS_SECONDS), where transformers' bar would write a redraw per step.
- A loss or gradient that is not finite stops the run after that optimizer step, before anything is logged or
  saved (the Trainer would log the NaN as the average of earlier losses and carry on); weights that are not finite
  are never saved. Under fp16 loss scaling an overflowing gradient is expected (the step is skipped by design),
  so only the loss counts there.
"""
import os
import time
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist
from transformers import Seq2SeqTrainer
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import has_length
from transformers.utils import logging

from chatglm3.checkpoint.upstream_files import copy_upstream_files
from chatglm3.checkpoint.native import PREFIX_KEY
from chatglm3.errors import ChatGLMError
from chatglm3.checkpoint.loading import load_ptuning_checkpoint
from chatglm3.output_files import reported_write_errors, share_weight_files
from chatglm3.progress import Progress

logger = logging.get_logger(__name__)

WEIGHTS_NAME = "pytorch_model.bin"
TRAINING_ARGS_NAME = "training_args.bin"
_CHECK = ("请检查学习率（--learning_rate / LR）、--lora_alpha（LORA_ALPHA）、fp16（可改用 bf16 或 fp32）和数据，"
          "再从上一个检查点以更小的学习率继续",
          "Check the learning rate (--learning_rate, LR), --lora_alpha (LORA_ALPHA), fp16 (use bf16 or fp32) and the "
          "data, then resume from the last checkpoint with a lower learning rate")


class NotFiniteError(ChatGLMError):
    """Training produced a NaN or infinite loss, gradient or weight."""


def prefix_state_dict(model, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """Only the P-Tuning prefix, float32 on CPU, under upstream's key names."""
    if state_dict is None:
        state_dict = model.state_dict()
    prefix = {k: v.detach().float().cpu().contiguous() for k, v in state_dict.items() if k.startswith(PREFIX_KEY)}
    if not prefix:
        raise ChatGLMError(f"模型中没有 P-Tuning 前缀参数 / The model has no P-Tuning prefix ({PREFIX_KEY}*)")
    return prefix


class TrainingProgress(ProgressCallback):
    """transformers' progress callback (which also prints each log dict) with chatglm3.progress's bar or lines."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:  # (a resumed run starts at its checkpoint's step)
            self.training_bar = Progress(state.max_steps, "训练步 / training steps", initial=state.global_step)
        self.current_step = state.global_step

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if state.is_world_process_zero and has_length(eval_dataloader):
            if self.prediction_bar is None:
                self.prediction_bar = Progress(len(eval_dataloader), "验证批次 / evaluation batches", unit="batch")
            self.prediction_bar.update(1)


class PrefixTrainer(Seq2SeqTrainer):
    def __init__(self, *args, save_prefix_only: bool = False, upstream_files_from: Optional[str] = None,
                 **kwargs):
        self.save_prefix_only = save_prefix_only
        self.upstream_files_from = upstream_files_from  # the base folder whose code files etc. full checkpoints get
        super().__init__(*args, **kwargs)
        if self.pop_callback(ProgressCallback) is not None:  # not with --disable_tqdm, nor in a notebook
            self.add_callback(TrainingProgress())
        self._tokens = torch.zeros(2, dtype=torch.float64)  # [all real tokens, labelled tokens] since last log
        self._last_log_time: Optional[float] = None
        self._bad_loss: Optional[torch.Tensor] = None  # whether a loss since the last optimizer step was not finite

    # ---- stopping on NaN ------------------------------------------------------------------------------------
    def _all_processes(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        """`tensor` reduced (op: SUM, MAX) over every process."""
        if not (dist.is_available() and dist.is_initialized()):
            return tensor
        device = self.args.device if dist.get_backend() == "nccl" else torch.device("cpu")
        tensor = tensor.to(device)
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
        return tensor

    def _loss_scaling(self) -> bool:
        ds_config = getattr(self.args, "hf_deepspeed_config", None)
        return bool(self.args.fp16 or (ds_config is not None and ds_config.is_true("fp16.enabled")))

    def _stop_if_not_finite(self, grad_norm) -> None:
        """After an optimizer step, before it is logged or saved: raise NotFiniteError when a loss of the step
        (any process) or its gradient norm is NaN or infinite. One synchronisation per optimizer step."""
        if self._bad_loss is None:  # no training step since the last check
            return
        bad = torch.zeros(2, device=self._bad_loss.device)
        bad[0] = self._bad_loss.float()
        if grad_norm is not None and not self._loss_scaling():
            bad[1] = (~torch.isfinite(torch.as_tensor(grad_norm, dtype=torch.float32))).float().to(bad.device)
        self._bad_loss = None
        bad_loss, bad_grad = self._all_processes(bad, "MAX").tolist()  # all stop together
        if bad_loss or bad_grad:
            zh, en = ("损失", "loss") if bad_loss else ("梯度", "gradient")
            raise NotFiniteError(
                f"错误：第 {self.state.global_step} 步的{zh}不是有限数（NaN 或 inf），训练已停止，不保存这一步的检查点；{_CHECK[0]} / "
                f"Error: the {en} at step {self.state.global_step} is not finite (NaN or inf); training stopped and "
                f"nothing of this step was saved. {_CHECK[1]}"
            )

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *args, **kwargs):
        self._stop_if_not_finite(grad_norm)
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)

    def _check_finite_weights(self, model, state_dict) -> None:
        """The weights about to be saved are finite (the trainable ones; a given state_dict entirely)."""
        named = state_dict.items() if state_dict is not None else (
            (n, p) for n, p in model.named_parameters() if p.requires_grad)
        for name, tensor in named:
            if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
                raise NotFiniteError(
                    f"错误：第 {self.state.global_step} 步之后的权重 {name} 含有 NaN 或 inf，训练已停止，没有保存；{_CHECK[0]} / "
                    f"Error: after step {self.state.global_step} the weights {name} hold NaN or inf; training "
                    f"stopped and they were not saved. {_CHECK[1]}"
                )

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
        model = self.accelerator.unwrap_model(self.model)
        self._check_finite_weights(model, state_dict)
        os.makedirs(output_dir, exist_ok=True)
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
        if self.upstream_files_from is not None:
            copy_upstream_files(self.upstream_files_from, output_dir)
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
        loss = super().training_step(model, inputs, *args, **kwargs)
        bad = ~torch.isfinite(loss.detach())  # stays on the device: checked once per optimizer step
        self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad
        return loss

    def log(self, logs, *args, **kwargs):
        # Training logs (the ones with "loss") are made on every process together, so a collective is safe here.
        if "loss" in logs and self._last_log_time is not None:
            tokens = self._all_processes(self._tokens.clone(), "SUM").cpu()
            now = time.perf_counter()
            elapsed = max(now - self._last_log_time, 1e-9)
            logs["tokens_per_second"] = round(float(tokens[0]) / elapsed, 1)
            logs["labelled_tokens_per_second"] = round(float(tokens[1]) / elapsed, 1)
            self._tokens.zero_()
            self._last_log_time = now
        return super().log(logs, *args, **kwargs)
