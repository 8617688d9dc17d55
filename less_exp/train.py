"""``less-train``: fit the LESS state parameters of a frozen model (``conf/train.yaml``).

The Hydra entry point is thin; :func:`train` does the work and can be called with a config composed
by hand. ``training.mode`` picks the mode (:mod:`less_exp.training`); the trained states go to
``checkpoint`` (default ``<job folder>/checkpoint``), which ``less-eval checkpoint=...`` loads.
"""

from __future__ import annotations

import time

import hydra
from omegaconf import DictConfig, open_dict

from less_exp import commandline, factory, paths, runtime, schema, search, tasks, training
from less_exp.errors import NonFiniteError
from less_exp.eval import evaluate
from less_exp.models import load_model

JOB = "train"


def train(cfg: DictConfig) -> dict:
    """Validate, load the frozen model, run the training mode; write and return its metrics.

    With ``task=`` the trained states are then evaluated on it in the same job (:func:`evaluate_trained`).
    """
    schema.check(cfg)
    mode = training.get(cfg.training.mode)
    runtime.validate(cfg)
    factory.validate(cfg)
    mode.validate(cfg)
    task = tasks.get(cfg.task.get("module") or cfg.task.name) if cfg.get("task") else None
    if task is not None:
        task.validate(cfg)
    runtime.seed_everything(cfg.seed)
    device = runtime.resolve_device(cfg.device)
    with runtime.Job(cfg, JOB) as job:
        model, tokenizer = load_model(cfg.model, device, cache_dir=cfg.paths.cache_dir)
        try:
            metrics = mode.run(cfg, model, tokenizer, job.tracker, job.out_dir)
        except NonFiniteError as err:
            job.fail(err)
            raise
        metrics["train_wall_s"] = round(time.perf_counter() - job.started, 1)
        results = job.finish(metrics)
    print(f"{cfg.training.mode}: {mode.summary_line(metrics)}")
    print(f"checkpoint: {metrics['checkpoint']}")
    print(f"results: {results}")
    if task is not None:
        metrics["evaluation"] = evaluate_trained(cfg, metrics, (model, tokenizer), job.out_dir)
    return metrics


def evaluate_trained(cfg: DictConfig, metrics: dict, model_and_tokenizer, out_dir) -> dict:
    """Run ``cfg.task`` with the states just trained as an eval job in ``<job folder>/eval`` (its own
    ``results.json``, so ``less-report`` on a training sweep finds the evaluations beside the training)."""
    eval_cfg = cfg.copy()
    with open_dict(eval_cfg):
        eval_cfg.checkpoint = metrics["checkpoint"]
        eval_cfg.paths.output_dir = str(out_dir / "eval")
    trained = {key: metrics[key] for key in ("train_s", "train_wall_s", "state_parameters") if key in metrics}
    return evaluate(eval_cfg, extra=trained, model_and_tokenizer=model_and_tokenizer)


@hydra.main(config_path=paths.conf_dir(), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Command line: ``less-train [overrides]``, ``-m`` to sweep; returns ``optimized_metric`` for a search."""
    return search.objective(cfg, runtime.run_cli("less-train", train, cfg))


def cli() -> None:
    """The ``less-train`` console script."""
    commandline.train()


if __name__ == "__main__":
    cli()
