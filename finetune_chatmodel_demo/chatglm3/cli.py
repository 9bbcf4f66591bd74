"""命令行共用的模型与生成参数 / The flags shared by inference.py, evaluate.py, data_processing/quiz_types.py (and, for the
model, api_server.py): upstream's model flags, and how replies are decoded: greedy by default, so that a script's
answers repeat (what checking a fine-tuned model needs); --do-sample draws with --temperature and --top-p
(upstream's 0.8 and 0.8, chatglm3.model.generation)."""
import argparse
import sys
from typing import Dict

from chatglm3 import ChatGLMError, limits
from chatglm3.checkpoint import loading
from chatglm3.data import train_format
from chatglm3.model.generation import SAMPLE_TEMPERATURE, SAMPLE_TOP_P


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
                            "加载时要量化（6B 在 2 核上约 3 分钟）/ quantize the layers' linear weights to 4 bits (NF4) or 8 "
                            "bits (LLM.int8) through bitsandbytes, on CPU or GPU: less memory, quantized while loading "
                            "(about 3 min for 6B on 2 cores); speed: docs/lora_qlora.md")


def add_format_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=train_format.FORMATS, default=None,
                        help="提问的格式，默认按检查点记录的训练格式（没有记录时为 multi-turn）/ how to ask the model "
                             "(default: the training format its checkpoint records; multi-turn when none): "
                             "multi-turn = chat format, input-output = the raw prompt")


def add_generation_args(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """--max-new-tokens (this script's default), --do-sample / --greedy (the default), --temperature, --top-p,
    --seed."""
    group = parser.add_argument_group("生成 / generation")
    group.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                       help=f"每条回答最多生成的 token 数 / most new tokens per answer (default {max_new_tokens})")
    mode = group.add_mutually_exclusive_group()
    mode.add_argument("--do-sample", action="store_true", default=False,
                      help="按 --temperature、--top-p 采样；默认贪心解码，同样的问题得到同样的回答 / sample with "
                           "--temperature and --top-p (default: greedy decoding, the same question gets the same answer)")
    mode.add_argument("--greedy", dest="do_sample", action="store_false", default=False,
                      help="贪心解码（默认）/ greedy decoding (the default)")
    group.add_argument("--temperature", type=float, default=SAMPLE_TEMPERATURE,
                       help=f"采样温度，配合 --do-sample / sampling temperature with --do-sample ({SAMPLE_TEMPERATURE})")
    group.add_argument("--top-p", type=float, default=SAMPLE_TOP_P,
                       help=f"nucleus 采样阈值，配合 --do-sample / top-p with --do-sample ({SAMPLE_TOP_P})")
    group.add_argument("--seed", type=int, default=None, help="随机种子（配合 --do-sample）/ random seed (for --do-sample)")


def check_generation_args(args: argparse.Namespace) -> None:
    """The generation flags in range (limits' one line naming the flag)."""
    limits.AT_LEAST_1.check("--max-new-tokens", args.max_new_tokens)
    limits.POSITIVE.check("--temperature", args.temperature)
    limits.TOP_P.check("--top-p", args.top_p)
    if args.seed is not None:
        limits.SEED.check("--seed", args.seed)


def generation_kwargs(args: argparse.Namespace) -> Dict:
    """model.generate's keyword arguments for the generation flags."""
    if not args.do_sample:
        return {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    return {"max_new_tokens": args.max_new_tokens, "do_sample": True, "temperature": args.temperature,
            "top_p": args.top_p}


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
