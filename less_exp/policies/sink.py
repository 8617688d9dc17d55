"""Attention sinks + recent window (Lambda-shaped mask; StreamingLLM, Xiao et al. 2023, arXiv 2309.17453)."""

from dataclasses import dataclass
from typing import ClassVar

from less_exp.policies.base import EvictionPolicy


@dataclass
class Sink(EvictionPolicy):
    """Keep the first ``sink`` tokens and the ``recent`` most recent ones; the oldest non-sink leaves first."""

    sink: float = 4
    recent: float = 100
    name: ClassVar[str] = "sink"

    def validate(self, budget) -> None:
        super().validate(budget)
        if budget.heavy:
            raise ValueError("sink ranks no tokens: set policy.heavy=0 and give the slots to policy.recent")
