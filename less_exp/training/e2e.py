"""End-to-end LESS training (DESIGN.md §4; ``training=e2e``): every layer's state parameters jointly on
the model's output, the KL divergence from the full-cache teacher's next-token distribution.

Backpropagating through every layer keeps every layer's activations, attention logits included;
``training.gradient_checkpointing`` (on by default) runs the frozen decoder layers under
transformers' activation checkpointing instead, so only each layer's input is kept and the layer is
recomputed in the backward pass (the recompute replays the same dropout draws, so the gradients are
the same). The job can start from any checkpoint of the same set-up (``training.init_from``) and
resumes after a kill from its last saved epoch or ``training.save_every`` step.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig

from less_exp import checkpoints
from less_exp.adapter import attention_modules
from less_exp.tracking import Tracker
from less_exp.training import output

REPORT = output.REPORT
PROGRESS = "e2e"
summary_line = output.summary_line


def validate(cfg: DictConfig) -> None:
    output.validate(cfg)


@contextmanager
def checkpointed(model: torch.nn.Module, enabled: bool = True):
    """Run the decoder layers under activation checkpointing (non-reentrant) for the duration.

    transformers checkpoints a layer only in training mode, so the model is put in training mode with
    every dropout module left in evaluation mode: the base model stays deterministic and frozen.
    """
    if not enabled:
        yield
        return
    was_training = model.training
    model.activation_checkpointing_enable()
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    try:
        yield
    finally:
        model.activation_checkpointing_disable()
        model.train(was_training)


def run(cfg: DictConfig, model: torch.nn.Module, tokenizer, tracker: Tracker, out_dir: Path) -> dict:
    """Train all layers' states jointly into the checkpoint folder; returns the job's metrics."""
    t = cfg.training
    num_layers = len(attention_modules(model))
    states, head, root = output.open_job(cfg, model, out_dir)
    todo = len(checkpoints.done_layers(root)) < num_layers
    print(f"less-train: e2e, {num_layers} layers into {root}: " + ("training" if todo else "already done"))
    plain = None
    if todo:
        sets = output.prepare(cfg, model, tokenizer, states)
        comp = output.attach(cfg, model, states)
        plain = output.plain_baseline(model, comp, sets, t.batch_size)
        with checkpointed(model, t.gradient_checkpointing):
            fit = output.OutputFit(cfg, model, comp, sets, list(states), root, head, tracker, PROGRESS, 0, "e2e")
            metrics = fit()
        for layer in range(num_layers):
            checkpoints.save_layer(root, layer, states[layer].state_dict(), {**metrics, "stage_first": 0}, head)
        checkpoints.progress_file(root, PROGRESS).unlink(missing_ok=True)
    return output.summarize(root, list(range(num_layers)) if todo else [], tracker, plain, states.num_parameters())
