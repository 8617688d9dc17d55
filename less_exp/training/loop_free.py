"""Loop-free teacher targets on answers (``training.no_repeat_ngram``): the teacher's distribution with
the tokens that would repeat an n-gram of the same answer taken out and the rest renormalised.

Inside a loop the full-cache teacher predicts more of the loop, so distilling from it teaches a state
to loop as the teacher does (and the small models we compress loop more with the full cache than with
the plain policy). The unlikelihood term (:mod:`less_exp.training.unlikelihood`) pushes the repeat
down but says nothing about where its mass should go, and at weights that move greedy choices it
drags the state away from the teacher everywhere. Here the target itself is changed, only where it
matters: at an answer position whose last ``n - 1`` tokens already occurred earlier in the same
answer, every token that followed them there is banned (as ``generate``'s ``no_repeat_ngram_size``
bans it), and the teacher's remaining top-k and leftover mass are renormalised. The KL to that
target keeps the teacher's ranking of everything else, so the state learns where to go instead of
the loop. A banned token outside the teacher's top-k stays in the leftover mass (it is rarely there:
a loop's next token is the teacher's favourite).
"""

from __future__ import annotations

import torch

from less_exp.training.teacher import TopK
from less_exp.training.unlikelihood import spans


def banned_tokens(ids: torch.Tensor, answer: torch.Tensor, n: int) -> torch.Tensor:
    """``[N, S - 1, m]`` long, padded with -1: for each predicting position (position p predicts token
    p + 1) of ``ids [N, S]``, the tokens that would complete an n-gram already seen earlier in the same
    answer (``answer [N, S]`` marks answer tokens; a prediction counts when token p + 1 is one)."""
    rows: list[dict[int, list[int]]] = []
    for row in range(ids.shape[0]):
        tokens, found = ids[row].tolist(), {}
        for start, end in spans(answer[row]):
            follows: dict[tuple, list[int]] = {}
            for last in range(start + n - 1, end):
                context = tuple(tokens[last - n + 1: last])
                if context in follows:
                    found[last - 1] = list(follows[context])
                seen = follows.setdefault(context, [])
                if tokens[last] not in seen:
                    seen.append(tokens[last])
        rows.append(found)
    width = max((len(v) for found in rows for v in found.values()), default=0)
    out = torch.full((ids.shape[0], ids.shape[1] - 1, max(width, 1)), -1, dtype=torch.long)
    for row, found in enumerate(rows):
        for position, banned in found.items():
            out[row, position, :len(banned)] = torch.tensor(banned)
    return out


def without(target: TopK, banned: torch.Tensor) -> TopK:
    """``target`` with the ``banned [..., m]`` tokens (-1: none) at zero probability and the rest
    renormalised; a position whose every kept token and leftover mass would vanish keeps its target."""
    hit = (target.index.unsqueeze(-1) == banned.unsqueeze(-2)).any(-1)
    logp = target.logp.masked_fill(hit, float("-inf"))
    norm = torch.cat([logp, target.log_rest.unsqueeze(-1)], -1).logsumexp(-1)
    keep = torch.isfinite(norm)
    norm = torch.where(keep, norm, torch.zeros_like(norm))
    return TopK(target.index,
                torch.where(keep.unsqueeze(-1), logp - norm.unsqueeze(-1), target.logp),
                torch.where(keep, target.log_rest - norm, target.log_rest))
