"""Reference LESS attention: every sum of DESIGN.md section 2 written out per query, in float64.

Slow on purpose; tests compare the parallel and recurrent forms against it.
"""

from __future__ import annotations

import torch

from less_exp.state import LessState


@torch.no_grad()
def naive_less_attention(query, key, value, keep, scaling, state: LessState | None = None) -> torch.Tensor:
    """``o_t = (A_t + phi(q_t)^T H_t) / (B_t + phi(q_t)^T z_t)`` with explicit kept and evicted sets."""
    B, Hq, S, d = query.shape
    Hkv = key.shape[1]
    group = Hq // Hkv
    out = torch.zeros(B, Hq, S, d, dtype=torch.float64)
    phi = state.phi(query).double() if state is not None else None
    psi = state.psi(key).double() if state is not None else None
    for b in range(B):
        for h in range(Hq):
            g = h // group
            for t in range(S):
                kept = [s for s in range(t + 1) if keep[b, g, t, s]]
                evicted = [s for s in range(t + 1) if not keep[b, g, t, s]]
                scores = torch.stack([(query[b, h, t].double() @ key[b, g, s].double()) * scaling for s in kept])
                m = scores.max()
                weights = (scores - m).exp()
                A = (weights[:, None] * value[b, g, kept].double()).sum(0)
                Bt = weights.sum()
                if state is not None and evicted:
                    Ht = sum(torch.outer(psi[b, g, s], value[b, g, s].double()) for s in evicted)
                    zt = sum(psi[b, g, s] for s in evicted)
                    A = A + torch.exp(-m) * (phi[b, h, t] @ Ht)
                    Bt = Bt + torch.exp(-m) * (phi[b, h, t] @ zt)
                out[b, h, t] = A / Bt
    return out
