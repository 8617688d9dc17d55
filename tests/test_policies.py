"""Policies: the vectorised parallel face and the decode face against a slow reference."""

import pytest
import torch

from less_exp.policies import H2O, TOVA, Full, Sink, Window
from less_exp.policies.reference import reference_keep_sets

POLICIES = [
    Full(),
    Window(recent=5),
    Sink(sink=2, recent=4),
    H2O(heavy=3, recent=3),
    H2O(sink=1, heavy=2, recent=2),
    TOVA(heavy=5, recent=1),
]


def _inputs(B=2, Hkv=2, G=2, S=17, pad=(0, 4), seed=0, ties=False):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, Hkv, G, S, S, generator=gen, dtype=torch.float64) * 2
    if ties:  # few distinct logits, one query per KV head: many tokens get exactly the same attention
        logits = torch.randint(-1, 2, (B, Hkv, 1, S, S), generator=gen).double()
    valid = torch.ones(B, S, dtype=torch.bool)
    for b, p in enumerate(pad):
        valid[b, :p] = False
    return logits, valid


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: repr(p))
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_keep_mask_matches_reference(policy, ties):
    logits, valid = _inputs(ties=ties)
    budget = policy.budget(length=valid.shape[1])
    sched = policy.keep_mask(budget, valid, 2, logits.float())
    keep, present = sched.keep, sched.present
    ref = reference_keep_sets(policy, budget, valid, 2, logits)
    B, H, S, _ = keep.shape
    for b in range(B):
        for h in range(H):
            for t in range(S):
                if valid[b, t]:
                    assert set(keep[b, h, t].nonzero().flatten().tolist()) == ref[b][h][t], (b, h, t)
                    if budget.capacity is not None:
                        assert int(keep[b, h, t].sum()) <= budget.capacity
            assert set(present[b, h].nonzero().flatten().tolist()) == ref[b][h][S - 1]


@pytest.mark.parametrize("policy", POLICIES[1:], ids=lambda p: repr(p))
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_decode_face_matches_parallel_face(policy, ties):
    """Run ``victim`` slot by slot with a small cache, as a real cache does: new tokens land in the
    first free slot, so slots are not in logical order and ties need the explicit tie-break."""
    logits, valid = _inputs(pad=(0, 0), ties=ties)
    budget = policy.budget(length=valid.shape[1])
    keep = policy.keep_mask(budget, valid, 2, logits.float()).keep
    B, Hkv, G, S, _ = logits.shape
    cap = budget.capacity
    slot_pos = torch.full((B, Hkv, cap + 1), -1, dtype=torch.long)
    present = torch.zeros(B, Hkv, cap + 1, dtype=torch.bool)
    scores = torch.zeros(B, Hkv, cap + 1, dtype=torch.float32)
    for t in range(S):
        free = (~present).float().argmax(-1)
        slot_pos.scatter_(-1, free[..., None], t)
        present.scatter_(-1, free[..., None], True)
        scores.scatter_(-1, free[..., None], 0.0)
        evict, victim = policy.victim(present, slot_pos, scores, torch.tensor(t), budget)
        present.scatter_(-1, victim[..., None], present.gather(-1, victim[..., None]) & ~evict[..., None])
        for b in range(B):
            for h in range(Hkv):
                got = set(slot_pos[b, h][present[b, h]].tolist())
                assert got == set(keep[b, h, t].nonzero().flatten().tolist()), (t, b, h)
        if policy.uses_scores:
            row = logits[..., t, :].float().gather(-1, slot_pos.clamp_min(0)[:, :, None].expand(B, Hkv, G, cap + 1))
            probs = torch.softmax(row.masked_fill(~present[:, :, None], float("-inf")), -1).sum(2)
            scores = policy.accumulate(scores, probs)


def test_budget_ratios_and_baseline_plus():
    assert H2O(heavy=0.05, recent=0.05, ratio_of="max_positions").budget(max_positions=2048) == H2O(
        heavy=102, recent=102
    ).budget()
    assert Sink(sink=0.01, recent=0.1, ratio_of="length").budget(length=1000).capacity == 110
    assert H2O(heavy=50, recent=50, baseline_plus=True).budget(state_tokens=4.06).capacity == 104
    assert Sink(sink=4, recent=100, baseline_plus=True).budget(state_tokens=4.06).recent == 104


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: H2O(heavy=0.5), "fractional"),
        (lambda: H2O(heavy=3, ratio_of="max_positions"), "ratio"),
        (lambda: H2O(ratio_of="tokens"), "ratio_of"),
        (lambda: Window(recent=0).budget(), "recent"),
        (lambda: Sink(heavy=3).budget(), "heavy"),
        (lambda: H2O(heavy=50, recent=50).check_fits(H2O(heavy=50, recent=50).budget(), 64), "not smaller"),
    ],
)
def test_bad_budgets_fail_clearly(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("policy", [Sink(sink=0, recent=1), Sink(sink=2, recent=3), Sink(sink=4, recent=9), Window(recent=1),
                                    Window(recent=6), Sink(sink=1, heavy=0, recent=30)], ids=repr)
@pytest.mark.parametrize("pad", [(0, 0, 0), (0, 5, 17)], ids=["unpadded", "padded"])
def test_oldest_first_closed_form_equals_the_step_loop(policy, pad):
    """Every field of the schedule, the evicted stream and what seeds a cache included."""
    S = 24
    valid = torch.ones(len(pad), S, dtype=torch.bool)
    for b, p in enumerate(pad):
        valid[b, :p] = False
    budget = policy.budget(length=S)
    assert policy.oldest_first
    closed = policy.keep_mask(budget, valid, 3)
    looped = policy.schedule(budget, valid, 3)
    for field in ("keep", "evicted", "present", "logical", "scores", "count"):
        assert torch.equal(getattr(closed, field), getattr(looped, field)), field
    assert not H2O(heavy=2, recent=2).oldest_first and not TOVA(heavy=2, recent=2).oldest_first


@pytest.mark.parametrize("policy", [H2O(heavy=3, recent=3), H2O(sink=1, heavy=2, recent=2), TOVA(heavy=5, recent=1),
                                    H2O(heavy=1, recent=1)], ids=repr)
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("narrow", [False, True], ids=["all-keys", "causal-keys"])
def test_ranking_parallel_face_over_slots_equals_the_step_loop_and_the_reference(policy, ties, seed, narrow, monkeypatch):
    """The slot-wise parallel face, its logits read as rows of 5 steps (never the whole tensor; with
    ``narrow`` only over the keys those steps may see), against the step loop over every position
    (the chunk face from an empty cache) and the slow reference: keep sets, evicted stream, what is
    present at the end and its scores."""
    import less_exp.policies.base as base

    logits, valid = _inputs(pad=(0, 4, 9), B=3, seed=seed, ties=ties)
    budget = policy.budget(length=valid.shape[1])
    looped = policy.schedule(budget, valid, 2, logits.float())
    monkeypatch.setattr(base, "SCORE_BLOCK", 5)
    asked = []

    def rows(start, stop):
        asked.append((start, stop))
        return logits.float()[..., start:stop, :stop] if narrow else logits.float()[..., start:stop, :]

    slots = policy.keep_mask(budget, valid, 2, rows)
    assert asked == [(0, 5), (5, 10), (10, 15), (15, 17)]
    for field in ("keep", "evicted", "present", "logical", "count"):
        assert torch.equal(getattr(slots, field), getattr(looped, field)), field
    torch.testing.assert_close(slots.scores, looped.scores * looped.present, rtol=1e-6, atol=1e-7)
    ref = reference_keep_sets(policy, budget, valid, 2, logits)
    for b in range(valid.shape[0]):
        for h in range(2):
            for t in range(valid.shape[1]):
                if valid[b, t]:
                    assert set(slots.keep[b, h, t].nonzero().flatten().tolist()) == ref[b][h][t]
