"""Hyper-parameter search: the value a job returns to Hydra's sweeper, and the Optuna example end to end."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import yaml
from omegaconf import OmegaConf

from less_exp.search import objective


def test_objective_reads_the_job_or_its_nested_evaluation(capsys):
    cfg = OmegaConf.create({"optimized_metric": "perplexity"})
    assert objective(cfg, {"perplexity": 12.5, "nll": 2.0}) == 12.5
    assert objective(cfg, {"mean_val_mse": 0.1, "evaluation": {"perplexity": 9}}) == 9.0
    assert objective(OmegaConf.create({}), {"perplexity": 1.0}) is None
    assert math.isnan(objective(cfg, None))  # a failed job: a failed trial, its reason already printed
    assert capsys.readouterr().err == ""
    assert math.isnan(objective(cfg, {"nll": 2.0, "policy": "sink"}))
    assert capsys.readouterr().err.strip() == ("optimized_metric=perplexity is not a metric of this job (it has nll); "
                                               "set optimized_metric to one of them")


def test_optuna_example_finds_a_best_trial(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the search extra (pip install -e '.[search]')")
    env = {**os.environ, "LESS_OUTPUT_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "less_exp.train", "+hparams_search=tiny_perplexity", "model=tiny_llama", "logger=none",
           "policy=sink", "policy.recent=8", "feature_map.hidden=32", "training.seq_len=64", "training.num_sequences=4",
           "training.epochs=1", "task=perplexity", "task.seq_len=64", "task.max_windows=1",
           "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (found,) = (tmp_path / "multirun" / "train").glob("*/optimization_results.yaml")
    best = yaml.safe_load(found.read_text())
    assert set(best["best_params"]) == {"feature_map.features", "training.lr"}
    assert math.isfinite(best["best_value"]) and best["best_value"] > 1
