"""Eviction policies, one per module; ``conf/policy/*.yaml`` picks one by ``_target_``."""

from less_exp.policies.base import Budget, EvictionPolicy, Schedule, ScoredPolicy
from less_exp.policies.full import Full
from less_exp.policies.h2o import H2O
from less_exp.policies.sink import Sink
from less_exp.policies.tova import TOVA
from less_exp.policies.window import Window

__all__ = ["Budget", "EvictionPolicy", "Schedule", "ScoredPolicy", "Full", "H2O", "Sink", "TOVA", "Window"]
