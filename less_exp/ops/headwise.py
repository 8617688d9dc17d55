"""A matmul with one weight matrix per head, without copying the weights for every row of the batch."""

from __future__ import annotations

import torch


def headwise_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x [..., H, S, d] @ weight [H or 1, d, k] -> [..., H, S, k]`` (the weight cast to ``x``'s dtype).

    ``torch.matmul`` would broadcast the weights to ``[B, H, d, k]`` and copy them, which at a decode
    batch of a thousand rows costs more than the product itself; here every head's rows (batch and
    steps together) meet its weights in one batched product of ``H`` matrices."""
    weight = weight.to(x.dtype)
    if weight.shape[0] == 1:
        return torch.matmul(x, weight[0])
    *lead, H, S, d = x.shape
    rows = x.reshape(-1, H, S, d).transpose(0, 1).reshape(H, -1, d)
    out = torch.bmm(rows, weight).reshape(H, -1, S, weight.shape[-1]).transpose(0, 1)
    return out.reshape(*lead, H, S, weight.shape[-1])
