"""Slow, obviously-correct kept sets: one Python loop per row and head, straight from the definitions.

Used only by tests to check the vectorised faces of each policy.
"""

from __future__ import annotations

import math

import torch

from less_exp.policies.base import Budget, EvictionPolicy


def reference_keep_sets(
    policy: EvictionPolicy, budget: Budget, valid: torch.Tensor, num_kv_heads: int, logits: torch.Tensor | None = None
) -> list[list[list[set[int]]]]:
    """``sets[b][h][t]``: the key positions query ``t`` sees (only for valid ``t``)."""
    B, S = valid.shape
    out = []
    for b in range(B):
        positions = [t for t in range(S) if valid[b, t]]
        per_head = []
        for h in range(num_kv_heads):
            kept: list[int] = []
            score: dict[int, float] = {}
            rows: list[set[int]] = [set() for _ in range(S)]
            for i, t in enumerate(positions):
                kept.append(t)
                score[t] = 0.0
                if budget.capacity is not None and len(kept) > budget.capacity:
                    logical = {p: positions.index(p) for p in kept}
                    candidates = [p for p in kept if logical[p] >= budget.sink and logical[p] <= i - budget.recent]
                    if policy.uses_scores:
                        victim = min(candidates, key=lambda p: (score[p], p))
                    else:
                        victim = min(candidates)
                    kept.remove(victim)
                rows[t] = set(kept)
                if policy.uses_scores:
                    groups = logits.shape[2]
                    probs = {p: 0.0 for p in kept}
                    for g in range(groups):
                        row = [float(logits[b, h, g, t, p]) for p in kept]
                        top = max(row)
                        den = sum(math.exp(x - top) for x in row)
                        for p, x in zip(kept, row):
                            probs[p] += math.exp(x - top) / den
                    if policy.name == "tova":
                        score = {p: probs.get(p, 0.0) for p in kept}
                    else:
                        for p in kept:
                            score[p] += probs[p]
            per_head.append(rows)
        out.append(per_head)
    return out
