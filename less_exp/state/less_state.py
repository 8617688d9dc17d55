"""The per-layer LESS state: the learned pieces that turn evicted tokens into a constant-size summary."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from less_exp.ops.gates import stream_log_weights
from less_exp.ops.linear_attention import fold_stream, linear_attention
from less_exp.state.feature_maps import FeatureMap
from less_exp.state.gating import Gating
from less_exp.state.normalizers import JointNormalizer, NormNormalizer
from less_exp.state.reweighting import Reweighting


class Gates(NamedTuple):
    """A chunk's gating: per-step log-gates ``g [B, Hkv, c, F]``, the stream entries' log-weights
    ``[B, Hkv, c, F]`` and the pool's ages after the chunk ``[B, Hkv, n0 + c, F]`` (``ops.gates``)."""

    g: torch.Tensor
    log_weight: torch.Tensor
    ages: torch.Tensor


class LessState(nn.Module):
    """One layer's trainable state parameters (the base model stays frozen).

    The recurrent state itself (``[H | z]``, ``[B, Hkv, D', d + 1]``) lives in the cache; this module
    holds the maps that write it (``psi``, per KV head) and read it (``phi``, per query head), an
    optional re-weighting of those features, and the normaliser that mixes the read-out with the
    sparse attention, and an optional gating that lets the state forget. It runs in float32 whatever the model's dtype: it is tiny, and its sums must
    not round away.
    """

    def __init__(self, feature_map: FeatureMap, normalizer: nn.Module, head_dim: int,
                 reweighting: Reweighting | None = None, gating: Gating | None = None):
        super().__init__()
        self.feature_map = feature_map
        self.normalizer = normalizer
        self.head_dim = head_dim
        self.reweighting = reweighting
        self.gating = gating

    @property
    def num_features(self) -> int:
        return self.feature_map.num_features * (self.reweighting.factor if self.reweighting is not None else 1)

    @property
    def needs_positions(self) -> bool:
        return self.reweighting is not None and self.reweighting.needs_positions

    def phi(self, q: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """Query features ``[B, H, c, D']``; ``pos [B, c]`` logical positions (for position re-weighting)."""
        phi, offset = self.phi_with_offset(q, pos)
        return phi if offset is None else phi * offset.exp()[..., None]

    def phi_with_offset(self, q: torch.Tensor, pos: torch.Tensor | None = None):
        """``(features, log_offset [B, H, c] or None)`` as :meth:`FeatureMap.query_with_offset`."""
        phi, offset = self.feature_map.query_with_offset(q)
        if self.reweighting is not None:
            phi = self.reweighting.query(q, phi, None if pos is None else pos[:, None, :])
        return phi, offset

    def psi(self, k: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """Key features ``[B, Hkv, c, D']``; ``pos [B, Hkv, c]`` logical positions of the keys."""
        psi = self.feature_map.key(k)
        if self.reweighting is not None:
            psi = self.reweighting.key(k, psi, pos)
        return psi

    @property
    def gate_width(self) -> int:
        """Numbers per cached token for its running log-gate (0 without gating)."""
        return 0 if self.gating is None else self.gating.width(self.num_features)

    def gates(self, value: torch.Tensor, arrive: torch.Tensor | None, evicted: torch.Tensor,
              prior: torch.Tensor | None = None) -> Gates | None:
        """The gating of ``c`` incoming tokens, or None without one.

        ``value [B, Hkv, c, d]`` the incoming tokens' values (what the gates read), ``arrive [B, c]``
        False at padding (which gets no gate), ``evicted [B, Hkv, c]`` and ``prior`` as
        :func:`ops.gates.stream_log_weights`.
        """
        if self.gating is None:
            return None
        g = self.gating.log_gates(value)
        if arrive is not None:
            g = g * arrive[:, None, :, None].to(g.dtype)
        return Gates(g, *stream_log_weights(g, evicted, prior))

    def attend(
        self,
        query: torch.Tensor,
        stream_key: torch.Tensor,
        stream_value: torch.Tensor,
        has: torch.Tensor,
        o_sparse: torch.Tensor,
        lse: torch.Tensor,
        initial: torch.Tensor | None = None,
        chunk_size: int = 64,
        query_pos: torch.Tensor | None = None,
        stream_pos: torch.Tensor | None = None,
        gates: Gates | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The LESS output of ``c`` queries from their sparse part and the evicted stream; every form calls it.

        Args:
            query: ``[B, H, c, d]``; stream_key/stream_value ``[B, Hkv, c, d]``: the token evicted at each
                step (``ops.gather_stream``), ``has [B, Hkv, c]`` False where nothing was evicted.
            o_sparse, lse: ``[B, Hkv, G, c, d]`` / ``[B, Hkv, G, c]`` from ``ops.sparse_attention``.
            initial: the state ``[B, Hkv, D', d + 1]`` before the first step (None: empty).
            query_pos ``[B, c]``, stream_pos ``[B, Hkv, c]``: logical positions of the queries and of the
                evicted tokens, needed only when :attr:`needs_positions` (``ops.stream_positions``).
            gates: from :meth:`gates` for the same ``c`` steps; required when the state has a gating.
        Returns:
            ``(out [B, Hkv, G, c, d] float32, state after the last step)``.
        """
        B, H, c, _ = query.shape
        Hkv = stream_key.shape[1]
        if self.needs_positions and (query_pos is None or stream_pos is None):
            raise ValueError("this state's re-weighting needs query_pos and stream_pos")
        phi, offset = self.phi_with_offset(query.float(), query_pos)
        phi = phi.reshape(B, Hkv, H // Hkv, c, -1)
        psi, g = self._stream(stream_key, has, stream_pos, gates)
        num, den, final = linear_attention(phi, psi, stream_value, initial, chunk_size, g)
        if offset is not None:
            offset = offset.reshape(B, Hkv, H // Hkv, c)
        return self.normalizer(o_sparse, lse, num, den, offset), final

    def fold(self, stream_key: torch.Tensor, stream_value: torch.Tensor, has: torch.Tensor,
             stream_pos: torch.Tensor | None = None, gates: Gates | None = None,
             initial: torch.Tensor | None = None) -> torch.Tensor:
        """The state after absorbing a stream (arguments as :meth:`attend`) with no query reading it:
        how a one-shot prefill takes in the tokens it evicts."""
        psi, g = self._stream(stream_key, has, stream_pos, gates)
        return fold_stream(psi, stream_value, initial, g)

    def _stream(self, stream_key, has, stream_pos, gates):
        """The stream's key features, each scaled by the gated weight it enters with, and the log-gates."""
        if (gates is None) != (self.gating is None):
            raise ValueError("a gated state needs gates (LessState.gates), an ungated one takes none")
        psi = self.psi(stream_key.float(), stream_pos) * has[..., None]
        if gates is None:
            return psi, None
        return psi * gates.log_weight.exp(), gates.g

    def token_equivalents(self) -> float:
        """State size per KV head in cached tokens (a token costs 2 d numbers: key and value)."""
        D, d = self.num_features, self.head_dim
        return (D * d + D) / (2 * d)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def settings(self) -> dict:
        out = {"feature_map": self.feature_map.settings(), "normalizer": self.normalizer.settings()}
        if self.reweighting is not None:
            out["reweighting"] = self.reweighting.settings()
        if self.gating is not None:
            out["gating"] = self.gating.settings()
        return out


class LessStates(nn.ModuleList):
    """One :class:`LessState` per decoder layer; its ``state_dict`` is exactly what a checkpoint holds."""

    @classmethod
    def build(cls, make_feature_map, make_normalizer, num_layers: int, head_dim: int,
              make_reweighting=None, make_gating=None) -> "LessStates":
        """``make_gating(features)`` gets the state's D' (re-weighting included)."""
        def one():
            state = LessState(make_feature_map(), make_normalizer(), head_dim,
                              make_reweighting() if make_reweighting is not None else None)
            if make_gating is not None:
                state.gating = make_gating(state.num_features)
            return state

        return cls(one() for _ in range(num_layers))

    def token_equivalents(self) -> float:
        return self[0].token_equivalents() if len(self) else 0.0

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


__all__ = ["Gates", "JointNormalizer", "LessState", "LessStates", "NormNormalizer"]
