"""Loop-free teacher targets (training.no_repeat_ngram): the banned tokens against a slow reference, the
renormalised target, the KL against it in every dtype, and an e2e job on answer windows where it makes
the student give the loops' tokens less mass than distillation from the teacher alone (bad settings:
test_unlikelihood.py)."""

from __future__ import annotations

import pytest
import torch

from less_exp import train as train_job
from less_exp.training import loop_free, output, teacher
from test_unlikelihood import E2E, answer_start
from tiny_training import against_distillation

pytestmark = pytest.mark.usefixtures("one_thread")


def _slow_banned(ids: torch.Tensor, answer: torch.Tensor, n: int) -> list[list[set[int]]]:
    """Per predicting position p (predicts token t = p + 1): when the n - 1 tokens before t and t itself lie
    in one answer, every token that followed the same n - 1 tokens earlier inside that answer."""
    rows, length = ids.shape
    out = [[set() for _ in range(length - 1)] for _ in range(rows)]
    for r in range(rows):
        for p in range(length - 1):
            t = p + 1
            first = t - n + 1
            begin = answer_start(answer, r, first, t)
            if begin is None:
                continue
            context = ids[r, first: t].tolist()
            out[r][p] = {int(ids[r, j]) for j in range(begin + n - 1, t) if ids[r, j - n + 1: j].tolist() == context}
    return out


def _as_sets(banned: torch.Tensor) -> list[list[set[int]]]:
    return [[{int(x) for x in pos if x >= 0} for pos in row] for row in banned]


def test_banned_tokens_are_the_ones_that_would_repeat_an_answers_ngram():
    # prompt 9 9 | answer 1 2 3 1 2 5 1 | prompt 9 | answer 1 2
    ids = torch.tensor([[9, 9, 1, 2, 3, 1, 2, 5, 1, 9, 1, 2]])
    answer = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1]], dtype=torch.bool)
    got = _as_sets(loop_free.banned_tokens(ids, answer, 2))[0]
    # token 6 follows "1" (token 5), which the answer already went on with 2; token 7 follows "2", which went
    # on with 3; "5" and "3" were new contexts, and the second answer starts afresh
    assert {p: s for p, s in enumerate(got) if s} == {5: {2}, 6: {3}}
    assert _as_sets(loop_free.banned_tokens(ids, answer, 3))[0][6] == {3}  # (1 2) was followed by 3


@pytest.mark.parametrize("n", [2, 3, 5])
def test_banned_tokens_match_the_slow_reference(n):
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(0, 3, (3, 70), generator=g)
    answer = torch.rand(3, 70, generator=g) < 0.85
    assert _as_sets(loop_free.banned_tokens(ids, answer, n)) == _slow_banned(ids, answer, n)


def _target(g: torch.Generator, vocab: int = 40, k: int = 6) -> tuple[teacher.TopK, torch.Tensor]:
    logits = torch.randn(2, 5, vocab, generator=g) * 3
    return teacher.top_k_targets(logits, k), logits


def test_a_loop_free_target_takes_the_banned_mass_out_and_keeps_the_rest_in_proportion():
    g = torch.Generator().manual_seed(0)
    target, _ = _target(g)
    banned = torch.full((2, 5, 2), -1)
    banned[0, 1, 0] = target.index[0, 1, 0]              # the favourite
    banned[1, 3] = torch.tensor([int(target.index[1, 3, 2]), 39 if 39 not in target.index[1, 3] else 38])  # one kept, one in the rest
    free = loop_free.without(target, banned)
    p, q = target.logp.exp(), free.logp.exp()
    total = q.sum(-1) + free.log_rest.exp()
    torch.testing.assert_close(total, torch.ones_like(total))
    assert q[0, 1, 0] == 0 and q[1, 3, 2] == 0
    keep = torch.ones_like(p, dtype=torch.bool)
    keep[0, 1, 0] = keep[1, 3, 2] = False
    ratio = q[keep] / p[keep]
    torch.testing.assert_close(ratio[:5], ratio[:5].new_full((5,), 1.0))  # untouched positions: the same target
    torch.testing.assert_close(q[0, 1, 1:] / p[0, 1, 1:], (q[0, 1, 1] / p[0, 1, 1]).expand(5))  # the rest scaled alike
    torch.testing.assert_close(free.log_rest[0, 1] - target.log_rest[0, 1], free.logp[0, 1, 1] - target.logp[0, 1, 1])
    same = loop_free.without(target, torch.full((2, 5, 1), -1))
    torch.testing.assert_close(same.logp, target.logp)


def kl_reference(student: torch.Tensor, target: teacher.TopK) -> torch.Tensor:
    """The coarsened KL in float64 over the k + 1 outcomes, an outcome with p = 0 contributing nothing."""
    logq = student.detach().double().log_softmax(-1)
    p = target.logp.double().exp()
    q_kept = logq.gather(-1, target.index).exp()
    want = torch.where(p > 0, p * (target.logp.double() - q_kept.log()), torch.zeros_like(p)).sum(-1)
    p_rest, q_rest = target.log_rest.double().exp(), 1 - q_kept.sum(-1)
    return want + torch.where(p_rest > 0, p_rest * (target.log_rest.double() - q_rest.log()), torch.zeros_like(p_rest))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_kl_to_a_loop_free_target_is_the_coarsened_kl_in_every_dtype(dtype):
    g = torch.Generator().manual_seed(1)
    target, _ = _target(g)
    banned = torch.full((2, 5, 1), -1)
    banned[:, 2, 0] = target.index[:, 2, 0]
    banned[1, 4, 0] = target.index[1, 4, 3]
    free = loop_free.without(target, banned)
    student = (torch.randn(2, 5, 40, generator=g) * 2).to(dtype).requires_grad_()
    got = teacher.top_k_kl(student, free)
    got.sum().backward()
    assert got.dtype == torch.float32 and torch.isfinite(got).all() and torch.isfinite(student.grad).all()
    torch.testing.assert_close(got.double(), kl_reference(student, free), rtol=2e-3, atol=2e-4)


def test_a_step_towards_a_loop_free_target_lowers_the_banned_token_only_there():
    target = teacher.top_k_targets(torch.tensor([[[4.0, 1.0, 0.0, 0.0], [4.0, 1.0, 0.0, 0.0]]]), 2)
    banned = torch.tensor([[[-1], [0]]])
    student = torch.tensor([[[4.0, 1.0, 0.0, 0.0], [4.0, 1.0, 0.0, 0.0]]], requires_grad=True)
    teacher.top_k_kl(student, loop_free.without(target, banned)).sum().backward()
    assert student.grad[0, 0].abs().max() < 1e-6  # already the teacher's distribution
    assert student.grad[0, 1, 0] > 0 and student.grad[0, 1, 1] < 0  # the loop's token down, the next choice up


def _banned_mass(model, sets: output.Data, n: int = 2) -> float:
    """Mean probability the model gives, at the answer positions where some token would repeat an
    n-gram of the answer, to those tokens."""
    answer = torch.cat([torch.zeros(len(sets.windows), 1, dtype=torch.bool), sets.answer], 1)
    banned = loop_free.banned_tokens(sets.windows, answer, n)
    where = (banned >= 0).any(-1)
    with torch.no_grad():
        p = model(input_ids=sets.windows, use_cache=False).logits[:, :-1].float().softmax(-1)
    mass = p.gather(-1, banned.clamp(min=0)).masked_fill(banned < 0, 0.0).sum(-1)
    return mass[where].mean().item()


def test_e2e_on_loop_free_targets_gives_loops_less_mass_than_distillation_alone(compose_config, tmp_path, monkeypatch):
    seen, metrics = against_distillation(compose_config, tmp_path, monkeypatch, _banned_mass,
                                         [*E2E, "data.answers.student_share=0.5", "training.epochs=4"], "training.no_repeat_ngram=2")
    assert seen["sets"][0].banned is None
    sets = seen["sets"][1]
    assert sets.banned is not None and int((sets.banned >= 0).any(-1).sum()) >= 10
    assert metrics["complete"] and metrics["val_kl"] < metrics["initial_val_kl"]
    (start, _), (distilled, free) = seen["before"], seen["after"]
    assert free < 0.97 * min(start, distilled), (start, distilled, free)  # distillation alone: -1.7%, here -5.4%

