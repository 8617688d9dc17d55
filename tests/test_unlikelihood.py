"""Unlikelihood on answers' repeated n-grams (training.unlikelihood): the mask against a slow reference,
the term's value in every dtype, that its gradient lowers a repeat's probability, an e2e job on answer
windows that trains with it, and the bad settings of every answer loss (unlikelihood, loop-free targets,
decisive stops) refused before the model loads."""

from __future__ import annotations

import pytest
import torch

from less_exp import train as train_job
from less_exp.errors import ConfigError
from less_exp.training import output, unlikelihood
from tiny_training import TINY, against_distillation

pytestmark = pytest.mark.usefixtures("one_thread")


def answer_start(answer: torch.Tensor, row: int, first: int, last: int) -> int | None:
    """Where the answer holding tokens ``first..last`` of ``row`` begins; None unless they all lie in one."""
    if first < 0 or not bool(answer[row, first: last + 1].all()):
        return None
    while first > 0 and bool(answer[row, first - 1]):
        first -= 1
    return first


def _slow_repeat_mask(ids: torch.Tensor, answer: torch.Tensor, n: int) -> torch.Tensor:
    """Position by position: does the token it predicts end an n-gram lying inside one answer that also
    starts at an earlier position of that same answer?"""
    rows, length = ids.shape
    out = torch.zeros(rows, length - 1, dtype=torch.bool)
    for r in range(rows):
        for p in range(length - 1):
            end = p + 1
            first = end - n + 1
            begin = answer_start(answer, r, first, end)
            if begin is None:
                continue
            gram = ids[r, first: end + 1].tolist()
            out[r, p] = any(ids[r, s: s + n].tolist() == gram for s in range(begin, first))
    return out


def test_repeat_mask_marks_the_positions_that_continue_a_loop():
    # prompt 9 9 | answer 1 2 3 1 2 3 1 | prompt 9 | answer 1 2 3
    ids = torch.tensor([[9, 9, 1, 2, 3, 1, 2, 3, 1, 9, 1, 2, 3]])
    answer = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    mask = unlikelihood.repeat_mask(ids, answer, 2)
    # the 2-grams (1 2), (2 3), (3 1) recur at tokens 6, 7, 8: predicted from positions 5, 6, 7;
    # the second answer's (1 2) is new to it (n-grams do not cross answers)
    assert mask[0].nonzero().flatten().tolist() == [5, 6, 7]
    assert unlikelihood.repeat_mask(ids, answer, 4)[0].nonzero().flatten().tolist() == [7]  # (1 2 3 1) again


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_repeat_mask_matches_the_slow_reference(n):
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(0, 4, (3, 60), generator=g)
    answer = torch.rand(3, 60, generator=g) < 0.8
    torch.testing.assert_close(unlikelihood.repeat_mask(ids, answer, n), _slow_repeat_mask(ids, answer, n), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unlikelihood_is_minus_log_one_minus_p_in_every_dtype(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 5, 50, generator=g) * 4).to(dtype)
    logits[0, 1, 7] = 60.0  # p(target) rounds to 1: the term stays finite
    targets = torch.randint(0, 50, (2, 5), generator=g)
    targets[0, 1] = 7
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1] = mask[1, 3] = mask[1, 4] = True
    got = unlikelihood.unlikelihood(logits, targets, mask)
    p = logits.double().softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    want = -torch.log1p(-p[mask].clamp(max=1 - 1e-6)).mean()
    assert got.dtype == torch.float32 and torch.isfinite(got)
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-4)
    none = unlikelihood.unlikelihood(logits.float().requires_grad_(), targets, torch.zeros_like(mask))
    assert none.item() == 0.0 and none.requires_grad


def test_a_step_on_the_unlikelihood_lowers_the_repeats_probability():
    logits = torch.zeros(1, 4, 10, requires_grad=True)
    targets = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[False, True, False, True]])
    unlikelihood.unlikelihood(logits, targets, mask).backward()
    with torch.no_grad():
        after = (logits - 5.0 * logits.grad).softmax(-1)
    assert after[0, 1, 2] < 0.1 and after[0, 3, 4] < 0.1
    assert after[0, 0, 1] == pytest.approx(0.1) and after[0, 2, 3] == pytest.approx(0.1)  # unflagged positions untouched


ANSWERS = ["data=c4_answers", "data.answers.templates=['Q {text} A:']", "data.answers.min_doc_tokens=8",
           "data.answers.max_doc_tokens=16", "data.answers.max_new_tokens=24", "data.answers.stop=null",
           "data.answers.drop_unfinished=false", "data.answers.max_repetition=null"]
E2E = [*TINY, "training=e2e", "training.num_sequences=6", "training.epochs=2", "training.lr=3e-2", *ANSWERS]


def _repeat_probability(model, sets: output.Data, n: int = 2) -> float:
    """Mean probability the model gives the repeated answer n-grams' tokens of every window."""
    answer = torch.cat([torch.zeros(len(sets.windows), 1, dtype=torch.bool), sets.answer], 1)
    repeats = unlikelihood.repeat_mask(sets.windows, answer, n)
    with torch.no_grad():
        logits = model(input_ids=sets.windows, use_cache=False).logits[:, :-1].float()
    p = logits.softmax(-1).gather(-1, sets.windows[:, 1:].unsqueeze(-1)).squeeze(-1)
    return p[repeats].mean().item()


def test_e2e_with_unlikelihood_makes_the_students_repeats_less_likely_than_distillation_alone(compose_config, tmp_path, monkeypatch):
    # the tiny random model's greedy answers loop: plenty of flagged repeats
    seen, metrics = against_distillation(compose_config, tmp_path, monkeypatch, _repeat_probability,
                                         [*E2E, "data.answers.student_share=0.5", "training.unlikelihood_ngram=2"], "training.unlikelihood=1.0")
    assert seen["sets"][0].repeats is None
    sets = seen["sets"][1]
    assert sets.repeats is not None and int(sets.repeats.sum()) >= 10
    assert metrics["complete"]
    # the best epoch is picked on what trains (KL + 1.0 x unlikelihood on the held-out windows), reported beside plain's
    assert metrics["val_kl"] + metrics["val_unlikelihood"] < metrics["initial_val_kl"] + metrics["initial_val_unlikelihood"]
    assert metrics["plain_val_unlikelihood"] > 0
    (start, _), (distilled, penalised) = seen["before"], seen["after"]
    # the tiny random model gives a repeat about 1/vocab: distillation alone leaves that where it was
    assert penalised < 0.98 * min(start, distilled)


@pytest.mark.parametrize("overrides, message", [
    ([*E2E, "training.unlikelihood=-1"], r"training\.unlikelihood=-1 must be a number >= 0"),
    ([*E2E, "training.unlikelihood_ngram=0"], r"training\.unlikelihood_ngram=0 must be a positive integer"),
    ([*TINY, "training=progressive", "training.unlikelihood=1"],
     r"training\.unlikelihood=1 works on the answers of answer windows; use data=c4_answers"),
    ([*E2E, "training.no_repeat_ngram=1"], r"training\.no_repeat_ngram=1 must be an integer >= 2"),
    ([*E2E, "training.no_repeat_ngram=true"], r"training\.no_repeat_ngram=True must be an integer >= 2"),
    ([*TINY, "training=progressive", "training.no_repeat_ngram=4"],
     r"training\.no_repeat_ngram=4 works on the answers of answer windows; use data=c4_answers"),
    ([*E2E, "training.end_target=0"], r"training\.end_target=0 must be a number in \(0, 1\]"),
    ([*E2E, "training.end_target=1.5"], r"training\.end_target=1\.5 must be a number in \(0, 1\]"),
    ([*E2E, "training.end_weight=0"], r"training\.end_weight=0 must be a number > 0"),
    ([*TINY, "training=progressive", "training.end_target=0.9"],
     r"training\.end_target=0\.9 works on the answers of answer windows; use data=c4_answers"),
    ([*TINY, "training=e2e", "training.end_weight=4"],
     r"training\.end_weight=4 works on the answers of answer windows; use data=c4_answers"),
])
def test_bad_answer_loss_settings_are_refused_before_the_model_loads(compose_config, overrides, message, monkeypatch):
    monkeypatch.setattr(train_job, "load_model", lambda *a, **k: pytest.fail("the model loaded"), raising=False)
    with pytest.raises(ConfigError, match=message):
        train_job.train(compose_config("train", overrides))
