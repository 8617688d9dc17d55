"""The full cache: nothing is evicted; the reference every compressed policy is measured against."""

from dataclasses import dataclass
from typing import ClassVar

from less_exp.policies.base import EvictionPolicy


@dataclass
class Full(EvictionPolicy):
    """Keep every token (dense causal attention). Budget fields are ignored."""

    name: ClassVar[str] = "full"
    evicts: ClassVar[bool] = False

    def validate(self, budget) -> None:
        pass
