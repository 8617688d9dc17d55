"""The tiny layer-wise training set-up shared by the training and checkpoint tests."""

from __future__ import annotations

from pathlib import Path

import torch

from less_exp import paths, train as train_job

# key_scale_init=1 lets the tiny random model's state matter from the first step (at 1e-4 it starts as
# the plain policy, as in the paper, and needs far more steps than a unit test takes).
TINY = [
    "model=tiny_llama", "logger=none", "policy=sink", "policy.recent=8",
    "feature_map.hidden=32", "feature_map.dropout=0", "feature_map.key_scale_init=1.0",
    "training.seq_len=64", "training.num_sequences=6", "training.epochs=4", "training.lr=3e-2",
]
EVAL = ["model=tiny_llama", "logger=none", "policy=sink", "policy.recent=8", "task.seq_len=64", "task.max_windows=2"]


def train_checkpoint(out: Path, *overrides: str) -> Path:
    """Train the tiny set-up into ``out`` (one thread) and return its checkpoint folder."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=paths.conf_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={out}", *TINY, *overrides])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_job.train(cfg)
    finally:
        torch.set_num_threads(threads)
    return Path(out) / "checkpoint"


def watch_output_training(monkeypatch, measure) -> dict:
    """Record, for every output-level training job that runs next, its prepared data (``seen["sets"]``)
    and ``measure(model, sets)`` before and after its fit (``seen["before"]``, ``seen["after"]``)."""
    from less_exp.training import output

    seen: dict = {}
    prepare, fit = output.prepare, output.OutputFit.__call__

    def spy(cfg, model, tokenizer, states=None):
        sets = prepare(cfg, model, tokenizer, states)
        seen.setdefault("sets", []).append(sets)
        return sets

    def measured(self):
        seen.setdefault("before", []).append(measure(self.model, self.sets))
        metrics = fit(self)
        seen.setdefault("after", []).append(measure(self.model, self.sets))
        return metrics

    monkeypatch.setattr(output, "prepare", spy)
    monkeypatch.setattr(output.OutputFit, "__call__", measured)
    return seen


def against_distillation(compose_config, tmp_path: Path, monkeypatch, measure, common: list[str], change: str):
    """Train ``common`` twice on the same answer windows, as it is and with ``change``; returns what
    :func:`watch_output_training` saw and the changed run's metrics."""
    seen = watch_output_training(monkeypatch, measure)
    records = f"training.record_dir={tmp_path / 'r'}"
    train_job.train(compose_config("train", [*common, f"checkpoint={tmp_path / 'kl'}", records]))
    metrics = train_job.train(compose_config("train", [*common, change, f"checkpoint={tmp_path / 'changed'}", records]))
    return seen, metrics
