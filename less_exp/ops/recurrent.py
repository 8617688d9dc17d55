"""Recurrent form: one decoding step over a real, evicting cache plus the constant-size state."""

from __future__ import annotations

import torch

from less_exp.ops.parallel import attention_logits, sparse_attention
from less_exp.state import LessState


def fold(state: LessState, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, H: torch.Tensor, z: torch.Tensor):
    """Add evicted tokens to the state: ``H += psi(k) v^T``, ``z += psi(k)`` where ``mask`` ``[B, Hkv, n]`` is set."""
    psi = state.psi(key) * mask[..., None]
    return H + torch.matmul(psi.transpose(-1, -2), value), z + psi.sum(-2)


def recurrent_less_step(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    present: torch.Tensor,
    scaling: float,
    state: LessState | None = None,
    H: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
):
    """Attention of new queries ``[B, H, q, d]`` over cache slots ``[B, Hkv, N, d]`` and the state.

    Returns ``(out [B, H, q, d], probs [B, Hkv, G, q, N])``; ``probs`` is the sparse attention over the
    kept slots, which score-based policies accumulate.
    """
    B, Hq, Sq, d = query.shape
    Hkv = keys.shape[1]
    logits = attention_logits(query, keys, scaling)
    out, lse, probs = sparse_attention(logits, present[:, :, None, :].expand(B, Hkv, Sq, -1), values)
    if state is not None:
        phi = state.phi(query).reshape(B, Hkv, Hq // Hkv, Sq, -1)
        num = torch.matmul(phi, H[:, :, None])
        den = torch.matmul(phi, z[:, :, None, :, None])[..., 0]
        out = state.normalizer(out, lse, num, den)
    return out.reshape(B, Hq, Sq, d), probs
