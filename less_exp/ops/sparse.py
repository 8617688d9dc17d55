"""Softmax attention restricted to the kept keys, computed in float32 whatever the model's dtype.

Rankings (H2O, TOVA) and the joint normaliser read these logits and log-sum-exps, so every face of a
policy sees the same float32 numbers; half-precision queries and keys are exact in float32.
"""

from __future__ import annotations

import math

import torch


def attention_logits(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """``[B, H, q, d] x [B, Hkv, k, d] -> [B, Hkv, G, q, k]`` float32 scaled logits, grouped by KV head."""
    B, H, Sq, d = query.shape
    Hkv = key.shape[1]
    q = query.float().reshape(B, Hkv, H // Hkv, Sq, d)
    return torch.matmul(q, key.float()[:, :, None].transpose(-1, -2)) * scaling


def sparse_attention(logits: torch.Tensor, keep: torch.Tensor, value: torch.Tensor):
    """``(o_sparse [B, Hkv, G, q, d], lse [B, Hkv, G, q], probs [B, Hkv, G, q, k])``, all float32;
    ``keep`` ``[B, Hkv, q, k]`` broadcasts over the query groups. ``probs`` is what H2O and TOVA accumulate."""
    masked = logits.masked_fill(~keep[:, :, None], -math.inf)
    # One exp pass instead of logsumexp's and then softmax's, in place when no gradient is needed (half the
    # time of this op on CPU). The shift cancels in both results, so it needs no gradient; clamped, a row
    # with no kept key keeps lse = -inf.
    top = masked.detach().amax(-1, keepdim=True).clamp_min(torch.finfo(masked.dtype).min)
    in_place = not masked.requires_grad
    weights = masked.sub_(top).exp_() if in_place else (masked - top).exp()
    total = weights.sum(-1, keepdim=True)
    lse = (top + total.log()).squeeze(-1)
    probs = weights.div_(total) if in_place else weights / total
    return torch.matmul(probs, value.float()[:, :, None]), lse, probs
