"""Refusing a model that clearly cannot fit in memory, before anything is allocated.

The estimate is a lower bound from config.json (parameters counted on the meta device, where nothing is
allocated): the weights as they will be held (the dtype; 4/8-bit bytes for quantized layers, chatglm3.checkpoint.quantization),
for P-Tuning v2 and LoRA the trainable part with its gradients and Adam states, and for full fine-tuning the
gradients and Adam's two float32 states,
divided among the processes as DeepSpeed ZeRO divides them. Activations, buffers and fragmentation come on top,
so a run refused here could not have run. With ZeRO-3 or DeepSpeed's CPU/NVMe offload the placement is
DeepSpeed's to decide: a shortfall is then a warning. CHATGLM_SKIP_MEMORY_CHECK=1 skips the check.
"""
import os
import sys
from pathlib import Path

import torch

from chatglm3.errors import ChatGLMError

SKIP_ENV = "CHATGLM_SKIP_MEMORY_CHECK"
ADAM_STATE_BYTES = 8  # exp_avg and exp_avg_sq, float32, per trainable parameter
GIB = 2**30


def parameter_count(config) -> int:
    from chatglm3.model.modeling import ChatGLMForConditionalGeneration

    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(config)
    return sum(p.numel() for p in model.parameters())


def weight_bytes(config, dtype: torch.dtype, quantization_bit=None) -> int:
    """The weights once loaded: the transformer blocks' linear layers in 4 or 8 bits when quantized, the P-Tuning
    prefix in float32, everything else in `dtype`."""
    from chatglm3.checkpoint.native import PREFIX_KEY
    from chatglm3.model.modeling import ChatGLMForConditionalGeneration
    from chatglm3.checkpoint.quantization import quantized_bytes, target_linears

    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(config)
    total, quantized = 0, set()
    if quantization_bit:
        for _, _, layer in target_linears(model):
            quantized.add(id(layer.weight))
            total += quantized_bytes(layer.weight.numel(), layer.out_features, quantization_bit)
    for name, param in model.named_parameters():
        if id(param) not in quantized:
            total += param.numel() * (4 if name.startswith(PREFIX_KEY) else dtype.itemsize)
    return total


def trainable_parameters(config, lora_rank=None, lora_targets=()) -> int:
    """The float32 trainable part of a frozen base: LoRA's A and B (rank x (in + out)) on every targeted linear
    layer, else the P-Tuning prefix encoder (`config.pre_seq_len`)."""
    from chatglm3.checkpoint.native import PREFIX_KEY
    from chatglm3.model.modeling import ChatGLMForConditionalGeneration

    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(config)
    if lora_rank:
        return sum(lora_rank * (m.in_features + m.out_features) for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and name.rpartition(".")[2] in lora_targets)
    return sum(p.numel() for name, p in model.named_parameters() if name.startswith(PREFIX_KEY))


def trainable_bytes(parameters: int) -> int:
    """A float32 trainable part (a prefix, an adapter): the weights are counted with the model; their gradients
    and Adam's two states come on top."""
    return parameters * (4 + ADAM_STATE_BYTES)


def cheaper_option(dtype: torch.dtype, quantization_bit=None, training: bool = False) -> str:
    """The next cheaper way to load the same model, as flags of the script in use (never what is already used)."""
    bit_flag = "--quantization_bit 4（QUANTIZATION_BIT=4）" if training else "--quantization-bit 4"
    if quantization_bit == 4:
        return ""
    if dtype == torch.float32:
        return "--bf16（PRECISION=bf16）" if training else "--dtype bfloat16"
    return bit_flag


def model_config(model_dir):
    """The (checked) config.json in `model_dir`, as a ChatGLMConfig."""
    from chatglm3.checkpoint.native import read_config
    from chatglm3.model.configuration import ChatGLMConfig

    return ChatGLMConfig.from_dict(read_config(Path(model_dir)))


def model_parameters(model_dir) -> int:
    """Parameters of the model whose (checked) config.json is in `model_dir`; nothing is allocated."""
    return parameter_count(model_config(model_dir))


def zero_settings(deepspeed_config: dict) -> tuple:
    """(ZeRO stage, whether anything is offloaded to CPU/NVMe) of a DeepSpeed config."""
    zero = deepspeed_config.get("zero_optimization") or {}
    offload = any(str((zero.get(k) or {}).get("device", "none")) != "none"
                  for k in ("offload_optimizer", "offload_param"))
    return int(zero.get("stage", 0)), offload


def available_bytes(device) -> int:
    """Free memory of a CUDA device, or the memory the OS can give this process (MemAvailable)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024


def training_bytes(parameters: int, dtype_bytes: int, world_size: int = 1, zero_stage: int = 0,
                   master_copy: bool = False) -> int:
    """Full fine-tuning, per process: weights, gradients (split by ZeRO-2/3), Adam states and, with DeepSpeed's
    half precision, the float32 master weights (split by ZeRO >= 1); ZeRO-3 splits the weights too."""
    split = max(world_size, 1)
    weights = parameters * dtype_bytes / (split if zero_stage >= 3 else 1)
    grads = parameters * dtype_bytes / (split if zero_stage >= 2 else 1)
    states = parameters * (ADAM_STATE_BYTES + (4 if master_copy else 0)) / (split if zero_stage >= 1 else 1)
    return int(weights + grads + states)


def check_fits(what: str, need: int, device, processes: int = 1, certain: bool = True, cheaper: str = "") -> None:
    """Raise ChatGLMError when `processes` times `need` bytes exceed the free memory of `device` (one process per
    GPU: `processes` is 1 there); only warn when the estimate is not `certain`. `cheaper`: the next cheaper
    option to suggest (cheaper_option), none when the cheapest is in use."""
    if os.environ.get(SKIP_ENV, "").strip().lower() in ("1", "true", "yes"):
        return
    total, free = need * processes, available_bytes(device)
    if total <= free:
        return
    zh_place = "显存" if torch.device(device).type == "cuda" else "内存"
    zh = f"{what} 至少需要 {total / GIB:.1f} GiB {zh_place}，{device} 只有 {free / GIB:.1f} GiB 可用"
    en = f"{what} needs at least {total / GIB:.1f} GiB, {device} has {free / GIB:.1f} GiB free"
    if not certain:
        print(f"警告：{zh}；ZeRO-3/offload 的实际用量由 DeepSpeed 决定，继续运行 / Warning: {en}; with ZeRO-3 or offload "
              "DeepSpeed decides the placement, carrying on", file=sys.stderr, flush=True)
        return
    zh_do, en_do = (f"试试 {cheaper}，或换", f"Try {cheaper}, or use") if cheaper else ("请换", "Use")
    raise ChatGLMError(f"错误：{zh}。{zh_do}更大的机器或更多 GPU；确信放得下时设置 {SKIP_ENV}=1 跳过检查 / "
                       f"Error: {en}. {en_do} a larger machine or more GPUs, or set {SKIP_ENV}=1 to skip this check")
