"""Heavy-Hitter Oracle (H2O; Zhang et al., NeurIPS 2023, arXiv 2306.14048)."""

from dataclasses import dataclass
from typing import ClassVar

import torch

from less_exp.policies.base import ScoredPolicy


@dataclass
class H2O(ScoredPolicy):
    """Keep ``heavy`` heavy hitters and the ``recent`` most recent tokens.

    A token's score is the attention it has received so far, accumulated over every query that saw
    it (the sparse attention over the kept set; with GQA summed over the KV head's query heads).
    When the cache overflows, the unprotected token with the lowest accumulated score leaves for
    good: a real cache no longer holds its key, so it cannot come back.
    """

    heavy: float = 50
    recent: float = 50
    name: ClassVar[str] = "h2o"

    def accumulate(self, scores: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        return scores + probs

    def grow(self, heavy: int, recent: int, extra: int) -> tuple[int, int]:
        return heavy + (extra + 1) // 2, recent + extra // 2
