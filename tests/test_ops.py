"""Parallel and recurrent LESS attention against the naive reference."""

import pytest
import torch

from less_exp.ops import attention_logits, fold, parallel_less_attention, recurrent_less_step
from less_exp.ops.naive import naive_less_attention
from less_exp.policies import H2O, Sink
from less_exp.state import JointNormalizer, LessMLP, LessState


def _state(d=8, H=4, Hkv=2, scale=1.0):
    torch.manual_seed(0)
    fm = LessMLP(d, H, Hkv, hidden=16, features=4, key_scale_init=scale, dropout=0.0)
    return LessState(fm, JointNormalizer(), d).eval()


def _qkv(B=2, H=4, Hkv=2, S=12, d=8):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(B, h, S, d, generator=gen) for h in (H, Hkv, Hkv)]


@pytest.mark.parametrize("policy", [Sink(sink=1, recent=3), H2O(heavy=2, recent=2)], ids=lambda p: p.name)
@pytest.mark.parametrize("with_state", [False, True])
def test_parallel_matches_naive(policy, with_state):
    q, k, v = _qkv()
    scaling = 8**-0.5
    valid = torch.ones(2, 12, dtype=torch.bool)
    keep, _, _ = policy.keep_mask(policy.budget(), valid, 2, attention_logits(q, k, scaling))
    state = _state() if with_state else None
    out = parallel_less_attention(q, k, v, keep, valid, scaling, state)
    ref = naive_less_attention(q, k, v, keep, scaling, state)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    if with_state:
        plain = parallel_less_attention(q, k, v, keep, valid, scaling, None)
        assert (out - plain).abs().max() > 1e-2, "a state with weight must change the output"


def test_recurrent_steps_match_parallel():
    """Fold each evicted token into (H, z) as it leaves; every step must equal the parallel row."""
    q, k, v = _qkv()
    scaling = 8**-0.5
    policy, state = Sink(sink=1, recent=3), _state()
    valid = torch.ones(2, 12, dtype=torch.bool)
    keep, _, _ = policy.keep_mask(policy.budget(), valid, 2, None)
    par = parallel_less_attention(q, k, v, keep, valid, scaling, state)
    H = torch.zeros(2, 2, 4, 8)
    z = torch.zeros(2, 2, 4)
    folded = torch.zeros(2, 2, 12, dtype=torch.bool)
    for t in range(12):
        leaving = ~keep[:, :, t, : t + 1] & ~folded[..., : t + 1]
        H, z = fold(state, k[:, :, : t + 1], v[:, :, : t + 1], leaving, H, z)
        folded[..., : t + 1] |= leaving
        out, _ = recurrent_less_step(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], keep[:, :, t, : t + 1], scaling, state, H, z)
        torch.testing.assert_close(out[:, :, 0], par[:, :, t], atol=1e-5, rtol=1e-5)


def test_untrained_state_is_the_plain_policy():
    q, k, v = _qkv()
    policy = H2O(heavy=2, recent=2)
    valid = torch.ones(2, 12, dtype=torch.bool)
    keep, _, _ = policy.keep_mask(policy.budget(), valid, 2, attention_logits(q, k, 0.35))
    plain = parallel_less_attention(q, k, v, keep, valid, 0.35)
    fresh = parallel_less_attention(q, k, v, keep, valid, 0.35, _state(scale=1e-4))
    torch.testing.assert_close(fresh, plain, atol=1e-3, rtol=1e-3)


def test_state_gradients_flow_only_to_state():
    q, k, v = _qkv()
    state = _state().train()
    policy = Sink(sink=1, recent=3)
    keep, _, _ = policy.keep_mask(policy.budget(), torch.ones(2, 12, dtype=torch.bool), 2)
    out = parallel_less_attention(q, k, v, keep, None, 0.35, state)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in state.parameters())
