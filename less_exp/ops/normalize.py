"""How the sparse part and the state's read-out become one output (LESS's joint normaliser)."""

from __future__ import annotations

import math

import torch


def joint_normalize(o_sparse: torch.Tensor, lse: torch.Tensor, num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``o = (A + phi^T H) / (B + phi^T z)`` with ``A / B = o_sparse`` and ``log B = lse``, in float32.

    Written as ``w_s * o_sparse + w_h * (num / den)`` with ``w_s, w_h`` from a log-space ``logaddexp``,
    so no exponential of a logit is ever formed. An empty state (``den == 0``, hence ``num == 0``) gets
    ``w_h = 0`` exactly; its logarithm is never taken, so neither the value nor the gradient is NaN.
    """
    o_sparse, lse, num, den = o_sparse.float(), lse.float(), num.float(), den.float()
    has = den > 0
    safe = torch.where(has, den, torch.ones_like(den))
    log_den = torch.where(has, safe.log(), torch.full_like(den, -math.inf))
    total = torch.logaddexp(lse, log_den)
    return (lse - total).exp()[..., None] * o_sparse + (log_den - total).exp()[..., None] * (num / safe[..., None])


def norm_mix(o_sparse: torch.Tensor, num: torch.Tensor, gain: torch.Tensor, mix: torch.Tensor, eps: float) -> torch.Tensor:
    """``o = o_sparse + mix * gain * num / rms(num)`` in float32: the state's read-out without a denominator.

    ``rms`` is over the head dimension; an empty state (``num == 0``) adds exactly 0.
    """
    num = num.float()
    rms = (num.square().mean(-1, keepdim=True) + eps).rsqrt()
    return o_sparse.float() + mix.float() * gain.float() * num * rms
