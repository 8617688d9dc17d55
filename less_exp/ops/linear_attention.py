"""Causal linear attention over the evicted stream: parallel, chunked and recurrent forms.

Past the budget a policy evicts exactly one token per step and never re-admits it, so the LESS state
read by the query at step ``t`` is a sum over a *stream*: entry ``t`` is ``(psi(k_e), v_e)`` of the
token ``e`` evicted at step ``t`` (zero when nothing left). Eviction happens before the step's query
attends, so the sum is inclusive: ``H_t = H_0 + sum_{j <= t} psi_j v_j^T`` and ``z_t = z_0 + sum psi_j``.

The state is kept as one tensor ``[B, Hkv, D', d + 1]``: ``H`` with ``z`` as its last column (the value
gets a column of ones), so numerator and denominator come out of the same products. Every form takes
``phi [B, Hkv, G, T, D']`` (query features, grouped by KV head), ``psi [B, Hkv, T, D']`` and
``value [B, Hkv, T, d]`` (the stream) and an optional initial state, and returns
``(num [B, Hkv, G, T, d], den [B, Hkv, G, T], final state)`` in float32. ``ops.naive`` holds the
reference they are tested against.

Gates (optional ``g``): a log-decay per step, ``[B, Hkv, T]`` (one per head, RetNet / simple-GLA
style) or ``[B, Hkv, T, D']`` (one per feature, GLA style), all <= 0. The state then decays before
each entry is added, ``S_t = exp(g_t) S_{t-1} + psi_t v_t^T``, so entry ``s`` reaches step ``t`` with
weight ``exp(G_t - G_s)``, ``G`` the cumulative sum of ``g``. Every exponent formed is such a
difference over a causal pair, hence <= 0: nothing overflows, masked pairs are set to -inf before
the exponential (no NaN gradients).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def with_ones(value: torch.Tensor) -> torch.Tensor:
    """``[..., d] -> [..., d + 1]``: the extra column turns ``H`` into ``[H | z]``."""
    return F.pad(value.float(), (0, 1), value=1.0)


def empty_state(psi: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    B, Hkv, _, D = psi.shape
    return torch.zeros(B, Hkv, D, value.shape[-1] + 1, dtype=torch.float32, device=psi.device)


def _split(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return out[..., :-1], out[..., -1]


def gather_stream(x: torch.Tensor, evicted: torch.Tensor) -> torch.Tensor:
    """``x [B, Hkv, n, F]`` at ``evicted [B, Hkv, T]`` (index into ``n``, -1 for no eviction) -> ``[B, Hkv, T, F]``."""
    idx = evicted.clamp_min(0)[..., None].expand(*evicted.shape, x.shape[-1])
    return x.gather(2, idx) * (evicted >= 0)[..., None].to(x.dtype)


def stream_positions(logical: torch.Tensor, evicted: torch.Tensor, new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logical positions from a schedule's ``logical [B, Hkv, n]`` (the last ``new`` entries are the
    incoming tokens): ``(queries [B, new], evicted stream [B, Hkv, T])``, 0 where undefined."""
    query = logical[:, 0, logical.shape[-1] - new:].clamp_min(0)
    return query, gather_stream(logical[..., None], evicted)[..., 0].clamp_min(0)


def _log_gates(g, psi):
    """``g`` as ``[B, Hkv, T, 1 or D']`` float32, or None."""
    if g is None:
        return None
    g = g.float()
    return g[..., None] if g.dim() == psi.dim() - 1 else g


def _gated_block(phi, psi, ve, g, state):
    """One block of steps with log-gates ``g [B, Hkv, C, 1 or D']`` from ``state``: (out, state after).

    ``b`` is the cumulative log-gate inside the block; the causal kernel carries ``exp(b_i - b_j)``
    (per feature for vector gates), the carried state reaches step ``i`` with ``exp(b_i)``.
    """
    C = psi.shape[2]
    b = g.cumsum(2)
    causal = torch.ones(C, C, dtype=torch.bool, device=psi.device).tril()
    if g.shape[-1] == 1:
        diff = (b[:, :, :, None, 0] - b[:, :, None, :, 0]).masked_fill(~causal, -math.inf)
        kernel = torch.matmul(phi, psi[:, :, None].transpose(-1, -2)) * diff.exp()[:, :, None]
    else:
        diff = (b[:, :, :, None, :] - b[:, :, None, :, :]).masked_fill(~causal[..., None], -math.inf)
        kernel = torch.einsum("bhgif,bhjf,bhijf->bhgij", phi, psi, diff.exp())
    carried = torch.matmul(phi * b.exp()[:, :, None], state[:, :, None])
    out = torch.matmul(kernel, ve[:, :, None]) + carried
    last = b[:, :, -1:]
    state = (last[:, :, 0, :, None]).exp() * state + torch.matmul((psi * (last - b).exp()).transpose(-1, -2), ve)
    return out, state


def parallel_linear_attention(phi, psi, value, initial=None, g=None):
    """Quadratic form: a lower-triangular (inclusive) kernel ``phi psi^T``. O(T^2) memory."""
    g = _log_gates(g, psi)
    if g is not None:
        state = empty_state(psi, value) if initial is None else initial
        out, final = _gated_block(phi.float(), psi.float(), with_ones(value), g, state)
        return (*_split(out), final)
    T = psi.shape[2]
    ve = with_ones(value)
    state = empty_state(psi, value) if initial is None else initial
    phi, psi = phi.float(), psi.float()
    causal = torch.ones(T, T, dtype=torch.bool, device=psi.device).tril()
    kernel = torch.matmul(phi, psi[:, :, None].transpose(-1, -2)).masked_fill(~causal, 0.0)
    out = torch.matmul(kernel, ve[:, :, None]) + torch.matmul(phi, state[:, :, None])
    final = state + torch.matmul(psi.transpose(-1, -2), ve)
    return (*_split(out), final)


def chunk_linear_attention(phi, psi, value, initial=None, chunk_size: int = 64, g=None):
    """Chunked form: exact inside chunks of ``chunk_size`` steps, a carried state across them.

    Ungated, the states at the chunk starts come from one exclusive cumulative sum of per-chunk
    updates (no Python loop over chunks); gated, the state is carried chunk by chunk. Either way
    memory is O(T C + (T / C) D' d) per head instead of O(T^2) (O(T C D') for vector gates).
    """
    g = _log_gates(g, psi)
    if g is not None:
        C = max(1, int(chunk_size))
        state = empty_state(psi, value) if initial is None else initial
        phi, psi, ve, outs = phi.float(), psi.float(), with_ones(value), []
        for start in range(0, psi.shape[2], C):
            stop = start + C
            out, state = _gated_block(phi[:, :, :, start:stop], psi[:, :, start:stop], ve[:, :, start:stop],
                                      g[:, :, start:stop], state)
            outs.append(out)
        return (*_split(torch.cat(outs, dim=3)), state)
    B, Hkv, T, D = psi.shape
    G = phi.shape[2]
    C = max(1, min(int(chunk_size), T))
    n = -(-T // C)
    pad = n * C - T
    ve = with_ones(value)
    state = empty_state(psi, value) if initial is None else initial
    phi_c = F.pad(phi.float(), (0, 0, 0, pad)).reshape(B, Hkv, G, n, C, D)
    psi_c = F.pad(psi.float(), (0, 0, 0, pad)).reshape(B, Hkv, n, C, D)
    ve_c = F.pad(ve, (0, 0, 0, pad)).reshape(B, Hkv, n, C, -1)
    updates = torch.matmul(psi_c.transpose(-1, -2), ve_c)  # [B, Hkv, n, D, d + 1]
    totals = updates.cumsum(2)
    starts = state[:, :, None] + totals - updates
    causal = torch.ones(C, C, dtype=torch.bool, device=psi.device).tril()
    kernel = torch.matmul(phi_c, psi_c[:, :, None].transpose(-1, -2)).masked_fill(~causal, 0.0)
    out = torch.matmul(kernel, ve_c[:, :, None]) + torch.matmul(phi_c, starts[:, :, None])
    out = out.reshape(B, Hkv, G, n * C, -1)[..., :T, :]
    return (*_split(out), state + totals[:, :, -1])


def recurrent_linear_attention(phi, psi, value, initial=None, g=None):
    """Step by step, as decoding runs it: decay the state, fold entry ``t`` into it, then read it."""
    ve = with_ones(value)
    g = _log_gates(g, psi)
    state = empty_state(psi, value) if initial is None else initial
    outs = []
    for t in range(psi.shape[2]):
        if g is not None:
            state = g[:, :, t, :, None].exp() * state
        state = state + psi[:, :, t, :, None].float() * ve[:, :, t, None, :]
        outs.append(torch.matmul(phi[:, :, :, t : t + 1].float(), state[:, :, None]))
    return (*_split(torch.cat(outs, dim=3)), state)


def fold_stream(psi, value, initial=None, g=None):
    """The state after the whole stream, with no read-out: ``exp(G_T) S_0 + sum_s exp(G_T - G_s) psi_s v_s^T``
    (``G`` the running log-gate, 0 without gates), one matmul. A one-shot prefill folds its evicted
    tokens with it; it equals the final state of every other form."""
    ve = with_ones(value)
    psi = psi.float()
    state = empty_state(psi, value) if initial is None else initial
    g = _log_gates(g, psi)
    if g is None:
        return state + torch.matmul(psi.transpose(-1, -2), ve)
    running = g.cumsum(2)
    total = running[:, :, -1:]
    return total[:, :, 0, :, None].exp() * state + torch.matmul((psi * (total - running).exp()).transpose(-1, -2), ve)


def linear_attention(phi, psi, value, initial=None, chunk_size: int = 64, g=None):
    """The form to use: one recurrent step for a single entry, the chunked form otherwise."""
    if psi.shape[2] == 1:
        return recurrent_linear_attention(phi, psi, value, initial, g)
    return chunk_linear_attention(phi, psi, value, initial, chunk_size, g)
