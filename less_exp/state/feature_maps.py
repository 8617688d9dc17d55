"""Feature maps phi (queries, per query head) and psi (keys, per KV head) of the LESS state.

Every map returns non-negative features so that ``phi(q) . psi(k)`` is a valid attention weight,
and reports its feature count ``num_features`` (D'), which sets the state's memory.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class FeatureMap(nn.Module):
    """Base: ``query(q [B, H, S, d]) -> [B, H, S, D']`` and ``key(k [B, Hkv, S, d]) -> [B, Hkv, S, D']``."""

    num_features: int

    def query(self, q: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def key(self, k: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def settings(self) -> dict:
        """What a checkpoint must match to load this map's parameters."""
        return {"name": type(self).__name__, "num_features": self.num_features}


class HeadwiseMLP(nn.Module):
    """Two bias-free layers ``d -> hidden -> out`` with GELU, one weight set per head (or shared)."""

    def __init__(self, heads: int, dim: int, hidden: int, out: int, dropout: float, per_head: bool):
        super().__init__()
        n = heads if per_head else 1
        self.w1 = nn.Parameter(torch.empty(n, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(n, hidden, out))
        for w in (self.w1, self.w2):
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, heads, S, d] -> [B, heads, S, out]``; matmul broadcasts the per-head weights."""
        hidden = nn.functional.gelu(torch.matmul(x, self.w1.to(x.dtype)))
        if self.training and self.dropout > 0:
            hidden = nn.functional.dropout(hidden, self.dropout)
        return torch.matmul(hidden, self.w2.to(x.dtype))


class LessMLP(FeatureMap):
    """The LESS paper's kernels: ``phi(q) = |MLP_q(q)|``, ``psi(k) = s * |MLP_k(k)|``.

    ``s`` is a learned positive scale per KV head (stored as its log), initialised to
    ``key_scale_init`` (1e-4) so that an untrained state adds almost nothing and LESS starts as the
    plain sparse policy. Dropout on the hidden layer acts only in training.
    """

    def __init__(
        self,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        hidden: int = 512,
        features: int = 8,
        key_scale_init: float = 1e-4,
        dropout: float = 0.3,
        per_head: bool = True,
    ):
        super().__init__()
        _require(features=features, hidden=hidden, kind=int)
        _require(key_scale_init=key_scale_init, dropout=dropout, kind=(int, float))
        if not isinstance(per_head, bool):
            raise ValueError(f"per_head={per_head!r} must be true or false")
        if features < 1 or hidden < 1:
            raise ValueError(f"features={features} and hidden={hidden} must be >= 1")
        if key_scale_init <= 0 or not 0 <= dropout < 1:
            raise ValueError(f"key_scale_init={key_scale_init} must be > 0 and dropout={dropout} in [0, 1)")
        self.num_features = features
        self.per_head = per_head
        self.hidden = hidden
        self.q_mlp = HeadwiseMLP(num_heads, head_dim, hidden, features, dropout, per_head)
        self.k_mlp = HeadwiseMLP(num_kv_heads, head_dim, hidden, features, dropout, per_head)
        self.log_key_scale = nn.Parameter(torch.full((num_kv_heads, 1, 1), math.log(key_scale_init)))

    def query(self, q: torch.Tensor) -> torch.Tensor:
        return self.q_mlp(q).abs()

    def key(self, k: torch.Tensor) -> torch.Tensor:
        return self.k_mlp(k).abs() * self.log_key_scale.exp().to(k.dtype)

    def settings(self) -> dict:
        return {**super().settings(), "hidden": self.hidden, "per_head": self.per_head}


def _require(kind, **values) -> None:
    """Each value must be of ``kind`` (bools excluded): a config typo fails with its name, not a TypeError."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ValueError(f"{name}={value!r} must be {'an integer' if kind is int else 'a number'}")


class Elu1(FeatureMap):
    """``elu(x) + 1`` (Katharopoulos et al., 2020), D' = d, no parameters but the key scale."""

    def __init__(self, head_dim: int, num_heads: int, num_kv_heads: int, key_scale_init: float = 1e-4):
        super().__init__()
        _require(key_scale_init=key_scale_init, kind=(int, float))
        if key_scale_init <= 0:
            raise ValueError(f"key_scale_init={key_scale_init} must be > 0")
        self.num_features = head_dim
        self.log_key_scale = nn.Parameter(torch.full((num_kv_heads, 1, 1), math.log(key_scale_init)))

    def query(self, q: torch.Tensor) -> torch.Tensor:
        return nn.functional.elu(q) + 1

    def key(self, k: torch.Tensor) -> torch.Tensor:
        return (nn.functional.elu(k) + 1) * self.log_key_scale.exp().to(k.dtype)
