"""Re-weighting of the state's features by a proportion per token (cosFormer, LeaPformer).

Both turn features ``f`` into ``[f sin(pi p / 2), f cos(pi p / 2)]`` (D' doubles), so the kernel
between a query with proportion ``p_q`` and a key with ``p_k`` is multiplied by
``cos(pi (p_q - p_k) / 2)``: tokens whose proportions are close weigh more. Proportions come from
the token's position over a fixed horizon (cosFormer) or from a small learned network (LeaPformer).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from less_exp.ops.headwise import headwise_matmul
from less_exp.state.feature_maps import _generator, _require


def reweight(features: torch.Tensor, proportion: torch.Tensor) -> torch.Tensor:
    """``features [..., D']``, ``proportion [...]`` in [0, 1] -> ``[..., 2 D']``."""
    angle = (math.pi / 2) * proportion.to(features.dtype)[..., None]
    return torch.cat([features * angle.sin(), features * angle.cos()], dim=-1)


class Reweighting(nn.Module):
    """Base: ``query(q, phi, pos)`` and ``key(k, psi, pos)`` return the re-weighted features."""

    factor = 2
    needs_positions = False

    def query(self, q: torch.Tensor, phi: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def key(self, k: torch.Tensor, psi: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def settings(self) -> dict:
        return {"name": type(self).__name__}


class CosFormer(Reweighting):
    """cosFormer's position proportions ``p = min(i / horizon, 1)`` (``i`` the logical position).

    The horizon must be fixed in advance (it is the ``M`` of cosFormer): positions past it all get
    ``p = 1``, so the kernel stops distinguishing them. Set it to the longest sequence served.
    """

    needs_positions = True

    def __init__(self, horizon: int = 2048, **_):
        super().__init__()
        _require(horizon=horizon, kind=int)
        if horizon < 1:
            raise ValueError(f"horizon={horizon} must be >= 1")
        self.horizon = horizon

    def _proportion(self, pos: torch.Tensor) -> torch.Tensor:
        return (pos.float() / self.horizon).clamp(0.0, 1.0)

    def query(self, q, phi, pos):
        return reweight(phi, self._proportion(pos))

    def key(self, k, psi, pos):
        return reweight(psi, self._proportion(pos))

    def settings(self) -> dict:
        return {**super().settings(), "horizon": self.horizon}


class ProportionNet(nn.Module):
    """LeaPformer's proportion network per head: ``sigmoid(W2 relu(W1 relu(x)))``, ``x [B, heads, S, d] -> [B, heads, S]``."""

    def __init__(self, heads: int, dim: int, hidden: int, gen: torch.Generator):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(heads, dim, hidden, generator=gen) / math.sqrt(dim))
        self.w2 = nn.Parameter(torch.randn(heads, hidden, 1, generator=gen) / math.sqrt(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(headwise_matmul(torch.relu(x), self.w1))
        return torch.sigmoid(headwise_matmul(h, self.w2))[..., 0]


class LeaPformer(Reweighting):
    """LeaPformer (Agostinelli et al., 2024): learned proportions from each token's own q or k, so the
    re-weighting needs no position and no horizon and streams like any linear attention."""

    def __init__(self, head_dim: int, num_heads: int, num_kv_heads: int, hidden: int = 16, seed: int = 0):
        super().__init__()
        _require(hidden=hidden, kind=int)
        if hidden < 1:
            raise ValueError(f"hidden={hidden} must be >= 1")
        gen = _generator(seed)
        self.hidden = hidden
        self.q_net = ProportionNet(num_heads, head_dim, hidden, gen)
        self.k_net = ProportionNet(num_kv_heads, head_dim, hidden, gen)

    def query(self, q, phi, pos):
        return reweight(phi, self.q_net(q))

    def key(self, k, psi, pos):
        return reweight(psi, self.k_net(k))

    def settings(self) -> dict:
        return {**super().settings(), "hidden": self.hidden}
