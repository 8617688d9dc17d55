"""Eviction policies: which keys stay in the KV cache at every step.

One step rule, :meth:`EvictionPolicy.victim`: at step ``t`` token ``t`` joins the kept set; if the set
then holds more than ``capacity = sink + heavy + recent`` tokens, exactly one *unprotected* token
leaves: the one of lowest priority, ties broken by the lowest logical position. Protected are the
first ``sink`` tokens and the ``recent`` most recent ones (token ``t`` included, so ``recent >= 1``).
Each policy only says how it ranks the rest: oldest first (window, sink), lowest accumulated
attention (H2O), lowest last attention (TOVA). Eviction happens before token ``t`` attends, so every
query sees at most ``capacity`` keys, a real cache never holds more, and an evicted token never
comes back. Positions are *logical*: padding is skipped, so padded and unpadded rows are alike.

Three faces call it: :meth:`EvictionPolicy.schedule` runs it token by token over a chunk of new
tokens on top of a cache's slots (chunked prefill), :meth:`EvictionPolicy.keep_mask` is the same run
over a whole sequence from an empty cache (training, perplexity, prefill; in closed form, without a
step loop, for the oldest-first policies), and the decoding cache calls it once per token.
``policies.reference`` is the slow oracle they are tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

RATIO_BASES = (None, "max_positions", "length")
PREFILLS = ("stepwise", "one_shot")
SCORE_BLOCK = 256  # steps whose attention weights a ranking policy's schedule holds at once


def logical_positions(valid: torch.Tensor) -> torch.Tensor:
    """``[B, S]`` long: each real token's position counting real tokens only, -1 at padding."""
    return torch.where(valid, valid.long().cumsum(-1) - 1, -1)


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
        prefill: how a cache takes a prompt. ``stepwise`` (the LESS paper): the prompt itself runs under
            eviction, token by token. ``one_shot`` (H2O's serving, SnapKV, kvpress): the prompt attends
            fully, then the cache is cut once to the budget by :meth:`compress` and the evicted tokens
            are folded into the state. Only a cache's first prefill reads it (later chunks, such as a
            new turn, follow the step rule); a form that scores every token under the policy
            (perplexity, training) is stepwise.
    """

    sink: float = 0
    heavy: float = 0
    recent: float = 0
    ratio_of: str | None = None
    baseline_plus: bool = False
    prefill: str = "stepwise"

    name: ClassVar[str] = "base"
    uses_scores: ClassVar[bool] = False
    evicts: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.ratio_of not in RATIO_BASES:
            raise ValueError(f"policy.ratio_of must be one of {RATIO_BASES}, got {self.ratio_of!r}")
        if self.prefill not in PREFILLS:
            raise ValueError(f"policy.prefill must be one of {PREFILLS}, got {self.prefill!r}")
        if not isinstance(self.baseline_plus, bool):
            raise ValueError(f"policy.baseline_plus={self.baseline_plus!r} must be true or false")
        for field in ("sink", "heavy", "recent"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise ValueError(f"policy.{field}={value!r} must be a number (a token count, or a ratio with policy.ratio_of)")
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
        return logical

    def accumulate(self, scores: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """New per-token scores after a query attended with ``probs`` (summed over a KV head's queries)."""
        return scores

    def prompt_scores(self, received: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Running scores after a prompt attended in full (one-shot prefill): ``received [B, Hkv, S]`` the
        attention each token got from every query, ``last`` that of the last query. Default: accumulated."""
        return self.accumulate(torch.zeros_like(received), received)

    # ------------------------------------------------------------- the step rule
    def victim(
        self,
        present: torch.Tensor,
        logical: torch.Tensor,
        scores: torch.Tensor,
        current: torch.Tensor,
        budget: Budget,
        ordered: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step rule, the one implementation every face calls (decode, chunk and parallel).

        Args:
            present: ``[B, Hkv, N]`` bool, slots holding a token (the newest included).
            logical: ``[B, Hkv, N]`` long, logical position of each slot's token.
            scores: ``[B, Hkv, N]`` float32, the policy's running scores.
            current: ``[B, 1, 1]`` (or broadcastable) long, logical position of the newest token.
            ordered: the present slots are in logical order, so the first slot of lowest priority is
                already the one of lowest logical position (saves the tie-break pass).
        Returns:
            ``(evict, victim)``: ``[B, Hkv]`` bool (whether a slot leaves) and ``[B, Hkv]`` long slot: the
            unprotected token of lowest priority, ties broken by the lowest logical position.
        """
        over = present.sum(-1) > budget.capacity
        candidates = present & (logical >= budget.sink) & (logical <= current - budget.recent)
        rank = self.priority(logical, scores)
        if rank is logical:
            victim = logical.masked_fill(~candidates, torch.iinfo(logical.dtype).max).argmin(-1)
        elif ordered:
            victim = rank.masked_fill(~candidates, math.inf).argmin(-1)
        else:
            rank = rank.masked_fill(~candidates, math.inf)
            ties = rank == rank.amin(-1, keepdim=True)
            victim = logical.masked_fill(~(candidates & ties), torch.iinfo(logical.dtype).max).argmin(-1)
        return over & candidates.any(-1), victim

    def schedule(
        self,
        budget: Budget,
        arrive: torch.Tensor,
        num_kv_heads: int,
        logits: torch.Tensor | None = None,
        slots: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> "Schedule":
        """Run the step rule over ``c`` incoming tokens, one at a time (chunk and parallel faces).

        Args:
            arrive: ``[B, c]`` bool, False where the incoming token is padding (it is never admitted).
            logits: ``[B, Hkv, G, c, N + c]`` float32 logits of the incoming queries over the slots and
                the chunk, or a function ``(start, stop) ->`` those rows, so that the whole tensor is never
                held; needed when the policy ranks by attention.
            slots: ``(present, logical, scores [B, Hkv, N], count [B])`` of a cache, its present slots in
                logical order, or None for an empty one (the parallel face over a whole sequence).
        """
        if self.uses_scores and logits is None:
            raise ValueError(f"{self.name} ranks tokens by attention and needs the attention logits")
        B, c = arrive.shape
        device = arrive.device
        heads = num_kv_heads if self.uses_scores else 1  # a ranking that ignores attention is the same for every head
        if slots is None:
            slots = (
                torch.zeros(B, heads, 0, dtype=torch.bool, device=device),
                torch.zeros(B, heads, 0, dtype=torch.long, device=device),
                torch.zeros(B, heads, 0, dtype=torch.float32, device=device),
                torch.zeros(B, dtype=torch.long, device=device),
            )
        present0, logical0, scores0, count0 = slots
        N = present0.shape[-1]
        current = count0[:, None] + arrive.long().cumsum(-1) - 1
        new_logical = torch.where(arrive, current, -1)[:, None, :].expand(B, heads, c)
        present = torch.cat([present0[:, :heads], arrive.new_zeros(B, heads, c)], -1)
        logical = torch.cat([logical0[:, :heads], new_logical], -1)
        scores = torch.cat([scores0[:, :heads].float(), scores0.new_zeros(B, heads, c, dtype=torch.float32)], -1)
        keep = torch.zeros(B, heads, c, N + c, dtype=torch.bool, device=device)
        evicted = torch.full((B, heads, c), -1, dtype=torch.long, device=device)
        cap = budget.capacity
        # a row can only overflow once it holds ``cap`` tokens: before that step no victim is looked for
        filled = (present0.sum(-1).amax() if N else 0) + arrive.long().cumsum(-1).amax(0)
        may_evict = (filled > cap).tolist() if cap is not None else [False] * c
        every_row = bool(arrive.all())
        for j in range(c):
            if self.uses_scores and j % SCORE_BLOCK == 0:
                # exp(logit - max over the keys a query could see); a step's attention is its row restricted
                # to the kept set, normalised (the decode face gets the same from a log-sum-exp)
                masked, top = self._step_logits(logits, arrive, present0[:, :heads], j, min(j + SCORE_BLOCK, c))
                weights, first = (masked - top[..., None]).exp(), j
            here = arrive[:, j, None]
            present[..., N + j] = here
            if may_evict[j]:
                evict, victim = self.victim(present, logical, scores, current[:, j, None, None], budget, ordered=True)
                present.scatter_(-1, victim[..., None], present.gather(-1, victim[..., None]) & ~evict[..., None])
                evicted[..., j] = torch.where(evict, victim, -1)
            keep[:, :, j] = present
            if self.uses_scores:
                end = N + j + 1
                w = weights[:, :, :, j - first, :end] * present[:, :, None, :end]
                new = self.accumulate(scores[..., :end], (w / w.sum(-1, keepdim=True)).sum(2))
                scores[..., :end] = new if every_row else torch.where(here[..., None], new, scores[..., :end])
        own = torch.zeros(c, N + c, dtype=torch.bool, device=device)
        own[:, N:] = torch.eye(c, dtype=torch.bool, device=device)
        keep = torch.where(arrive[:, None, :, None], keep, own)  # a padding query sees only itself
        if heads != num_kv_heads:
            keep, evicted, present, logical, scores = (
                x.expand(B, num_kv_heads, *x.shape[2:]) for x in (keep, evicted, present, logical, scores)
            )
        return Schedule(keep, evicted, present, logical, scores, count0 + arrive.long().sum(-1))

    @staticmethod
    def _step_logits(logits, arrive: torch.Tensor, present0: torch.Tensor, start: int, stop: int,
                     width: int | None = None):
        """The logits of the steps ``start:stop`` with -inf at the keys their queries cannot see (not in
        the cache's ``present0 [B, Hkv, N]``, not yet arrived, padding), and each row's max (at least
        -1e30). Made a block of steps at a time, so that no S x S float32 tensor is held. A function
        may return only the first ``N + stop`` columns (no later key is seen); the rows come back
        ``width`` columns wide (default ``N + c``), -inf past what was given."""
        B, heads, N = present0.shape
        c = arrive.shape[1]
        rows = logits[..., start:stop, :] if isinstance(logits, torch.Tensor) else logits(start, stop)
        given = rows.shape[-1]
        step = torch.arange(start, stop, device=arrive.device)[:, None]
        arrived = arrive[:, None, :] & (torch.arange(c, device=arrive.device)[None, :] <= step)  # [B, rows, c]
        seen = torch.cat([present0[:, :, None, :].expand(B, heads, stop - start, N), arrived[:, None].expand(B, heads, -1, c)], -1)
        masked = rows.masked_fill(~seen[:, :, None, :, :given], -math.inf)
        top = masked.amax(-1).clamp_min(-1e30)
        width = N + c if width is None else width
        if given < width:
            masked = torch.cat([masked, masked.new_full((*masked.shape[:-1], width - given), -math.inf)], -1)
        return masked, top

    # ------------------------------------------------------------- parallel face
    def keep_mask(
        self, budget: Budget, valid: torch.Tensor, num_kv_heads: int, logits: torch.Tensor | None = None
    ) -> "Schedule":
        """The step rule over a whole sequence from an empty cache (``valid [B, S]``: False at padding).

        ``keep[b, h, t, s]`` says query ``t`` sees key ``s``; ``evicted[b, h, t]`` is the token that left
        at step ``t``; ``present``/``scores`` after the last token seed a decoding cache.
        """
        if budget.capacity is None:
            B, S = valid.shape
            causal = torch.ones(S, S, dtype=torch.bool, device=valid.device).tril()
            keep = (causal & valid[:, None, None, :]) | (~valid[:, None, :, None] & torch.eye(S, dtype=torch.bool, device=valid.device))
            logical = logical_positions(valid)[:, None].expand(B, num_kv_heads, S)
            return Schedule(
                keep.expand(B, num_kv_heads, S, S),
                torch.full((B, num_kv_heads, S), -1, dtype=torch.long, device=valid.device),
                valid[:, None].expand(B, num_kv_heads, S),
                logical,
                torch.zeros(B, num_kv_heads, S, device=valid.device),
                valid.long().sum(-1),
            )
        if self.oldest_first:
            return self._oldest_first_schedule(budget, valid, num_kv_heads)
        if self.uses_scores:
            return self._slot_schedule(budget, valid, num_kv_heads, logits)
        return self.schedule(budget, valid, num_kv_heads)

    def _slot_schedule(self, budget: Budget, valid: torch.Tensor, num_kv_heads: int, logits) -> "Schedule":
        """:meth:`keep_mask` for a ranking policy: the step rule runs over ``capacity`` slots instead of over
        every position, so a step costs O(budget) rather than O(S); the attention a step adds to the
        scores is read from the logits at the kept slots only. The newcomer is protected (``recent >=
        1``), so once the slots are full the victim is among them and the newcomer takes its slot; until
        then it takes the next free one (slots fill in order and an eviction refills at once). A spare
        slot at the end absorbs the writes of padding steps. Scores are returned for the tokens still
        present (0 elsewhere)."""
        if logits is None:
            raise ValueError(f"{self.name} ranks tokens by attention and needs the attention logits")
        B, S = valid.shape
        H, device, cap = num_kv_heads, valid.device, budget.capacity
        M = cap + 1  # the last slot is the spare
        phys = torch.full((B, H, M), S, dtype=torch.long, device=device)  # S: no token (a spare column below)
        present = torch.zeros(B, H, M, dtype=torch.bool, device=device)
        slot_logical = torch.full((B, H, M), -1, dtype=torch.long, device=device)
        scores = torch.zeros(B, H, M, dtype=torch.float32, device=device)
        keep = torch.zeros(B, H, S, S + 1, dtype=torch.bool, device=device)
        evicted = torch.full((B, H, S), -1, dtype=torch.long, device=device)
        logical = logical_positions(valid)
        admitted = valid.long().cumsum(-1) - valid.long()  # real tokens before each step
        full = admitted >= cap  # [B, S]: the slots are full when step j arrives
        next_free = torch.where(valid, admitted.clamp_max(cap), cap)  # padding writes go to the spare slot
        may_evict = (full & valid).any(0).tolist()
        every_row = bool(valid.all())
        empty = torch.zeros(B, H, 0, dtype=torch.bool, device=device)  # the parallel face starts from an empty cache
        big = torch.iinfo(torch.long).max
        # per step, indexed on the first dimension (one view a step instead of several)
        step_valid = valid.T[:, :, None, None].expand(S, B, H, 1)
        step_logical = logical.T[:, :, None, None].expand(S, B, H, 1)
        step_free = next_free.T[:, :, None, None].expand(S, B, H, 1)
        step_evicts = (full & valid).T[:, :, None, None].expand(S, B, H, 1)
        step_phys = torch.arange(S, device=device)[:, None, None, None].expand(S, B, H, 1)
        zero = scores.new_zeros(B, H, 1)
        for j in range(S):
            if j % SCORE_BLOCK == 0:
                # one spare column (S) at -inf: a slot without a token gets no attention, with no mask to apply
                rows, top = self._step_logits(logits, valid, empty, j, min(j + SCORE_BLOCK, S), width=S + 1)
                rows = rows.permute(3, 0, 1, 2, 4).contiguous()
                top, first = top.permute(3, 0, 1, 2)[..., None], j
            target, here, current = step_free[j], step_valid[j], step_logical[j]
            if may_evict[j]:
                candidates = present & (slot_logical >= budget.sink) & (slot_logical <= current - budget.recent)
                rank = self.priority(slot_logical, scores).masked_fill(~candidates, math.inf)
                ties = candidates & (rank == rank.amin(-1, keepdim=True))
                victim = slot_logical.masked_fill(~ties, big).argmin(-1, keepdim=True)
                evict = step_evicts[j]
                evicted[..., j] = torch.where(evict, phys.gather(-1, victim), -1)[..., 0]
                target = torch.where(evict, victim, target)
            present.scatter_(-1, target, here)
            phys.scatter_(-1, target, step_phys[j])
            slot_logical.scatter_(-1, target, current)
            scores.scatter_(-1, target, zero)
            at = torch.where(present, phys, S)  # each kept token's position; S (the spare column) for the rest
            keep[:, :, j].scatter_(-1, at, present)
            row = rows[j - first].gather(-1, at[:, :, None].expand(-1, -1, rows.shape[3], -1))
            w = (row - top[j - first]).exp()
            new = self.accumulate(scores, (w / w.sum(-1, keepdim=True)).sum(2))
            scores = new if every_row else torch.where(here, new, scores)
        keep = torch.where(valid[:, None, :, None], keep[..., :S], torch.eye(S, dtype=torch.bool, device=device))
        at = torch.where(present, phys, S)
        final = torch.zeros(B, H, S + 1, dtype=torch.bool, device=device).scatter_(-1, at, present)[..., :S]
        final_scores = torch.zeros(B, H, S + 1, device=device).scatter_(-1, at, scores)[..., :S]
        return Schedule(keep, evicted, final, logical[:, None].expand(B, H, S), final_scores * final, valid.long().sum(-1))

    def compress(self, budget: Budget, valid: torch.Tensor, num_kv_heads: int,
                 scores: torch.Tensor | None = None) -> "Schedule":
        """One-shot compression of a whole prompt (``prefill=one_shot``, ``valid [B, S]``): the step rule's
        ranking applied once, as if the prompt had arrived in a single step. Kept are the ``sink`` first
        and ``recent`` last real tokens and, of the rest, the ``capacity`` minus those of highest priority
        (ties to the newest); for an oldest-first policy that is the stepwise final set. ``scores [B,
        Hkv, S]`` from :meth:`prompt_scores` (ranking policies). ``keep`` is None (every query saw its
        whole past); ``evicted`` lists each evicted token at its own step, so a state folds them in
        prompt order, and the gated weight ``exp(G_end - G_s)`` does not depend on when it left."""
        B, S = valid.shape
        device = valid.device
        heads = (B, num_kv_heads, S)
        logical = logical_positions(valid)
        count = valid.long().sum(-1)
        scores = torch.zeros(heads, device=device) if scores is None else scores.float()
        at = logical[:, None].expand(heads)
        if budget.capacity is None:
            present = valid[:, None].expand(heads)
        else:
            protected = valid & ((logical < budget.sink) | (logical >= (count - budget.recent)[:, None]))
            candidates = (valid & ~protected)[:, None].expand(heads)
            room = (budget.capacity - protected.long().sum(-1)).clamp_min(0)
            rank = self.priority(at, scores).double().masked_fill(~candidates, -math.inf)
            order = torch.arange(S - 1, -1, -1, device=device).expand(heads)  # newest first, then by priority
            order = order.gather(-1, rank.gather(-1, order).argsort(dim=-1, descending=True, stable=True))
            place = torch.empty_like(order).scatter_(-1, order, torch.arange(S, device=device).expand(heads))
            present = protected[:, None] | (candidates & (place < room[:, None, None]))
        evicted = torch.where(valid[:, None] & ~present, torch.arange(S, device=device), -1)
        return Schedule(None, evicted, present, at, scores * present, count)

    @property
    def oldest_first(self) -> bool:
        """Whether the policy ranks by age alone (window, sink): then the step rule has a closed form."""
        return not self.uses_scores and type(self).priority is EvictionPolicy.priority

    def _oldest_first_schedule(self, budget: Budget, valid: torch.Tensor, num_kv_heads: int) -> "Schedule":
        """:meth:`keep_mask` for an oldest-first policy without a loop over tokens. Evicting the oldest
        unprotected token each step keeps the ``sink`` first tokens and the ``capacity - sink`` newest, so
        query ``t`` (logical) sees key ``s`` iff ``s <= t`` and (``s < sink`` or ``s > t - (capacity - sink)``),
        and step ``t >= capacity`` evicts logical token ``t - (capacity - sink)``: O(S^2) bits, no step loop."""
        B, S = valid.shape
        device = valid.device
        window = budget.capacity - budget.sink
        logical = logical_positions(valid)
        lq, lk = logical[:, :, None], logical[:, None, :]
        keep = valid[:, None, :] & (lk <= lq) & ((lk < budget.sink) | (lk > lq - window))
        keep = torch.where(valid[:, :, None], keep, torch.eye(S, dtype=torch.bool, device=device))  # padding sees itself
        leaving = logical - window
        evicts = valid & (leaving >= budget.sink)
        by_logical = (~valid).to(torch.int8).argsort(dim=-1, stable=True)  # physical index of logical position p
        evicted = torch.where(evicts, by_logical.gather(-1, leaving.clamp(0, S - 1)), -1)
        count = valid.long().sum(-1)
        present = valid & ((logical < budget.sink) | (logical > (count - 1)[:, None] - window))
        heads = (B, num_kv_heads)
        return Schedule(keep[:, None].expand(*heads, S, S), evicted[:, None].expand(*heads, S),
                        present[:, None].expand(*heads, S), logical[:, None].expand(*heads, S),
                        torch.zeros(*heads, S, device=device), count)

    def describe(self, budget: Budget) -> str:
        if budget.capacity is None:
            return self.name
        return f"{self.name}(sink={budget.sink}, heavy={budget.heavy}, recent={budget.recent})"


@dataclass
class ScoredPolicy(EvictionPolicy):
    """A policy that ranks tokens by the attention they receive."""

    uses_scores: ClassVar[bool] = True

    def priority(self, logical: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores


@dataclass(frozen=True)
class Schedule:
    """What the step rule decided for ``c`` incoming tokens over ``N`` cache slots plus the ``c`` new ones.

    Attributes:
        keep: ``[B, Hkv, c, N + c]`` bool, the keys each incoming query sees (None after a one-shot
            compression, where every query saw its whole past).
        evicted: ``[B, Hkv, c]`` long, index (into ``N + c``) of the token that left at each step, -1 when
            none did: the evicted stream that the LESS state absorbs.
        present, logical, scores: ``[B, Hkv, N + c]`` kept set, logical positions and running scores
            after the last step.
        count: ``[B]`` tokens seen after the last step (padding excluded).
    """

    keep: torch.Tensor | None
    evicted: torch.Tensor
    present: torch.Tensor
    logical: torch.Tensor
    scores: torch.Tensor
    count: torch.Tensor
