"""The parallel form's state part as running sums over eviction events: O(S D' d) instead of O(S^2 d).

The state read by query ``t`` is ``H_t = sum_{s in E_t} psi(k_s) v_s^T`` (and ``z_t``). The evicted
set changes by a few tokens a step: ``s`` joins ``E_t`` when the policy evicts it at ``t`` and leaves
again if the policy re-admits it. Writing those changes as events ``(t, s, +1 / -1)`` makes ``H_t`` a
cumulative sum over ``t`` of per-step updates. The events depend on the keep-mask alone, so training
finds them once per sequence and then never builds the ``S x S`` kernel that
:func:`~less_exp.ops.parallel.parallel_less_attention` masks. Both give the same outputs.
"""

from __future__ import annotations

import torch

from less_exp.state import LessState


def eviction_events(keep: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index [N, 4] long (b, kv head, t, s), sign [N] float)``: where ``E_t`` gains (+1) or loses (-1) ``s``.

    Args:
        keep: ``[B, Hkv, S, S]`` bool from a policy's ``keep_mask``.
        valid: ``[B, S]`` bool (False at padding) or None.
    """
    S = keep.shape[-1]
    evicted = torch.ones(S, S, dtype=torch.bool, device=keep.device).tril() & ~keep
    if valid is not None:
        evicted = evicted & valid[:, None, None, :] & valid[:, None, :, None]
    step = evicted.to(torch.int8).diff(dim=-2, prepend=torch.zeros_like(evicted[..., :1, :], dtype=torch.int8))
    index = step.nonzero()
    return index, step[tuple(index.unbind(-1))].float()


def state_readout(phi, psi, value, index, sign) -> tuple[torch.Tensor, torch.Tensor]:
    """``(phi_t^T H_t [B, Hkv, G, S, d], phi_t^T z_t [B, Hkv, G, S])`` from the events of :func:`eviction_events`.

    Args:
        phi: ``[B, H, S, D']`` query features; psi: ``[B, Hkv, S, D']`` key features; value: ``[B, Hkv, S, d]``.
    """
    B, Hkv, S, F = psi.shape
    b, h, t, s = index.unbind(-1)
    feats = psi[b, h, s] * sign[:, None].to(psi.dtype)
    updates = feats[:, :, None] * value[b, h, s][:, None, :]
    H = psi.new_zeros(B, Hkv, S, F, value.shape[-1]).index_put((b, h, t), updates, accumulate=True).cumsum(2)
    z = psi.new_zeros(B, Hkv, S, F).index_put((b, h, t), feats, accumulate=True).cumsum(2)
    phi = phi.reshape(B, Hkv, -1, S, F)
    return torch.einsum("bhgtf,bhtfd->bhgtd", phi, H), torch.einsum("bhgtf,bhtf->bhgt", phi, z)


def cumulative_less_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    events: tuple[torch.Tensor, torch.Tensor],
    state: LessState,
    sparse: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """LESS attention ``[B, H, S, d]`` from the sparse part ``(o_sparse, lse)`` and the eviction ``events``."""
    B, H, S, d = query.shape
    o_sparse, lse = sparse
    num, den = state_readout(state.phi(query), state.psi(key), value, *events)
    return state.normalizer(o_sparse, lse, num, den).reshape(B, H, S, d)
