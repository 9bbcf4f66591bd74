"""Refusing a model that clearly cannot fit in memory, before anything is allocated.

The estimate is a lower bound from config.json (parameters counted on the meta device, where nothing is
allocated): the weights in their dtype, and for full fine-tuning the gradients and Adam's two float32 states,
divided among the processes as DeepSpeed ZeRO divides them. Activations, buffers and fragmentation come on top,
so a run refused here could not have run. With ZeRO-3 or DeepSpeed's CPU/NVMe offload the placement is
DeepSpeed's to decide: a shortfall is then a warning. CHATGLM_SKIP_MEMORY_CHECK=1 skips the check.
"""
import os
import sys
from pathlib import Path

import torch

from .errors import ChatGLMError

SKIP_ENV = "CHATGLM_SKIP_MEMORY_CHECK"
ADAM_STATE_BYTES = 8  # exp_avg and exp_avg_sq, float32, per trainable parameter
GIB = 2**30


def parameter_count(config) -> int:
    from .model import ChatGLMForConditionalGeneration

    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(config)
    return sum(p.numel() for p in model.parameters())


def model_config(model_dir):
    """The (checked) config.json in `model_dir`, as a ChatGLMConfig."""
    from .checkpoint import read_config
    from .configuration import ChatGLMConfig

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


def check_fits(what: str, need: int, device, processes: int = 1, certain: bool = True) -> None:
    """Raise ChatGLMError when `processes` times `need` bytes exceed the free memory of `device` (one process per
    GPU: `processes` is 1 there); only warn when the estimate is not `certain`."""
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
    raise ChatGLMError(f"错误：{zh}。请换更大的机器、更多 GPU 或用 P-Tuning；确信放得下时设置 {SKIP_ENV}=1 跳过检查 / "
                       f"Error: {en}. Use a larger machine, more GPUs or P-Tuning, or set {SKIP_ENV}=1 to skip this "
                       "check")
