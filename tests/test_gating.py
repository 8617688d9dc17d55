"""Decay and gating of the state: the parallel form against a float64 reference at several chunk sizes,
the real cache (token by token, chunked prefill, beam search) against the parallel form, the plain
start, half precision over 8k tokens, training, checkpoints and config-time refusals."""

from __future__ import annotations

import math

import pytest
import torch

from less_exp import factory, schema
from less_exp.adapter import build
from less_exp.errors import ConfigError
from less_exp.ops import attention_logits, gather_stream, sparse_attention, stream_log_weights, stream_positions
from less_exp.ops.naive import naive_less_attention
from less_exp.policies import H2O, Sink
from less_exp.state import Decay, LessState, LessStates, ScalarGate, VectorGate
from less_exp.tasks.consistency import max_abs_logit_diff
from test_engine import assert_beams_match_parallel
from test_feature_maps import POLICIES, assert_cache_matches_parallel, ids, node, stream_8k_tokens, tiny

GATINGS = ["decay", "decay-learned", "scalar_gate", "vector_gate"]


def gating_node(name: str):
    if name == "decay-learned":
        cfg = node("gating", "decay")
        cfg.learned = True
        return cfg
    return node("gating", name)


def liven(state: LessState, seed: int = 0) -> None:
    """Gates that decay fast and differ by token and feature, so a wrong weight shows in the output."""
    gen = torch.Generator().manual_seed(seed)
    gating = state.gating
    with torch.no_grad():
        if isinstance(gating, Decay):
            gamma = torch.rand(len(gating._gammas), generator=gen) * 0.3 + 0.6
            if gating.learned:
                gating.theta.copy_(torch.logit(gamma))
            else:
                gating.log_gamma.copy_(gamma.log())
        elif isinstance(gating, ScalarGate):
            gating.weight.copy_(torch.randn(gating.weight.shape, generator=gen))
            gating.bias.fill_(-1.0)
        elif isinstance(gating, VectorGate):
            gating.up.copy_(torch.randn(gating.up.shape, generator=gen))
            gating.bias.copy_(torch.randn(gating.bias.shape, generator=gen) - 1.0)
        if not isinstance(gating, Decay):
            gating.temperature = 1.0


def make_states(model, feature_map: str, gating: str, trained: bool = True, seed: int = 0, **map_overrides):
    cfg = model.config
    shape = {"layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
             "head_dim": cfg.head_dim}
    extra = {"key_scale_init": 1.0, "dropout": 0.0, **map_overrides} if trained else map_overrides
    torch.manual_seed(seed)
    fm, norm, _, gate = factory._state_builders(node("feature_map", feature_map, **extra), node("normalizer", "joint"),
                                                None, gating_node(gating) if gating != "none" else None, shape)
    states = LessStates.build(fm, norm, shape["layers"], shape["head_dim"], None, gate).eval()
    if trained and gating != "none":
        for i, state in enumerate(states):
            liven(state, seed + i)
    return states


# ------------------------------------------------------------------ the parallel form, exactly
@pytest.mark.parametrize("chunk", [1, 7, 64, 24], ids=lambda c: f"chunk{c}")
@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("gating", GATINGS)
def test_chunked_parallel_form_equals_float64_reference(gating, policy, chunk):
    """One layer's output (sparse part + gated state) against explicit kept and evicted sets in float64,
    where an evicted token ``s`` counts at ``t`` with ``exp(G_t - G_s)``: chunk sizes 1, 7, 64 and S."""
    B, H, Hkv, S, d = 2, 4, 2, 24, 8
    shape = {"layers": 1, "heads": H, "kv_heads": Hkv, "head_dim": d}
    torch.manual_seed(0)
    fm, norm, _, gate = factory._state_builders(node("feature_map", "elu1", key_scale_init=1.0, features=6),
                                                node("normalizer", "joint"), None, gating_node(gating), shape)
    state = LessState(fm(), norm(), d)
    state.gating = gate(state.num_features)
    liven(state)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, n, S, d, generator=gen) for n in (H, Hkv, Hkv))
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[1, :3] = False  # left padding in the second row: no gate, never evicted
    pol = POLICIES[policy]()
    budget = pol.budget(length=S, max_positions=S)
    logits = attention_logits(q, k, d ** -0.5)
    sched = pol.keep_mask(budget, valid, Hkv, logits if pol.uses_scores else None)
    o_sparse, lse, _ = sparse_attention(logits, sched.keep, v)
    ev = sched.evicted
    assert (ev >= 0).sum() > 10
    gates = state.gates(v, valid, ev)
    out, _ = state.attend(q, gather_stream(k, ev), gather_stream(v, ev), ev >= 0, o_sparse, lse, chunk_size=chunk,
                          gates=gates)
    g = state.gating.log_gates(v).double() * valid[:, None, :, None]
    assert g.min() < -0.05, "gates must really decay for this test to mean anything"
    state64 = state.double()
    ref = naive_less_attention(q, k, v, sched.keep, d ** -0.5, phi=state64.phi(q.double()), psi=state64.psi(k.double()),
                               valid=valid, g=g)
    rows = valid[:, None, :, None].expand(B, H, S, d)
    torch.testing.assert_close(out.reshape(B, H, S, d).double()[rows], ref[rows], rtol=1e-4, atol=1e-5)


def test_stream_weights_carry_ages_across_chunks():
    """Splitting a pool of tokens into two chunks (ages carried between them) gives the same weights."""
    gen = torch.Generator().manual_seed(0)
    g = -torch.rand(1, 2, 10, 3, generator=gen)
    evicted = torch.tensor([[[-1, -1, 0, 1, -1, 4, 2, 7, 3, 9], [-1, 0, -1, 2, 1, 3, -1, 8, 6, 5]]])
    whole, ages = stream_log_weights(g, evicted)
    first, mid = stream_log_weights(g[:, :, :6], evicted[:, :, :6])
    second, end = stream_log_weights(g[:, :, 6:], evicted[:, :, 6:], mid)
    torch.testing.assert_close(torch.cat([first, second], 2), whole)
    torch.testing.assert_close(end, ages)
    assert (whole <= 0).all() and (ages <= 0).all()


# ------------------------------------------------------------------ the real cache
@pytest.mark.parametrize("family", ["tiny_llama", "tiny_mistral"], ids=["gqa", "mha"])
@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("feature_map", ["less_mlp", "elu1"])
@pytest.mark.parametrize("gating", GATINGS)
def test_gated_cache_agrees_with_parallel_form(gating, feature_map, policy, family, one_thread):
    """Token by token and in chunks of 5 (chunked prefill): evicted tokens enter with the parallel form's weight."""
    model, _ = tiny(family)
    assert_cache_matches_parallel(model, POLICIES[policy], make_states(model, feature_map, "none"),
                                  make_states(model, feature_map, gating))


def test_beam_search_carries_the_ages():
    model, _ = tiny()
    build(model, H2O(heavy=2, recent=2), make_states(model, "elu1", "vector_gate"))
    assert_beams_match_parallel(model)


def test_decay_of_one_is_no_gating():
    model, _ = tiny()
    x = ids(48)
    out = []
    with torch.no_grad():
        for gating in ("none", "decay"):
            states = make_states(model, "elu1", "none")
            if gating == "decay":
                for state in states:
                    state.gating = Decay(model.config.num_key_value_heads, gamma=1.0)
            build(model, H2O(heavy=4, recent=4), states)
            out.append(model(x, use_cache=False).logits)
    torch.testing.assert_close(out[1], out[0], rtol=0, atol=1e-5)
    assert max_abs_logit_diff(model, x, prefill=9, chunk=5) < 1e-3


@pytest.mark.parametrize("gating", ["decay", "scalar_gate", "vector_gate"])
def test_untrained_gated_state_gives_the_plain_policy(gating):
    model, _ = tiny()
    x = ids(256)
    losses = []
    with torch.no_grad():
        for states in (None, make_states(model, "less_mlp", gating, trained=False)):
            build(model, Sink(sink=4, recent=32), states)
            losses.append(model(x, labels=x, use_cache=False).loss.item())
    assert abs(math.exp(losses[1]) / math.exp(losses[0]) - 1) < 1e-3


def test_untrained_gates_decay_slowly():
    """Data-dependent gates start close to 1 (less than 20% decay across 1024 tokens) whatever the token;
    the fixed decay is RetNet's per-head schedule at the configured exponent."""
    v = torch.randn(1, 3, 1024, 64) * 3
    for gate in (ScalarGate(3, 64), VectorGate(3, 64, features=8)):
        total = gate.log_gates(v).sum(2)
        assert (total > math.log(0.8)).all() and (total < 0).all(), type(gate).__name__
    per_token = Decay(3, exponent=5).log_gates(v)[0, :, 0, 0]
    torch.testing.assert_close(per_token, torch.tensor([1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128]).log())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gating", ["decay", "scalar_gate", "vector_gate"])
def test_8k_tokens_stay_finite_in_half_precision(gating, dtype, one_thread):
    """8192 tokens through the real cache in chunks of 1024, fast gates and unit key scale."""
    model, _ = tiny(dtype=dtype, max_length=8192)
    cache = stream_8k_tokens(model, make_states(model, "elu1", gating))
    assert all(torch.isfinite(layer.ages).all() and (layer.ages <= 0).all() for layer in cache.layers)


# ------------------------------------------------------------------ config, training, checkpoints
@pytest.mark.parametrize("overrides,match", [
    (["gating=scalar_gate"], "gating=scalar_gate shapes a LESS state, but feature_map=none"),
    (["feature_map=elu1", "gating=decay", "gating.gamma=[0.9,0.8]", "policy=sink"],
     r"gating=decay: gamma=\[0.9, 0.8\] must be one number in \(0, 1\] or 3 of them"),
    (["feature_map=elu1", "gating=decay", "gating.gamma=1.0", "gating.learned=true", "policy=sink"],
     "learned=true needs every gamma < 1"),
    (["feature_map=elu1", "gating=vector_gate", "gating.rank=0", "policy=sink"], "gating.rank=0 must be a positive integer"),
    (["feature_map=elu1", "gating=scalar_gate", "gating.temperature=0", "policy=sink"], "temperature=0"),
    (["feature_map=elu1", "gating=scalar_gate", "gating.chunk_size=0", "policy=sink"], "gating.chunk_size=0"),
])
def test_senseless_gatings_fail_at_config_time(compose_config, overrides, match):
    cfg = compose_config("eval", overrides)
    with pytest.raises(ConfigError, match=match):
        schema.check(cfg)
        factory.validate(cfg)


def test_sizes_name_the_gating(compose_config, capsys):
    factory.validate(compose_config("eval", ["feature_map=elu1", "feature_map.features=8", "gating=vector_gate",
                                             "policy=sink"]))
    out = capsys.readouterr().out
    # elu1 d->8: 64*8 for each of 9 + 3 heads + 3 key scales = 6,147; vector gate: down 3*64*16 + up 3*16*8
    # + bias 3*8 = 3,480
    assert "state: Elu1 with VectorGate, D'=8, 9,627 parameters a layer" in out
    assert "a gate age of 8 numbers per cached token" in out


TINY_TRAIN = ["model=tiny_llama", "logger=none", "policy=sink", "policy.recent=8", "training.seq_len=64",
              "training.num_sequences=4", "training.epochs=2", "training.lr=0.05"]
TINY_EVAL = ["model=tiny_llama", "logger=none", "policy=sink", "policy.recent=8", "task.seq_len=64", "task.max_windows=2"]


@pytest.mark.parametrize("gating", ["decay-learned", "scalar_gate", "vector_gate"])
def test_training_moves_the_gates_and_the_checkpoint_carries_them(gating, compose_config, tmp_path, one_thread):
    from less_exp import eval as eval_job
    from less_exp import train as train_job
    from less_exp.checkpoints import read_manifest
    from safetensors.torch import load_file

    name = gating.split("-")[0]
    extra = ["gating.learned=true"] if gating == "decay-learned" else []
    ckpt = tmp_path / "ckpt"
    metrics = train_job.train(compose_config("train", [
        *TINY_TRAIN, "feature_map=elu1", "feature_map.features=8", f"gating={name}", *extra, "gating.chunk_size=16",
        f"checkpoint={ckpt}", "task=perplexity", "task.seq_len=64", "task.max_windows=2"]))
    assert math.isfinite(metrics["evaluation"]["perplexity"])
    manifest = read_manifest(ckpt)
    assert manifest["gating"]["name"] == name and manifest["settings"]["gating"]["name"]
    weights = load_file(str(ckpt / "layer_000.safetensors"))
    gate_params = {k: v for k, v in weights.items() if k.startswith("gating.")}
    fresh = make_states(tiny()[0], "elu1", gating, trained=False, features=8)[0].gating.state_dict()
    assert gate_params and any(not torch.equal(v, fresh[k.split(".", 1)[1]]) for k, v in gate_params.items()), \
        "training must move the gate's parameters"
    again = eval_job.evaluate(compose_config("eval", [*TINY_EVAL, f"checkpoint={ckpt}", "gating.chunk_size=5"]))
    assert again["perplexity"] == pytest.approx(metrics["evaluation"]["perplexity"], rel=1e-5)
    other = "scalar_gate" if name != "scalar_gate" else "vector_gate"
    with pytest.raises(ConfigError, match=f"holds gating={name}, but this run sets gating={other}"):
        eval_job.evaluate(compose_config("eval", [*TINY_EVAL, f"checkpoint={ckpt}", f"gating={other}"]))


def test_gates_and_scales_get_their_own_learning_rates():
    from omegaconf import OmegaConf

    from less_exp.training.layerwise import param_groups

    state = make_states(tiny()[0], "elu1", "scalar_gate", trained=False, features=8)[0]
    ids_of = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    by_name = dict(state.named_parameters())
    one = param_groups(state, OmegaConf.create({"scale_lr": None, "gate_lr": None}))
    assert len(one) == 1 and ids_of(one[0]) == {id(p) for p in by_name.values()}
    rest, scales, gates = param_groups(state, OmegaConf.create({"scale_lr": 0.1, "gate_lr": 0.3}))
    assert ids_of(gates) == {id(by_name["gating.weight"]), id(by_name["gating.bias"])} and gates["lr"] == 0.3
    assert ids_of(scales) == {id(by_name["feature_map.log_key_scale"])} and scales["lr"] == 0.1
    assert len(ids_of(rest)) == len(by_name) - 3 and "lr" not in rest
