"""One-shot prefill (``policy.prefill=one_shot``): the prompt attends fully, the cache is cut once to the
budget by the policy's ranking over the prompt, the state folds in what was cut. Held against sdpa, a
dense float64 softmax, a slow per-row selection and the float64 state recurrence."""

from __future__ import annotations

import math

import pytest
import torch

from less_exp.adapter import LessCache, build, cache_kwargs
from less_exp.adapter.attention import switch
from less_exp.errors import ConfigError
from less_exp.ops import causal_attention, fold_stream
from less_exp.ops.naive import naive_linear_attention
from less_exp.policies import H2O, TOVA, Budget, Sink, Window
from less_exp.schema import check
from test_engine import ids, tiny
from test_gating import make_states

POLICIES = {
    "window": lambda **kw: Window(recent=6, **kw),
    "sink": lambda **kw: Sink(sink=2, recent=5, **kw),
    "h2o": lambda **kw: H2O(sink=1, heavy=4, recent=3, **kw),
    "tova": lambda **kw: TOVA(heavy=6, recent=1, **kw),
}


def padded(B=3, S=20, seed=0):
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[1, :4] = False
    valid[2, :11] = False
    return valid


# ------------------------------------------------------------------ ops
@pytest.mark.parametrize("gates", ["none", "head", "feature"])
def test_fold_stream_equals_the_float64_recurrence(gates):
    B, Hkv, T, D, d = 2, 3, 17, 5, 4
    gen = torch.Generator().manual_seed(0)
    psi = torch.rand(B, Hkv, T, D, generator=gen)
    value = torch.randn(B, Hkv, T, d, generator=gen)
    initial = torch.randn(B, Hkv, D, d + 1, generator=gen)
    g = {"none": None, "head": -torch.rand(B, Hkv, T, generator=gen),
         "feature": -torch.rand(B, Hkv, T, D, generator=gen)}[gates]
    final = fold_stream(psi, value, initial, g)
    phi = torch.zeros(B, Hkv, 1, T, D)
    _, _, reference = naive_linear_attention(phi, psi, value, initial, None if g is None else (g if g.dim() == 4 else g[..., None]))
    torch.testing.assert_close(final.double(), reference, atol=1e-5, rtol=1e-5)


def dense_reference(q, k, v, valid, scaling):
    """float64 softmax over each query's real past (a padding query sees itself): out, received, last."""
    B, H, S, d = q.shape
    Hkv = k.shape[1]
    kk, vv = (x.double().repeat_interleave(H // Hkv, 1) for x in (k, v))
    logits = q.double() @ kk.transpose(-1, -2) * scaling
    pos = torch.arange(S)
    mask = (pos[None, :] <= pos[:, None]) & valid[:, None, None, :]
    mask = mask | (~valid[:, None, :, None] & torch.eye(S, dtype=torch.bool))
    probs = logits.masked_fill(~mask, -math.inf).softmax(-1)
    grouped = probs.reshape(B, Hkv, H // Hkv, S, S)
    received = (grouped * valid[:, None, None, :, None]).sum((2, 3))
    last = torch.stack([grouped[b, :, :, int(valid[b].nonzero().max())].sum(1) for b in range(B)])
    return probs @ vv, received, last


@pytest.mark.parametrize("block", [4, 7, 256])
def test_causal_attention_and_its_scores_match_a_dense_softmax(block):
    B, H, Hkv, S, d = 3, 4, 2, 20, 8
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, n, S, d, generator=gen) for n in (H, Hkv, Hkv))
    valid = padded(B, S)
    out_ref, received_ref, last_ref = dense_reference(q, k, v, valid, 0.3)
    out, received, last = causal_attention(q, k, v, valid, 0.3, block, scores=True)
    torch.testing.assert_close(out.double(), out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(received.double(), received_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last.double(), last_ref, atol=1e-5, rtol=1e-5)
    fast, none, _ = causal_attention(q, k, v, valid, 0.3, block)
    assert none is None
    torch.testing.assert_close(fast.double(), out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(causal_attention(q, k, v, None, 0.3)[0], causal_attention(q, k, v, None, 0.3, block, True)[0],
                               atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ the cut
def reference_cut(policy, budget: Budget, valid, scores):
    """``kept[b][h]``: the positions kept, chosen one row and head at a time from the definition."""
    out = []
    for b in range(valid.shape[0]):
        positions = [t for t in range(valid.shape[1]) if valid[b, t]]
        n = len(positions)
        rows = []
        for h in range(scores.shape[1]):
            protected = [p for i, p in enumerate(positions) if i < budget.sink or i >= n - budget.recent]
            rest = [p for p in positions if p not in protected]
            rank = (lambda p: positions.index(p)) if not policy.uses_scores else (lambda p: float(scores[b, h, p]))
            rest.sort(key=lambda p: (rank(p), p), reverse=True)
            rows.append(set(protected) | set(rest[: max(0, budget.capacity - len(protected))]))
        out.append(rows)
    return out


@pytest.mark.parametrize("policy", list(POLICIES))
def test_compress_keeps_what_a_slow_selection_keeps(policy):
    pol = POLICIES[policy]()
    valid = padded()
    B, S, Hkv = *valid.shape, 2
    gen = torch.Generator().manual_seed(2)
    scores = (torch.rand(B, Hkv, S, generator=gen) * 4).round() / 4  # coarse: many ties
    budget = pol.budget(length=S)
    sched = pol.compress(budget, valid, Hkv, scores if pol.uses_scores else None)
    expected = reference_cut(pol, budget, valid, scores)
    for b in range(B):
        for h in range(Hkv):
            assert set(sched.present[b, h].nonzero().flatten().tolist()) == expected[b][h]
            gone = sorted(set(valid[b].nonzero().flatten().tolist()) - expected[b][h])
            assert sched.evicted[b, h][sched.evicted[b, h] >= 0].tolist() == gone
    assert sched.present.sum(-1).max() <= budget.capacity
    assert sched.count.tolist() == valid.sum(-1).tolist()


@pytest.mark.parametrize("policy", ["window", "sink"])
@pytest.mark.parametrize("recent", [1, 3, 8])
def test_an_oldest_first_cut_is_the_stepwise_final_set(policy, recent):
    pol = POLICIES[policy]()
    pol.recent = recent
    valid = padded()
    budget = pol.budget(length=20)
    once = pol.compress(budget, valid, 2)
    stepwise = pol.keep_mask(budget, valid, 2)
    assert torch.equal(once.present, stepwise.present)


# ------------------------------------------------------------------ the model
def explicit_cut(model, prompt, policy):
    """The prompt run by eager attention: every layer's keys, values and the kept sets from its weights."""
    switch(model, None)
    model.set_attn_implementation("eager")
    out = model(prompt, output_attentions=True, use_cache=True)
    model.set_attn_implementation("sdpa")
    kv, cuts = [], []
    Hkv = model.config.num_key_value_heads
    valid = torch.ones_like(prompt, dtype=torch.bool)
    for layer, probs in enumerate(out.attentions):
        B, H, S, _ = probs.shape
        grouped = probs.float().reshape(B, Hkv, H // Hkv, S, S)
        scores = policy.prompt_scores(grouped.sum((2, 3)), grouped[:, :, :, -1].sum(2))
        budget = policy.budget(length=S)
        cuts.append(reference_cut(policy, budget, valid, scores))
        cache_layer = out.past_key_values.layers[layer]
        kv.append((cache_layer.keys, cache_layer.values))
    return out.logits, kv, cuts


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_mistral"], ids=["gqa", "mha"])
@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("state", ["plain", "less", "decay", "vector_gate"])
def test_one_shot_prefill_is_sdpa_plus_an_explicit_cut(family, policy, state):
    model, _ = tiny(family)
    prompt = ids(30, batch=2)
    pol = POLICIES[policy](prefill="one_shot")
    reference_logits, kv, cuts = explicit_cut(model, prompt, pol)
    states = None if state == "plain" else make_states(model, "less_mlp", "none" if state == "less" else state)
    build(model, pol, states)
    cache = LessCache(model)
    logits = model(prompt, **cache_kwargs(cache)).logits
    torch.testing.assert_close(logits, reference_logits, atol=1e-4, rtol=1e-4)
    for layer, (cache_layer, (keys, values), cut) in enumerate(zip(cache.layers, kv, cuts)):
        for b in range(2):
            for h in range(model.config.num_key_value_heads):
                slots = cache_layer.present[b, h].nonzero().flatten()
                assert set(cache_layer.logical[b, h, slots].tolist()) == cut[b][h]
                at = cache_layer.logical[b, h, slots]
                torch.testing.assert_close(cache_layer.keys[b, h, slots], keys[b, h, at])
                torch.testing.assert_close(cache_layer.values[b, h, slots], values[b, h, at])
        if states is None:
            assert cache_layer.state is None
            continue
        less = states[layer]
        gone = torch.ones(2, keys.shape[1], 30)
        for b in range(2):
            for h in range(keys.shape[1]):
                gone[b, h, sorted(cut[b][h])] = 0
        psi = less.psi(keys.float()) * gone[..., None]
        g = None if less.gating is None else less.gating.log_gates(values)
        _, _, expected = naive_linear_attention(torch.zeros(2, keys.shape[1], 1, 30, psi.shape[-1]), psi, values.float(),
                                                None, g)
        torch.testing.assert_close(cache_layer.state.double(), expected, atol=1e-4, rtol=1e-4)
    steps = model.generate(prompt, max_new_tokens=6, do_sample=False, **cache_kwargs(LessCache(model)))
    assert steps.shape[1] == 36


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("policy", ["sink", "h2o"])
def test_one_shot_in_half_precision_is_finite_and_close_to_float32(dtype, policy):
    prompt = ids(30, batch=2)
    outputs = {}
    for dt in (torch.float32, dtype):
        model, _ = tiny("tiny_llama", dt)
        build(model, POLICIES[policy](prefill="one_shot"), make_states(model, "less_mlp", "decay").to(dt))
        cache = LessCache(model)
        first = model(prompt, **cache_kwargs(cache)).logits
        step = model(first[:, -1:].argmax(-1), **cache_kwargs(cache)).logits
        outputs[dt] = torch.cat([first, step], 1).float()
    assert torch.isfinite(outputs[dtype]).all()
    torch.testing.assert_close(outputs[dtype], outputs[torch.float32], atol=0.1, rtol=0.05)


# ------------------------------------------------------------------ config
def test_one_shot_is_refused_where_every_token_is_scored(compose_config):
    with pytest.raises(ConfigError, match="task=perplexity scores every token"):
        check(compose_config("eval", ["model=tiny_llama", "policy=sink", "policy.prefill=one_shot", "task=perplexity"]))
    with pytest.raises(ConfigError, match="train with policy.prefill=stepwise"):
        check(compose_config("train", ["model=tiny_llama", "policy=sink", "policy.prefill=one_shot", "feature_map=less_mlp"]))
    with pytest.raises(ConfigError, match="policy.prefill"):
        check(compose_config("eval", ["model=tiny_llama", "policy=sink", "policy.prefill=once", "task=xsum"]))
    check(compose_config("eval", ["model=tiny_llama", "policy=h2o", "policy.prefill=one_shot", "task=xsum"]))


@pytest.mark.parametrize("policy", ["sink", "h2o", "tova"])
@pytest.mark.parametrize("state", ["less", "decay"])
def test_one_shot_left_padded_batch_matches_single_rows(policy, state):
    """Row 1 is left-padded: its one-shot cut, state and the decoding after it are those of the row alone."""
    from less_exp.tasks.consistency import decode_logits

    model, _ = tiny("tiny_qwen2")
    build(model, POLICIES[policy](prefill="one_shot"), make_states(model, "less_mlp", "none" if state == "less" else state))
    long, short, pad = ids(30, seed=1), ids(24, seed=2), 6
    batch, mask = torch.zeros(2, 30, dtype=torch.long), torch.zeros(2, 30, dtype=torch.long)
    batch[0], mask[0] = long[0], 1
    batch[1, pad:], mask[1, pad:] = short[0], 1
    with torch.no_grad():
        together = decode_logits(model, batch, mask, prefill=20)
        alone_long = decode_logits(model, long, None, prefill=20)
        alone_short = decode_logits(model, short, None, prefill=20 - pad)
    torch.testing.assert_close(together[0], alone_long[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(together[1, pad:], alone_short[0], atol=1e-4, rtol=1e-4)
