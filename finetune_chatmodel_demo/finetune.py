#!/usr/bin/env python
"""Fine-tune ChatGLM3-6B on multi-turn dialogue: P-Tuning v2 (`--pre_seq_len N`), LoRA (`--lora_rank R`) or full
fine-tuning.

Same flags as upstream's finetune_chatmodel_demo/finetune.py, plus `--validation_file`, `--packing`, the LoRA flags,
`--data_format` (OpenAI, ShareGPT or Alpaca files read as they are) and several `--train_file`s mixed by
`--train_weights` (docs/data.md).
Examples (the launchers in scripts/ fill these in from environment variables):

    python finetune.py --model_name_or_path chatglm3-6b --train_file formatted_data/pokemon_conversations.jsonl \\
        --output_dir output/pokemon_pt --pre_seq_len 128 --learning_rate 2e-2 --max_steps 1000 \\
        --per_device_train_batch_size 4 --gradient_accumulation_steps 4 --max_seq_length 512 \\
        --gradient_checkpointing --logging_steps 10 --save_steps 200 --resume_from_checkpoint true

    torchrun --nproc_per_node 4 finetune.py ... --deepspeed configs/deepspeed.json --bf16   # full fine-tuning
    python finetune.py ... --lora_rank 8 --learning_rate 5e-4   # LoRA: saves a PEFT adapter (scripts/finetune_lora.sh)

Precision: with P-Tuning v2 and LoRA the frozen base is held in bf16 with --bf16, fp16 with --fp16, else by the
one dtype rule (chatglm3.checkpoint.loading.resolve_dtype: bf16 on a GPU that has it, the checkpoint's own dtype on the CPU);
the prefix or adapter stays float32. `--quantization_bit 4|8` quantizes that base (bitsandbytes, CPU or CUDA):
P-Tuning v2 over a quantized base, or QLoRA with --lora_rank. Full fine-tuning loads float32 weights and takes
--bf16/--fp16 (mixed precision, or DeepSpeed's) as usual; --bf16 works on the CPU too.

`--resume_from_checkpoint true` continues from the newest complete checkpoint-N in --output_dir (or starts
fresh when there is none); a path continues from that checkpoint. Optimizer, scheduler and RNG are restored.
"""
import contextlib
import dataclasses
import logging
import os
import sys
import warnings

import torch  # noqa: E402
# chatglm3 before transformers' training classes, which import bitsandbytes: chatglm3.checkpoint.quantization quiets it first.
from chatglm3 import ChatGLMError, compat, output_files  # noqa: E402
from chatglm3.checkpoint import loading, lora, memory, quantization, torch_files  # noqa: E402
from chatglm3.data import train_format  # noqa: E402
import transformers  # noqa: E402
from transformers import HfArgumentParser, Seq2SeqTrainingArguments, set_seed  # noqa: E402
from transformers.trainer_utils import IntervalStrategy  # noqa: E402

from arguments import (ArgumentsError, DataTrainingArguments, ModelArguments, check_arguments,  # noqa: E402
                       check_training_arguments, train_files)
import launching  # noqa: E402
from arguments import no_effect_notes  # noqa: E402
from launching import TRAINER_STATE_NAME, find_last_checkpoint  # noqa: E402
import preprocess_utils  # noqa: E402
from trainer import PrefixTrainer  # noqa: E402

logger = logging.getLogger(__name__)

# Errors that carry a message for the user: printed without a traceback, exit status 1
# (chatglm3.data.reader.DataFormatError is a ChatGLMError).
USER_ERRORS = (ArgumentsError, ChatGLMError)


def parse_args(argv=None):
    compat.silence_renamed_flag_warnings()
    # Printed once per collective by DeepSpeed's CPU path; says nothing actionable to a user.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor", category=FutureWarning)
    argv = sys.argv[1:] if argv is None else list(argv)
    # No abbreviations: "--output_di X" must not pass for --output_dir (the launcher reads flags by full name).
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, Seq2SeqTrainingArguments), allow_abbrev=False)
    parser.error = flag_error
    # Read by transformers while parsing, where a bad file would be a ValueError naming nothing.
    launching.check_deepspeed_config(launching.flag_value(argv, "--deepspeed"), "--deepspeed")
    try:  # transformers checks some flag values itself (e.g. --logging_steps 0) and raises ValueError
        if len(argv) == 1 and argv[0].endswith(".json"):
            return parser.parse_json_file(json_file=os.path.abspath(argv[0]))
        argv = compat.training_argv(argv, Seq2SeqTrainingArguments.__dataclass_fields__)
        *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ArgumentsError(f"错误：参数不合法 / Error: invalid flag value: {reason}") from None
    if unknown:
        flag_error(f"不认识的参数 / unrecognized arguments: {' '.join(unknown)}")
    return parsed


def flag_error(message: str):
    """argparse's error as one line (its usage block would bury the reason); exit status 2."""
    print(f"错误 / Error: {message}（python finetune.py --help）", file=sys.stderr)
    sys.exit(2)


def main_print(training_args, message: str):
    if training_args.process_index == 0:
        print(message, flush=True)


def resolve_resume(training_args):
    """`--resume_from_checkpoint true|false|PATH` -> a checkpoint path or None."""
    value = training_args.resume_from_checkpoint
    if value is None or str(value).strip().lower() in ("", "false", "no", "none", "0"):
        return None
    if str(value).strip().lower() in ("true", "yes", "auto", "1"):
        last = find_last_checkpoint(training_args.output_dir)
        if last is None:
            main_print(
                training_args,
                f"{training_args.output_dir} 中没有检查点，从头开始训练 / "
                f"No checkpoint in {training_args.output_dir}, starting from scratch",
            )
            return None
        main_print(training_args, f"从检查点继续训练 / Resuming from {last}")
        return str(last)
    path = os.path.abspath(value)
    if not os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
        raise ArgumentsError(
            f"错误：--resume_from_checkpoint {value} 不是完整的训练检查点（缺少 trainer_state.json）；"
            f"用 true 表示 --output_dir 中最新的检查点 / Error: --resume_from_checkpoint {value} is not a complete "
            "training checkpoint (no trainer_state.json); pass true to use the newest one in --output_dir"
        )
    torch_files.verify_checkpoint(path)
    return path


def read_data(paths, limit, data_args, tokenizer, training_args, weights=None):
    """Data files loaded, checked and tokenized once (None without a path); errors name file:line. Several files
    (or weights) make a MixedDataset, sampled by weight each epoch."""
    if paths is None:
        return None
    return preprocess_utils.build_training_set(
        paths, tokenizer, weights, train_format=data_args.train_format, max_seq_length=data_args.max_seq_length,
        max_source_length=data_args.max_source_length, max_target_length=data_args.max_target_length, limit=limit,
        packing=data_args.packing, verbose=training_args.process_index == 0, data_format=data_args.data_format,
    )


class Trainer(PrefixTrainer):
    """PrefixTrainer that draws several training files by weight, afresh each epoch (WeightedEpochSampler)."""

    def _get_train_sampler(self, *args, **kwargs):
        dataset = args[0] if args else kwargs.get("train_dataset")
        dataset = self.train_dataset if dataset is None else dataset
        if isinstance(dataset, preprocess_utils.MixedDataset):
            return preprocess_utils.WeightedEpochSampler(dataset, self.args.seed)
        return super()._get_train_sampler(*args, **kwargs)


def setup_logging(training_args):
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def configure_training(training_args, data_args) -> bool:
    """Evaluation follows --validation_file; settings our model and datasets need. Returns whether activation
    recomputation was asked for (the model's own switch does it, see compat.take_gradient_checkpointing)."""
    strategy = IntervalStrategy(training_args.eval_strategy)
    if data_args.validation_file is None and strategy != IntervalStrategy.NO:
        raise ArgumentsError(
            f"错误：--eval_strategy {strategy.value} 需要 --validation_file / "
            f"Error: --eval_strategy {strategy.value} needs --validation_file"
        )
    if data_args.validation_file is not None:
        if strategy == IntervalStrategy.NO:
            training_args.eval_strategy = IntervalStrategy.STEPS
            training_args.eval_steps = training_args.eval_steps or training_args.save_steps
        training_args.do_eval = True
    # Dataset items are plain dicts for our collator, and forward takes **kwargs, so the Trainer cannot guess
    # which columns the model uses.
    training_args.remove_unused_columns = False
    training_args.label_names = ["labels"]
    training_args.prediction_loss_only = True  # the model returns no logits with labels (memory)
    training_args.ddp_find_unused_parameters = False
    return compat.take_gradient_checkpointing(training_args)


def make_plan(model_args, training_args):
    """The load plan (chatglm3.checkpoint.loading): names resolved once (a Hub id from the Hugging Face cache or downloaded,
    --cache_dir, --model_revision), config.json and the P-Tuning checkpoint's config read once, and the weights'
    dtype: full fine-tuning keeps float32 master weights (--bf16/--fp16 compute in half through AMP or
    DeepSpeed); P-Tuning v2 and LoRA freeze the base, held in bf16 with --bf16, fp16 with --fp16, else by the one
    dtype rule (loading.resolve_dtype: bf16 on a GPU, the checkpoint's own on the CPU). A quantized base is
    placed on the training device as it is read (bitsandbytes quantizes there)."""
    frozen = model_args.pre_seq_len is not None or model_args.lora_rank is not None
    dtype = "float32" if not frozen else "bfloat16" if training_args.bf16 else "float16" if training_args.fp16 else None
    device = training_args.device if model_args.quantization_bit else torch.device("cpu")
    plan = loading.make_plan(
        model_args.model_name_or_path, model_args.tokenizer_name, pt_checkpoint=model_args.ptuning_checkpoint,
        pre_seq_len=model_args.pre_seq_len, prefix_projection=model_args.prefix_projection if model_args.pre_seq_len else None,
        device=str(device), dtype=dtype, quantization_bit=model_args.quantization_bit,
        revision=model_args.model_revision, cache_dir=model_args.cache_dir, label="--model_name_or_path, BASE_MODEL_PATH")
    if dtype is None and training_args.device.type != "cpu":  # the rule for the device that trains, not the loader's
        plan = dataclasses.replace(plan, dtype=loading.resolve_dtype(None, training_args.device))
    return plan


def sanity_check(sample, tokenizer):
    """Upstream's print of the first training sample: each token, its id and its label (-100: not learnt), to
    check the loss mask before training (--sanity_check false turns it off)."""
    print("Sanity Check >>>>>>>>>>>>>")
    for token, label in zip(sample["input_ids"], sample["labels"]):
        print("%20s: %6d -> %6d" % (repr(tokenizer.decode([int(token)])), int(token), int(label)))
    print("<<<<<<<<<<<<< Sanity Check", flush=True)


def check_memory(plan, model_args, training_args):
    """Refuse, before the weights are read, a run that clearly cannot fit (a lower bound, chatglm3.checkpoint.memory): every
    process first holds the weights in RAM; the device then holds them as loaded (dtype, 4/8-bit layers) with the
    trainable part's gradients and Adam states (P-Tuning v2, LoRA), or, for full fine-tuning, the gradients and
    Adam states as ZeRO splits them. ZeRO-3 and offload leave the placement to DeepSpeed: a warning only."""
    config = plan.model_config()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    # The rank of a LoRA update is at most the narrower side of the layer it adapts, never above hidden_size: a
    # larger one only allocates (a rank of 10^8 asks for gigabytes per layer).
    if model_args.lora_rank is not None and model_args.lora_rank > config.hidden_size:
        raise ArgumentsError(f"错误：--lora_rank（LORA_RANK）{model_args.lora_rank} 大于模型的 hidden_size {config.hidden_size}，"
                             f"LoRA 的秩不会超过层的宽度 / Error: --lora_rank (LORA_RANK) {model_args.lora_rank} exceeds the "
                             f"model's hidden_size {config.hidden_size}; a LoRA update's rank cannot exceed a layer's width")
    stage, offload = memory.zero_settings(training_args.hf_deepspeed_config.config) if training_args.deepspeed else (0, False)
    if model_args.pre_seq_len is not None or model_args.lora_rank is not None:  # the base is frozen
        # QLoRA's k-bit preparation (PEFT) holds the weights that are not quantized in float32.
        dtype = torch.float32 if model_args.lora_rank and plan.quantization_bit else plan.dtype
        trainable = memory.trainable_parameters(config, model_args.lora_rank, lora.parse_targets(
            model_args.lora_target or lora.DEFAULT_TARGET))
        need = memory.weight_bytes(config, dtype, plan.quantization_bit) + memory.trainable_bytes(trainable)
        cheaper = memory.cheaper_option(plan.dtype, plan.quantization_bit, training=True)
    else:
        half = bool(training_args.deepspeed) and (training_args.bf16 or training_args.fp16)
        need = memory.training_bytes(plan.parameters, 2 if half else 4, training_args.world_size, stage, master_copy=half)
        cheaper = "P-Tuning v2（--pre_seq_len 128）/ LoRA（--lora_rank 8）"
    device = training_args.device
    if device.type == "cuda" and not plan.quantization_bit:
        memory.check_fits("加载权重 / loading the weights", plan.weight_bytes(), "cpu", processes=local)
    memory.check_fits(plan.model_dir, need, device, processes=1 if device.type == "cuda" else local,
                      certain=stage < 3 and not offload, cheaper=cheaper)


def load_model(plan, model_args, tokenizer, training_args, gradient_checkpointing: bool):
    """From the plan: on the CPU (the Trainer or DeepSpeed places it), a quantized base on the training device.
    P-Tuning v2 and LoRA freeze the base (the prefix and the adapter stay float32); QLoRA (LoRA over a 4/8-bit
    base) goes through PEFT's k-bit preparation; full fine-tuning keeps float32 master weights."""
    pt = model_args.pre_seq_len is not None
    use_lora = model_args.lora_rank is not None
    check_memory(plan, model_args, training_args)
    model = loading.load_model(plan, tokenizer, check_memory=False, for_training=True)
    if model_args.ptuning_checkpoint is not None:
        main_print(training_args, f"已加载 P-Tuning 前缀 / Loaded the prefix from {model_args.ptuning_checkpoint}")
    if plan.quantization_bit:
        quantization.for_training(model)
        main_print(training_args, f"基座已量化为 {plan.quantization_bit} 比特 / The base is quantized to {plan.quantization_bit} bits "
                                  f"({'NF4, double quantization' if plan.quantization_bit == 4 else 'LLM.int8'})")
    if use_lora and plan.quantization_bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if use_lora:
        model = lora.add_lora(model, model_args.lora_rank, model_args.lora_alpha, model_args.lora_dropout,
                              model_args.lora_target, base_path=model_args.model_name_or_path)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    method = "P-Tuning v2" if pt else ("QLoRA" if plan.quantization_bit else "LoRA") if use_lora else "全参数微调 / full fine-tuning"
    main_print(
        training_args,
        f"{method}: 可训练参数 / trainable parameters {trainable:,} / {total:,}; 权重精度 / weights {plan.dtype}",
    )
    return model.train()


def make_collator(data_args, tokenizer, train_dataset):
    if data_args.packing:
        return preprocess_utils.DataCollatorForPacking(tokenizer)
    return preprocess_utils.DataCollatorForChatGLM(
        tokenizer, padding="max_length" if data_args.pad_to_max_length else "longest",
        max_length=train_dataset.max_seq_length,
    )


def train(model_args, data_args, training_args):
    check_arguments(model_args, data_args)
    check_training_arguments(training_args)
    files, _ = train_files(data_args)
    output_files.refuse_device_inputs([("--train_file", path) for path in files]
                                      + [("--validation_file", data_args.validation_file)])
    output_files.check_output_dir("--output_dir", training_args.output_dir, {
        "--model_name_or_path": model_args.model_name_or_path, "--tokenizer_name": model_args.tokenizer_name,
        "--ptuning_checkpoint": model_args.ptuning_checkpoint})
    # One live run per output folder, however it was started (a launcher only checks; its training holds it).
    # The first process of a run holds it; the others share its folder.
    first = os.environ.get("RANK", "0") == "0"
    with launching.holding(training_args.output_dir, "--output_dir") if first else contextlib.nullcontext():
        run(model_args, data_args, training_args)


def run(model_args, data_args, training_args):
    """The training itself, once the flags are checked and the output folder is this run's."""
    gradient_checkpointing = configure_training(training_args, data_args)
    resume = resolve_resume(training_args)
    setup_logging(training_args)
    if training_args.full_determinism:  # before any product: MKL reads its settings at its first call
        launching.make_repeatable(training_args.seed)
    set_seed(training_args.seed)

    for note in no_effect_notes(model_args, data_args):
        main_print(training_args, note)
    plan = make_plan(model_args, training_args)
    model_args.model_name_or_path, model_args.tokenizer_name = plan.model_dir, plan.tokenizer_dir  # local folders from here on
    tokenizer = loading.load_tokenizer(plan.tokenizer_dir)
    # Data first: a bad file fails in seconds, before gigabytes of weights are read.
    files, weights = train_files(data_args)
    train_dataset = read_data(files, data_args.max_train_samples, data_args, tokenizer, training_args, weights)
    validation = None if data_args.validation_file is None else [data_args.validation_file]
    eval_dataset = read_data(validation, data_args.max_eval_samples, data_args, tokenizer, training_args)
    if data_args.sanity_check and training_args.process_index == 0:
        sanity_check(train_dataset[0], tokenizer)
    model = load_model(plan, model_args, tokenizer, training_args, gradient_checkpointing)
    # In every checkpoint: inference.py and evaluate.py then ask the model the way it was trained.
    train_format.record(model, tokenizer, data_args.train_format)
    full = model_args.pre_seq_len is None and model_args.lora_rank is None

    trainer = Trainer(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=make_collator(data_args, tokenizer, train_dataset), processing_class=tokenizer,
        save_prefix_only=model_args.pre_seq_len is not None,
        upstream_files_from=model_args.model_name_or_path if full else None,  # upstream's tools open a full checkpoint
    )
    # DeepSpeed reads its checkpoints with torch.load(weights_only=False): every load goes through the allow-list.
    with torch_files.only_safe_torch_load():
        trainer.train(resume_from_checkpoint=resume)
    with output_files.reported_write_errors(training_args.output_dir, ("；检查点不受影响", "; the checkpoints are intact")):
        trainer.save_model()
        trainer.save_state()
    main_print(training_args, f"训练完成，模型保存在 / Training finished, model saved to {os.path.abspath(training_args.output_dir)}")
    # Torch asks for this before exit: left to the interpreter's teardown, a rank of a multi-process CPU run once
    # aborted after the model was saved ("terminate called without an active exception", the launcher then fails).
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main(argv=None) -> int:
    """finetune.py's command line (sys.argv when argv is None); bad input: one line on stderr, exit status 1."""
    try:
        train(*parse_args(argv))
    except USER_ERRORS as err:
        print(err, file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
