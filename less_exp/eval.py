"""``less-eval``: evaluate a model, optionally compressed, on one task (``conf/eval.yaml``).

The Hydra entry point is thin; :func:`evaluate` does the work and can be called with a config
composed by hand (tests, notebooks).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, open_dict

from less_exp import checkpoints, commandline, factory, paths, presets, runtime, schema, search, tasks
from less_exp.errors import NonFiniteError
from less_exp.guards import FiniteGuard
from less_exp.models import load_model

JOB = "eval"


def evaluate(cfg: DictConfig, extra: dict | None = None, model_and_tokenizer=None) -> dict:
    """Validate, load the model, apply compression, run ``cfg.task``; write and return its metrics.

    ``extra`` metrics are recorded beside the task's (a train job adds its training time);
    ``model_and_tokenizer`` reuses an already loaded, unmodified model.
    """
    schema.check(cfg)
    task = tasks.get(cfg.task.get("module") or cfg.task.name)
    runtime.validate(cfg)
    cfg = with_checkpoint_policy(cfg)
    factory.validate(cfg)
    if cfg.get("checkpoint"):
        checkpoints.check(cfg)
    task.validate(cfg)
    runtime.seed_everything(cfg.seed)
    device = runtime.resolve_device(cfg.device)
    with runtime.Job(cfg, JOB) as job:
        model, tokenizer = model_and_tokenizer or load_model(cfg.model, device, cache_dir=cfg.paths.cache_dir)
        model = factory.apply(model, cfg)
        batch = cfg.task.get("batch_size")
        batch = (batch if isinstance(batch, int) else 1) * (2 if cfg.task.get("pad") else 1)
        factory.check_memory(model, "task.seq_len", cfg.task.get("seq_len"), batch)
        factory.check_decode_memory(model, cfg.task, int(cfg.model.max_length))
        try:
            with FiniteGuard(model):
                metrics = task.run(model, tokenizer, cfg, job.tracker)
        except NonFiniteError as err:
            job.fail(err)
            raise
        for key, value in {**factory.summary(model, cfg, metrics.get("budget_length")), **(extra or {})}.items():
            metrics.setdefault(key, value)
        results = job.finish(metrics)
    print(f"{cfg.task.name}: " + " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))
    print(f"results: {results}")
    return metrics


def with_checkpoint_policy(cfg: DictConfig) -> DictConfig:
    """``cfg`` with the checkpoint's policy and budget when it sets a checkpoint and no policy (eval.yaml's
    ``full`` untouched, which no state is trained for), saying so in one line; otherwise ``cfg`` itself."""
    if not cfg.get("checkpoint") or not presets.is_default_policy(cfg.policy):
        return cfg
    policy = presets.checkpoint_policy(checkpoints.read_manifest(cfg.checkpoint), cfg.checkpoint)
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.policy = policy
    print(f"policy: {presets.describe_policy(policy)} from checkpoint={cfg.checkpoint}'s manifest "
          "(set policy= to evaluate another)", flush=True)
    return cfg


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


@hydra.main(config_path=paths.conf_dir(), config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Command line: ``less-eval [overrides]``, ``-m`` to sweep; returns ``optimized_metric`` for a search."""
    return search.objective(cfg, runtime.run_cli("less-eval", evaluate, cfg))


def cli() -> None:
    """The ``less-eval`` console script."""
    commandline.evaluate()


if __name__ == "__main__":
    cli()
