"""Token Omission Via Attention (TOVA; Oren et al., 2024, arXiv 2401.06104)."""

from dataclasses import dataclass
from typing import ClassVar

import torch

from less_exp.policies.base import ScoredPolicy


@dataclass
class TOVA(ScoredPolicy):
    """Evict the token that the latest query attended to least (summed over a KV head's queries).

    TOVA keeps no fixed recent window; ``recent=1`` only protects the token being added. Ranking uses
    the previous query's attention, so every query attends to at most ``heavy + recent`` keys.
    """

    heavy: float = 100
    recent: float = 1
    name: ClassVar[str] = "tova"

    def accumulate(self, scores: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        return probs

    def prompt_scores(self, received: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        return last
