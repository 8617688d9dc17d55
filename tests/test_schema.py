"""The configuration schema (less_exp/schema.py): every preset passes it, every kind of bad value is
one line naming the key, its choices are the code's own, and the command line checks it without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from less_exp import checkpoints, data, models, presets, prompts, schema, training
from less_exp.errors import ConfigError
from less_exp.paths import conf_dir
from less_exp.policies.base import RATIO_BASES
from less_exp.training import output

GROUPS = ("model", "data", "policy", "feature_map", "gating", "reweighting", "normalizer", "task", "logger")


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return compose(name, overrides=overrides)


STATE_GROUPS = ("gating", "reweighting", "normalizer")  # they shape a state: composed with one


@pytest.mark.parametrize("config_name, overrides", [
    *(("eval", [f"{group}={option}", *(["feature_map=elu1"] if group in STATE_GROUPS else [])])
      for group in GROUPS for option in presets.names(group)),
    *(("train", [f"training={option}"]) for option in presets.names("training")),
    *(("train", [f"experiment={option}"]) for option in presets.names("experiment")),
])
def test_every_preset_passes_the_schema(config_name, overrides):
    schema.check(_compose(config_name, overrides))


@pytest.mark.parametrize("override, message", [
    ("++task.seqlen=64", "task.seqlen is not a setting (did you mean task.seq_len?)"),
    ("task.seq_len=abc", "task.seq_len='abc' must be an integer >= 2"),
    ("task.seq_len=true", "task.seq_len=True must be an integer >= 2"),
    ("task.max_windows=0", "task.max_windows=0 must be a positive integer or null (null: every window)"),
    ("policy.heavy=nan", "policy.heavy=nan must be a number >= 0 (a token count, or a ratio with policy.ratio_of)"),
    ("policy.ratio_of=tokens", "policy.ratio_of='tokens' must be one of max_positions, length or null"),
    ("task.windows=sliding", "task.windows='sliding' must be one of disjoint, rolling"),
    ("task.seq_len=4096", "task.seq_len=4096 must be an integer in [2, 2048] (model.max_length)"),
    ("model.config.num_hidden_layers=0", "model.config.num_hidden_layers=0 must be a positive integer"),
])
def test_a_bad_value_is_one_line_naming_the_key(override, message):
    cfg = _compose("eval", ["model=tiny_llama", override])
    with pytest.raises(ConfigError) as caught:
        schema.check(cfg)
    assert str(caught.value) == message


def test_a_number_is_finite_and_an_integer_is_not_a_bool():
    assert schema.Num(gt=0).problem(float("inf")) and schema.Num().problem(float("nan"))
    assert schema.Int(ge=1).problem(True) and schema.Int(ge=1).problem(2.0)
    assert schema.Num(gt=0, le=1).problem(1) is None and schema.Num(gt=0, le=1).problem(0)
    gamma = schema.Num(gt=0, le=1, null=True, alt=schema.List(schema.Num(gt=0, le=1), nonempty=True))
    assert gamma.problem([0.5, 0.9]) is None and gamma.problem(None) is None
    assert gamma.problem([0.5, 2]) and gamma.problem([]) and gamma.problem("fast")


def test_keys_of_user_named_mappings_pass_and_their_values_are_checked():
    cfg = _compose("train", ["model=tiny_llama", "data=c4_wikitext2", "+model.config.rope_theta=5.0"])
    schema.check(cfg)
    bad = _compose("train", ["model=tiny_llama", "data=c4_wikitext2", "data.weights.c4=-1"])
    with pytest.raises(ConfigError, match=r"data\.weights\.c4=-1 must be a number > 0"):
        schema.check(bad)
    nested = _compose("eval", ["model=tiny_llama", "task=xsum", "task.dataset.hub.max_rows=0"])
    with pytest.raises(ConfigError, match=r"task\.dataset\.hub\.max_rows=0"):
        schema.check(nested)


def test_the_schema_choices_are_the_code_s_own():
    sections = schema.SECTIONS
    assert set(sections["model"]["dtype"].choices) == set(models.DTYPES)
    assert set(sections["training"]["after"].choices) == set(output.AFTER)
    assert set(sections["training"]["mode"].choices) == set(training.MODES)
    assert set(sections["task"]["split"].choices) == set(data.SPLITS)
    assert set(sections[""]["checkpoint_budget"].choices) == set(checkpoints.BUDGET_MATCH)
    assert {*sections["policy"]["ratio_of"].choices, None} == set(RATIO_BASES)
    assert set(sections["task"]["prompt_format"].choices) == set(sections["data_answers"]["prompt_format"].choices) == set(prompts.FORMATS)


def test_cross_key_rules_run_after_the_keys():
    cfg = _compose("eval", ["model=tiny_llama", "policy=h2o", "task=consistency", "task.seq_len=64", "task.prefill=64"])
    with pytest.raises(ConfigError, match=r"task\.prefill=64 must be in \[1, task\.seq_len=64\)"):
        schema.check(cfg)
    train = _compose("train", ["model=tiny_llama", "training.from_layer=1", "training.to_layer=1"])
    with pytest.raises(ConfigError, match=r"training\.from_layer=1 must be smaller than training\.to_layer=1"):
        schema.check(train)


def test_the_command_line_checks_without_importing_torch():
    code = ("import sys; from less_exp import commandline; "
            "p = commandline.compose_error('eval', ['model=tiny_llama', 'task.seq_len=1']); "
            "print(p); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.splitlines() == ["task.seq_len=1 must be an integer >= 2", "False"]
