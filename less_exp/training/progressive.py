"""Progressive LESS training, the QAT-like mode (DESIGN.md §4; ``training=progressive``).

The layers are trained in order, ``training.window`` at a time (a *stage*). While a stage trains,
the layers before it run their already trained states, frozen; the stage's states learn from the
model's output, the KL divergence from the full-cache teacher's next-token distribution
(:mod:`less_exp.training.teacher`), plus, with ``training.mse_weight > 0``, that weight times the
stage's layers' mean squared error to the teacher's attention outputs. Each stage so learns to
correct what the compressed layers before it changed. The layers after the stage run, per
``training.after``:

- ``init``: their starting state: the ``training.init_from`` checkpoint's (typically a layer-wise
  one) or, without it, the untrained state, which acts as the plain policy;
- ``plain``: the plain policy, their states set aside.

A stage's layers are written to the checkpoint when it ends (best epoch by validation KL); a killed
job resumes from the first unfinished stage, at its last saved epoch or step.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from less_exp import checkpoints
from less_exp.adapter import attention_modules
from less_exp.models import DTYPES
from less_exp.tracking import Tracker
from less_exp.training import output, record

REPORT = output.REPORT
summary_line = output.summary_line


def validate(cfg: DictConfig) -> None:
    output.validate(cfg)


def stages(num_layers: int, window: int) -> list[list[int]]:
    return [list(range(first, min(first + window, num_layers))) for first in range(0, num_layers, window)]


def run(cfg: DictConfig, model: torch.nn.Module, tokenizer, tracker: Tracker, out_dir: Path) -> dict:
    """Train every unfinished stage into the checkpoint folder; returns the job's metrics."""
    t = cfg.training
    num_layers = len(attention_modules(model))
    states, head, root = output.open_job(cfg, model, out_dir, window=int(t.window), after=t.after)
    done = checkpoints.done_layers(root)
    plan = stages(num_layers, int(t.window))
    todo = [stage for stage in plan if not all(layer in done for layer in stage)]
    print(f"less-train: progressive, {len(plan)} stages of up to {t.window} layers into {root}: {len(todo)} to train")
    plain = None
    if todo:
        sets = output.prepare(cfg, model, tokenizer, states)
        comp = output.attach(cfg, model, states)
        plain = output.plain_baseline(model, comp, sets, t.batch_size)
        with tqdm(total=len(plan), initial=len(plan) - len(todo), desc="stages", unit="stage") as bar:
            for stage in plan:
                if stage not in todo:
                    for layer in stage:
                        checkpoints.load_layer(root, layer, states[layer])
                    continue
                comp.plain_layers = frozenset(range(stage[-1] + 1, num_layers)) if t.after == "plain" else frozenset()
                metrics = _train_stage(cfg, model, comp, sets, states, stage, root, head, tracker)
                for layer in stage:
                    checkpoints.save_layer(root, layer, states[layer].state_dict(), metrics, head)
                checkpoints.progress_file(root, _name(stage)).unlink(missing_ok=True)
                bar.update(1)
                bar.set_postfix(layers=f"{stage[0]}-{stage[-1]}", val_kl=f"{metrics['val_kl']:.4g}")
        comp.plain_layers = frozenset()
    trained = [layer for stage in todo for layer in stage]
    return output.summarize(root, trained, tracker, plain, states.num_parameters())


def _name(stage: list[int]) -> str:
    return f"stage_{stage[0]:03d}"


def _train_stage(cfg, model, comp, sets, states, stage, root, head, tracker) -> dict:
    t = cfg.training
    label = f"layers {stage[0]}-{stage[-1]}" if len(stage) > 1 else f"layer {stage[0]}"
    hooks, mse = [], None
    record_dir = Path(t.record_dir) / "stage_outputs"
    if float(t.get("mse_weight", 0.0)) > 0:
        hooks, mse = _stage_mse(cfg, model, sets, stage, record_dir)
    try:
        fit = output.OutputFit(cfg, model, comp, sets, [states[layer] for layer in stage], root, head, tracker,
                               _name(stage), stage[0], label, mse=mse)
        metrics = fit()
    finally:
        for hook in hooks:
            hook.remove()
    if hooks and not t.keep_records:
        for layer in stage:
            shutil.rmtree(record.layer_dir(record_dir, layer), ignore_errors=True)
    return {**metrics, "stage_first": stage[0], "stage_last": stage[-1]}


def _stage_mse(cfg, model, sets, stage, record_dir):
    """Hooks that keep the stage's layers' attention outputs during a step, and the weighted mean squared
    error of those to the teacher's (recorded for the stage's layers once, with the full-cache model)."""
    t = cfg.training
    fingerprint = record.windows_fingerprint(cfg.model.name, sets.windows, dtype=t.record_dtype)
    record.record_layers(model, sets.windows, stage, record_dir, DTYPES[t.record_dtype], fingerprint, t.record_batch_size)
    modules = attention_modules(model)
    seen: dict[int, torch.Tensor] = {}

    def keep(layer):
        def hook(module, args, out):
            seen[layer] = out
        return hook

    hooks = [modules[layer].o_proj.register_forward_hook(keep(layer)) for layer in stage]
    weight = float(t.mse_weight)

    def mse(idx: list[int]) -> torch.Tensor:
        total = 0.0
        for layer in stage:
            target = torch.stack([torch.load(record.sequence_file(record_dir, layer, i), weights_only=True)["o"]
                                  for i in idx]).to(seen[layer].device, torch.float32)
            total = total + (seen[layer].float() - target).pow(2).mean()
        return weight * total / len(stage)

    return hooks, mse
