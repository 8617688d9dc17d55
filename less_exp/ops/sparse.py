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
    lse = masked.logsumexp(-1)
    probs = (masked - lse[..., None]).exp()
    return torch.matmul(probs, value.float()[:, :, None]), lse, probs
