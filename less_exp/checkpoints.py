"""Checkpoints of trained LESS state parameters: one safetensors file per layer plus ``manifest.json``.

A folder holds ``layer_NNN.safetensors`` (only that layer's ``LessState.state_dict()``, its metrics
in the file's metadata) and ``manifest.json``: what the states were trained for (base model, policy
and budget, feature map and normaliser configs and settings, state size) and, rebuilt from the layer
files after every layer, which layers are done with their metrics. Jobs that train different layer
ranges write into the same folder; the manifest is rewritten under a lock from the layer files, so
it never loses a layer. ``progress/`` holds a layer's per-epoch training progress until it is done.
Every file is written to a temporary name and renamed, so a kill never leaves a corrupt one.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from less_exp.adapter import attention_modules
from less_exp.errors import ConfigError

MANIFEST = "manifest.json"
FORMAT = "less-exp/states-v1"
MATCHED = ("model", "policy", "feature_map", "normalizer")


# ------------------------------------------------------------------------------ files
def layer_file(root: Path, layer: int) -> Path:
    return Path(root) / f"layer_{layer:03d}.safetensors"


def progress_file(root: Path, layer: int) -> Path:
    return Path(root) / "progress" / f"layer_{layer:03d}.pt"


def _atomic(path: Path, write) -> None:
    """``write(tmp)`` then rename, with the umask's permissions (safetensors creates files 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


@contextmanager
def _locked(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------ identity
def header(cfg: DictConfig, model: torch.nn.Module, states, budget) -> dict:
    """What a checkpoint must match: model, policy (with its budget), feature map, normaliser."""
    config = model.config
    policy = OmegaConf.to_container(cfg.policy, resolve=True)
    policy.pop("baseline_plus", None)
    return {
        "format": FORMAT,
        "model": {
            "name": cfg.model.name,
            "source": cfg.model.source,
            "id": cfg.model.get("hub_id") or cfg.model.get("cache_name") or cfg.model.name,
            "model_type": config.model_type,
            "num_layers": len(attention_modules(model)),
            "num_heads": config.num_attention_heads,
            "num_kv_heads": config.num_key_value_heads,
            "head_dim": states[0].head_dim,
        },
        "policy": policy,
        "budget": {"sink": budget.sink, "heavy": budget.heavy, "recent": budget.recent},
        "feature_map": OmegaConf.to_container(cfg.feature_map, resolve=True),
        "normalizer": OmegaConf.to_container(cfg.normalizer, resolve=True),
        "settings": states[0].settings(),
        "state_token_equivalents": states.token_equivalents(),
    }


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ConfigError(f"checkpoint={root}: no {MANIFEST} there; point checkpoint at a folder written by less-train")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"checkpoint={root}: {MANIFEST} is not valid JSON ({err})") from err
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"checkpoint={root}: {MANIFEST} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def open_for_training(root: Path, head: dict) -> None:
    """Create the folder's manifest, or check that an existing one was written for the same set-up."""
    root = Path(root)
    with _locked(root):
        if (root / MANIFEST).is_file():
            found = read_manifest(root)
            for key in (*MATCHED, "budget"):
                if _comparable(found.get(key), key) != _comparable(head[key], key):
                    raise ConfigError(
                        f"checkpoint={root} holds states trained with {key}={_show(found.get(key))}, but this job "
                        f"has {key}={_show(head[key])}; use another checkpoint folder or the same {key}"
                    )
        _write_manifest(root, head)


def _comparable(value, key: str):
    """Settings that do not change the trained parameters (dropout, the key scale's init) are ignored."""
    if key == "feature_map" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in ("dropout", "key_scale_init")}
    return value


def _show(value) -> str:
    if isinstance(value, dict) and "name" in value:
        rest = {k: v for k, v in value.items() if k not in ("name", "_target_")}
        return f"{value['name']} {json.dumps(rest, sort_keys=True)}"
    return json.dumps(value, sort_keys=True)


def _write_manifest(root: Path, head: dict | None = None) -> dict:
    """Rewrite the manifest from ``head`` (or the current one) and the layer files present. Call under the lock."""
    manifest = dict(head) if head is not None else read_manifest(root)
    layers = {}
    for path in sorted(root.glob("layer_*.safetensors")):
        with safe_open(str(path), "pt") as fh:
            layers[str(int(path.stem.split("_")[1]))] = json.loads(fh.metadata()["metrics"])
    manifest["layers"] = layers
    manifest["layers_done"] = sorted(int(k) for k in layers)
    manifest["complete"] = len(layers) == manifest["model"]["num_layers"]
    _atomic(root / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"))
    return manifest


# ------------------------------------------------------------------------------ layers
def save_layer(root: Path, layer: int, state_dict: dict, metrics: dict) -> dict:
    """Write one finished layer and refresh the manifest; returns the manifest."""
    root = Path(root)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    metadata = {"metrics": json.dumps(metrics), "layer": str(layer)}
    _atomic(layer_file(root, layer), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    with _locked(root):
        manifest = _write_manifest(root)
    progress_file(root, layer).unlink(missing_ok=True)
    return manifest


def done_layers(root: Path) -> set[int]:
    return {int(p.stem.split("_")[1]) for p in Path(root).glob("layer_*.safetensors")}


def save_progress(root: Path, layer: int, progress: dict) -> None:
    _atomic(progress_file(root, layer), lambda tmp: torch.save(progress, tmp))


def load_progress(root: Path, layer: int) -> dict | None:
    path = progress_file(root, layer)
    return torch.load(path, weights_only=False) if path.is_file() else None


# ------------------------------------------------------------------------------ evaluation
BUDGET_MATCH = ("trained", "any")
BUDGET_KEYS = ("sink", "heavy", "recent", "ratio_of")


def check(cfg: DictConfig) -> dict:
    """Cheap checks of ``cfg.checkpoint`` against the eval config, before the model loads."""
    root = cfg.checkpoint
    manifest = read_manifest(root)
    if cfg.policy.get("baseline_plus"):
        raise ConfigError(
            f"checkpoint={root} with policy.baseline_plus=true: Baseline+ evaluates the plain policy without a "
            "state; drop checkpoint= for Baseline+"
        )
    trained = manifest["model"]["name"]
    if trained != cfg.model.name:
        raise ConfigError(f"checkpoint={root} was trained for model={trained}, but this run uses model={cfg.model.name}")
    policy = OmegaConf.to_container(cfg.policy, resolve=True)
    policy.pop("baseline_plus", None)
    trained_policy = dict(manifest["policy"])
    match = cfg.get("checkpoint_budget", "trained")
    if match not in BUDGET_MATCH:
        raise ConfigError(f"checkpoint_budget={match!r} is not one of {BUDGET_MATCH}")
    if match == "any":
        for key in BUDGET_KEYS:
            policy.pop(key, None)
            trained_policy.pop(key, None)
    if policy != trained_policy:
        raise ConfigError(
            f"checkpoint={root} was trained with policy={_show(manifest['policy'])}, but this run uses "
            f"policy={_show(OmegaConf.to_container(cfg.policy, resolve=True))}; the state only learned what that policy "
            "evicts" + ("" if match == "any" else " (checkpoint_budget=any accepts the same policy at another budget)")
        )
    own = cfg.feature_map.get("name", "none")
    if own not in ("none", manifest["feature_map"]["name"]):
        raise ConfigError(
            f"checkpoint={root} holds feature_map={manifest['feature_map']['name']}, but this run sets feature_map={own}; "
            "leave feature_map unset to take the checkpoint's"
        )
    return manifest


def state_nodes(cfg: DictConfig, manifest: dict) -> tuple[DictConfig, DictConfig]:
    """The feature map to build (the run's when it names one, else the checkpoint's) and the checkpoint's normaliser."""
    feature_map = cfg.feature_map if cfg.feature_map.get("name", "none") != "none" else OmegaConf.create(manifest["feature_map"])
    return feature_map, OmegaConf.create(manifest["normalizer"])


def load_into(states, root: str | Path, manifest: dict | None = None) -> None:
    """Load every layer of the checkpoint at ``root`` into ``states``; any mismatch is a ConfigError."""
    root = Path(root)
    manifest = manifest or read_manifest(root)
    expected = manifest["model"]["num_layers"]
    if len(states) != expected:
        raise ConfigError(f"checkpoint={root} has states for {expected} layers, but the model has {len(states)}")
    if states[0].head_dim != manifest["model"]["head_dim"]:
        raise ConfigError(
            f"checkpoint={root} was trained for head_dim={manifest['model']['head_dim']}, the model has {states[0].head_dim}"
        )
    settings = states[0].settings()
    if settings != manifest["settings"]:
        raise ConfigError(f"checkpoint={root} holds states with settings {manifest['settings']}, this run builds {settings}")
    missing = [layer for layer in range(expected) if not layer_file(root, layer).is_file()]
    if missing:
        raise ConfigError(
            f"checkpoint={root} lacks layers {missing}; train them into the same folder "
            f"(less-train checkpoint={root} training.from_layer={missing[0]} ...)"
        )
    for layer, state in enumerate(states):
        path = layer_file(root, layer)
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise ConfigError(f"checkpoint={root}: {path.name} is unreadable ({err})") from err
        own = state.state_dict()
        if set(tensors) != set(own) or any(tensors[k].shape != own[k].shape for k in own):
            raise ConfigError(
                f"checkpoint={root}: {path.name} holds {sorted((k, tuple(v.shape)) for k, v in tensors.items())}, "
                f"this run's state needs {sorted((k, tuple(v.shape)) for k, v in own.items())}"
            )
        state.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})
