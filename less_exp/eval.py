"""``less-eval``: evaluate a model, optionally compressed, on one task (``conf/eval.yaml``).

The Hydra entry point is thin; :func:`evaluate` does the work and can be called with a config
composed by hand (tests, notebooks).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from less_exp import checkpoints, factory, paths, runtime, tasks
from less_exp.models import load_model

JOB = "eval"


def evaluate(cfg: DictConfig) -> dict:
    """Validate, load the model, apply compression, run ``cfg.task``; write and return its metrics."""
    task = tasks.get(cfg.task.get("module") or cfg.task.name)
    runtime.validate(cfg)
    factory.validate(cfg)
    if cfg.get("checkpoint"):
        checkpoints.check(cfg)
    task.validate(cfg)
    runtime.seed_everything(cfg.seed)
    device = runtime.resolve_device(cfg.device)
    with runtime.Job(cfg, JOB) as job:
        model, tokenizer = load_model(cfg.model, device, cache_dir=cfg.paths.cache_dir)
        model = factory.apply(model, cfg)
        metrics = task.run(model, tokenizer, cfg, job.tracker)
        for key, value in factory.summary(model, cfg, metrics.get("budget_length")).items():
            metrics.setdefault(key, value)
        results = job.finish(metrics)
    print(f"{cfg.task.name}: " + " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))
    print(f"results: {results}")
    return metrics


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


@hydra.main(config_path=paths.conf_dir(), config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Command line: ``less-eval [overrides]``, ``-m`` to sweep."""
    evaluate(cfg)


if __name__ == "__main__":
    main()
