"""Decay and gating of the LESS state: how much an evicted token still counts ``t - s`` steps later.

A gating gives every incoming token ``t`` a log-gate ``g_t <= 0`` per KV head (``[B, Hkv, c, 1]``) or
per state feature (``[B, Hkv, c, D']``). With ``G`` the running sum of ``g``, a token written at ``s``
weighs ``exp(G_t - G_s)`` in the read-out at step ``t``: it enters the state, when evicted at ``e``,
with ``exp(G_e - G_s)`` and decays with the state from then on (``ops.gates``, ``ops.linear_attention``).

Gates read the token's *value*: the attention function sees keys only after RoPE, whose rotation
would make a linear gate depend on the position, while the value is a plain projection of the
token's hidden state. Every gate starts close to 1 (a slow decay), and the untrained state is tiny
anyway (the feature maps' key scale), so an untrained gated state still gives the plain policy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from less_exp.state.feature_maps import _generator, _require


class Gating(nn.Module):
    """Base: ``log_gates(value [B, Hkv, c, d]) -> [B, Hkv, c, 1 or D']`` float32, every entry <= 0."""

    per_feature = False

    def log_gates(self, value: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def width(self, num_features: int) -> int:
        """Numbers a cache keeps per slot for a token's running log-gate."""
        return num_features if self.per_feature else 1

    def settings(self) -> dict:
        return {"name": type(self).__name__}


def retnet_gammas(num_kv_heads: int, exponent: float) -> list[float]:
    """RetNet's per-head decays ``1 - 2^-(exponent + h)``; RetNet itself uses ``exponent = 5``."""
    return [1.0 - 2.0 ** -(exponent + h) for h in range(num_kv_heads)]


class Decay(Gating):
    """A decay per KV head, ``w_ts = gamma^(t - s)``: fixed, or learned through ``log gamma = logsigmoid(theta)``.

    ``gamma`` null takes :func:`retnet_gammas` at ``exponent`` (8 by default: half-lives of 180 to
    several hundred tokens, so the state is not emptied before training shapes it).
    """

    def __init__(self, num_kv_heads: int, gamma: float | list | None = None, exponent: float = 8.0,
                 learned: bool = False, **_):
        super().__init__()
        _require(exponent=exponent, kind=(int, float))
        if not isinstance(learned, bool):
            raise ValueError(f"learned={learned!r} must be true or false")
        if gamma is None:
            gammas = retnet_gammas(num_kv_heads, float(exponent))
        else:
            gammas = list(gamma) if isinstance(gamma, (list, tuple)) else [gamma] * num_kv_heads
            if len(gammas) != num_kv_heads or not all(isinstance(x, (int, float)) and 0 < x <= 1 for x in gammas):
                raise ValueError(f"gamma={gamma!r} must be one number in (0, 1] or {num_kv_heads} of them (one a KV head)")
        self.learned = learned
        log_gamma = torch.tensor([math.log(x) for x in gammas], dtype=torch.float32)
        if learned:
            if any(x >= 1 for x in gammas):
                raise ValueError("learned=true needs every gamma < 1 (its logit is the parameter)")
            self.theta = nn.Parameter(log_gamma - torch.log(-torch.expm1(log_gamma)))  # logit(gamma)
        else:
            self.register_buffer("log_gamma", log_gamma)
        self._gammas = gammas

    def log_gates(self, value):
        log_gamma = F.logsigmoid(self.theta) if self.learned else self.log_gamma
        return log_gamma[:, None, None].expand(value.shape[0], -1, value.shape[2], 1).float()

    def settings(self) -> dict:
        return {**super().settings(), "gamma": [round(x, 12) for x in self._gammas], "learned": self.learned}


class _ProjectedGate(Gating):
    """``g = logsigmoid(x W + b) / temperature`` per KV head, as simple GLA / GLA; ``W`` starts at 0, so
    every gate starts at ``logsigmoid(bias) / temperature`` whatever the token (about -1.5e-4 at the
    defaults: ``exp(-0.16)`` across 1024 tokens)."""

    def __init__(self, temperature: float, bias: float):
        super().__init__()
        _require(temperature=temperature, kind=(int, float))
        _require(bias=bias, kind=(int, float))
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0")
        self.temperature = float(temperature)
        self.bias_init = float(bias)

    def _gate(self, logits: torch.Tensor) -> torch.Tensor:
        return F.logsigmoid(logits) / self.temperature

    def settings(self) -> dict:
        return {**super().settings(), "temperature": self.temperature, "bias": self.bias_init}


class ScalarGate(_ProjectedGate):
    """One data-dependent log-gate per KV head and token (Mamba2 / simple GLA): ``w_ts = exp(G_t - G_s)``."""

    def __init__(self, num_kv_heads: int, head_dim: int, temperature: float = 16.0, bias: float = 6.0, **_):
        super().__init__(temperature, bias)
        self.weight = nn.Parameter(torch.zeros(num_kv_heads, head_dim, 1))
        self.bias = nn.Parameter(torch.full((num_kv_heads, 1, 1), float(bias)))

    def log_gates(self, value):
        return self._gate(torch.matmul(value.float(), self.weight) + self.bias)


class VectorGate(_ProjectedGate):
    """GLA's gate: one log-gate per state feature, ``logsigmoid(x W1 W2 + b) / temperature`` with a
    low-rank ``W1 W2`` (``rank``) per KV head. ``features`` is the state's D' (re-weighting included)."""

    per_feature = True

    def __init__(self, num_kv_heads: int, head_dim: int, features: int, rank: int = 16, temperature: float = 16.0,
                 bias: float = 6.0, seed: int = 0, **_):
        super().__init__(temperature, bias)
        _require(rank=rank, kind=int)
        _require(seed=seed, kind=int)
        if rank < 1:
            raise ValueError(f"rank={rank} must be >= 1")
        self.rank, self.seed = rank, seed
        gen = _generator(seed)
        self.down = nn.Parameter(torch.randn(num_kv_heads, head_dim, rank, generator=gen) / math.sqrt(head_dim))
        self.up = nn.Parameter(torch.zeros(num_kv_heads, rank, features))
        self.bias = nn.Parameter(torch.full((num_kv_heads, 1, features), float(bias)))

    def log_gates(self, value):
        return self._gate(torch.matmul(torch.matmul(value.float(), self.down), self.up) + self.bias)

    def settings(self) -> dict:
        return {**super().settings(), "rank": self.rank, "seed": self.seed}
