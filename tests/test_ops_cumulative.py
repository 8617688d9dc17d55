"""The cumulative (eviction-event) form of the state part against the parallel form."""

import pytest
import torch

from less_exp.ops import attention_logits, parallel_less_attention, sparse_attention
from less_exp.ops.cumulative import cumulative_less_attention, eviction_events
from less_exp.policies import H2O, Sink
from less_exp.state import JointNormalizer, LessMLP, LessState


@pytest.mark.parametrize("policy", [Sink(sink=1, recent=3), H2O(heavy=2, recent=3)], ids=lambda p: p.name)
@pytest.mark.parametrize("padded", [False, True])
def test_cumulative_matches_parallel_with_gradients(policy, padded):
    torch.manual_seed(0)
    B, H, Hkv, S, d = 2, 4, 2, 16, 8
    q, k, v = torch.randn(B, H, S, d), torch.randn(B, Hkv, S, d), torch.randn(B, Hkv, S, d)
    valid = torch.ones(B, S, dtype=torch.bool)
    if padded:
        valid[1, :5] = False
    state = LessState(LessMLP(d, H, Hkv, hidden=16, features=4, key_scale_init=1.0, dropout=0.0), JointNormalizer(), d)
    logits = attention_logits(q, k, d**-0.5)
    keep, _, _ = policy.keep_mask(policy.budget(), valid, Hkv, logits)
    o_sparse, lse, _ = sparse_attention(logits, keep, v)

    outputs, grads = [], []
    for form in ("parallel", "cumulative"):
        if form == "parallel":
            out = parallel_less_attention(q, k, v, keep, valid, d**-0.5, state)
        else:
            out = cumulative_less_attention(q, k, v, eviction_events(keep, valid), state, (o_sparse, lse))
        out = out * valid[:, None, :, None]
        out.square().sum().backward()
        outputs.append(out.detach())
        grads.append([p.grad.clone() for p in state.parameters()])
        state.zero_grad()
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_events_are_one_eviction_per_step_past_the_budget():
    policy = Sink(sink=2, recent=3)
    S = 10
    keep, _, _ = policy.keep_mask(policy.budget(), torch.ones(1, S, dtype=torch.bool), 1)
    index, sign = eviction_events(keep)
    assert (sign == 1).all()
    assert index[:, 2].tolist() == list(range(5, S)) and index[:, 3].tolist() == list(range(2, S - 3))
