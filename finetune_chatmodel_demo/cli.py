"""命令行共用的模型参数 / The model flags of upstream's inference.py, shared by inference.py, evaluate.py and
scripts/quiz_types.py."""
import argparse
import sys

from chatglm3 import ChatGLMError



from chatglm3.checkpoint import loading



from chatglm3.data import train_format


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
    group.add_argument("--dtype", default="auto", choices=loading.DTYPE_CHOICES,
                       help="未量化权重的精度；auto：GPU 上 bf16（不支持时 fp16），CPU 上用检查点自己的精度（fp16 按 bf16）/ "
                            "dtype of the weights that are not quantized; auto: bf16 on a GPU (fp16 where it lacks "
                            "bf16), on the CPU the checkpoint's own (fp16 read as bf16; float32 when none is recorded)")
    group.add_argument("--quantization-bit", default=None, metavar="{4,8}",
                       help="把各层的线性层量化为 4 比特（NF4）或 8 比特（LLM.int8，bitsandbytes，CPU 与 GPU 均可）；省内存，"
                            "CPU 上比 bf16 慢 / quantize the layers' linear weights to 4 bits (NF4) or 8 bits (LLM.int8) "
                            "through bitsandbytes, on CPU or GPU: less memory, slower than bf16 on a CPU")


def add_format_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=train_format.FORMATS, default=None,
                        help="提问的格式，默认按检查点记录的训练格式（没有记录时为 multi-turn）/ how to ask the model "
                             "(default: the training format its checkpoint records; multi-turn when none): "
                             "multi-turn = chat format, input-output = the raw prompt")


def load_plan(args: argparse.Namespace) -> loading.LoadPlan:
    """The load plan of the model flags, made once per command line (names resolved, configs read)."""
    if getattr(args, "_load_plan", None) is None:
        if args.pt_pre_seq_len is not None and args.pt_checkpoint is None:
            raise ChatGLMError("错误：--pt-pre-seq-len 需要配合 --pt-checkpoint 使用 / "
                               "Error: --pt-pre-seq-len only makes sense with --pt-checkpoint")
        args._load_plan = loading.make_plan(args.model, args.tokenizer, args.pt_checkpoint, args.adapter,
                                            args.pt_pre_seq_len, device=args.device, dtype=args.dtype,
                                            quantization_bit=args.quantization_bit, label="--model")
    return args._load_plan


def prompt_format(args: argparse.Namespace) -> str:
    """--format, else the training format the checkpoint records (load_from_args says which), else multi-turn."""
    return args.format or load_plan(args).train_format or "multi-turn"


def load_from_args(args: argparse.Namespace):
    """(model, tokenizer) from the model flags; says on stderr what was loaded."""
    plan = load_plan(args)
    model, tokenizer = loading.load_plan(plan)
    details = f"device {model.device}, dtype {str(plan.dtype).replace('torch.', '')}"
    if plan.quantization_bit:
        details += f", {plan.quantization_bit}-bit ({'NF4' if plan.quantization_bit == 4 else 'LLM.int8'})"
    if plan.prefix:
        details += f", P-Tuning pre_seq_len {plan.prefix['pre_seq_len']}"
    if args.adapter is not None:
        details += f", LoRA adapter {args.adapter}"
    if hasattr(args, "format"):  # add_format_arg
        raw = prompt_format(args) == "input-output"
        details += f", 提问格式 / prompt format {'input-output: raw prompt' if raw else 'multi-turn: chat format'}"
    print(f"已加载模型 / Loaded model: {args.model} ({details})", file=sys.stderr)
    return model, tokenizer
