"""The per-layer LESS state: the learned pieces that turn evicted tokens into a constant-size summary."""

from __future__ import annotations

import torch
from torch import nn

from less_exp.state.feature_maps import FeatureMap
from less_exp.state.normalizers import JointNormalizer


class LessState(nn.Module):
    """One layer's trainable state parameters (the base model stays frozen).

    The recurrent state itself (``H [B, Hkv, D', d]``, ``z [B, Hkv, D']``) lives in the cache; this
    module holds the maps that write it (``psi``, per KV head) and read it (``phi``, per query head)
    and the normaliser that mixes the read-out with the sparse attention.
    """

    def __init__(self, feature_map: FeatureMap, normalizer: nn.Module, head_dim: int):
        super().__init__()
        self.feature_map = feature_map
        self.normalizer = normalizer
        self.head_dim = head_dim

    @property
    def num_features(self) -> int:
        return self.feature_map.num_features

    def phi(self, q: torch.Tensor) -> torch.Tensor:
        return self.feature_map.query(q)

    def psi(self, k: torch.Tensor) -> torch.Tensor:
        return self.feature_map.key(k)

    def token_equivalents(self) -> float:
        """State size per KV head in cached tokens (a token costs 2 d numbers: key and value)."""
        D, d = self.num_features, self.head_dim
        return (D * d + D) / (2 * d)

    def settings(self) -> dict:
        return {"feature_map": self.feature_map.settings(), "normalizer": self.normalizer.settings()}


class LessStates(nn.ModuleList):
    """One :class:`LessState` per decoder layer; its ``state_dict`` is exactly what a checkpoint holds."""

    @classmethod
    def build(cls, make_feature_map, make_normalizer, num_layers: int, head_dim: int) -> "LessStates":
        return cls(LessState(make_feature_map(), make_normalizer(), head_dim) for _ in range(num_layers))

    def token_equivalents(self) -> float:
        return self[0].token_equivalents() if len(self) else 0.0


__all__ = ["JointNormalizer", "LessState", "LessStates"]
