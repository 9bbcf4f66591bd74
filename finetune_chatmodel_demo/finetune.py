#!/usr/bin/env python
"""Fine-tune ChatGLM3-6B on multi-turn dialogue: P-Tuning v2 (`--pre_seq_len N`), LoRA (`--lora_rank R`) or full
fine-tuning.

Same flags as upstream's finetune_chatmodel_demo/finetune.py, plus `--validation_file`, `--packing` and the LoRA flags.
Examples (the launchers in scripts/ fill these in from environment variables):

    python finetune.py --model_name_or_path chatglm3-6b --train_file formatted_data/pokemon_conversations.jsonl \\
        --output_dir output/pokemon_pt --pre_seq_len 128 --learning_rate 2e-2 --max_steps 1000 \\
        --per_device_train_batch_size 4 --gradient_accumulation_steps 4 --max_seq_length 512 \\
        --gradient_checkpointing --logging_steps 10 --save_steps 200 --resume_from_checkpoint true

    torchrun --nproc_per_node 4 finetune.py ... --deepspeed configs/deepspeed.json --bf16   # full fine-tuning
    python finetune.py ... --lora_rank 8 --learning_rate 5e-4   # LoRA: saves a PEFT adapter (scripts/finetune_lora.sh)

Precision: with P-Tuning v2 and LoRA the frozen base weights are loaded in bf16 (fp16 on GPUs without bf16) and
the prefix or adapter stays float32, so no --fp16/--bf16 flag is needed; on CPU everything is float32. Full fine-tuning loads
float32 weights and takes --bf16/--fp16 (mixed precision, or DeepSpeed's) as usual.

`--resume_from_checkpoint true` continues from the newest complete checkpoint-N in --output_dir (or starts
fresh when there is none); a path continues from that checkpoint. Optimizer, scheduler and RNG are restored.
"""
import contextlib
import logging
import os
import sys
import warnings

# Run from any directory: the sibling modules (arguments, trainer, preprocess_utils, chatglm3) sit beside us.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import HfArgumentParser, Seq2SeqTrainingArguments, set_seed  # noqa: E402
from transformers.trainer_utils import IntervalStrategy  # noqa: E402

from arguments import (ArgumentsError, DataTrainingArguments, ModelArguments, check_arguments,  # noqa: E402
                       check_training_arguments)
from chatglm3 import ChatGLMError, compat, launching, loading, lora, memory, safe_io, safe_load  # noqa: E402
from arguments import no_effect_notes  # noqa: E402
from chatglm3 import hub, train_format  # noqa: E402
from chatglm3.launching import TRAINER_STATE_NAME, find_last_checkpoint  # noqa: E402
import preprocess_utils  # noqa: E402
from trainer import PrefixTrainer  # noqa: E402

logger = logging.getLogger(__name__)

# Errors that carry a message for the user: printed without a traceback, exit status 1
# (chatglm3.data.DataFormatError is a ChatGLMError).
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
    safe_load.verify_checkpoint(path)
    return path


def check_quantization(model_args):
    if model_args.quantization_bit is None:
        return
    if not torch.cuda.is_available():
        raise ArgumentsError(
            f"错误：--quantization_bit {model_args.quantization_bit} 需要 CUDA GPU，本机没有；请去掉该参数 / "
            f"Error: --quantization_bit {model_args.quantization_bit} needs a CUDA GPU and none is available; "
            "drop the flag"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ArgumentsError(
            "错误：--quantization_bit 需要 bitsandbytes：pip install bitsandbytes / "
            "Error: --quantization_bit needs bitsandbytes: pip install bitsandbytes"
        ) from None


def quantize_frozen_linears(model, bits: int, compute_dtype: torch.dtype):
    """Replace the (frozen) linear layers of the transformer blocks by bitsandbytes 8-bit or 4-bit ones, on
    the GPU. Embeddings, the output layer and the prefix stay as they are."""
    import bitsandbytes as bnb

    device = torch.device("cuda", torch.cuda.current_device())
    for block in model.transformer.encoder.layers:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                has_bias = child.bias is not None
                if bits == 8:
                    new = bnb.nn.Linear8bitLt(
                        child.in_features, child.out_features, bias=has_bias, has_fp16_weights=False
                    )
                    new.weight = bnb.nn.Int8Params(child.weight.data.cpu(), requires_grad=False, has_fp16_weights=False)
                else:
                    new = bnb.nn.Linear4bit(
                        child.in_features, child.out_features, bias=has_bias, compute_dtype=compute_dtype,
                        quant_type="nf4",
                    )
                    new.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                if has_bias:
                    new.bias = torch.nn.Parameter(child.bias.data.clone(), requires_grad=False)
                setattr(parent, name, new.to(device))  # moving to the GPU is what quantizes
    return model.to(device)


def read_data(path, limit, data_args, tokenizer, training_args):
    """A data file loaded, checked and tokenized once (None without a path); errors name file:line."""
    if path is None:
        return None
    return preprocess_utils.build_dataset(
        path, tokenizer, data_args.train_format, data_args.max_seq_length, data_args.max_source_length,
        data_args.max_target_length, limit=limit, packing=data_args.packing, verbose=training_args.process_index == 0,
    )


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


def resolve_names(model_args):
    """--model_name_or_path and --tokenizer_name as local folders: a folder as is, a Hub id from the Hugging Face
    cache or downloaded (--cache_dir, --model_revision)."""
    options = {"revision": model_args.model_revision, "cache_dir": model_args.cache_dir}
    model_dir = hub.resolve(model_args.model_name_or_path, label="--model_name_or_path, BASE_MODEL_PATH", **options)
    if model_args.tokenizer_name is None:
        return model_dir, None
    return model_dir, hub.resolve(model_args.tokenizer_name, need="tokenizer", label="--tokenizer_name", **options)


def load_tokenizer(model_args):
    return loading.load_tokenizer(model_args.tokenizer_name or model_args.model_name_or_path)


def sanity_check(sample, tokenizer):
    """Upstream's print of the first training sample: each token, its id and its label (-100: not learnt), to
    check the loss mask before training (--sanity_check false turns it off)."""
    print("Sanity Check >>>>>>>>>>>>>")
    for token, label in zip(sample["input_ids"], sample["labels"]):
        print("%20s: %6d -> %6d" % (repr(tokenizer.decode([int(token)])), int(token), int(label)))
    print("<<<<<<<<<<<<< Sanity Check", flush=True)


def check_memory(model_args, training_args, dtype: torch.dtype):
    """Refuse, before the weights are read, a run that clearly cannot fit (a lower bound, chatglm3.memory): every
    process first holds the weights in RAM; the device then holds them and, for full fine-tuning, the gradients
    and Adam states as ZeRO splits them. ZeRO-3 and offload leave the placement to DeepSpeed: a warning only."""
    config = memory.model_config(model_args.model_name_or_path)
    # The rank of a LoRA update is at most the narrower side of the layer it adapts, never above hidden_size: a
    # larger one only allocates (a rank of 10^8 asks for gigabytes per layer).
    if model_args.lora_rank is not None and model_args.lora_rank > config.hidden_size:
        raise ArgumentsError(f"错误：--lora_rank（LORA_RANK）{model_args.lora_rank} 大于模型的 hidden_size {config.hidden_size}，"
                             f"LoRA 的秩不会超过层的宽度 / Error: --lora_rank (LORA_RANK) {model_args.lora_rank} exceeds the "
                             f"model's hidden_size {config.hidden_size}; a LoRA update's rank cannot exceed a layer's width")
    params = memory.parameter_count(config)
    size, local = dtype.itemsize, int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    stage, offload = memory.zero_settings(training_args.hf_deepspeed_config.config) if training_args.deepspeed else (0, False)
    if model_args.pre_seq_len is not None or model_args.lora_rank is not None:  # the base is frozen
        need = params * (model_args.quantization_bit or 8 * size) // 8
    else:
        half = bool(training_args.deepspeed) and (training_args.bf16 or training_args.fp16)
        need = memory.training_bytes(params, 2 if half else size, training_args.world_size, stage, master_copy=half)
    device = training_args.device
    if device.type == "cuda":
        memory.check_fits("加载权重 / loading the weights", params * size, "cpu", processes=local)
    memory.check_fits(f"{model_args.model_name_or_path}", need, device, processes=1 if device.type == "cuda" else local,
                      certain=stage < 3 and not offload)


def load_model(model_args, tokenizer, training_args, gradient_checkpointing: bool):
    """On the CPU (the Trainer or DeepSpeed places it). P-Tuning v2 and LoRA freeze the base model, so it can sit
    in half precision on a GPU (the prefix and the adapter stay float32); full fine-tuning keeps float32 master
    weights (AMP or DeepSpeed compute in half)."""
    pt = model_args.pre_seq_len is not None
    use_lora = model_args.lora_rank is not None
    dtype = loading.resolve_dtype(None, loading.default_device()) if pt or use_lora else torch.float32
    check_memory(model_args, training_args, dtype)
    model = loading.load_model(
        model_args.model_name_or_path, tokenizer, pt_checkpoint=model_args.ptuning_checkpoint,
        pre_seq_len=model_args.pre_seq_len, prefix_projection=model_args.prefix_projection if pt else None,
        device="cpu", dtype=dtype,
    )
    if model_args.ptuning_checkpoint is not None:
        main_print(training_args, f"已加载 P-Tuning 前缀 / Loaded the prefix from {model_args.ptuning_checkpoint}")
    if model_args.quantization_bit is not None:
        model = quantize_frozen_linears(model, model_args.quantization_bit, dtype)
        main_print(training_args, f"已量化为 {model_args.quantization_bit} 比特 / Quantized to {model_args.quantization_bit} bit")
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if use_lora:
        model = lora.add_lora(model, model_args.lora_rank, model_args.lora_alpha, model_args.lora_dropout,
                              model_args.lora_target, base_path=model_args.model_name_or_path)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    main_print(
        training_args,
        f"{'P-Tuning v2' if pt else 'LoRA' if use_lora else '全参数微调 / full fine-tuning'}: "
        f"可训练参数 / trainable parameters {trainable:,} / {total:,}; 权重精度 / weights {dtype}",
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
    safe_io.check_inputs({"--train_file": data_args.train_file, "--validation_file": data_args.validation_file})
    safe_io.check_output_dir("--output_dir", training_args.output_dir, {
        "--model_name_or_path": model_args.model_name_or_path, "--tokenizer_name": model_args.tokenizer_name,
        "--ptuning_checkpoint": model_args.ptuning_checkpoint})
    check_quantization(model_args)
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
    set_seed(training_args.seed)

    for note in no_effect_notes(model_args, data_args):
        main_print(training_args, note)
    model_args.model_name_or_path, model_args.tokenizer_name = resolve_names(model_args)  # local folders from here on
    tokenizer = load_tokenizer(model_args)
    # Data first: a bad file fails in seconds, before gigabytes of weights are read.
    train_dataset = read_data(data_args.train_file, data_args.max_train_samples, data_args, tokenizer, training_args)
    eval_dataset = read_data(data_args.validation_file, data_args.max_eval_samples, data_args, tokenizer, training_args)
    if data_args.sanity_check and training_args.process_index == 0:
        sanity_check(train_dataset[0], tokenizer)
    model = load_model(model_args, tokenizer, training_args, gradient_checkpointing)
    # In every checkpoint: inference.py and evaluate.py then ask the model the way it was trained.
    train_format.record(model, tokenizer, data_args.train_format)
    full = model_args.pre_seq_len is None and model_args.lora_rank is None

    trainer = PrefixTrainer(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=make_collator(data_args, tokenizer, train_dataset), processing_class=tokenizer,
        save_prefix_only=model_args.pre_seq_len is not None,
        carry_from=model_args.model_name_or_path if full else None,  # upstream's tools open a full checkpoint
    )
    # DeepSpeed reads its checkpoints with torch.load(weights_only=False): every load goes through the allow-list.
    with safe_load.only_safe_torch_load():
        trainer.train(resume_from_checkpoint=resume)
    with safe_io.reported_write_errors(training_args.output_dir, ("；检查点不受影响", "; the checkpoints are intact")):
        trainer.save_model()
        trainer.save_state()
    main_print(training_args, f"训练完成，模型保存在 / Training finished, model saved to {os.path.abspath(training_args.output_dir)}")


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
