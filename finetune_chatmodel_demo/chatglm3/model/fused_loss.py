"""The output layer and the cross-entropy as one blocked pass ("fused linear cross-entropy").

`linear_cross_entropy(hidden, weight, targets)` equals
`F.cross_entropy(F.linear(hidden, weight).float(), targets)` (the model's loss on its labelled positions) without
ever holding the (positions x vocabulary) float32 logits: rows are taken a block at a time, and each block's
logits are turned into its loss and, in the same pass, into its gradients (softmax minus one-hot, multiplied
back through the weight), then dropped. The idea of Liger-Kernel's and Apple's "cut cross-entropy" kernels, in
plain PyTorch so that it runs the same on CPU and CUDA (both packages need Triton, i.e. CUDA).

Why it is faster than autograd through `F.cross_entropy`: three matrix multiplies per block instead of four (no
logits recomputed in the backward pass), two when the weight is frozen (P-Tuning v2, LoRA); no log-softmax tensor
and its gradient; logits blocks sized for the cache; on the CPU, oneDNN's float32 kernels (chatglm3/model/onednn.py).
Figures: docs/performance.md.
"""
import torch

from chatglm3.model.onednn import matmul_nt

# Bytes of float32 logits per row block (the block's rows are fixed by the vocabulary). CPU: a few times the
# last-level cache, the best measured on 1 and 2 threads (smaller blocks stream the weight through once per block
# too often, larger ones gained nothing); GPU: large, so that a block's matrix multiplies fill the device.
_BLOCK_BYTES = {"cpu": 128 * 2**20, "cuda": 1024 * 2**20}


def row_block_size(vocab_size: int, device: torch.device) -> int:
    budget = _BLOCK_BYTES.get(device.type, _BLOCK_BYTES["cuda"])
    return max(8, budget // (4 * vocab_size) // 8 * 8)


def fusable(layer: torch.nn.Module) -> bool:
    """Whether `linear_cross_entropy` may stand for this output layer: it reads the weight directly, so the layer
    must be a plain bias-free nn.Linear whose weight is all here (not wrapped by an adapter, whose change it
    would skip; not partitioned by DeepSpeed ZeRO-3, which gathers the weight only while the module itself runs)."""
    return type(layer) is torch.nn.Linear and layer.bias is None and not hasattr(layer.weight, "ds_id")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, row_block: int = 0) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` (logits in float32) against `targets`, as a float32 scalar.

    hidden: [n, h]; weight: [vocab, h] (the output layer's, no bias); targets: [n] class ids (every row counts:
    select the labelled rows first). Gradients reach `hidden` and `weight` as autograd would give them (the
    weight's is summed in float32 over the row blocks). With no rows the loss is a zero that still has a graph."""
    if hidden.shape[0] == 0:  # an empty [0, vocab] product: costs nothing, keeps the graph
        return (hidden @ weight.T).float().sum()
    block = row_block or row_block_size(weight.shape[0], hidden.device)
    total = _LinearCrossEntropySum.apply(hidden, weight, targets, block, torch.is_grad_enabled())
    return total / hidden.shape[0]


class _LinearCrossEntropySum(torch.autograd.Function):
    """Summed cross-entropy; its gradients are computed in the forward pass and only scaled in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, row_block: int, grad_enabled: bool):
        want_hidden = grad_enabled and ctx.needs_input_grad[0]
        want_weight = grad_enabled and ctx.needs_input_grad[1]
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], row_block):
            h, y = hidden[start:start + row_block], targets[start:start + row_block]
            logits = matmul_nt(h, weight).float()  # [rows, vocab]; the one tensor of the block's size
            rows = torch.arange(h.shape[0], device=h.device)
            target_logit = logits[rows, y]
            peak = logits.amax(dim=-1, keepdim=True)
            # In place from here on: exp(logits - peak), its row sums give the log-sum-exp, then the softmax.
            probs = logits.sub_(peak).exp_()
            sums = probs.sum(dim=-1, keepdim=True)
            total += (peak.squeeze(-1) + sums.squeeze(-1).log() - target_logit).sum()
            if not (want_hidden or want_weight):
                continue
            grad_logits = probs.div_(sums)
            grad_logits[rows, y] -= 1  # d(loss)/d(logits) = softmax - one-hot
            grad_logits = grad_logits.to(hidden.dtype)
            if want_hidden:
                grad_hidden[start:start + row_block] = matmul_nt(grad_logits, weight.T)  # = grad_logits @ weight
            if want_weight and grad_logits.dtype == torch.float32:
                grad_weight.addmm_(grad_logits.T, h)
            elif want_weight:  # half precision: each block's product rounded once, summed in float32
                grad_weight += (grad_logits.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None
