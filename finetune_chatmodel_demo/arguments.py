"""Command-line flags of finetune.py that are not transformers' own training arguments.

The flag names are upstream ChatGLM3's (`finetune_chatmodel_demo/arguments.py`), so existing commands keep
working; `--validation_file`, `--packing` and `--sanity_check` are new; those with no effect here are listed in NO_EFFECT
(each one given prints a line). Everything else (`--output_dir`, `--learning_rate`,
`--max_steps`, `--save_steps`, `--resume_from_checkpoint`, `--gradient_checkpointing`, `--deepspeed`, ...)
comes from transformers' `Seq2SeqTrainingArguments`; see `python finetune.py --help`.
"""
from dataclasses import dataclass, field, fields
from typing import Optional

from chatglm3 import limits
from chatglm3.data import formats, reader


class ArgumentsError(ValueError):
    """A flag or flag combination that cannot work; the message says which flag and what to do."""


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={
            "help": "基座模型目录（如 chatglm3-6b 的本地目录）/ Directory of the base model (e.g. a local chatglm3-6b)."
        }
    )
    tokenizer_name: Optional[str] = field(
        default=None,
        metadata={"help": "分词器目录，默认与模型相同 / Tokenizer directory; defaults to --model_name_or_path."},
    )
    ptuning_checkpoint: Optional[str] = field(
        default=None,
        metadata={
            "help": "从已有的 P-Tuning v2 检查点继续（只加载前缀）/ Start from an existing P-Tuning v2 checkpoint "
            "(loads the prefix only; optimizer state is not restored, use --resume_from_checkpoint for that)."
        },
    )
    pre_seq_len: Optional[int] = field(
        default=None,
        metadata={
            "help": "P-Tuning v2 前缀长度；不设置则全参数微调 / P-Tuning v2 prefix length; unset = full fine-tuning."
        },
    )
    prefix_projection: bool = field(
        default=False,
        metadata={"help": "前缀经过两层 MLP 投影 / Pass the prefix through a two-layer MLP (upstream option)."},
    )
    lora_rank: Optional[int] = field(
        default=None,
        metadata={
            "help": "LoRA 秩；设置则用 LoRA 微调（PEFT，只训练适配器，上游 finetune_demo 用 8）/ LoRA rank; set it to "
            "fine-tune with LoRA (PEFT, only the adapter trains; upstream's finetune_demo uses 8)."
        },
    )
    lora_alpha: Optional[float] = field(
        default=None,
        metadata={"help": "LoRA 缩放系数，默认 32（上游 lora.yaml）/ LoRA alpha (default 32, upstream's lora.yaml)."},
    )
    lora_dropout: Optional[float] = field(
        default=None,
        metadata={"help": "LoRA 层的 dropout，默认 0.1（上游 lora.yaml）/ dropout of the LoRA layers (default 0.1, as upstream)."},
    )
    lora_target: Optional[str] = field(
        default=None,
        metadata={
            "help": "加 LoRA 的线性层，逗号分隔，默认 query_key_value（同上游）/ linear layers to adapt, comma-separated "
            "(default query_key_value, as upstream; also dense, dense_h_to_4h, dense_4h_to_h, output_layer)."
        },
    )
    quantization_bit: Optional[int] = field(
        default=None,
        metadata={
            "help": "以 4 比特（NF4，双重量化）或 8 比特（LLM.int8）量化冻结的基座（bitsandbytes，CPU 与 GPU 均可）；配合 "
            "--pre_seq_len 为量化基座上的 P-Tuning v2，配合 --lora_rank 为 QLoRA / Quantize the frozen base to 4 bits "
            "(NF4, double quantization) or 8 bits (LLM.int8) through bitsandbytes, on CPU or GPU: with --pre_seq_len "
            "P-Tuning v2 over a quantized base, with --lora_rank QLoRA."
        },
    )
    cache_dir: Optional[str] = field(
        default=None, metadata={"help": "Hub 模型的缓存目录 / Hugging Face cache for Hub ids (default: HF_HOME's)."}
    )
    model_revision: str = field(
        default="main", metadata={"help": "Hub 模型的版本（分支、标签或提交）/ Hub revision: branch, tag or commit."}
    )
    config_name: Optional[str] = field(default=None, metadata={"help": "上游参数，无作用 / upstream flag, no effect here."})
    use_fast_tokenizer: bool = field(default=True, metadata={"help": "上游参数，无作用 / upstream flag, no effect here."})
    use_auth_token: bool = field(default=False, metadata={"help": "上游参数，无作用 / upstream flag, no effect here."})
    resize_position_embeddings: Optional[bool] = field(
        default=None, metadata={"help": "上游参数，无作用 / upstream flag, no effect here."}
    )


@dataclass
class DataTrainingArguments:
    train_file: str = field(
        metadata={"help": "训练数据（JSONL 或 JSON 列表）；多个文件用逗号分隔，按 --train_weights 每轮抽样 / Training data "
                          "(JSONL or a JSON list); several files comma-separated, sampled each epoch by --train_weights."}
    )
    train_weights: Optional[str] = field(
        default=None,
        metadata={"help": "各训练文件的权重，逗号分隔，如 3,1：文件 k 占每轮样本的 w_k / sum(w)，每轮样本数为各文件之和；不设则每个文件"
                          "每轮用一遍 / Weights of the training files, comma-separated, e.g. 3,1: file k makes w_k / sum(w) of "
                          "each epoch, whose size is all files' samples together; unset: each file once per epoch (docs/data.md)."},
    )
    data_format: str = field(
        default="auto",
        metadata={"help": "数据文件的格式，auto 按文件自动识别 / Format of the data files; auto detects it per file "
                          "(docs/data.md).", "choices": list(formats.CHOICES)},
    )
    validation_file: Optional[str] = field(
        default=None,
        metadata={
            "help": "验证数据，训练中定期计算验证损失 / Validation data; its loss is computed during training "
            "(every --eval_steps, default --save_steps)."
        },
    )
    train_format: str = field(
        default="multi-turn",
        metadata={"help": "数据格式 / Data format.", "choices": ["multi-turn", "input-output"]},
    )
    max_seq_length: int = field(
        default=2048,
        metadata={"help": "多轮格式的最大长度（超出截断）/ Maximum tokens per multi-turn sample (longer ones are truncated)."},
    )
    max_source_length: int = field(
        default=1024,
        metadata={"help": "input-output 格式的输入最大长度 / Maximum prompt tokens for input-output data."},
    )
    max_target_length: int = field(
        default=128,
        metadata={"help": "input-output 格式的输出最大长度 / Maximum response tokens for input-output data."},
    )
    preprocessing_num_workers: Optional[int] = field(
        default=None,
        metadata={"help": "保留以兼容上游，分词只做一次 / Kept for upstream compatibility; data is tokenized once."},
    )
    max_train_samples: Optional[int] = field(
        default=None,
        metadata={"help": "只用前 N 条训练样本（调试用）/ Use only the first N training samples (for debugging)."},
    )
    max_eval_samples: Optional[int] = field(
        default=None,
        metadata={"help": "只用前 N 条验证样本 / Use only the first N validation samples."},
    )
    pad_to_max_length: bool = field(
        default=False,
        metadata={
            "help": "每批都补齐到 max_seq_length（慢，仅用于对比）；默认只补齐到批内最长 / Pad every batch to "
            "max_seq_length (slow, for comparison); by default a batch is padded to its longest sample."
        },
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "把多段对话拼进同一行（最长 max_seq_length），段间互不可见 / Pack several conversations into "
            "one row of up to max_seq_length tokens; they cannot attend to each other. Fewer padding tokens."
        },
    )
    sanity_check: bool = field(
        default=True,
        metadata={"help": "训练前打印第一条样本的 token 与标签（如上游）/ Print the first sample's tokens and labels "
                          "before training, as upstream (main process)."},
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "上游参数，无作用 / upstream flag, no effect here."})


# Upstream's flags that change nothing here, with the reason printed when one is given.
NO_EFFECT = {
    "config_name": "配置总是读取模型目录的 config.json / the config always comes from the model folder",
    "use_fast_tokenizer": "ChatGLM3 只有 SentencePiece 分词器 / ChatGLM3 has one (SentencePiece) tokenizer",
    "use_auth_token": "有 token 时 huggingface_hub 总会使用（HF_TOKEN 或 hf auth login）/ huggingface_hub uses your token "
                      "whenever there is one (HF_TOKEN or hf auth login)",
    "resize_position_embeddings": "上游也未使用，旋转位置编码无需调整 / unused upstream too: rotary positions need no resizing",
    "overwrite_cache": "数据不缓存，每次重新分词 / data is never cached, it is tokenized afresh each run",
    "preprocessing_num_workers": "分词只在主进程做一次 / data is tokenized once, in the main process",
}


def no_effect_notes(*argument_sets) -> list:
    """One line for each flag of NO_EFFECT given a value other than its default."""
    return [
        f"提示 / Note: --{f.name} 在这里没有作用 / has no effect here: {NO_EFFECT[f.name]}"
        for args in argument_sets for f in fields(args)
        if f.name in NO_EFFECT and getattr(args, f.name) != f.default
    ]


def check_arguments(model_args: ModelArguments, data_args: DataTrainingArguments) -> None:
    """Reject values that cannot work, before anything slow is loaded."""
    limits.check_flags(model_args, data_args)  # every number in range (chatglm3.limits.FLAG_LIMITS)
    check_lora_arguments(model_args)
    if model_args.quantization_bit is not None and model_args.quantization_bit not in (4, 8):
        raise ArgumentsError(
            f"错误：--quantization_bit 只能是 4 或 8，收到 {model_args.quantization_bit} / "
            f"Error: --quantization_bit must be 4 or 8, got {model_args.quantization_bit}"
        )
    if model_args.quantization_bit is not None and model_args.pre_seq_len is None and model_args.lora_rank is None:
        raise ArgumentsError(
            f"错误：--quantization_bit {model_args.quantization_bit} 不能用于全参数微调（量化的权重不能训练），请同时设置 "
            "--pre_seq_len（P-Tuning v2）或 --lora_rank（QLoRA）/ Error: --quantization_bit cannot be used with full "
            "fine-tuning (quantized weights do not train): add --pre_seq_len (P-Tuning v2) or --lora_rank (QLoRA)"
        )
    if model_args.ptuning_checkpoint is not None and model_args.pre_seq_len is None:
        raise ArgumentsError(
            "错误：--ptuning_checkpoint 需要同时设置 --pre_seq_len / "
            "Error: --ptuning_checkpoint needs --pre_seq_len as well"
        )
    train_files(data_args)  # the weights match the files
    if data_args.packing and data_args.pad_to_max_length:
        raise ArgumentsError(
            "错误：--packing 与 --pad_to_max_length 不能同时使用 / "
            "Error: --packing and --pad_to_max_length cannot be used together"
        )


def check_training_arguments(training_args) -> None:
    """Reject a transformers training flag with a value that cannot work (chatglm3.limits), naming the flag."""
    limits.check_flags(training_args)


def check_lora_arguments(model_args: ModelArguments) -> None:
    """LoRA's flags need --lora_rank, and LoRA is not combined with P-Tuning."""
    lora_flags = [f"--{name}" for name in ("lora_alpha", "lora_dropout", "lora_target") if getattr(model_args, name) is not None]
    if model_args.lora_rank is None:
        if lora_flags:
            raise ArgumentsError(f"错误：{' '.join(lora_flags)} 需要 --lora_rank / Error: {' '.join(lora_flags)} needs --lora_rank")
        return
    if model_args.pre_seq_len is not None or model_args.ptuning_checkpoint is not None:
        raise ArgumentsError(
            "错误：LoRA（--lora_rank）与 P-Tuning v2（--pre_seq_len）只能选一种 / "
            "Error: LoRA (--lora_rank) and P-Tuning v2 (--pre_seq_len) cannot be combined: choose one"
        )


def train_files(data_args: DataTrainingArguments) -> tuple:
    """(files, weights or None) of --train_file and --train_weights; one line when they do not match."""
    files = reader.split_files(data_args.train_file)
    weights = reader.parse_weights(data_args.train_weights, len(files), "--train_weights (DATASET_WEIGHTS)",
                                   "--train_file (DATASET_PATH)")
    return files, weights
