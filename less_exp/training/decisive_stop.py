"""Decisive stops on answers (``training.end_target``): where the teacher's most likely next token in an
answer is an end token, a target that puts at least ``end_target`` of the probability on it.

Greedy generation stops only where the end token is the student's most likely token. The full-cache
teacher of the small models we compress stops hesitantly (SmolLM2 after one-sentence XSum summaries:
mean p(end) 0.53, against 0.62 for the plain sink policy), so a state distilled from it inherits a
stop that a small shift of the distribution turns into "go on", and an answer that goes on past its
sentence under an evicting policy tends to loop. The target keeps the teacher's decision and ranking
and raises only its confidence at its own stops: the end token gets ``max(p_end, end_target)``, every
other kept token and the leftover mass share the rest in the teacher's proportions.
``training.end_weight`` weighs these positions in the loss. With a student share of the answers, the
student's answers that run on past a point where the teacher would stop are where this teaches most.
"""

from __future__ import annotations

from pathlib import Path

import torch

from less_exp.training.teacher import TopK, load


def favourite(target: TopK) -> tuple[torch.Tensor, torch.Tensor]:
    """``([...] token id, [...] slot in the top-k)`` of the target's most likely token at each position."""
    slot = target.logp.argmax(-1)
    return target.index.gather(-1, slot.unsqueeze(-1)).squeeze(-1), slot


def top_is_end(target: TopK, end_ids: torch.Tensor) -> torch.Tensor:
    """``[...]`` bool: whether the target's most likely token is one of ``end_ids``."""
    token, _ = favourite(target)
    return torch.isin(token, end_ids.to(token.device))


def stop_mask(files: list[Path], answer: torch.Tensor, end_ids: torch.Tensor) -> torch.Tensor:
    """``[N, S - 1]`` bool: the predicting positions (of the windows whose teacher top-k are in ``files``)
    that predict an answer token (``answer [N, S - 1]``) and where the teacher's favourite is an end token."""
    rows = [top_is_end(load([f], torch.device("cpu")), end_ids)[0] for f in files]
    return torch.stack(rows) & answer.cpu()


def sharpened(target: TopK, where: torch.Tensor, end_ids: torch.Tensor, mass: float) -> TopK:
    """``target`` with, at the positions ``where`` (``[...]`` bool) whose favourite is an end token, that
    token's probability raised to ``mass`` (kept where it is already higher) and the rest scaled to share
    ``1 - mass``; other positions are returned as they are."""
    token, slot = favourite(target)
    best = slot.unsqueeze(-1)
    p = target.logp.gather(-1, best).squeeze(-1).exp()
    hit = where & torch.isin(token, end_ids.to(token.device)) & (p < mass)
    scale = torch.log1p(-torch.full_like(p, mass)) - torch.log1p(-p)  # log of (1 - mass) / (1 - p)
    scale = torch.where(hit, scale, torch.zeros_like(scale))
    logp = target.logp + scale.unsqueeze(-1)
    top = torch.zeros_like(target.logp, dtype=torch.bool).scatter_(-1, best, True) & hit.unsqueeze(-1)
    logp = torch.where(top, torch.full_like(logp, mass).log(), logp)
    return TopK(target.index, logp, target.log_rest + scale)
