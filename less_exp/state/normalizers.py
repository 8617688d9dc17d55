"""How the sparse attention and the state's read-out are combined into one output."""

from __future__ import annotations

import torch
from torch import nn


class JointNormalizer(nn.Module):
    """LESS: one softmax-like denominator over the kept tokens and the state.

    ``o = (A + phi^T H) / (B + phi^T z)`` where ``A / B = o_sparse`` and ``log B = lse``; computed as
    ``w_s * o_sparse + (w_h / den) * num`` with ``w_s = B / total``, ``w_h = den / total`` taken from a
    log-space ``logaddexp`` so that large logits never overflow. An empty state (``den == 0``, hence
    ``num == 0``) contributes exactly nothing; clamping ``den`` only keeps its logarithm finite.
    """

    def forward(self, o_sparse: torch.Tensor, lse: torch.Tensor, num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        den = den.clamp_min(1e-30)
        log_den = den.log()
        total = torch.logaddexp(lse, log_den)
        return (lse - total).exp()[..., None] * o_sparse + ((log_den - total).exp() / den)[..., None] * num

    def settings(self) -> dict:
        return {"name": "joint"}
