"""4- and 8-bit base weights through bitsandbytes, on the CPU and on CUDA alike (`--quantization_bit` in
finetune.py, `--quantization-bit` in the other scripts).

As upstream's ChatGLM3 quantizes, only the linear layers of the transformer blocks are quantized (query_key_value,
dense, dense_h_to_4h, dense_4h_to_h); the embedding, the output layer, the norms and the P-Tuning prefix stay in
the model's dtype. 4 bits: NF4 with double quantization (QLoRA's recipe; blocks of 64 weights, each with an 8-bit
scale, the scales themselves scaled per 256), bf16/fp16 compute. 8 bits: LLM.int8 with outlier threshold 6.0
(transformers' default). The layers are swapped on the meta-device model before the weights are read, and every
weight is quantized as it arrives, so a load never holds more than one full-precision tensor at a time.

bitsandbytes (>= 0.50, tested 0.50.2) runs both on the CPU (the weights are uint8/int8 tensors there too; forward and backward
work). On a CPU with AVX512-BF16, 4-bit weights packed for bitsandbytes' kernel decode faster than bf16 (fewer bytes
read); elsewhere its general kernel is slower (docs/lora_qlora.md).
"""
import ctypes
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch
from torch import nn

from chatglm3.errors import ChatGLMError

BITS = (4, 8)
NF4_BLOCK = 64  # weights per 4-bit block (bitsandbytes' default), each with one 8-bit scale under double quant
INT8_THRESHOLD = 6.0
# Two bitsandbytes warnings that would only confuse users, silenced where bitsandbytes is imported: its CPU backend
# tries, on import, to fetch an optional faster 4-bit kernel from the Hugging Face Hub (the `kernels` package) and
# warns when it cannot (offline, or an untrusted publisher); its own CPU kernel runs instead, nothing is missing.
# LLM.int8 warns at every product that it quantizes its bf16/float32 input through float16, which is how it works.
_NOISY_LOGGERS = ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions")
for _name in _NOISY_LOGGERS:  # at import of this module (chatglm3 imports it), before PEFT may import bitsandbytes
    logging.getLogger(_name).setLevel(logging.ERROR)
# bitsandbytes repacks a 4-bit weight for its AVX512-BF16 CPU kernel at the first product without gradients; the
# repacked layout needs whole blocks per row and rows in multiples of 32.
_CPU_PACK_ROWS = 32
_CHUNK_WEIGHTS = 2**24  # weights quantized at once on the CPU (about 200 MB of bitsandbytes' working memory)
_PARALLEL_SLICES = 2  # slices quantized side by side, _CHUNK_WEIGHTS between them


def parse_bits(value, flag: str) -> Optional[int]:
    """None, or 4 / 8 from a flag's value (int or text); anything else is one line naming the flag."""
    if value is None or value == "":
        return None
    text = str(value).strip()
    if text not in ("4", "8"):
        raise ChatGLMError(f"错误：{flag} 只能是 4 或 8，收到 {value!r} / Error: {flag} must be 4 or 8, got {value!r}")
    return int(text)


def bitsandbytes():
    """The bitsandbytes module (imported here only, quietly); one line when it is not installed."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ChatGLMError("错误：量化需要 bitsandbytes：pip install bitsandbytes / Error: quantization needs "
                           "bitsandbytes: pip install bitsandbytes") from None
    return bnb


def target_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) for every linear layer inside the transformer blocks."""
    found = []
    for block in model.transformer.encoder.layers:
        for parent in block.modules():
            for name, child in parent.named_children():
                if type(child) is nn.Linear:
                    found.append((parent, name, child))
    return found


def swap_linears(model: nn.Module, bits: int, compute_dtype: torch.dtype) -> None:
    """Replace the blocks' linear layers of a meta-device model by empty bitsandbytes layers (filled by
    `set_weight` as the checkpoint is read); marks the model as PEFT and the Trainer expect of a k-bit model."""
    bnb = bitsandbytes()
    for parent, name, layer in target_linears(model):
        bias = layer.bias is not None
        if bits == 4:
            new = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=bias, compute_dtype=compute_dtype,
                                    compress_statistics=True, quant_type="nf4", device="meta")
            if layer.in_features % NF4_BLOCK or layer.out_features % _CPU_PACK_ROWS:
                new.support_avx512bf16_for_cpu = False  # the general kernel instead (tiny test models)
        else:
            new = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=bias, has_fp16_weights=False,
                                      threshold=INT8_THRESHOLD, device="meta")
        new.weight.requires_grad = False
        setattr(parent, name, new)
    model.is_loaded_in_4bit, model.is_loaded_in_8bit = bits == 4, bits == 8
    model.quantization_method = "bitsandbytes"  # the Trainer does not .to() such a model (placed at load)


def for_training(model: nn.Module) -> None:
    """Keep 4-bit weights in the layout that has gradients: the repacked CPU layout (made at the first product
    without gradients, e.g. an evaluation during training) has a kernel without a backward pass, through which
    no gradient would reach the layers below."""
    bnb = bitsandbytes()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def is_quantized_weight(module: nn.Module, attr: str) -> bool:
    bnb = bitsandbytes()
    return attr == "weight" and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def set_weight(module: nn.Module, tensor: torch.Tensor, device: torch.device) -> None:
    """Quantize `tensor` (full precision, on the CPU) into `module`'s weight on `device`: bitsandbytes quantizes
    when a parameter moves to a real device."""
    bnb = bitsandbytes()
    if isinstance(module, bnb.nn.Linear4bit) and device.type == "cpu":
        data, state = _nf4_in_row_chunks(tensor)
        release_freed_memory()  # the slices' working memory, freed in the worker threads' own heaps
        param = bnb.nn.Params4bit(data, requires_grad=False, quant_state=state, blocksize=NF4_BLOCK,
                                  compress_statistics=True, quant_type="nf4", bnb_quantized=True, module=module)
        module.weight, module.quant_state = param, state
        return
    if isinstance(module, bnb.nn.Linear4bit):
        param = bnb.nn.Params4bit(tensor, requires_grad=False, compress_statistics=True, quant_type="nf4")
    else:
        param = bnb.nn.Int8Params(tensor, requires_grad=False, has_fp16_weights=False)
    module.weight = param.to(device)


def _nf4_in_row_chunks(tensor: torch.Tensor):
    """bitsandbytes.functional.quantize_4bit(tensor, nf4, double quantization), computed a slice of rows at a time.
    Its CPU kernel holds about 13 bytes per weight while it works (float32 copies, int32 codes): 1.5 GB for one of
    chatglm3-6b's MLP matrices, which made a 4-bit load's peak 2.5 GB above what it keeps. Every block of 64 weights is
    quantized on its own, so slices of whole blocks give the same bytes; the scales are then double-quantized
    together, as bitsandbytes does. Two slices are quantized at a time (the kernel keeps two cores only partly busy:
    one 4096x13696 matrix took 3.1 s one slice at a time, 2.0 s two at a time, on 2 cores), each half as large, so
    the weights in flight stay _CHUNK_WEIGHTS."""
    bnb = bitsandbytes()
    flat = tensor.reshape(-1)
    step = max(NF4_BLOCK * 2, _CHUNK_WEIGHTS // _PARALLEL_SLICES // (NF4_BLOCK * 2) * (NF4_BLOCK * 2))
    if flat.numel() % (NF4_BLOCK * 2):  # a partial block: leave it to bitsandbytes in one piece
        step = flat.numel()

    def quantize(part):
        return torch.ops.bitsandbytes.quantize_4bit.default(part.contiguous(), NF4_BLOCK, "nf4", torch.uint8)

    parts = flat.split(step)
    if len(parts) == 1:
        packed, absmax = zip(quantize(parts[0]))
    else:
        with ThreadPoolExecutor(_PARALLEL_SLICES) as pool:  # map keeps the slices' order
            packed, absmax = zip(*pool.map(quantize, parts))
    absmax = torch.cat(absmax)
    offset = absmax.mean()
    qabsmax, state2 = bnb.functional.quantize_blockwise(absmax - offset, blocksize=256)
    state = bnb.functional.QuantState(absmax=qabsmax, shape=tensor.shape, dtype=tensor.dtype, blocksize=NF4_BLOCK,
                                      code=bnb.functional.get_4bit_type("nf4", device=tensor.device), quant_type="nf4",
                                      offset=offset, state2=state2)
    return torch.cat(packed), state


def pack_for_cpu_inference(model: nn.Module) -> None:
    """Put every 4-bit weight into the layout of bitsandbytes' AVX512-BF16 CPU kernel now, a slice of rows at a
    time, instead of at its first product. Done there (bitsandbytes' Linear4bit.forward), each matrix is converted
    whole through int32 working copies (about 5 bytes a weight) whose freed pages stay in the C heap between the
    long-lived weights: at 4 of chatglm3-6b's layers +0.55 GB at peak and +0.3 GB kept after the first reply.
    Inference only: that layout has no backward pass (`for_training`). The same bytes as bitsandbytes' own
    conversion (each block of 32 rows is converted on its own; tests/test_quantization.py compares them)."""
    bnb = bitsandbytes()
    from bitsandbytes.functional import _convert_weight_packed_for_cpu  # bitsandbytes' conversion, applied per slice

    if not bnb.functional.has_avx512bf16():  # bitsandbytes' general kernel then, which needs no repacking
        return
    for module in model.modules():
        if not (isinstance(module, bnb.nn.Linear4bit) and module.support_avx512bf16_for_cpu
                and module.weight.device.type == "cpu"):
            continue
        state = module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            continue
        rows, cols = state.shape
        codes = module.weight.data.view(torch.uint8).reshape(rows, cols // 2)  # two 4-bit codes a byte, row-major
        scales = state.absmax
        if state.nested:
            scales = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        scales = scales.float().reshape(rows, cols // state.blocksize)
        step = max(_CPU_PACK_ROWS, _CHUNK_WEIGHTS // cols // _CPU_PACK_ROWS * _CPU_PACK_ROWS)
        packed, packed_scales = [], []
        for start in range(0, rows, step):
            part = bnb.functional.QuantState(absmax=scales[start:start + step].reshape(-1),
                                             shape=torch.Size((min(step, rows - start), cols)), code=state.code,
                                             blocksize=state.blocksize, quant_type=state.quant_type, dtype=state.dtype)
            weight, part = _convert_weight_packed_for_cpu(codes[start:start + step].reshape(-1), part)
            packed.append(weight)
            packed_scales.append(part.absmax)  # [cols / blocksize, rows of the slice], bf16
        # The fields bitsandbytes' conversion sets, so that its inverse (saving, training) still applies.
        state.original_dtype, state.original_nested = state.dtype, state.nested
        state.original_qshape = module.weight.data.shape
        state.absmax = torch.cat(packed_scales, dim=1).contiguous()
        state.nested = False
        if hasattr(state, "state2"):
            del state.state2
        state.dtype, state.packing_format_for_cpu = torch.bfloat16, True
        module.weight.data = torch.cat(packed)
        del codes, scales, packed, packed_scales
    release_freed_memory()


def release_freed_memory() -> None:
    """Hand the C heap's freed pages back to the OS (glibc's malloc_trim; nothing elsewhere). A quantized load frees
    thousands of mid-sized working buffers that glibc otherwise keeps: about 0.2 GB at 4 of chatglm3-6b's layers."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (Windows, macOS, musl): the allocator keeps its own counsel
        pass


def quantized_bytes(numel: int, rows: int, bits: int) -> int:
    """Memory of one quantized weight: 4 bits: half a byte per weight, one byte per block of 64 (the double-
    quantized scale) and a float32 per 256 blocks; 8 bits: a byte per weight and a float32 scale per row."""
    if bits == 4:
        blocks = -(-numel // NF4_BLOCK)
        return numel // 2 + blocks + 4 * -(-blocks // 256)
    return numel + 4 * rows
