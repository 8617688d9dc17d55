"""Sliding window: keep only the ``recent`` most recent tokens."""

from dataclasses import dataclass
from typing import ClassVar

from less_exp.policies.base import EvictionPolicy


@dataclass
class Window(EvictionPolicy):
    """Local attention over the last ``recent`` tokens; the oldest token leaves first."""

    name: ClassVar[str] = "window"

    def validate(self, budget) -> None:
        super().validate(budget)
        if budget.sink or budget.heavy:
            raise ValueError("window keeps only recent tokens: set policy.sink=0 and policy.heavy=0 (or use policy=sink)")
