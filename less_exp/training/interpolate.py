"""Interpolated states (``training=interpolate``): every state parameter ``(1 - alpha) * A + alpha * B`` of
two checkpoints of one set-up, ``A = training.init_from`` and ``B = training.toward``; nothing is trained.

A fine-tuning stage buys one thing at the price of another (sink's decisive stage: better greedy
summaries for a worse perplexity on news text). When B was trained from A, the states between them
usually trade the two smoothly, as weight-space interpolation does between a model and its fine-tuned
successor (WiSE-FT), so a sweep over ``alpha`` finds a mix that keeps enough of each at the cost of
evaluations alone. The result is an ordinary checkpoint whose manifest records both ends and ``alpha``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from less_exp import checkpoints
from less_exp.errors import ConfigError
from less_exp.factory import instantiate_component, make_states
from less_exp.report_spec import ReportSpec
from less_exp.tracking import Tracker

REPORT = ReportSpec(columns=("layers_done", "num_layers", "alpha"), label_key="alpha", own_data=False)  # trains on nothing
ENDS = ("init_from", "toward")


def mix(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 - alpha) * a + alpha * b`` in float64, returned in ``a``'s dtype: exactly ``a`` at 0 and ``b`` at 1."""
    return torch.lerp(a.double(), b.double(), alpha).to(a.dtype)


def mix_layer(a: dict, b: dict, alpha: float, fixed: set[str]) -> dict:
    """One layer's state dict between ``a`` and ``b``. The ``fixed`` tensors (buffers such as Performer's
    random features) and non-floating ones are not trained and must be equal at both ends: a mix of two
    different random projections is neither."""
    mixed = {}
    for name, value in a.items():
        if name in fixed or not value.is_floating_point():
            if not torch.equal(value, b[name]):
                raise ValueError(f"its fixed tensor {name} differs between the two ends")
            mixed[name] = value
        else:
            mixed[name] = mix(value, b[name], alpha)
    return mixed


def validate(cfg: DictConfig) -> None:
    """Both ends set, readable and of one set-up, and ``alpha`` in [0, 1], before the model loads."""
    t = cfg.training
    for key in ENDS:
        path = t.get(key)
        if not path:
            raise ConfigError(f"training.{key} is not set: training=interpolate mixes the states of training.init_from "
                              "(alpha 0) and training.toward (alpha 1); set both to checkpoint folders of this set-up")
        if not (Path(path) / checkpoints.MANIFEST).is_file():
            raise ConfigError(f"training.{key}={path}: no {checkpoints.MANIFEST} there; point it at a checkpoint "
                              "folder written by less-train")
    start, end = checkpoints.read_manifest(t.init_from), checkpoints.read_manifest(t.toward)
    differs = checkpoints.setup_mismatch(end, start)
    if differs:
        raise ConfigError(f"training.toward={t.toward} holds states trained with {differs[0]}, but training.init_from="
                          f"{t.init_from} holds {differs[1]}; interpolate between checkpoints of one set-up")


def identity(cfg: DictConfig, toward: dict) -> dict:
    """The fingerprint's ``training``: both ends (absolute), ``alpha``, and the data the far end (its
    manifest ``toward``) was trained on."""
    return {"mode": "interpolate", "data": toward["training"].get("data"), "init_from": str(Path(cfg.training.init_from).resolve()),
            "toward": str(Path(cfg.training.toward).resolve()), "alpha": float(cfg.training.alpha)}


def run(cfg: DictConfig, model: torch.nn.Module, tokenizer, tracker: Tracker, out_dir: Path) -> dict:
    """Write the interpolated states into the checkpoint folder; returns the job's metrics."""
    t, alpha = cfg.training, float(cfg.training.alpha)
    budget = instantiate_component(cfg.policy).budget(length=t.seq_len, max_positions=model.config.max_position_embeddings)
    start, end = make_states(cfg, model), make_states(cfg, model)
    head = checkpoints.header(cfg, model, start, budget)
    manifests = [checkpoints.check_start(t[key], head, f"training.{key}") for key in ENDS]
    head["training"] = identity(cfg, manifests[1])
    for key, states, manifest in zip(ENDS, (start, end), manifests):
        checkpoints.load_into(states, t[key], manifest, model=model)
    root = Path(cfg.checkpoint) if cfg.get("checkpoint") else Path(out_dir) / "checkpoint"
    checkpoints.open_for_training(root, head)
    for layer in range(len(start)):
        fixed = {name for name, _ in start[layer].named_buffers()}
        try:
            mixed = mix_layer(start[layer].state_dict(), end[layer].state_dict(), alpha, fixed)
        except ValueError as err:
            raise ConfigError(f"layer {layer}: {err} (training.init_from={t.init_from}, training.toward={t.toward}); "
                              "interpolate between checkpoints that share their fixed features") from err
        checkpoints.save_layer(root, layer, mixed, {"alpha": alpha}, head)
    manifest = checkpoints.read_manifest(root)
    print(f"less-train: {len(start)} layers of {1 - alpha:g} x {t.init_from} + {alpha:g} x {t.toward} into {root}")
    return {"checkpoint": str(root), "complete": manifest["complete"], "layers_done": len(manifest["layers_done"]),
            "num_layers": manifest["model"]["num_layers"], "alpha": alpha,
            "state_token_equivalents": manifest["state_token_equivalents"], "state_parameters": start.num_parameters()}


def summary_line(metrics: dict) -> str:
    return f"layers done {metrics['layers_done']}/{metrics['num_layers']} at alpha {metrics['alpha']:g}"
