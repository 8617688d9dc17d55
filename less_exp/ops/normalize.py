"""How the sparse part and the state's read-out become one output (LESS's joint normaliser)."""

from __future__ import annotations

import math

import torch

DEN_FLOOR = 1e-30


def joint_normalize(o_sparse: torch.Tensor, lse: torch.Tensor, num: torch.Tensor, den: torch.Tensor,
                    log_offset: torch.Tensor | None = None) -> torch.Tensor:
    """``o = (A + phi^T H) / (B + phi^T z)`` with ``A / B = o_sparse`` and ``log B = lse``, in float32;
    ``num``, ``den`` are ``phi^T H``, ``phi^T z`` divided by ``exp(log_offset)`` when it is given.

    Written as ``w_s * o_sparse + exp(log_offset - total) * num`` with ``total = logaddexp(lse, log den +
    log_offset)``: no exponential of a logit is formed and nothing is divided by ``den``, whose square
    underflows when the state is tiny (the gradient of ``num / den`` then is inf * 0 = NaN). ``den`` is
    floored at 1e-30 inside the log, where the state's weight is below float32's resolution anyway. An
    empty state (``den == 0``, hence ``num == 0``) adds exactly 0, in value and gradient.
    """
    o_sparse, lse, num, den = o_sparse.float(), lse.float(), num.float(), den.float()
    offset = torch.zeros_like(den) if log_offset is None else log_offset.float()
    has = den > 0
    log_den = torch.where(has, den.clamp_min(DEN_FLOOR).log() + offset, torch.full_like(den, -math.inf))
    total = torch.logaddexp(lse, log_den)
    state_weight = torch.where(has, offset - total, -math.inf).exp()  # <= 1 / den: finite, also its gradient
    return (lse - total).exp()[..., None] * o_sparse + state_weight[..., None] * num


def norm_mix(o_sparse: torch.Tensor, num: torch.Tensor, gain: torch.Tensor, mix: torch.Tensor, eps: float) -> torch.Tensor:
    """``o = o_sparse + mix * gain * num / rms(num)`` in float32: the state's read-out without a denominator.

    ``rms`` is over the head dimension; an empty state (``num == 0``) adds exactly 0.
    """
    num = num.float()
    rms = (num.square().mean(-1, keepdim=True) + eps).rsqrt()
    return o_sparse.float() + mix.float() * gain.float() * num * rms
