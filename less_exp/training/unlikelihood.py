"""Unlikelihood on repeated n-grams of answers (Welleck et al. 2019, sequence level): a term that makes
the student *less* likely to continue a loop.

Distillation from the full-cache teacher cannot teach a state to stay out of loops: the small models
we compress loop now and then with the full cache too, and inside a loop the teacher predicts more of
it. On answer windows whose answers the student wrote itself (``data.answers.student_share``), the
positions that continue an n-gram already seen earlier in the same answer are where generation goes
wrong; there ``-log(1 - p(token))`` pushes the student's probability of the repeat down, while the KL
keeps every other position close to the teacher. ``training.unlikelihood`` weighs the term.
"""

from __future__ import annotations

import torch


def spans(answer: torch.Tensor) -> list[tuple[int, int]]:
    """The ``[start, end)`` runs of True in a 1-D mask: one answer each (a prompt always separates two)."""
    flags = answer.tolist()
    runs, start = [], None
    for i, flag in enumerate(flags + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    return runs


def repeat_mask(ids: torch.Tensor, answer: torch.Tensor, n: int) -> torch.Tensor:
    """``[N, S - 1]`` bool over the predicting positions: True where the predicted token (position p
    predicts token p + 1) completes a token n-gram of an answer that already occurred earlier in the
    same answer. ``ids`` and ``answer`` are ``[N, S]``."""
    mask = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool)
    for row in range(ids.shape[0]):
        tokens = ids[row].tolist()
        for start, end in spans(answer[row]):
            seen = set()
            for last in range(start + n - 1, end):
                gram = tuple(tokens[last - n + 1: last + 1])
                if gram in seen:
                    mask[row, last - 1] = True
                seen.add(gram)
    return mask


def unlikelihood(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``-log(1 - p(target))`` over the positions in ``mask`` (``logits [B, S', V]``, ``targets``
    and ``mask [B, S']``), in float32; 0 (with a graph) when no position is flagged."""
    if not bool(mask.any()):
        return logits.sum() * 0.0
    picked = logits[mask].float()
    log_p = picked.gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1) - picked.logsumexp(-1)
    return -torch.log1p(-log_p.exp().clamp(max=1 - 1e-6)).mean()
