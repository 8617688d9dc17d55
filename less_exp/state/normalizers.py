"""How the sparse attention and the state's read-out are combined into one output.

Every normaliser takes ``(o_sparse [B, Hkv, G, c, d], lse [B, Hkv, G, c], num [..., d], den [...],
log_offset)`` and returns the output in float32; ``num = phi^T H`` and ``den = phi^T z`` are the
state's read-out, both to be multiplied by ``exp(log_offset)`` (None: 1) for their true scale.
"""

from __future__ import annotations

import torch
from torch import nn

from less_exp.ops.normalize import joint_normalize, norm_mix
from less_exp.state.feature_maps import _require


class JointNormalizer(nn.Module):
    """LESS: one softmax-like denominator over the kept tokens and the state (``ops.joint_normalize``)."""

    def __init__(self, **_):
        super().__init__()

    def forward(self, o_sparse, lse, num, den, log_offset=None) -> torch.Tensor:
        return joint_normalize(o_sparse, lse, num, den, log_offset)

    def settings(self) -> dict:
        return {"name": "joint"}


class NormNormalizer(nn.Module):
    """No denominator for the state (TransNormer): ``o = o_sparse + w * RMSNorm(phi^T H)`` (``ops.norm_mix``).

    The division by ``phi^T z`` has unbounded gradients when the denominator is small; a norm does
    not. Because the norm is scale-invariant the state cannot start small through its key scale, so
    the per-head mixing weight ``w`` starts at 0 (the plain policy exactly); the RMSNorm gain per head
    and channel starts at 1.
    """

    def __init__(self, head_dim: int, num_heads: int, num_kv_heads: int, eps: float = 1e-12, **_):
        super().__init__()
        _require(eps=eps, kind=(int, float))
        if eps <= 0:
            raise ValueError(f"eps={eps} must be > 0")
        self.eps = float(eps)
        group = num_heads // num_kv_heads
        self.mix = nn.Parameter(torch.zeros(num_kv_heads, group, 1, 1))
        self.gain = nn.Parameter(torch.ones(num_kv_heads, group, 1, head_dim))

    def forward(self, o_sparse, lse, num, den, log_offset=None):
        """The norm is scale-invariant, so a feature map's log offset is not applied (its exponential
        could overflow): ``eps`` acts on the read-out as the map scaled it."""
        return norm_mix(o_sparse, num, self.gain, self.mix, self.eps)

    def settings(self) -> dict:
        return {"name": "norm"}
