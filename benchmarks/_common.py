"""Helpers shared by the benchmark scripts: the model shape, the real tokenizer, the Pokémon data, memory peaks.

Importing this module puts `finetune_chatmodel_demo/` (and its scripts/) and `data_processing/` on sys.path (one of the project's two
guarded sys.path edits: the benchmarks reuse the drop-in folder's collators and flags, which are scripts' modules,
not the installed library), so the scripts run from any directory with plain `python benchmarks/bench_train.py`.
"""
import argparse
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "finetune_chatmodel_demo"
DATA_PROCESSING = REPO / "data_processing"
DEFAULT_TOKENIZER = REPO.parent / "shared" / "chatglm3-tokenizer"

for _p in (DEMO, DEMO / "scripts", DATA_PROCESSING):  # collators and flags, the tiny-model builder, Pokémon data
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402

from chatglm3 import ChatGLMConfig, ChatGLMError, ChatGLMForConditionalGeneration  # noqa: E402
from chatglm3.checkpoint.loading import default_device, load_tokenizer, resolve_dtype  # noqa: E402


class BenchError(ChatGLMError):
    """Bad benchmark input; main() prints the message and exits 2 without a traceback."""


def fail(message: str, code: int = 2):
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)


def progress(message: str):
    # Progress goes to stderr so that stdout holds only the table (and, with --json, the JSON last line).
    print(message, file=sys.stderr, flush=True)


# --- model shape ---------------------------------------------------------------------------------------------------
def add_shape_args(parser: argparse.ArgumentParser):
    """The default CPU benchmark shape: a 4-layer ChatGLM3 with the real 65,024-word padded vocabulary."""
    group = parser.add_argument_group("模型形状 / model shape (random weights)")
    group.add_argument("--layers", type=int, default=4, help="层数 / layers (default: 4)")
    group.add_argument("--hidden", type=int, default=256, help="隐藏维度 / hidden size (default: 256)")
    group.add_argument("--heads", type=int, default=8, help="注意力头数 / attention heads (default: 8)")
    group.add_argument("--kv-channels", type=int, default=32, help="每头维度 / channels per head (default: 32)")
    group.add_argument("--kv-groups", type=int, default=2, help="KV 组数（multi-query）/ key-value groups (default: 2)")
    group.add_argument("--ffn", type=int, default=682, help="FFN 维度 / FFN hidden size (default: 682)")
    group.add_argument("--vocab", type=int, default=65024, help="补齐后的词表大小 / padded vocabulary (default: 65024)")


def model_config(args, pre_seq_len=None, vocab_needed: int = 0) -> ChatGLMConfig:
    for name in ("layers", "hidden", "heads", "kv_channels", "kv_groups", "ffn", "vocab"):
        if getattr(args, name) < 1:
            raise BenchError(f"错误：--{name.replace('_', '-')} 必须为正数 / Error: --{name.replace('_', '-')} must be positive")
    if args.heads % args.kv_groups:
        raise BenchError(f"错误：--heads ({args.heads}) 必须能被 --kv-groups ({args.kv_groups}) 整除 / Error: --heads must divide by --kv-groups")
    if args.vocab < vocab_needed:
        raise BenchError(
            f"错误：--vocab {args.vocab} 小于分词器的词表 {vocab_needed} / Error: --vocab {args.vocab} is smaller than the "
            f"tokenizer's vocabulary ({vocab_needed}); use at least {math.ceil(vocab_needed / 64) * 64}"
        )
    return ChatGLMConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads, kv_channels=args.kv_channels,
        multi_query_attention=True, multi_query_group_num=args.kv_groups, ffn_hidden_size=args.ffn,
        padded_vocab_size=args.vocab, add_qkv_bias=True, add_bias_linear=False,
        pre_seq_len=pre_seq_len or None, prefix_projection=False,
    )


def build_model(config: ChatGLMConfig, device="cpu", dtype=torch.float32, seed: int = 0) -> ChatGLMForConditionalGeneration:
    """A randomly initialised model, created directly on `device` in `dtype` (no float32 copy on the host)."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = ChatGLMForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model


def matmul_params(model) -> int:
    """Weights that take part in matrix multiplies (every nn.Linear, the output layer included; not the
    embedding lookup): the N of the usual 2N FLOPs per token forward."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def step_flops(model, batch: dict, train_weights: bool, logits_everywhere: bool, padding: bool = True) -> float:
    """Floating-point operations of one training step's matrix multiplies, as this project counts them: the
    transformer's linear layers at every position the batch holds (`padding` False: at its real tokens only,
    the model FLOPs of MFU), 2 FLOPs per weight and position forward, 2 backward to the activations, 2 more for
    weight gradients when the weights train; the output layer likewise at those positions (`logits_everywhere`,
    upstream's loss) or only at the labelled ones (the model's loss); attention as causal attention within each
    conversation plus the P-Tuning prefix (4 x head_dim FLOPs per query-key pair forward, twice that backward)."""
    config = model.config
    passes = 3 if train_weights else 2
    body = sum(m.weight.numel() for m in model.transformer.encoder.modules() if isinstance(m, torch.nn.Linear))
    head = model.transformer.output_layer.weight.numel()
    positions = batch["input_ids"].numel() if padding else int((batch["attention_mask"] > 0).sum())
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    pairs = 0
    for row in batch["attention_mask"].tolist():
        for segment in set(row) - {0}:
            n = row.count(segment)
            pairs += n * (config.pre_seq_len or 0) + n * (n + 1) // 2
    attention = 12 * config.kv_channels * config.num_attention_heads * config.num_layers * pairs
    return 2 * passes * (body * positions + head * (positions if logits_everywhere else labelled)) + attention


def matmul_peak_gflops(device: str, seconds: float = 1.5) -> dict:
    """This machine's float32 matrix-multiply rate (GFLOP/s, best over `seconds` of 2048^3 products), through
    aten::mm (MKL on the CPU) and, on the CPU, through oneDNN (the kernel chatglm3.model.fused_loss uses)."""
    n = 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    kernels = {"aten_mm": lambda: a @ b}
    if device == "cpu" and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        kernels["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    best = {}
    for name, kernel in kernels.items():
        fastest, deadline = float("inf"), time.perf_counter() + seconds / len(kernels)
        kernel()
        while time.perf_counter() < deadline:
            synchronize(device)
            start = time.perf_counter()
            kernel()
            synchronize(device)
            fastest = min(fastest, time.perf_counter() - start)
        best[name] = 2 * n**3 / fastest / 1e9
    return best


# --- tokenizer and data ---------------------------------------------------------------------------------------------
def pokemon_conversations(workdir: Path) -> Path:
    """Run the data pipeline (data_processing.py, then format_tool_poke.py) into `workdir`; returns the JSONL."""
    conversations, jsonl = workdir / "pokemon_data.json", workdir / "pokemon_conversations.jsonl"
    steps = [
        [sys.executable, str(DATA_PROCESSING / "data_processing.py"), "--output", str(conversations)],
        [sys.executable, str(DATA_PROCESSING / "format_tool_poke.py"), "--path", str(conversations), "--output", str(jsonl)],
    ]
    for command in steps:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise BenchError(
                f"错误：生成宝可梦数据失败 / Error: generating the Pokémon data failed: {' '.join(command[1:2])} exited "
                f"{result.returncode}:\n{result.stderr.strip()[-2000:]}\n(或用 --data 指定数据文件 / or pass --data FILE)"
            )
    return jsonl


# --- memory --------------------------------------------------------------------------------------------------------
def reset_peak_memory(device: str):
    """Start a fresh peak: CUDA's allocator counter, or the process's RSS high-water mark on Linux
    (writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux, or not allowed: the peak then covers the whole process life


def peak_memory_mb(device: str) -> float:
    """Peak GPU memory allocated by tensors, or peak resident memory of this process (MiB)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def machine_line(device: str, dtype) -> str:
    """Where the figures come from; warns when other processes keep the CPUs busy (timings then vary, and several
    torch threads wait on each other: --threads 1 measures more steadily on a shared machine)."""
    line = (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"device {device}, {str(dtype).replace('torch.', '')}")
    if hasattr(os, "getloadavg"):
        load = os.getloadavg()[0]
        line += f", load average {load:.1f}"
        if load > (os.cpu_count() or 1) and not device.startswith("cuda"):
            line += " (busy machine: CPU timings unreliable; --threads 1 is steadier)"
    return line


def synchronize(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def resolve_device(name: str) -> str:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError("错误：没有可用的 CUDA GPU / Error: --device cuda given but no CUDA GPU is available")
    return default_device() if name == "auto" else name


DTYPES = ("fp32", "bf16", "fp16")  # --dtype choices besides auto (auto: bf16 on GPU, fp16 where it lacks bf16, fp32 on CPU)


def setup(args):
    """The run's device, dtype and tokenizer from the common flags (--device --dtype --threads --tokenizer)."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(None if args.dtype == "auto" else args.dtype, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    return device, dtype, load_tokenizer(args.tokenizer)
