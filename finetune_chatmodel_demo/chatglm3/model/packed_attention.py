"""Attention for packed rows without a dense mask: one plain causal attention per packed conversation.

A packed row holds several conversations (attention_mask = segment ids 1, 2, 3, ..., 0 for padding). The dense
alternative is a block-diagonal [rows, 1, seq, prefix + seq] mask over the whole row, which computes every
query-key pair of the row and throws most away. Here each conversation's queries attend to its own keys, plus
the P-Tuning prefix when there is one (placed first, as in the KV cache), so the work is the sum of the
conversations' squares instead of the row's; the loss is the one of the conversations trained unpacked.
"""
import functools
from typing import Optional

import torch
import torch.nn.functional as F


class Segments:
    """Where the packed conversations lie: spans[row] = [(start, end), ...] in token positions."""

    def __init__(self, spans: list[list[tuple[int, int]]]):
        self.spans = spans

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> Optional["Segments"]:
        """The spans of a packed attention_mask (b, seq), or None when no row holds more than one segment
        (then the ordinary mask is as cheap). Segments are contiguous runs of one id > 0."""
        if attention_mask.dim() != 2 or int(attention_mask.max()) <= 1:
            return None
        mask = attention_mask.cpu()
        change = torch.ones_like(mask, dtype=torch.bool)
        change[:, 1:] = mask[:, 1:] != mask[:, :-1]
        spans = []
        for row, flags in zip(mask.tolist(), change.tolist()):
            starts = [i for i, flag in enumerate(flags) if flag] + [len(row)]
            spans.append([(a, b) for a, b in zip(starts, starts[1:]) if row[a] > 0])
        return cls(spans)


@functools.lru_cache(maxsize=64)
def _prefix_causal_mask(length: int, prefix_len: int, device: torch.device) -> torch.Tensor:
    """[length, prefix + length]: every query sees the whole prefix, then causally its own conversation.
    Cached: packed rows repeat the same conversation lengths in every layer and step; SDPA only reads it."""
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    return torch.cat([causal.new_ones(length, prefix_len), causal], dim=-1)


def segment_attention(q, k, v, segments: Segments, prefix_len: int, dropout: float = 0.0) -> torch.Tensor:
    """q: [b, heads, seq, d]; k, v: [b, heads, prefix + seq, d] with the prefix first. Returns [b, heads, seq, d];
    padding positions get zeros (nothing reads them: their labels are ignored and no query attends to them).
    Each row is concatenated from its pieces (not written into a zero tensor slice by slice, whose backward
    copies the whole gradient once per slice)."""
    rows = []
    for r, spans in enumerate(segments.spans):
        pieces, end = [], 0
        for a, b in spans:
            if a > end:  # padding before this conversation
                pieces.append(q.new_zeros(q.shape[1], a - end, q.shape[3]))
            keys, values = k[r, :, prefix_len + a:prefix_len + b], v[r, :, prefix_len + a:prefix_len + b]
            if prefix_len:
                keys = torch.cat([k[r, :, :prefix_len], keys], dim=1)
                values = torch.cat([v[r, :, :prefix_len], values], dim=1)
                mask = _prefix_causal_mask(b - a, prefix_len, q.device)
                pieces.append(F.scaled_dot_product_attention(q[r, :, a:b], keys, values, attn_mask=mask, dropout_p=dropout))
            else:
                pieces.append(F.scaled_dot_product_attention(q[r, :, a:b], keys, values, is_causal=True, dropout_p=dropout))
            end = b
        if end < q.shape[2]:  # padding at the end of the row
            pieces.append(q.new_zeros(q.shape[1], q.shape[2] - end, q.shape[3]))
        rows.append(torch.cat(pieces, dim=1))
    return torch.stack(rows)
