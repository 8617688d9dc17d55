"""Parallel form of sparse (+ LESS) attention over a whole sequence, from keep-masks.

Used for training, perplexity and the prefill of a real cache. The state part is a masked linear
attention over the evicted positions: ``phi(q_t) . psi(k_s)`` for every ``s`` evicted at ``t``.
"""

from __future__ import annotations

import math

import torch

from less_exp.state import LessState


def attention_logits(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """``[B, H, q, d] x [B, Hkv, k, d] -> [B, Hkv, G, q, k]`` scaled logits, grouped by KV head."""
    B, H, Sq, d = query.shape
    Hkv = key.shape[1]
    return torch.einsum("bhgtd,bhsd->bhgts", query.reshape(B, Hkv, H // Hkv, Sq, d), key) * scaling


def sparse_attention(logits: torch.Tensor, keep: torch.Tensor, value: torch.Tensor):
    """Softmax over kept keys: ``(o_sparse [B, Hkv, G, q, d], lse [B, Hkv, G, q], probs)``."""
    masked = logits.masked_fill(~keep[:, :, None], -math.inf)
    lse = masked.logsumexp(-1)
    probs = (masked - lse[..., None]).exp()
    out = torch.einsum("bhgts,bhsd->bhgtd", probs, value)
    return out, lse, probs


def parallel_less_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keep: torch.Tensor,
    valid: torch.Tensor | None,
    scaling: float,
    state: LessState | None = None,
    logits: torch.Tensor | None = None,
    psi: torch.Tensor | None = None,
    sparse: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Returns ``[B, H, S, d]``.

    Args:
        keep: ``[B, Hkv, S, S]`` bool from a policy's ``keep_mask``.
        valid: ``[B, S]`` bool (False at padding) or None.
        state: the layer's LESS state, or None for the plain policy.
        logits, psi: precomputed ``attention_logits`` / ``state.psi(key)`` to avoid recomputing them.
        sparse: precomputed ``(o_sparse, lse)`` from ``sparse_attention`` (they do not depend on the
            state, so training computes them once per sequence); ``logits`` is then not needed.
    """
    B, H, S, d = query.shape
    Hkv = key.shape[1]
    if sparse is None:
        if logits is None:
            logits = attention_logits(query, key, scaling)
        out, lse, _ = sparse_attention(logits, keep, value)
    else:
        out, lse = sparse
    if state is not None:
        evicted = torch.ones(S, S, dtype=torch.bool, device=query.device).tril() & ~keep
        if valid is not None:
            evicted = evicted & valid[:, None, None, :] & valid[:, None, :, None]
        phi = state.phi(query).reshape(B, Hkv, H // Hkv, S, -1)
        psi = state.psi(key) if psi is None else psi
        out = state.normalizer(out, lse, *masked_state_readout(phi, psi, value, evicted))
    return out.reshape(B, H, S, d)


def masked_state_readout(phi: torch.Tensor, psi: torch.Tensor, value: torch.Tensor, evicted: torch.Tensor):
    """``phi(q_t)^T H_t`` and ``phi(q_t)^T z_t`` with ``H_t, z_t`` summed over ``evicted[b, h, t, s]``.

    ``phi [B, Hkv, G, q, D']``, ``psi [B, Hkv, k, D']``, ``value [B, Hkv, k, d]``; returns
    ``(num [B, Hkv, G, q, d], den [B, Hkv, G, q])``: a linear attention restricted to evicted keys.
    """
    kernel = torch.matmul(phi, psi[:, :, None].transpose(-1, -2)) * evicted[:, :, None]
    return torch.matmul(kernel, value[:, :, None]), kernel.sum(-1)
