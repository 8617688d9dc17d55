"""Softmax attention restricted to the kept keys, computed in float32 whatever the model's dtype.

Rankings (H2O, TOVA) and the joint normaliser read these logits and log-sum-exps, so every face of a
policy sees the same float32 numbers; half-precision queries and keys are exact in float32.
"""

from __future__ import annotations

import math

import torch
import torch.utils.checkpoint


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


def _block_attention(query, key, value, keep, scaling):
    out, lse, _ = sparse_attention(attention_logits(query, key, scaling), keep, value)
    return out, lse


def blocked_sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: torch.Tensor,
                             scaling: float, block: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o_sparse [B, Hkv, G, S, d], lse [B, Hkv, G, S])`` of :func:`sparse_attention` over
    :func:`attention_logits`, ``block`` queries at a time over only the key columns some query of the
    block keeps: float32 memory O(block x kept columns) instead of O(S x S), and for a policy whose
    kept set is a window (sink, window) work O(S x budget). The probabilities are not returned (a
    ranking policy needs them all; use the unblocked form). Under autograd each block is recomputed in
    the backward pass (activation checkpointing), so training memory stays bounded as well."""
    outs, lses = [], []
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    for start in range(0, query.shape[-2], block):
        stop = min(start + block, query.shape[-2])
        rows = keep[..., start:stop, :]
        columns = rows.flatten(0, -2).any(0).nonzero().flatten()
        if columns.numel() == rows.shape[-1]:
            k, v, mask = key, value, rows
        else:
            k, v, mask = key.index_select(2, columns), value.index_select(2, columns), rows.index_select(-1, columns)
        q = query[..., start:stop, :]
        if grad:
            out, lse = torch.utils.checkpoint.checkpoint(_block_attention, q, k, v, mask, scaling, use_reentrant=False)
        else:
            out, lse = _block_attention(q, k, v, mask, scaling)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=3), torch.cat(lses, dim=3)


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor | None,
                     scaling: float, block: int = 256, scores: bool = False):
    """Full causal attention in float32 (``valid [B, S]`` False at padding, which sees only itself):
    ``(out [B, H, S, d], received [B, Hkv, S], last [B, Hkv, S])``. With ``scores`` it also gives the
    attention each key received summed over every real query of a KV head's group, and that of each
    row's last real query (what H2O and TOVA rank a prompt by), ``block`` queries at a time so that
    no S x S float32 tensor is held; without, it is one ``scaled_dot_product_attention`` call and the
    two are None."""
    B, H, S, d = query.shape
    Hkv = key.shape[1]
    positions = torch.arange(S, device=query.device)
    if not scores:
        if valid is None or bool(valid.all()):
            mask, causal = None, True
        else:
            mask = (positions[None, :] <= positions[:, None]) & valid[:, None, :]
            mask = (mask | (~valid[:, :, None] & torch.eye(S, dtype=torch.bool, device=query.device)))[:, None]
            causal = False
        out = torch.nn.functional.scaled_dot_product_attention(
            query.float(), key.float(), value.float(), attn_mask=mask, is_causal=causal, scale=scaling,
            enable_gqa=H != Hkv)
        return out, None, None
    valid = torch.ones(B, S, dtype=torch.bool, device=query.device) if valid is None else valid
    last = S - 1 - valid.flip(-1).to(torch.int8).argmax(-1)  # each row's last real position
    received = torch.zeros(B, Hkv, S, dtype=torch.float32, device=query.device)
    final = torch.zeros_like(received)
    outs = []
    for start in range(0, S, block):
        rows = positions[start:start + block]
        stop = start + rows.numel()  # the block's queries see no key past it
        seen = positions[:stop]
        keep = (seen[None, :] <= rows[:, None]) & valid[:, None, :stop]
        keep = keep | (~valid[:, start:stop, None] & (seen[None, :] == rows[:, None]))
        out, _, probs = sparse_attention(attention_logits(query[..., start:stop, :], key[..., :stop, :], scaling),
                                         keep[:, None], value[..., :stop, :])
        outs.append(out)
        real = valid[:, start:stop]
        received[..., :stop] += torch.einsum("bhgqk,bq->bhk", probs, real.float())
        is_last = rows[None, :] == last[:, None]
        if bool(is_last.any()):
            final[..., :stop] += torch.einsum("bhgqk,bq->bhk", probs, is_last.float())
    return torch.cat(outs, dim=3).reshape(B, H, S, d), received, final
