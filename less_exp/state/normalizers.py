"""How the sparse attention and the state's read-out are combined into one output."""

from __future__ import annotations

import torch
from torch import nn


class JointNormalizer(nn.Module):
    """LESS: one softmax-like denominator over the kept tokens and the state.

    ``o = (A + phi^T H) / (B + phi^T z)`` where ``A / B = o_sparse`` and ``log B = lse``; computed as
    ``w_s * o_sparse + w_h * (phi^T H / phi^T z)`` with weights from a log-space ``logaddexp`` so that
    large logits never overflow. Where the state is empty (``den == 0``) the output is ``o_sparse``.
    """

    def forward(self, o_sparse: torch.Tensor, lse: torch.Tensor, num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        has_state = den > 0
        log_den = torch.where(has_state, den, 1.0).log()
        total = torch.logaddexp(lse, torch.where(has_state, log_den, -torch.inf))
        w_sparse = (lse - total).exp()
        w_state = torch.where(has_state, (log_den - total).exp(), 0.0)
        mean_state = num / torch.where(has_state, den, 1.0)[..., None]
        return w_sparse[..., None] * o_sparse + w_state[..., None] * mean_state

    def settings(self) -> dict:
        return {"name": "joint"}
