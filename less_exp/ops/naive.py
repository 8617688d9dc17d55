"""Obviously-correct references in float64, written straight from DESIGN.md section 2. Slow on purpose.

``naive_less_attention`` sums over explicit kept and evicted sets per query; ``naive_linear_attention``
runs the evicted stream one entry at a time. Tests hold every fast form against them.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def naive_linear_attention(phi, psi, value, initial=None, g=None):
    """``num_t = phi_t^T H_t``, ``den_t = phi_t^T z_t`` with ``H_t = a_t * H_{t-1} + psi_t v_t^T`` and
    ``z_t = a_t * z_{t-1} + psi_t``, ``a_t = exp(g_t)`` (1 without gates; per head or per feature)."""
    B, Hkv, G, T, D = phi.shape
    d = value.shape[-1]
    H = torch.zeros(B, Hkv, D, d, dtype=torch.float64) if initial is None else initial[..., :d].double().clone()
    z = torch.zeros(B, Hkv, D, dtype=torch.float64) if initial is None else initial[..., d].double().clone()
    num = torch.zeros(B, Hkv, G, T, d, dtype=torch.float64)
    den = torch.zeros(B, Hkv, G, T, dtype=torch.float64)
    for b in range(B):
        for h in range(Hkv):
            for t in range(T):
                if g is not None:
                    a = g[b, h, t].double().exp() * torch.ones(D, dtype=torch.float64)
                    H[b, h] *= a[:, None]
                    z[b, h] *= a
                H[b, h] += torch.outer(psi[b, h, t].double(), value[b, h, t].double())
                z[b, h] += psi[b, h, t].double()
                for q in range(G):
                    num[b, h, q, t] = phi[b, h, q, t].double() @ H[b, h]
                    den[b, h, q, t] = phi[b, h, q, t].double() @ z[b, h]
    return num, den, torch.cat([H, z[..., None]], -1)


@torch.no_grad()
def naive_less_attention(query, key, value, keep, scaling, phi=None, psi=None, valid=None, g=None) -> torch.Tensor:
    """``o_t = (A_t + phi(q_t)^T H_t) / (B_t + phi(q_t)^T z_t)`` with explicit kept and evicted sets.

    ``keep [B, Hkv, S, S]``; ``phi [B, H, S, D']`` and ``psi [B, Hkv, S, D']`` are the state's features
    (None for the plain policy); ``valid [B, S]`` False at padding, which is never evicted. ``g [B, Hkv,
    S, 1 or D']``: every token's log-gate; an evicted ``s`` then counts at ``t`` with ``exp(G_t - G_s)``
    (per feature), ``G`` the running sum of ``g`` over the tokens.
    Returns ``[B, H, S, d]`` float64.
    """
    B, Hq, S, d = query.shape
    Hkv = key.shape[1]
    group = Hq // Hkv
    out = torch.zeros(B, Hq, S, d, dtype=torch.float64)
    G = None if g is None else g.double().cumsum(2)
    for b in range(B):
        for h in range(Hq):
            kv = h // group
            for t in range(S):
                kept = [s for s in range(t + 1) if keep[b, kv, t, s]]
                evicted = [s for s in range(t + 1) if not keep[b, kv, t, s] and (valid is None or valid[b, s])]
                scores = torch.stack([(query[b, h, t].double() @ key[b, kv, s].double()) * scaling for s in kept])
                m = scores.max()
                weights = (scores - m).exp()
                A = (weights[:, None] * value[b, kv, kept].double()).sum(0)
                Bt = weights.sum()
                if phi is not None and evicted:
                    w = [1.0 if G is None else (G[b, kv, t] - G[b, kv, s]).exp() for s in evicted]
                    Ht = sum(torch.outer(psi[b, kv, s].double() * w_s, value[b, kv, s].double()) for s, w_s in zip(evicted, w))
                    zt = sum(psi[b, kv, s].double() * w_s for s, w_s in zip(evicted, w))
                    A = A + torch.exp(-m) * (phi[b, h, t].double() @ Ht)
                    Bt = Bt + torch.exp(-m) * (phi[b, h, t].double() @ zt)
                out[b, h, t] = A / Bt
    return out
