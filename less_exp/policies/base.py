"""Eviction policies: which keys stay in the KV cache at every step.

A policy has two faces that must agree (see ``tests/test_policies.py``):

* ``keep_mask`` (parallel): boolean keep-masks ``[B, Hkv, S, S]`` over a whole sequence, used for
  training, perplexity and the prefill of a real cache.
* ``select_victims`` (decode): which cache slot leaves when one token arrives, used by
  :class:`less_exp.cache.LessCache`.

Both run the same step rule. At step ``t`` token ``t`` joins the kept set; if the set then holds
more than ``capacity = sink + heavy + recent`` tokens, exactly one *unprotected* token leaves: the
one with the lowest priority. Protected are the first ``sink`` tokens and the ``recent`` most recent
ones (token ``t`` included, so ``recent >= 1``). Each policy only says how it ranks the rest:
oldest first (window, sink), lowest accumulated attention (H2O), lowest last attention (TOVA).
Eviction happens before token ``t`` attends, so every query sees at most ``capacity`` keys and a
real cache never holds more. Positions are *logical*: left padding is skipped, so padded and
unpadded rows are treated alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

RATIO_BASES = (None, "max_positions", "length")


@dataclass(frozen=True)
class Budget:
    """Resolved absolute token counts. ``capacity`` is ``None`` for a cache that never evicts."""

    sink: int
    heavy: int
    recent: int
    unbounded: bool = False

    @property
    def capacity(self) -> int | None:
        return None if self.unbounded else self.sink + self.heavy + self.recent


@dataclass
class EvictionPolicy:
    """Base of every policy.

    Attributes:
        sink: tokens at the start that are never evicted (attention sinks, StreamingLLM).
        heavy: slots for tokens kept by the policy's ranking (heavy hitters for H2O/TOVA).
        recent: most recent tokens that are never evicted; the current token is one of them.
        ratio_of: ``None`` when the three counts are absolute; ``"max_positions"`` to read them as
            fractions of the model's maximum positions (as LESS does) or ``"length"`` as fractions of
            the sequence (prompt) length (as H2O does).
        baseline_plus: add the LESS state's size in token-equivalents to the budget, so that a plain
            policy is compared with LESS at equal memory ("Baseline+" in the LESS paper).
    """

    sink: float = 0
    heavy: float = 0
    recent: float = 0
    ratio_of: str | None = None
    baseline_plus: bool = False

    name: ClassVar[str] = "base"
    uses_scores: ClassVar[bool] = False
    evicts: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.ratio_of not in RATIO_BASES:
            raise ValueError(f"policy.ratio_of must be one of {RATIO_BASES}, got {self.ratio_of!r}")
        for field in ("sink", "heavy", "recent"):
            value = getattr(self, field)
            if value < 0:
                raise ValueError(f"policy.{field} must be >= 0, got {value}")
            if self.ratio_of is None and float(value) != int(value):
                raise ValueError(
                    f"policy.{field}={value} is fractional but policy.ratio_of is null; "
                    "set policy.ratio_of=max_positions or length to use ratios"
                )
            if self.ratio_of is not None and value > 1:
                raise ValueError(f"policy.{field}={value} is a ratio (ratio_of={self.ratio_of}) and must be <= 1")

    # ------------------------------------------------------------------ budget
    def budget(self, length: int | None = None, max_positions: int | None = None, state_tokens: float = 0.0) -> Budget:
        """Absolute counts for a sequence of ``length`` tokens (ratios resolved, Baseline+ applied)."""
        if not self.evicts:
            return Budget(0, 0, 0, unbounded=True)
        if self.ratio_of is None:
            counts = [int(self.sink), int(self.heavy), int(self.recent)]
        else:
            base = max_positions if self.ratio_of == "max_positions" else length
            if base is None:
                raise ValueError(f"policy.ratio_of={self.ratio_of} needs the {self.ratio_of.replace('_', ' ')}")
            counts = [int(round(r * base)) for r in (self.sink, self.heavy, self.recent)]
        sink, heavy, recent = counts
        if self.baseline_plus:
            heavy, recent = self.grow(heavy, recent, int(round(state_tokens)))
        budget = Budget(sink, heavy, recent)
        self.validate(budget)
        return budget

    def grow(self, heavy: int, recent: int, extra: int) -> tuple[int, int]:
        """Where Baseline+'s extra tokens go: to the recent window unless the policy ranks tokens."""
        return heavy, recent + extra

    def validate(self, budget: Budget) -> None:
        if budget.recent < 1:
            raise ValueError(
                f"{self.name}: policy.recent must resolve to >= 1 (the current token is always kept), got {budget.recent}"
            )

    def check_fits(self, budget: Budget, length: int) -> None:
        """Refuse a budget that keeps every token of a ``length``-token sequence: nothing would be evicted."""
        if budget.capacity is not None and budget.capacity >= length:
            raise ValueError(
                f"{self.name}: budget of {budget.capacity} tokens (sink {budget.sink} + heavy {budget.heavy} + "
                f"recent {budget.recent}) is not smaller than the sequence length {length}; nothing would be evicted. "
                "Lower the budget or use policy=full."
            )

    # ------------------------------------------------------------- ranking
    def priority(self, logical: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Rank of each kept token; the lowest unprotected one is evicted. Default: oldest first."""
        return logical.to(scores.dtype)

    def accumulate(self, scores: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """New per-token scores after a query attended with ``probs`` (summed over a KV head's queries)."""
        return scores

    # ------------------------------------------------------------- step rule
    def select_victims(
        self,
        present: torch.Tensor,
        logical: torch.Tensor,
        scores: torch.Tensor,
        current: torch.Tensor,
        budget: Budget,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One eviction step over slots.

        Args:
            present: ``[B, Hkv, N]`` bool, slots holding a token (the newest included).
            logical: ``[B, Hkv, N]`` or broadcastable long, logical position of each slot's token.
            scores: ``[B, Hkv, N]`` float, the policy's running scores.
            current: ``[B, 1, 1]`` or broadcastable long, logical position of the newest token.
        Returns:
            ``(evict, victim)``: ``[B, Hkv]`` bool (whether a slot leaves) and ``[B, Hkv]`` long slot index.
        """
        evict = present.sum(-1) > budget.capacity
        protected = (logical < budget.sink) | (logical > current - budget.recent)
        candidates = present & ~protected
        rank = torch.where(candidates, self.priority(logical.expand_as(scores), scores), math.inf)
        victim = rank.argmin(-1)
        return evict & candidates.any(-1), victim

    # ------------------------------------------------------------- parallel face
    def keep_mask(
        self,
        budget: Budget,
        valid: torch.Tensor,
        num_kv_heads: int,
        logits: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep-masks over a whole sequence.

        Args:
            valid: ``[B, S]`` bool, False at (left) padding.
            logits: ``[B, Hkv, G, S, S]`` scaled attention logits, needed when ``uses_scores``.
        Returns:
            ``(keep, present, scores)``: ``keep[b, h, t, s]`` says query ``t`` sees key ``s`` (causal,
            valid keys only; a padding query sees itself); ``present``/``scores`` ``[B, Hkv, S]`` are the
            kept set and running scores after the last token, which seed a decoding cache.
        """
        B, S = valid.shape
        logical = valid.long().cumsum(-1) - 1
        causal = torch.ones(S, S, dtype=torch.bool, device=valid.device).tril()
        keep = causal & valid[:, None, None, :]
        if budget.capacity is not None:
            keep = keep & self._static_mask(budget, logical[:, None, :, None], logical[:, None, None, :])
        keep = keep.expand(B, num_kv_heads, S, S)
        keep = keep | (~valid[:, None, :, None] & torch.eye(S, dtype=torch.bool, device=valid.device))
        present = keep[:, :, -1, :] & valid[:, None, :]
        scores = torch.zeros(present.shape, dtype=torch.float32, device=valid.device)
        return keep, present, scores

    def _static_mask(self, budget: Budget, q_logical: torch.Tensor, k_logical: torch.Tensor) -> torch.Tensor:
        """Closed form of the step rule for policies that rank oldest-first (window, sink)."""
        recent = k_logical > q_logical - budget.recent - budget.heavy
        return recent | (k_logical < budget.sink)

    def describe(self, budget: Budget) -> str:
        if budget.capacity is None:
            return self.name
        return f"{self.name}(sink={budget.sink}, heavy={budget.heavy}, recent={budget.recent})"


@dataclass
class ScoredPolicy(EvictionPolicy):
    """A policy that ranks tokens by attention; its parallel face runs the step rule token by token."""

    uses_scores: ClassVar[bool] = True

    def priority(self, logical: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores

    def keep_mask(self, budget, valid, num_kv_heads, logits=None):
        if logits is None:
            raise ValueError(f"{self.name} ranks tokens by attention and needs the attention logits")
        B, S = valid.shape
        device = valid.device
        logical = valid.long().cumsum(-1) - 1
        cap = budget.capacity
        keep = torch.zeros(B, num_kv_heads, S, S, dtype=torch.bool, device=device)
        present = torch.zeros(B, num_kv_heads, S, dtype=torch.bool, device=device)
        scores = torch.zeros(B, num_kv_heads, S, dtype=torch.float32, device=device)
        logits = logits.float()
        # Until some row holds more than ``cap`` valid tokens nothing is evicted: do those rows at once.
        first = self._first_evicting_step(valid, cap)
        if first > 0:
            eye = torch.eye(first, dtype=torch.bool, device=device)
            block = torch.ones(first, first, dtype=torch.bool, device=device).tril() & valid[:, None, None, :first]
            block = block | (~valid[:, None, :first, None] & eye)
            keep[:, :, :first, :first] = block
            present[..., :first] = valid[:, None, :first]
            probs = _masked_softmax(logits[..., :first, :first], block[:, :, None]).sum(2)
            for t in range(first):
                new = self.accumulate(scores[..., :first], probs[..., t, :])
                scores[..., :first] = torch.where(valid[:, None, None, t], new, scores[..., :first])
        rows = torch.arange(B, device=device)[:, None]
        heads = torch.arange(num_kv_heads, device=device)[None, :]
        for t in range(first, S):
            vt = valid[:, t]
            present[:, :, t] = vt[:, None]
            evict, victim = self.select_victims(
                present[..., : t + 1], logical[:, None, : t + 1], scores[..., : t + 1], logical[:, None, t, None], budget
            )
            evict = evict & vt[:, None]
            present[rows, heads, victim] &= ~evict
            row = present[..., : t + 1] | (~vt[:, None, None] & (torch.arange(t + 1, device=device) == t))
            keep[:, :, t, : t + 1] = row
            probs = _masked_softmax(logits[..., t, : t + 1], row[:, :, None]).sum(2)
            new = self.accumulate(scores[..., : t + 1], probs)
            scores[..., : t + 1] = torch.where(vt[:, None, None], new, scores[..., : t + 1])
        return keep, present, scores

    @staticmethod
    def _first_evicting_step(valid: torch.Tensor, cap: int) -> int:
        """First index at which some row holds ``cap + 1`` valid tokens."""
        counts = valid.long().cumsum(-1).amax(0)
        over = (counts > cap).nonzero()
        return int(over[0]) if len(over) else valid.shape[1]


def _masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.masked_fill(~mask, -math.inf), dim=-1)
