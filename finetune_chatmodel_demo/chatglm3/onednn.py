"""Float32 matrix multiplies on the CPU through oneDNN instead of MKL.

`aten::mm` and `F.linear` call MKL's sgemm on the CPU, which takes its AVX2 path on AMD processors; oneDNN uses
AVX-512 where the CPU has it. On this project's AMD EPYC a 2048^3 float32 product measured 95 GFLOP/s through
`aten::mm` and 234 through oneDNN (benchmarks/README.md). oneDNN is reached through
`torch.ops.mkldnn._linear_pointwise`, the op torch.compile's CPU backend emits for linear layers; it is private
to torch, hence the check that it exists, and it has no autograd formula, hence `_Linear`. Same float32
arithmetic, another summation order (results equal up to rounding).
"""
import torch
from torch import nn
from torch.nn import functional as F

_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def usable(*tensors: torch.Tensor) -> bool:
    """Float32 CPU tensors, outside autocast (which wants its own casts), and no DeepSpeed ZeRO-3 parameter
    among them (ZeRO-3 gathers a weight for the backward pass only through its own F.linear)."""
    return (_AVAILABLE and not torch.is_autocast_enabled("cpu")
            and all(t.device.type == "cpu" and t.dtype == torch.float32 and not hasattr(t, "ds_id") for t in tensors))


def matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T for 2-D a, b (b laid out as a linear layer's [out, in] weight; a transposed view of a contiguous
    tensor is read as it is: measured as fast as a contiguous copy, without the copy). No autograd."""
    if usable(a, b):
        return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    return a @ b.T


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = matmul_nt(grad_2d, weight.T).view(x.shape)  # = grad @ weight
        if ctx.needs_input_grad[1]:
            grad_weight = grad_2d.T @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(0)
        return grad_x, grad_weight, grad_bias


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict keys, still an nn.Linear to PEFT and friends) whose float32
    CPU products go through oneDNN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if usable(x, self.weight):
            return _Linear.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
