"""Float32 matrix multiplies on the CPU through oneDNN instead of MKL.

`aten::mm` and `F.linear` call MKL's sgemm on the CPU, which takes its AVX2 path on AMD processors; oneDNN uses
AVX-512 where the CPU has it, so float32 products run faster there (figures: docs/performance.md). oneDNN is
reached through `torch.ops.mkldnn._linear_pointwise`, the op torch.compile's CPU backend emits for linear layers;
it is private to torch, hence the check that it exists, and it has no autograd formula: callers use it inside
their own autograd.Function (chatglm3/model/fused_loss.py). Same float32 arithmetic, another summation order
(results equal up to rounding).
"""
import torch

_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def usable(*tensors: torch.Tensor) -> bool:
    """Float32 CPU tensors, outside autocast (which wants its own casts), and no DeepSpeed ZeRO-3 parameter
    among them (partitioned: its data is not all here)."""
    return (_AVAILABLE and not torch.is_autocast_enabled("cpu")
            and all(t.device.type == "cpu" and t.dtype == torch.float32 and not hasattr(t, "ds_id") for t in tensors))


def matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T for 2-D a, b (b laid out as a linear layer's [out, in] weight; a transposed view of a contiguous
    tensor is read as it is: measured as fast as a contiguous copy, without the copy). No autograd."""
    if usable(a, b):
        return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    return a @ b.T
