"""命令行共用的模型参数 / The model flags of upstream's inference.py, shared by inference.py, evaluate.py and
scripts/quiz_types.py."""
import argparse
import sys

from chatglm3 import ChatGLMError, train_format
from chatglm3.loading import load_model_and_tokenizer


def add_model_args(parser: argparse.ArgumentParser) -> None:
    # No abbreviations: "--pt" would otherwise pass for --pt-checkpoint or --pt-pre-seq-len, whichever is unique.
    parser.allow_abbrev = False
    group = parser.add_argument_group("模型 / model")
    group.add_argument("--model", required=True,
                       help="基座模型或全参微调后的模型目录 / base model or full fine-tuned checkpoint directory")
    group.add_argument("--tokenizer", default=None,
                       help="分词器目录，默认与 --model 相同 / tokenizer directory (default: --model)")
    group.add_argument("--pt-checkpoint", default=None,
                       help="P-Tuning v2 检查点目录 / P-Tuning v2 checkpoint directory")
    group.add_argument("--pt-pre-seq-len", type=int, default=None,
                       help="P-Tuning 前缀长度，默认读取检查点的 config.json / prefix length "
                            "(default: read from the checkpoint's config.json; a different value is an error)")
    group.add_argument("--adapter", default=None,
                       help="LoRA 适配器目录（PEFT 格式，本项目或上游 finetune_demo 训练的）/ LoRA adapter directory "
                            "(PEFT format, trained here or by upstream's finetune_demo)")
    group.add_argument("--device", default=None,
                       help="运行设备，默认有 GPU 用 cuda，否则 cpu / device (default: cuda if available, else cpu)")


def add_format_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=train_format.FORMATS, default=None,
                        help="提问的格式，默认按检查点记录的训练格式（没有记录时为 multi-turn）/ how to ask the model "
                             "(default: the training format its checkpoint records; multi-turn when none): "
                             "multi-turn = chat format, input-output = the raw prompt")


def prompt_format(args: argparse.Namespace) -> str:
    """--format, else the training format the checkpoint records (load_from_args says which)."""
    return train_format.choose(args.format, args.model, args.pt_checkpoint, args.adapter)


def load_from_args(args: argparse.Namespace):
    """(model, tokenizer) from the model flags; says on stderr what was loaded."""
    if args.pt_pre_seq_len is not None and args.pt_checkpoint is None:
        raise ChatGLMError("错误：--pt-pre-seq-len 需要配合 --pt-checkpoint 使用 / "
                           "Error: --pt-pre-seq-len only makes sense with --pt-checkpoint")
    model, tokenizer = load_model_and_tokenizer(args.model, tokenizer_path=args.tokenizer,
                                                pt_checkpoint=args.pt_checkpoint, pre_seq_len=args.pt_pre_seq_len,
                                                device=args.device, adapter=args.adapter)
    details = f"device {model.device}, dtype {str(model.dtype).replace('torch.', '')}"
    if getattr(model.config, "pre_seq_len", None):
        details += f", P-Tuning pre_seq_len {model.config.pre_seq_len}"
    if args.adapter is not None:
        details += f", LoRA adapter {args.adapter}"
    if hasattr(args, "format"):  # add_format_arg
        raw = prompt_format(args) == "input-output"
        details += f", 提问格式 / prompt format {'input-output: raw prompt' if raw else 'multi-turn: chat format'}"
    print(f"已加载模型 / Loaded model: {args.model} ({details})", file=sys.stderr)
    return model, tokenizer
