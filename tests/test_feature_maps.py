"""Every feature map, re-weighting and normaliser: exact forms, sizes, the plain start, the real cache,
long sequences in half precision, and config-time refusals."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from less_exp import factory, schema
from less_exp.adapter import LessCache, build, cache_kwargs
from less_exp.errors import ConfigError
from less_exp.ops import attention_logits, gather_stream, sparse_attention, stream_positions
from less_exp.ops.naive import naive_less_attention
from less_exp.policies import H2O, Sink
from less_exp.state import LessState, LessStates
from less_exp.state.feature_maps import dct_matrix, taylor_rank
from less_exp.tasks.consistency import max_abs_logit_diff
from less_exp.tiny import build_tiny
from test_engine import assert_beams_match_parallel

CONF = Path(__file__).resolve().parents[1] / "conf"
MAPS = ["less_mlp", "elu1", "relu", "performer", "taylor", "dijiang", "hedgehog"]
# (feature_map, reweighting, normalizer): every map alone, then every re-weighting and normaliser
COMBOS = [(m, "none", "joint") for m in MAPS] + [
    ("performer", "leapformer", "joint"), ("elu1", "cosformer", "joint"), ("less_mlp", "none", "norm"),
    ("taylor", "none", "norm"), ("hedgehog", "leapformer", "norm"), ("dijiang", "cosformer", "norm"),
]
POLICIES = {"sink": lambda: Sink(sink=2, recent=5), "h2o": lambda: H2O(heavy=4, recent=3)}


def node(group: str, name: str, **overrides):
    cfg = OmegaConf.load(CONF / group / f"{name}.yaml")
    cfg.update({k: v for k, v in overrides.items() if k in cfg})
    return cfg


def tiny(family="tiny_llama", dtype=torch.float32, max_length=None):
    cfg = OmegaConf.load(CONF / "model" / f"{family}.yaml")
    if max_length:
        cfg.max_length = max_length
    model, tok = build_tiny(cfg, dtype)
    return model.eval().requires_grad_(False), tok


def make_states(model, feature_map, reweighting="none", normalizer="joint", trained=True, seed=0, **map_overrides):
    """States as the configs build them; ``trained`` gives them a unit key scale and a live mix (so the
    state really changes the output), else they are exactly as configured (the plain start)."""
    cfg = model.config
    shape = {"layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
             "head_dim": cfg.head_dim}
    extra = {"key_scale_init": 1.0, "dropout": 0.0, "hidden": 32, **map_overrides} if trained else map_overrides
    torch.manual_seed(seed)
    fm, norm, rw, _ = factory._state_builders(node("feature_map", feature_map, **extra), node("normalizer", normalizer),
                                              node("reweighting", reweighting, horizon=64), None, shape)
    states = LessStates.build(fm, norm, shape["layers"], shape["head_dim"], rw).eval()
    if trained:
        for state in states:
            if hasattr(state.normalizer, "mix"):
                state.normalizer.mix.data.fill_(0.5)
    return states


def ids(n=40, batch=1, seed=0):
    return torch.randint(0, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_mistral"], ids=["gqa", "mha"])
@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(c))
def test_every_state_agrees_between_parallel_form_and_cache(family, policy, combo, one_thread):
    """Token by token and in chunks of 5 (chunked prefill), with a state that changes the output."""
    model, _ = tiny(family)
    assert_cache_matches_parallel(model, POLICIES[policy], None, make_states(model, *combo))


def assert_cache_matches_parallel(model, make_policy, before, states) -> None:
    """``states`` change the parallel form's output (against ``before``), and the real cache, token by
    token and in chunks of 5 (chunked prefill), gives the parallel form's logits."""
    x = ids()
    with torch.no_grad():
        build(model, make_policy(), before)
        reference = model(x, use_cache=False).logits
        build(model, make_policy(), states)
        less = model(x, use_cache=False).logits
    assert (less - reference).abs().max() > 1e-3, "the state must change the output for this test to mean anything"
    assert max_abs_logit_diff(model, x, prefill=9) < 1e-3
    assert max_abs_logit_diff(model, x, prefill=9, chunk=5) < 1e-3


def test_beam_search_with_position_reweighting_and_norm():
    model, _ = tiny()
    build(model, H2O(heavy=2, recent=2), make_states(model, "dijiang", "cosformer", "norm"))
    assert_beams_match_parallel(model)


# ------------------------------------------------------------------ exact forms in float64
def _x(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def reference_kernel(name: str, fm, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``phi(q) . psi(k)`` written from each map's formula in float64: ``q [H, S, d]``, ``k [Hkv, S, d]``
    -> ``[H, S, S]`` (query head h meets its KV head)."""
    H, Hkv, d = q.shape[0], k.shape[0], q.shape[-1]
    kq = k.repeat_interleave(H // Hkv, 0)
    scale = fm.log_key_scale.double().exp().repeat_interleave(H // Hkv, 0)
    if name in ("performer", "dijiang"):  # the learned input projection in front of the fixed features
        q = q @ fm.projection.w_q.double()
        kq = kq @ fm.projection.w_k.double().repeat_interleave(H // Hkv, 0)
    if name == "performer":
        w = fm.omega.double()
        m = w.shape[0]

        def f(x):
            x = x / d ** 0.25
            return torch.exp(x @ w.T - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(m)
        return scale * f(q) @ f(kq).transpose(-1, -2)
    if name == "taylor":
        yq = q @ fm.w_q.double()
        yk = kq @ fm.w_k.double().repeat_interleave(H // Hkv, 0)
        a = yq @ yk.transpose(-1, -2) / math.sqrt(fm.rank)
        return scale * (1 + a + a * a / 2)
    if name == "dijiang":
        n = d
        c = torch.tensor([[math.sqrt((1 if f == 0 else 2) / n) * math.cos(math.pi * (t + 0.5) * f / n)
                           for t in range(n)] for f in range(n)], dtype=torch.float64)
        u = torch.rand(fm.num_features, generator=torch.Generator().manual_seed(fm.seed), dtype=torch.float64)
        p = c[: fm.num_features].T * torch.special.ndtri(u.clamp(1e-6, 1 - 1e-6))  # quasi-MC weights Phi^-1(u)

        def f(x):
            return torch.softmax(x @ p / d ** 0.25, -1)
        return scale * f(q) @ f(kq).transpose(-1, -2)
    if name == "hedgehog":
        def f(x, w):
            y = x @ w.double()
            return torch.cat([torch.softmax(y, -1), torch.softmax(-y, -1)], -1)
        return scale * f(q, fm.w_q) @ f(kq, fm.w_k.repeat_interleave(H // Hkv, 0)).transpose(-1, -2)
    if name in ("elu1", "relu"):
        act = (lambda x: torch.nn.functional.elu(x) + 1) if name == "elu1" else torch.relu
        wq = fm.w_q.double() if fm.w_q is not None else torch.eye(d, dtype=torch.float64).expand(H, d, d)
        wk = fm.w_k.double().repeat_interleave(H // Hkv, 0) if fm.w_k is not None else wq
        return scale * act(q @ wq) @ act(kq @ wk).transpose(-1, -2)
    if name == "less_mlp":
        def f(x, mlp):
            return (torch.nn.functional.gelu(x @ mlp.w1.double()) @ mlp.w2.double()).abs()
        k_mlp = type("M", (), {"w1": fm.k_mlp.w1.repeat_interleave(H // Hkv, 0), "w2": fm.k_mlp.w2.repeat_interleave(H // Hkv, 0)})
        return scale * f(q, fm.q_mlp) @ f(kq, k_mlp).transpose(-1, -2)
    raise KeyError(name)


@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize("features", [8, 32])
def test_kernel_of_every_map_matches_its_formula(name, features):
    H, Hkv, d, S = 4, 2, 16, 6
    extra = {"features": features if name not in ("dijiang",) else min(features, d), "key_scale_init": 0.5, "dropout": 0.0}
    fm = factory.instantiate_component(node("feature_map", name, **extra), head_dim=d, num_heads=H, num_kv_heads=Hkv)
    with torch.no_grad():
        for p in fm.parameters():  # away from the identity-like starts, so every weight matters
            p.add_(torch.randn_like(p) * 0.1)
    q, k = _x(H, S, d, seed=1), _x(Hkv, S, d, seed=2)
    got = fm.query(q.float()) @ fm.key(k.float()).repeat_interleave(H // Hkv, 0).transpose(-1, -2)
    torch.testing.assert_close(got.double(), reference_kernel(name, fm, q, k), rtol=1e-4, atol=1e-6)


def test_dct_matrix_is_orthonormal_and_taylor_sizes():
    c = dct_matrix(16).double()
    torch.testing.assert_close(c @ c.T, torch.eye(16, dtype=torch.float64), atol=1e-6, rtol=0)
    assert [(f, taylor_rank(f), 1 + taylor_rank(f) + taylor_rank(f) * (taylor_rank(f) + 1) // 2) for f in (3, 8, 15, 32)] == [
        (3, 1, 3), (8, 2, 6), (15, 4, 15), (32, 6, 28)]


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(c))
@pytest.mark.parametrize("policy", list(POLICIES))
def test_parallel_readout_equals_float64_reference(combo, policy):
    """The LESS output of one layer (sparse part + state through the normaliser) against explicit kept
    and evicted sets in float64, features taken from the same state run in float64."""
    B, H, Hkv, S, d = 1, 4, 2, 24, 8
    fm_name, rw_name, norm_name = combo
    shape = {"layers": 1, "heads": H, "kv_heads": Hkv, "head_dim": d}
    extra = {"key_scale_init": 1.0, "dropout": 0.0, "hidden": 16, "features": 6 if fm_name != "dijiang" else 6}
    torch.manual_seed(0)
    fm, norm, rw, _ = factory._state_builders(node("feature_map", fm_name, **extra), node("normalizer", norm_name),
                                              node("reweighting", rw_name, horizon=S), None, shape)
    state = LessState(fm(), norm(), d, rw() if rw else None)
    if hasattr(state.normalizer, "mix"):
        state.normalizer.mix.data.fill_(0.7)
    q, k, v = _x(B, H, S, d, seed=3).float(), _x(B, Hkv, S, d, seed=4).float(), _x(B, Hkv, S, d, seed=5).float()
    pol = POLICIES[policy]()
    budget = pol.budget(length=S, max_positions=S)
    valid = torch.ones(B, S, dtype=torch.bool)
    logits = attention_logits(q, k, d ** -0.5)
    sched = pol.keep_mask(budget, valid, Hkv, logits if pol.uses_scores else None)
    o_sparse, lse, _ = sparse_attention(logits, sched.keep, v)
    ev = sched.evicted
    q_pos, s_pos = stream_positions(sched.logical, ev, S)
    out, _ = state.attend(q, gather_stream(k, ev), gather_stream(v, ev), ev >= 0, o_sparse, lse, chunk_size=5,
                          query_pos=q_pos, stream_pos=s_pos)
    pos = torch.arange(S)
    state64 = state.double()
    phi = state64.phi(q.double(), pos[None]) if state.needs_positions else state64.phi(q.double())
    psi = state64.psi(k.double(), pos[None, None].expand(B, Hkv, S)) if state.needs_positions else state64.psi(k.double())
    if norm_name == "joint":
        ref = naive_less_attention(q, k, v, sched.keep, d ** -0.5, phi=phi, psi=psi)
    else:  # o_sparse + mix * RMSNorm(phi^T H), H over the evicted set, in float64
        plain = naive_less_attention(q, k, v, sched.keep, d ** -0.5)
        ref = torch.zeros_like(plain)
        for h in range(H):
            g = h // (H // Hkv)
            for t in range(S):
                evicted = [s for s in range(t + 1) if not sched.keep[0, g, t, s]]
                num = sum((phi[0, h, t] @ psi[0, g, s]) * v[0, g, s].double() for s in evicted) if evicted else torch.zeros(d, dtype=torch.float64)
                rms = (num.square().mean() + state.normalizer.eps).rsqrt()
                gain = state.normalizer.gain.double()[g, h % (H // Hkv), 0]
                ref[0, h, t] = plain[0, h, t] + state.normalizer.mix.double()[g, h % (H // Hkv), 0, 0] * gain * num * rms
    torch.testing.assert_close(out.reshape(B, H, S, d).double(), ref, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ sizes
def _expected(name, features, H, Hkv, d, hidden=512):
    """(D', parameters) of one layer's feature map from its definition (the key scale is Hkv numbers)."""
    if name == "less_mlp":
        return features, (H + Hkv) * (d * hidden + hidden * features) + Hkv
    if name in ("elu1", "relu"):
        return (d, Hkv) if features is None else (features, (H + Hkv) * d * features + Hkv)
    if name in ("performer", "dijiang"):  # a d x d input projection per head
        return features, (H + Hkv) * d * d + Hkv
    if name == "taylor":
        r = taylor_rank(features)
        return 1 + r + r * (r + 1) // 2, (H + Hkv) * d * r + Hkv
    if name == "hedgehog":
        return features, (H + Hkv) * d * features // 2 + Hkv
    raise KeyError(name)


@pytest.mark.parametrize("name", MAPS + ["elu1-null"])
@pytest.mark.parametrize("features", [8, 32])
@pytest.mark.parametrize("rw_norm", [("none", "joint"), ("leapformer", "joint"), ("cosformer", "norm")], ids="-".join)
def test_sizes_of_every_state(name, features, rw_norm):
    H, Hkv, d, hidden = 9, 3, 64, 16
    rw_name, norm_name = rw_norm
    feats = None if name == "elu1-null" else features
    name = name.split("-")[0]
    shape = {"layers": 30, "heads": H, "kv_heads": Hkv, "head_dim": d}
    fm, norm, rw, _ = factory._state_builders(node("feature_map", name, features=feats), node("normalizer", norm_name),
                                              node("reweighting", rw_name, hidden=hidden), None, shape)
    state = LessState(fm(), norm(), d, rw() if rw else None)
    D, params = _expected(name, feats, H, Hkv, d)
    if rw_name != "none":
        D *= 2
        params += (H + Hkv) * (d * hidden + hidden) if rw_name == "leapformer" else 0
    if norm_name == "norm":
        params += H + H * d
    assert state.num_features == D
    assert state.num_parameters() == params
    assert state.token_equivalents() == pytest.approx((D * d + D) / (2 * d))
    text = factory.describe_state(state, shape)
    assert f"D'={D}," in text and f"{params:,} parameters a layer ({params * 30:,} for 30 layers)" in text


# ------------------------------------------------------------------ the plain start
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(c))
def test_untrained_state_gives_the_plain_policy(combo):
    """As configured (key scale 1e-4, mix 0), a state changes perplexity by less than 1e-3 relative."""
    model, _ = tiny()
    x = ids(256)
    losses = []
    with torch.no_grad():
        for states in (None, make_states(model, *combo, trained=False)):
            build(model, Sink(sink=4, recent=32), states)
            losses.append(model(x, labels=x, use_cache=False).loss.item())
    assert abs(math.exp(losses[1]) / math.exp(losses[0]) - 1) < 1e-3


# ------------------------------------------------------------------ long sequences in half precision
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("combo", [(m, "none", "joint") for m in MAPS] + [("performer", "leapformer", "norm")],
                         ids=lambda c: "-".join(c))
def test_8k_tokens_stay_finite_in_half_precision(dtype, combo, one_thread):
    """8192 tokens through the real cache in chunks of 1024, states at unit key scale (large sums)."""
    model, _ = tiny(dtype=dtype, max_length=8192)
    stream_8k_tokens(model, make_states(model, *combo))


def stream_8k_tokens(model, states) -> LessCache:
    """Run 8192 tokens through the real cache (sink 4+60) in chunks of 1024; every logit and state finite."""
    build(model, Sink(sink=4, recent=60), states)
    x = ids(8192, seed=1)
    cache = LessCache(model)
    with torch.no_grad():
        for start in range(0, 8192, 1024):
            logits = model(x[:, start:start + 1024], **cache_kwargs(cache), use_cache=True).logits
            assert torch.isfinite(logits).all(), f"non-finite logits in tokens {start}-{start + 1024}"
    assert all(torch.isfinite(layer.state).all() for layer in cache.layers)
    return cache


# ------------------------------------------------------------------ config-time refusals
@pytest.mark.parametrize("overrides,match", [
    (["reweighting=leapformer"], "reweighting=leapformer shapes a LESS state, but feature_map=none"),
    (["normalizer=norm"], "normalizer=norm shapes a LESS state"),
    (["feature_map=taylor", "feature_map.features=2", "policy=sink"], "feature_map=taylor: features=2 is too small"),
    (["feature_map=dijiang", "feature_map.features=65", "policy=sink"], "feature_map=dijiang: features=65 must be between 1 and head_dim=64"),
    (["feature_map=hedgehog", "feature_map.features=7", "policy=sink"], "feature_map=hedgehog: features=7 must be even"),
    (["feature_map=performer", "feature_map.features=0", "policy=sink"], "feature_map.features=0 must be a positive integer"),
    (["feature_map=elu1", "reweighting=cosformer", "reweighting.horizon=512", "policy=sink"],
     "reweighting.horizon=512 is shorter than task.seq_len=1024"),
    (["feature_map=elu1", "normalizer=norm", "normalizer.eps=0", "policy=sink"], "normalizer.eps=0 must be a number in (0, 1]"),
    (["feature_map=elu1", "reweighting=leapformer", "reweighting.hidden=x", "policy=sink"], "reweighting.hidden='x' must be a positive integer"),
])
def test_senseless_settings_fail_at_config_time(compose_config, overrides, match):
    cfg = compose_config("eval", overrides)
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(")", r"\)")):
        schema.check(cfg)
        factory.validate(cfg)


def test_sizes_are_printed_before_the_model_loads(compose_config, capsys):
    factory.validate(compose_config("eval", ["feature_map=taylor", "feature_map.features=32", "policy=sink",
                                             "reweighting=leapformer"]))
    out = capsys.readouterr().out
    assert "state: Taylor x LeaPformer re-weighting, D'=56," in out and "for 30 layers" in out


# ------------------------------------------------------------------ training, checkpoints
TINY_TRAIN = ["model=tiny_llama", "logger=none", "policy=sink", "policy.recent=8", "training.seq_len=64",
              "training.num_sequences=4", "training.epochs=1"]
TINY_EVAL = ["model=tiny_llama", "logger=none", "policy=sink", "policy.recent=8", "task.seq_len=64", "task.max_windows=2"]


def test_train_evaluates_and_checkpoint_carries_every_component(compose_config, tmp_path, one_thread):
    """A train job with task= evaluates its states; the checkpoint holds Performer's fixed Omega and the
    re-weighting and normaliser settings, reloads to the same perplexity, and refuses other settings."""
    from less_exp import eval as eval_job
    from less_exp import train as train_job
    from less_exp.checkpoints import read_manifest
    from safetensors.torch import load_file

    ckpt = tmp_path / "ckpt"
    metrics = train_job.train(compose_config("train", [
        *TINY_TRAIN, "feature_map=performer", "reweighting=leapformer", "normalizer=norm", f"checkpoint={ckpt}",
        "task=perplexity", "task.seq_len=64", "task.max_windows=2"]))
    evaluation = metrics["evaluation"]
    assert evaluation["state_features"] == 16 and evaluation["state_parameters"] == metrics["state_parameters"]
    assert (tmp_path / "eval" / "results.json").is_file() and math.isfinite(evaluation["perplexity"])
    settings = read_manifest(ckpt)["settings"]
    assert settings["reweighting"] == {"name": "LeaPformer", "hidden": 16} and settings["normalizer"] == {"name": "norm"}
    assert settings["feature_map"]["seed"] == 0 and "feature_map.omega" in load_file(str(ckpt / "layer_000.safetensors"))

    again = eval_job.evaluate(compose_config("eval", [*TINY_EVAL, f"checkpoint={ckpt}"]))
    assert again["perplexity"] == pytest.approx(evaluation["perplexity"], rel=1e-6)
    with pytest.raises(ConfigError, match="holds reweighting=leapformer, but this run sets reweighting=cosformer"):
        eval_job.evaluate(compose_config("eval", [*TINY_EVAL, f"checkpoint={ckpt}", "feature_map=performer",
                                                  "reweighting=cosformer"]))
    with pytest.raises(ConfigError, match=r"feature_map.seed=0 \(this run: 1\)"):
        eval_job.evaluate(compose_config("eval", [*TINY_EVAL, f"checkpoint={ckpt}", "feature_map=performer",
                                                  "feature_map.seed=1"]))


def test_performer_sums_and_gradients_stay_finite_with_large_inputs():
    """Outlier-sized q and k over a long evicted stream at a grown key scale: without the causal shifts
    the read-out's backward (num / den^2) overflows float32; with them values and gradients are finite
    and the read-out still equals the unshifted one computed in float64."""
    B, H, Hkv, S, d = 1, 2, 1, 4096, 64
    fm = factory.instantiate_component(node("feature_map", "performer", key_scale_init=1e4), head_dim=d, num_heads=H,
                                       num_kv_heads=Hkv)
    state = LessState(fm, factory.instantiate_component(node("normalizer", "joint")), d)
    q = (_x(B, H, S, d, seed=6) * 6).float().requires_grad_()
    k, v = (_x(B, Hkv, S, d, seed=7) * 6).float(), _x(B, Hkv, S, d, seed=8).float()
    o_sparse, lse = torch.zeros(B, Hkv, H, S, d), torch.full((B, Hkv, H, S), 5.0)
    out, final = state.attend(q, k, v, torch.ones(B, Hkv, S, dtype=torch.bool), o_sparse, lse)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(final).all() and torch.isfinite(q.grad).all()
    assert torch.isfinite(fm.log_key_scale.grad).all() and torch.isfinite(fm.projection.w_q.grad).all()
    with torch.no_grad():  # the last query against the whole stream, unshifted, in float64
        phi, psi = state.double().phi(q[:, :, -1:].double()), state.double().psi(k.double())
        num = torch.einsum("bhqf,bgsf,bgsd->bhqd", phi, psi, v.double())
        den = torch.einsum("bhqf,bgsf->bhq", phi, psi)
        ref = (den / (den + math.exp(5.0)))[..., None] * num / den[..., None]
    torch.testing.assert_close(out[:, 0, :, -1:].double(), ref, rtol=1e-4, atol=1e-6)
