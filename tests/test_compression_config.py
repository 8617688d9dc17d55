"""Every policy / feature-map config composes, attaches to a model and runs through the eval job."""

import pytest

from less_exp import schema
from less_exp.adapter import compression_of
from less_exp.factory import apply, validate
from less_exp.errors import ConfigError
from less_exp.eval import evaluate
from less_exp.models import load_model

POLICIES = ["full", "window", "sink", "h2o", "tova"]
SMALL = ["policy.recent=8", "task.seq_len=48", "task.max_windows=2", "logger=none", "model=tiny_llama"]


def _small(policy):
    heavy = [] if policy in ("full", "window", "sink") else ["policy.heavy=8"]
    return [f"policy={policy}", *SMALL, *heavy]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("feature_map", ["none", "less_mlp", "elu1"])
def test_each_config_attaches(compose_config, policy, feature_map):
    cfg = compose_config("eval", _small(policy) + [f"feature_map={feature_map}"])
    model, _ = load_model(cfg.model)
    model = apply(model, cfg)
    comp = compression_of(model)
    if policy == "full" and feature_map == "none":
        assert comp is None and model.config._attn_implementation == "sdpa"
    else:
        assert comp.policy.name == policy
        assert (comp.states is None) == (feature_map == "none")


def test_untrained_less_equals_plain_policy_in_the_eval_job(compose_config):
    plain = evaluate(compose_config("eval", _small("h2o")))
    fresh = evaluate(compose_config("eval", _small("h2o") + ["feature_map=less_mlp"]))
    full = evaluate(compose_config("eval", _small("full")))
    assert abs(fresh["perplexity"] / plain["perplexity"] - 1) < 1e-3
    assert plain["perplexity"] != full["perplexity"]


def test_baseline_plus_grows_the_budget_by_the_state_size(compose_config):
    cfg = compose_config("eval", _small("h2o") + ["feature_map=less_mlp", "policy.baseline_plus=true"])
    model, _ = load_model(cfg.model)
    comp = compression_of(apply(model, cfg))
    assert comp.states is None
    # tiny_llama: head_dim 16, D' = 8: (8 * 16 + 8) / 32 = 4.25 tokens -> 4 more (2 heavy, 2 recent)
    assert comp.budget(48).capacity == 16 + 4


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["policy=h2o", "policy.heavy=40", "policy.recent=40", "task.seq_len=64"], "not smaller than the sequence"),
        (["policy=sink", "policy.heavy=3"], "heavy"),
        (["policy=h2o", "policy.heavy=0.5"], "fractional"),
        (["policy=h2o", "policy.baseline_plus=true"], "feature_map"),
        (["policy=h2o", "gating=none", "feature_map=less_mlp", "feature_map.features=0"], "features"),
    ],
)
def test_bad_compression_configs_fail_before_the_model_loads(compose_config, overrides, match):
    cfg = compose_config("eval", ["model=tiny_llama", "logger=none", *overrides])
    with pytest.raises(ConfigError, match=match):
        schema.check(cfg)
        validate(cfg)


def test_states_follow_the_model_mode(compose_config):
    """Dropout in the feature map must be off when the frozen model evaluates."""
    cfg = compose_config("eval", _small("h2o") + ["feature_map=less_mlp"])
    model, _ = load_model(cfg.model)
    states = compression_of(apply(model, cfg)).states
    assert not any(m.training for m in states.modules())
