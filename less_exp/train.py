"""``less-train``: fit the LESS state parameters of a frozen model (``conf/train.yaml``).

The Hydra entry point is thin; :func:`train` does the work and can be called with a config composed
by hand. ``training.mode`` picks the mode (:mod:`less_exp.training`); the trained states go to
``checkpoint`` (default ``<job folder>/checkpoint``), which ``less-eval checkpoint=...`` loads.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from less_exp import factory, paths, runtime, training
from less_exp.errors import NonFiniteError
from less_exp.models import load_model

JOB = "train"


def train(cfg: DictConfig) -> dict:
    """Validate, load the frozen model, run the training mode; write and return its metrics."""
    mode = training.get(cfg.training.mode)
    runtime.validate(cfg)
    factory.validate(cfg)
    mode.validate(cfg)
    runtime.seed_everything(cfg.seed)
    device = runtime.resolve_device(cfg.device)
    with runtime.Job(cfg, JOB) as job:
        model, tokenizer = load_model(cfg.model, device, cache_dir=cfg.paths.cache_dir)
        try:
            metrics = mode.run(cfg, model, tokenizer, job.tracker, job.out_dir)
        except NonFiniteError as err:
            job.fail(err)
            raise
        results = job.finish(metrics)
    print(
        f"{cfg.training.mode}: layers done {metrics['layers_done']}/{metrics['num_layers']}, "
        f"mean val MSE {metrics['mean_val_mse']:.4g} (plain {metrics['mean_plain_mse']:.4g}, "
        f"Baseline+ {metrics['mean_baseline_plus_mse']:.4g})"
    )
    print(f"checkpoint: {metrics['checkpoint']}")
    print(f"results: {results}")
    return metrics


@hydra.main(config_path=paths.conf_dir(), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Command line: ``less-train [overrides]``, ``-m`` to sweep."""
    runtime.run_cli("less-train", train, cfg)


def cli() -> None:
    """The ``less-train`` console script."""
    runtime.cli("less-train", "train", main)


if __name__ == "__main__":
    cli()
