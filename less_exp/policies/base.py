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
        lengths = valid.sum(-1).tolist()
        L = max(lengths)
        if L == S and min(lengths) == S:
            return self._run(logits.float(), budget, lengths)
        # Work in logical positions: drop each row's left padding so that every row starts at 0.
        shifted = logits.new_zeros(*logits.shape[:3], L, L, dtype=torch.float32)
        for b, n in enumerate(lengths):
            shifted[b, ..., :n, :n] = logits[b, ..., S - n :, S - n :]
        keep_l, present_l, scores_l = self._run(shifted, budget, lengths)
        keep = torch.zeros(B, num_kv_heads, S, S, dtype=torch.bool, device=device)
        present = torch.zeros(B, num_kv_heads, S, dtype=torch.bool, device=device)
        scores = torch.zeros(B, num_kv_heads, S, dtype=torch.float32, device=device)
        for b, n in enumerate(lengths):
            keep[b, :, S - n :, S - n :] = keep_l[b, :, :n, :n]
            present[b, :, S - n :] = present_l[b, :, :n]
            scores[b, :, S - n :] = scores_l[b, :, :n]
        keep |= ~valid[:, None, :, None] & torch.eye(S, dtype=torch.bool, device=device)
        return keep, present, scores

    def _run(self, logits: torch.Tensor, budget: Budget, lengths: list[int]):
        """The step rule over unpadded rows (row ``b`` is real for its first ``lengths[b]`` tokens).

        ``weights = exp(logits - row max)`` is computed once; the sparse attention of query ``t`` is
        then its row restricted to the kept set, normalised. Every step past the budget evicts exactly
        one token, so no count is needed, and candidates are a slice: logical ``[sink, t - recent]``.
        """
        B, Hkv, G, L, _ = logits.shape
        cap, sink, recent = budget.capacity, budget.sink, budget.recent
        causal = torch.ones(L, L, dtype=torch.bool, device=logits.device).tril()
        masked = logits.masked_fill(~causal, -math.inf)
        weights = (masked - masked.amax(-1, keepdim=True)).exp()
        keep = causal.expand(B, Hkv, L, L).clone()
        present = torch.ones(B, Hkv, L, dtype=torch.bool, device=logits.device)
        first = min(cap, L)
        probs = weights[..., :first, :first] / weights[..., :first, :first].sum(-1, keepdim=True)
        probs = probs.sum(2)
        scores = torch.zeros(B, Hkv, L, dtype=torch.float32, device=logits.device)
        real = torch.tensor(lengths, device=logits.device)[:, None, None]
        for t in range(first):
            new = self.accumulate(scores[..., :first], probs[..., t, :])
            scores[..., :first] = torch.where(real > t, new, scores[..., :first])
        final_scores = scores.clone()
        ends = {}
        for b, n in enumerate(lengths):
            ends.setdefault(n - 1, []).append(b)
        for t in range(first, L):
            hi = t - recent + 1
            rank = scores[..., sink:hi].masked_fill(~present[..., sink:hi], math.inf)
            present.scatter_(-1, rank.argmin(-1, keepdim=True) + sink, False)
            keep[:, :, t, : t + 1] = present[..., : t + 1]
            w = weights[..., t, : t + 1] * present[:, :, None, : t + 1]
            inc = (w / w.sum(-1, keepdim=True)).sum(2)
            scores[..., : t + 1] = self.accumulate(scores[..., : t + 1], inc)
            for b in ends.get(t, ()):
                final_scores[b] = scores[b]
        final_present = torch.stack([keep[b, :, n - 1] for b, n in enumerate(lengths)])
        return keep, final_present, final_scores

