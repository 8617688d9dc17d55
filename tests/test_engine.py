"""The compression engine on real transformers decoders: both forms agree, the cache really evicts."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from less_exp.adapter import CACHE_ARG, LessCache, build, cache_kwargs
from less_exp.policies import H2O, TOVA, Full, Sink, Window
from less_exp.state import JointNormalizer, LessMLP, LessStates
from less_exp.tasks.consistency import batch, decode_logits, max_abs_logit_diff, sdpa_logit_diff
from less_exp.tiny import build_tiny

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
FAMILIES = ["tiny_llama", "tiny_mistral", "tiny_qwen2", "tiny_qwen3", "tiny_gemma"]
POLICIES = {
    "full": lambda: Full(),
    "window": lambda: Window(recent=6),
    "sink": lambda: Sink(sink=2, recent=5),
    "h2o": lambda: H2O(heavy=4, recent=3),
    "tova": lambda: TOVA(heavy=6, recent=1),
}


def tiny(name, dtype=torch.float32):
    model, tok = build_tiny(OmegaConf.load(CONF / f"{name}.yaml"), dtype)
    return model.eval().requires_grad_(False), tok


def states_for(model, key_scale=1.0, seed=0):
    cfg = model.config
    d = cfg.head_dim
    torch.manual_seed(seed)
    return LessStates.build(
        lambda: LessMLP(d, cfg.num_attention_heads, cfg.num_key_value_heads, hidden=32, features=4,
                        key_scale_init=key_scale, dropout=0.0),
        JointNormalizer, cfg.num_hidden_layers, d,
    ).eval()


def ids(n=40, batch=1, seed=0):
    return torch.randint(0, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("with_state", [False, True], ids=["plain", "less"])
def test_parallel_and_decoding_agree(family, policy, with_state):
    model, _ = tiny(family)
    build(model, POLICIES[policy](), states_for(model) if with_state else None)
    assert max_abs_logit_diff(model, ids(), prefill=9) < 1e-4


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_mistral"], ids=["gqa", "mha"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("with_state", [False, True], ids=["plain", "less"])
def test_forms_agree_in_every_dtype(family, dtype, policy, with_state):
    """Parallel form vs decoding, token by token and in chunks, with a left-padded second row whose
    padding continues past the prefill. In half precision the bound is the model's own noise: the same
    comparison on transformers' sdpa + DynamicCache (twice it, or a few ulps of the logits)."""
    model, _ = tiny(family, dtype)
    x, mask = batch(ids(48), pad=9, pad_token_id=0)
    floor = sdpa_logit_diff(model, x, mask, prefill=5, chunk=4)
    build(model, POLICIES[policy](), states_for(model) if with_state else None)
    with torch.no_grad():
        scale = float(model(x, attention_mask=mask).logits.abs().max())
    eps = torch.finfo(dtype).eps
    bound = 1e-4 if dtype == torch.float32 else max(2 * floor, 4 * eps * scale)
    assert max_abs_logit_diff(model, x, mask, prefill=5, chunk=1) <= bound
    assert max_abs_logit_diff(model, x, mask, prefill=5, chunk=4) <= bound
    assert max_abs_logit_diff(model, x, mask, prefill=16, chunk=7) <= bound


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_less_in_half_precision_is_finite_and_close_to_float32(dtype):
    """The untrained state (key scale 1e-4) used to give NaN in float16; a strong one must stay finite too."""
    x = ids(64)
    for scale in (1e-4, 1.0):
        outs = []
        for dt in (torch.float32, dtype):
            model, _ = tiny("tiny_llama", dt)
            build(model, Sink(sink=2, recent=6), states_for(model, key_scale=scale))
            with torch.no_grad():
                outs.append(model(x).logits.float())
        assert torch.isfinite(outs[1]).all()
        nll = [torch.nn.functional.cross_entropy(o[0, :-1], x[0, 1:]) for o in outs]
        assert abs(float(nll[1] / nll[0]) - 1) < 0.01


def test_padding_while_decoding_is_not_admitted():
    """A row whose padding arrives during decoding must equal the same row without the padding."""
    model, _ = tiny("tiny_llama")
    build(model, H2O(heavy=4, recent=3), states_for(model))
    x, mask = batch(ids(40), pad=12, pad_token_id=0)
    together = decode_logits(model, x, mask, prefill=4)
    alone = decode_logits(model, x[1:, 12:], None, prefill=4)
    torch.testing.assert_close(together[1, 12:], alone[0], atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_state_changes_the_output_and_untrained_state_does_not():
    model, _ = tiny("tiny_llama")
    x = ids(64)
    build(model, H2O(heavy=4, recent=4), None)
    plain = model(x, use_cache=False).logits
    build(model, H2O(heavy=4, recent=4), states_for(model, key_scale=1e-4))
    fresh = model(x, use_cache=False).logits
    build(model, H2O(heavy=4, recent=4), states_for(model, key_scale=1.0))
    strong = model(x, use_cache=False).logits
    nll = lambda logits: torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:])
    assert abs(nll(fresh) / nll(plain) - 1) < 1e-3
    assert (strong - plain).abs().max() > 100 * (fresh - plain).abs().max()


@pytest.mark.parametrize("policy", ["sink", "h2o", "tova"])
@pytest.mark.parametrize("short_len", [22, 26])
def test_left_padded_batch_matches_single_rows(policy, short_len):
    """Row 1 is left-padded; with short_len=26 its prompt (6 tokens) is shorter than the budget."""
    model, _ = tiny("tiny_qwen2")
    build(model, POLICIES[policy](), states_for(model))
    long, short = ids(30, seed=1), ids(short_len, seed=2)
    pad = 30 - short_len
    batch = torch.zeros(2, 30, dtype=torch.long)
    mask = torch.zeros(2, 30, dtype=torch.long)
    batch[0], mask[0] = long[0], 1
    batch[1, pad:], mask[1, pad:] = short[0], 1
    together = decode_logits(model, batch, mask, prefill=12)
    alone_long = decode_logits(model, long, None, prefill=12)
    alone_short = decode_logits(model, short, None, prefill=12 - pad)
    torch.testing.assert_close(together[0], alone_long[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(together[1, pad:], alone_short[0], atol=1e-4, rtol=1e-4)
    assert max_abs_logit_diff(model, batch, mask, prefill=12) < 1e-4


def test_generate_with_real_cache_matches_parallel_greedy():
    model, _ = tiny("tiny_llama")
    build(model, H2O(heavy=4, recent=4), states_for(model))
    prompt = ids(12)
    out = model.generate(prompt, **cache_kwargs(LessCache(model)), max_new_tokens=20, do_sample=False,
                         min_new_tokens=20)
    seq = prompt
    for _ in range(20):
        nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("policy", ["window", "sink", "h2o", "tova"])
def test_cache_memory_is_constant(policy):
    model, _ = tiny("tiny_llama")
    build(model, POLICIES[policy](), states_for(model))
    cache = LessCache(model)
    sizes = []
    with torch.no_grad():
        model(ids(10), **cache_kwargs(cache), use_cache=True)
        for t in range(60):
            model(ids(1, seed=t), **cache_kwargs(cache), use_cache=True)
            if t in (20, 59):
                sizes.append(cache.nbytes())
    assert sizes[0] == sizes[1]
    assert cache.get_seq_length() == 70
    budget = POLICIES[policy]().budget().capacity
    layers, kv_heads, d = 2, model.config.num_key_value_heads, model.config.head_dim
    assert sizes[0]["kv"] == layers * 2 * kv_heads * (budget + 1) * d * 4


def test_full_cache_grows():
    model, _ = tiny("tiny_llama")
    build(model, Full(), None)
    cache = LessCache(model)
    with torch.no_grad():
        model(ids(10), **cache_kwargs(cache), use_cache=True)
        first = cache.nbytes()["kv"]
        model(ids(1), **cache_kwargs(cache), use_cache=True)
    assert cache.nbytes()["kv"] > first


def test_decoding_without_less_cache_fails_clearly():
    model, _ = tiny("tiny_llama")
    build(model, H2O(heavy=4, recent=4), None)
    with torch.no_grad():
        out = model(ids(10), use_cache=True)
        with pytest.raises(RuntimeError, match="LessCache"):
            model(ids(1), **cache_kwargs(getattr(out, CACHE_ARG)), use_cache=True)


def test_unsupported_model_fails_before_work():
    model, _ = tiny("tiny_llama")
    model.config.attn_logit_softcapping = 50.0
    with pytest.raises(ValueError, match="soft-capping"):
        build(model, H2O(), None)


def test_batched_generate_with_left_padding_matches_single_prompts():
    model, tok = tiny("tiny_llama")
    build(model, Sink(sink=2, recent=6), states_for(model))
    prompts = ["a longer prompt with several words", "short one"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    together = model.generate(**batch, **cache_kwargs(LessCache(model)), **kwargs)[:, batch.input_ids.shape[1]:]
    for row, prompt in enumerate(prompts):
        single = tok(prompt, return_tensors="pt")
        alone = model.generate(**single, **cache_kwargs(LessCache(model)), **kwargs)[:, single.input_ids.shape[1]:]
        assert torch.equal(together[row], alone[0])


@pytest.mark.parametrize("family", ["tiny_mistral", "tiny_qwen2"], ids=["mha", "gqa"])
@pytest.mark.parametrize("policy", ["full", "sink", "h2o", "tova"])
@pytest.mark.parametrize("bounds", [[0, 9, 14, 21, 22, 30, 31, 40], [0, 3, 16, 40]], ids=["full-cache", "filling"])
def test_chunked_prefill_matches_parallel(family, policy, bounds):
    """Prefill, then chunks of several tokens, then single tokens: all equal the parallel form.

    In "filling" the cache is below its budget when a chunk starts, so evictions begin mid-chunk.
    """
    model, _ = tiny(family)
    build(model, POLICIES[policy](), states_for(model))
    x = ids(40)
    with torch.no_grad():
        parallel = model(x, use_cache=False).logits
        cache = LessCache(model)
        pieces = [model(x[:, a:b], **cache_kwargs(cache), use_cache=True).logits for a, b in zip(bounds, bounds[1:])]
    torch.testing.assert_close(torch.cat(pieces, 1), parallel, atol=1e-4, rtol=1e-4)
    assert cache.get_seq_length() == 40


def test_beam_search_reorders_the_whole_cache():
    """Beam scores from the real cache must equal the parallel form's log-probability of each beam."""
    model, _ = tiny("tiny_llama")
    build(model, H2O(heavy=2, recent=2), states_for(model))
    assert_beams_match_parallel(model)


def assert_beams_match_parallel(model):
    """Beam search through the real cache scores each beam as the parallel form does."""
    prompt = ids(12)
    out = model.generate(prompt, **cache_kwargs(LessCache(model)), num_beams=3, num_return_sequences=3,
                         max_new_tokens=24, min_new_tokens=24, do_sample=False, length_penalty=0.0,
                         return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        logp = torch.log_softmax(model(out.sequences, use_cache=False).logits[:, 11:-1], -1)
    parallel = logp.gather(-1, out.sequences[:, 12:, None])[..., 0].sum(-1)
    torch.testing.assert_close(out.sequences_scores, parallel, atol=1e-4, rtol=1e-4)


def test_reorder_moves_every_per_row_tensor():
    """Swap two rows of a filled cache: decoding must continue each row's own history, state included."""
    model, _ = tiny("tiny_llama")
    build(model, H2O(heavy=2, recent=2), states_for(model))
    a, b, nxt = ids(20, seed=3), ids(20, seed=4), ids(1, seed=5)
    with torch.no_grad():
        cache = LessCache(model)
        model(torch.cat([a, b]), **cache_kwargs(cache), use_cache=True)
        cache.reorder_cache(torch.tensor([1, 0]))
        swapped = model(torch.cat([nxt, nxt]), **cache_kwargs(cache), use_cache=True).logits
        alone = []
        for row in (b, a):
            single = LessCache(model)
            model(row, **cache_kwargs(single), use_cache=True)
            alone.append(model(nxt, **cache_kwargs(single), use_cache=True).logits)
    torch.testing.assert_close(swapped, torch.cat(alone), atol=1e-5, rtol=1e-5)
