"""How the sparse attention and the state's read-out are combined into one output."""

from __future__ import annotations

import torch
from torch import nn

from less_exp.ops.normalize import joint_normalize


class JointNormalizer(nn.Module):
    """LESS: one softmax-like denominator over the kept tokens and the state (``ops.joint_normalize``)."""

    def forward(self, o_sparse: torch.Tensor, lse: torch.Tensor, num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        return joint_normalize(o_sparse, lse, num, den)

    def settings(self) -> dict:
        return {"name": "joint"}
