"""Checkpoints of trained LESS state parameters: one safetensors file per layer plus ``manifest.json``.

A folder holds ``layer_NNN.safetensors`` (only that layer's ``LessState.state_dict()``; its metrics
and its fingerprint in the file's metadata) and ``manifest.json``: what the states were trained for
and, rebuilt from the layer files after every layer, which layers are done with their metrics.

The fingerprint (:func:`header`) is a checkpoint's identity: the base model (preset, source, family,
layer and head counts, a hash of its config and of some of its weights), the policy and budget, the
feature map and normaliser configs and settings, and the training mode. Every layer file carries
it, so a folder is judged by its layer files even when the manifest is gone or was edited: training
refuses a folder whose files were trained for another set-up, evaluation refuses files that do not
match the manifest or the model they are loaded into. Non-finite parameters are never written nor
loaded.

A checkpoint is data, never code. Its manifest and every layer file's fingerprint may hold only the
known keys, plain JSON values and, for each state component, one ``_target_`` of :data:`ENGINE_CLASSES`;
anything else (a foreign ``_target_``, a nested Hydra key such as ``_partial_``) is refused when the
file is read, before anything is built. Each layer file carries a sha256 of its tensors
(:func:`tensors_digest`), verified whenever its tensors are loaded or it is counted as done.

Jobs that train different layer ranges write into the same folder; the manifest is rewritten under
a lock from the layer files, so it never loses a layer. ``progress/`` holds a layer's per-epoch
training progress (plain tensors, numbers and strings, read with ``weights_only=True``) until it is
done. Every file is written to a temporary name and renamed, so a kill never leaves a corrupt one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from less_exp import policies, state as components
from less_exp.adapter import attention_modules
from less_exp.errors import ConfigError, NonFiniteError

MANIFEST = "manifest.json"
FORMAT = "less-exp/states-v2"
FINGERPRINT = "fingerprint"
TENSORS_SHA256 = "tensors_sha256"
IDENTITY = ("format", "model", "policy", "budget", "feature_map", "normalizer", "reweighting", "gating", "settings",
            "training", "state_token_equivalents")
COMPONENTS = ("policy", "feature_map", "normalizer", "reweighting", "gating")
OPTIONAL_COMPONENTS = ("reweighting", "gating")  # recorded only when not none, as before they existed
MANIFEST_KEYS = (*IDENTITY, "layers", "layers_done", "complete")
HYDRA_KEY = re.compile(r"^_.*_$")  # _target_, _partial_, _args_, _recursive_, _convert_, ...
MODEL_DERIVED = ("model_type", "num_layers", "num_heads", "num_kv_heads", "head_dim", "config_hash", "weights_hash")
VOLATILE_CONFIG = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash", "use_cache",
                   "output_attentions", "output_hidden_states", "return_dict"}
HASH_CHUNK = 1 << 22


# ------------------------------------------------------------------------------ files
def layer_file(root: Path, layer: int) -> Path:
    return Path(root) / f"layer_{layer:03d}.safetensors"


def progress_file(root: Path, layer: int | str) -> Path:
    """A layer's training progress, or a named one (``"e2e"``, ``"stage_000"``) for modes that train several layers."""
    name = f"layer_{layer:03d}" if isinstance(layer, int) else layer
    return Path(root) / "progress" / f"{name}.pt"


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


_CLAIMS: dict[Path, int] = {}


def claim_layers(root: Path, layers) -> None:
    """Lock each layer this job trains into ``root`` (``.locks/layer_NNN``, fcntl) until :func:`release_claims`
    or the process ends: a job that would train a layer another less-train holds is refused in one line naming
    that process, while jobs over disjoint layer ranges share the folder (a SLURM array's layer ranges)."""
    taken = []
    for layer in layers:
        path = Path(root) / ".locks" / f"layer_{layer:03d}"
        if path in _CLAIMS:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            for fd_taken in [fd, *(_CLAIMS.pop(t) for t in taken)]:
                os.close(fd_taken)
            raise ConfigError(f"checkpoint={root} is being trained by another less-train (pid {holder}, layer {layer}); "
                              "wait for it or use another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _CLAIMS[path] = fd
        taken.append(path)


def release_claims() -> None:
    """Release every layer :func:`claim_layers` holds (the job that trained them has ended)."""
    while _CLAIMS:
        os.close(_CLAIMS.popitem()[1])


def _retrain(root: Path, path: Path) -> str:
    return f"retrain that layer: delete {path.name} and rerun less-train with checkpoint={root}"


# ------------------------------------------------------------------------------ data, never code
ENGINE_CLASSES = {
    "policy": (policies.Full, policies.H2O, policies.Sink, policies.TOVA, policies.Window),
    "feature_map": (components.DiJiang, components.Elu1, components.Hedgehog, components.LessMLP, components.Performer,
                    components.Relu, components.Taylor),
    "normalizer": (components.JointNormalizer, components.NormNormalizer),
    "reweighting": (components.CosFormer, components.LeaPformer),
    "gating": (components.Decay, components.ScalarGate, components.VectorGate),
}
"""The allow-list: the only classes a checkpoint's components may name, an explicit registry of the
engine's classes per group (``tests/test_checkpoint_trust.py`` checks that it covers every
``_target_`` of ``conf/<group>/*.yaml``). A class is named as the package exports it
(``less_exp.state.LessMLP``) or by its defining module (``less_exp.state.feature_maps.LessMLP``)."""


def _exported(cls: type) -> str:
    return f"{cls.__module__.rsplit('.', 1)[0]}.{cls.__name__}"


def allowed(group: str) -> dict[str, type]:
    """``_target_`` -> class for the engine classes of component ``group``."""
    return {name: cls for cls in ENGINE_CLASSES[group] for name in (_exported(cls), f"{cls.__module__}.{cls.__qualname__}")}


def engine_class(group: str, spec: dict) -> type:
    """The allow-listed class a checkpoint component names; anything else is a ConfigError."""
    cls = allowed(group).get(spec.get("_target_"))
    if cls is None:
        raise ConfigError(f"{group}._target_={spec.get('_target_')!r} is not an engine {group} class (a checkpoint may "
                          f"name only {', '.join(sorted(map(_exported, ENGINE_CLASSES[group])))})")
    return cls


def _not_data(value, where: str) -> str | None:
    """Where ``value`` stops being plain data: a Hydra key (``_target_``, ``_partial_``, ...) at any depth, or a
    value that is not a JSON scalar, list or dict; None when it is plain data."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or HYDRA_KEY.match(key):
                return f"{where}.{key}"
            found = _not_data(item, f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(value, list):
        return next((found for i, item in enumerate(value) if (found := _not_data(item, f"{where}[{i}]"))), None)
    return None if value is None or isinstance(value, (str, int, float, bool)) else where


def _require_data(root: Path, data, source: str, known: tuple, fix: str) -> None:
    """Refuse ``data`` (a manifest or a layer file's fingerprint, read by ``source``) unless it holds only ``known``
    keys, plain data, and components that name allow-listed engine classes: before anything is built from it."""
    if not isinstance(data, dict):
        raise ConfigError(f"checkpoint={root}: {source} is not a JSON object; {fix}")
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"checkpoint={root}: {source} has unknown key {unknown[0]!r} (known: {', '.join(known)}); {fix}")
    for key, value in data.items():
        if key in COMPONENTS:
            if not isinstance(value, dict):
                raise ConfigError(f"checkpoint={root}: {source} {key} is not a component (a JSON object); {fix}")
            if "_target_" in value or value.get("name") != "none":
                try:
                    engine_class(key, value)
                except ConfigError as err:
                    raise ConfigError(f"checkpoint={root}: {source} {err}; {fix}") from None
            value = {k: v for k, v in value.items() if k != "_target_"}
        found = _not_data(value, key)
        if found:
            raise ConfigError(f"checkpoint={root}: {source} holds {found}, which is not plain data (Hydra keys such as "
                              f"_target_ or _partial_ are allowed nowhere but a component's own _target_); {fix}")


def _rebuild(root: Path) -> str:
    return f"delete {MANIFEST} and rerun less-train with checkpoint={root} to rebuild it from the layer files"


# ------------------------------------------------------------------------------ identity
def config_hash(config) -> str:
    """Short sha256 of ``config.to_dict()`` without what varies between loads of one model (dtype, paths, versions)."""

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items()
                    if k not in VOLATILE_CONFIG and not str(k).startswith("_attn_implementation")}
        return value

    blob = json.dumps(strip(config.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def weights_hash(model: torch.nn.Module) -> str:
    """Short sha256 of the input embeddings and the first and last attention layers' parameters, in float32.

    The same weights give the same hash on any device and in any dtype they convert to float32 from exactly.
    """
    modules = attention_modules(model)
    named = []
    embeddings = model.get_input_embeddings()
    if embeddings is not None:
        named.append(("embed", embeddings.weight))
    for index in sorted({0, len(modules) - 1}):
        named += [(f"attn{index}.{n}", p) for n, p in sorted(modules[index].named_parameters())]
    digest = hashlib.sha256()
    for name, tensor in named:
        digest.update(f"{name}{tuple(tensor.shape)};".encode())
        flat = tensor.detach().reshape(-1)
        for start in range(0, flat.numel(), HASH_CHUNK):
            digest.update(flat[start : start + HASH_CHUNK].to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()[:16]


def model_identity(model: torch.nn.Module) -> dict:
    """What a checkpoint records of the model object itself (the preset's name and source come from the config)."""
    config = model.config
    modules = attention_modules(model)
    return {
        "model_type": config.model_type,
        "num_layers": len(modules),
        "num_heads": config.num_attention_heads,
        "num_kv_heads": config.num_key_value_heads,
        "head_dim": modules[0].head_dim,
        "config_hash": config_hash(config),
        "weights_hash": weights_hash(model),
    }


def _model_id(model_cfg: DictConfig) -> str:
    return model_cfg.get("hub_id") or model_cfg.get("cache_name") or model_cfg.name


def header(cfg: DictConfig, model: torch.nn.Module, states, budget, training: dict | None = None) -> dict:
    """The fingerprint of a training job: model identity, policy and budget, feature map, normaliser, and
    ``training`` (the mode and what else decides the parameters, such as the checkpoint it started from)."""
    policy = OmegaConf.to_container(cfg.policy, resolve=True)
    policy.pop("baseline_plus", None)
    policy.pop("prefill", None)  # a state trained stepwise serves a one-shot prefill as well
    head = {
        "format": FORMAT,
        "model": {"name": cfg.model.name, "source": cfg.model.source, "id": _model_id(cfg.model), **model_identity(model)},
        "policy": policy,
        "budget": {"sink": budget.sink, "heavy": budget.heavy, "recent": budget.recent},
        "feature_map": OmegaConf.to_container(cfg.feature_map, resolve=True),
        "normalizer": OmegaConf.to_container(cfg.normalizer, resolve=True),
        "settings": states[0].settings(),
        "training": training or {"mode": cfg.training.mode, "data": str(cfg.data.name)},
        "state_token_equivalents": states.token_equivalents(),
    }
    for group in OPTIONAL_COMPONENTS:
        if cfg[group].get("name", "none") != "none":
            head[group] = OmegaConf.to_container(cfg[group], resolve=True)
    return head


def fingerprint(head: dict) -> dict:
    """The identity part of a header or manifest (no layers, no metrics)."""
    return {key: head[key] for key in IDENTITY if key in head}


def _comparable(value, key: str):
    """Settings that do not change the trained parameters (dropout, the key scale's init, the chunk size) are ignored."""
    if key == "feature_map" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in ("dropout", "key_scale_init")}
    if key == "gating" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "chunk_size"}
    return value


def _show(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "name" in value:
        rest = {k: v for k, v in value.items() if k not in ("name", "_target_")}
        return f"{value['name']} {json.dumps(rest, sort_keys=True)}"
    return json.dumps(value, sort_keys=True)


def _mismatch(found: dict, own: dict, keys=IDENTITY) -> tuple[str, str] | None:
    """The first key of ``keys`` on which two fingerprints differ, as ``("key=found", "key=own")``, or None.

    A component (policy, feature map, normaliser) of another name shows whole; otherwise a dict shows
    each sub-key that differs (``model.config_hash=...``).
    """
    for key in keys:
        a, b = _comparable(found.get(key), key), _comparable(own.get(key), key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict) and not (key in COMPONENTS and a.get("name") != b.get("name")):
            subs = [k for k in sorted(set(a) | set(b), key=str) if a.get(k) != b.get(k)]
            return (", ".join(f"{key}.{k}={_show(a.get(k))}" for k in subs),
                    ", ".join(f"{key}.{k}={_show(b.get(k))}" for k in subs))
        return f"{key}={_show(found.get(key))}", f"{key}={_show(own.get(key))}"
    return None


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ConfigError(f"checkpoint={root}: no {MANIFEST} there; point checkpoint at a folder written by less-train")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"checkpoint={root}: {MANIFEST} is not valid JSON ({err})") from err
    if not isinstance(manifest, dict):
        raise ConfigError(f"checkpoint={root}: {MANIFEST} is not a JSON object; {_rebuild(Path(root))}")
    if manifest.get("format") != FORMAT:
        raise ConfigError(
            f"checkpoint={root}: {MANIFEST} has format {manifest.get('format')!r}, expected {FORMAT!r}; "
            "retrain into a new folder with this less-exp"
        )
    _require_data(Path(root), manifest, MANIFEST, MANIFEST_KEYS, _rebuild(Path(root)))
    return manifest


def read_layer(root: str | Path, layer: int) -> tuple[dict, dict]:
    """A layer file's fingerprint and metrics, from its header alone; an unreadable file is a ConfigError."""
    root, path = Path(root), layer_file(root, layer)
    try:
        with safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ConfigError(
            f"checkpoint={root}: {path.name} is unreadable (truncated or corrupt: {_one_line(err)}); {_retrain(root, path)}"
        ) from err
    try:
        found, metrics, own_layer = json.loads(meta[FINGERPRINT]), json.loads(meta["metrics"]), int(meta["layer"])
    except (KeyError, ValueError) as err:
        raise ConfigError(
            f"checkpoint={root}: {path.name} lacks its {FINGERPRINT}/metrics metadata (written by hand or by an older "
            f"less-exp); {_retrain(root, path)}"
        ) from err
    if own_layer != layer:
        raise ConfigError(f"checkpoint={root}: {path.name} holds layer {own_layer}'s state; {_retrain(root, path)}")
    _require_data(root, found, f"{path.name}'s {FINGERPRINT}", IDENTITY, _retrain(root, path))
    _require_data(root, {"metrics": metrics}, f"{path.name}'s metrics", ("metrics",), _retrain(root, path))
    return found, metrics


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


# ------------------------------------------------------------------------------ training
def open_for_training(root: Path, head: dict) -> None:
    """Check that the folder's manifest and layer files were written for this job's set-up, then write the manifest."""
    root = Path(root)
    with _locked(root):
        if (root / MANIFEST).is_file():
            differs = _mismatch(read_manifest(root), head)
            if differs:
                raise ConfigError(
                    f"checkpoint={root} holds states trained with {differs[0]}, but this job has {differs[1]}; "
                    "use another checkpoint folder or the same settings"
                )
        _write_manifest(root, head, verify=True)


def _write_manifest(root: Path, head: dict, verify: bool = False) -> dict:
    """Rewrite the manifest from ``head`` and the layer files, each of which must agree with it (and, with
    ``verify``, still hold the tensors it was saved with, as a job opening the folder counts them done). Call
    under the lock."""
    manifest = fingerprint(head)
    layers = {}
    for layer in sorted(done_layers(root)):
        found, layers[str(layer)] = read_layer(root, layer)
        differs = _mismatch(found, head)
        if differs:
            raise ConfigError(
                f"checkpoint={root}: {layer_file(root, layer).name} was trained with {differs[0]}, this job has "
                f"{differs[1]}; use another checkpoint folder"
            )
        if verify:
            _layer_tensors(root, layer)
    manifest["layers"] = layers
    manifest["layers_done"] = sorted(int(k) for k in layers)
    manifest["complete"] = len(layers) == manifest["model"]["num_layers"]
    _atomic(root / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"))
    return manifest


def _non_finite(tensors: dict) -> list[str]:
    return sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))


def tensors_digest(tensors: dict) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (sorted by name): what a layer file must still hold."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name};{tensor.dtype};{tuple(tensors[name].shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_layer(root: Path, layer: int, state_dict: dict, metrics: dict, head: dict) -> dict:
    """Write one finished layer with the job's fingerprint and refresh the manifest; returns the manifest.

    Non-finite parameters are a NonFiniteError: nothing is written and the layer's progress is dropped,
    so a rerun starts that layer afresh.
    """
    root = Path(root)
    path = layer_file(root, layer)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    bad = _non_finite(tensors)
    if bad:
        progress_file(root, layer).unlink(missing_ok=True)
        raise NonFiniteError(
            f"layer {layer}: the trained state has non-finite parameters ({', '.join(bad)}); nothing was written to "
            f"{path} and its progress was dropped; lower training.lr and rerun"
        )
    metadata = {"metrics": json.dumps(metrics), "layer": str(layer),
                FINGERPRINT: json.dumps(fingerprint(head), sort_keys=True), TENSORS_SHA256: tensors_digest(tensors)}
    _atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    with _locked(root):
        manifest = _write_manifest(root, head)
    progress_file(root, layer).unlink(missing_ok=True)
    return manifest


def setup_mismatch(found: dict, own: dict) -> tuple[str, str] | None:
    """Where two manifests or headers differ in what the states are for (model, policy, budget, state
    components), however they were trained; None when a checkpoint of one can start or stand in for the other."""
    return _mismatch(found, own, tuple(key for key in IDENTITY if key != "training"))


def check_start(root: str | Path, head: dict, setting: str = "training.init_from") -> dict:
    """The manifest of a checkpoint that a training job starts from, refused (naming ``setting``) unless
    its states were trained for this job's model, policy, budget and state (any training mode)."""
    manifest = read_manifest(root)
    differs = setup_mismatch(manifest, head)
    if differs:
        raise ConfigError(f"{setting}={root} holds states trained with {differs[0]}, but this job has {differs[1]}; "
                          "start from a checkpoint trained with the same model, policy and state settings")
    _check_layers(Path(root), manifest)
    return manifest


def _layer_tensors(root: str | Path, layer: int) -> dict:
    """A layer file's tensors, verified against the :func:`tensors_digest` saved with them; an unreadable,
    changed or unhashed file is a ConfigError that says how to retrain it."""
    root, path = Path(root), layer_file(root, layer)
    try:
        with safe_open(str(path), "pt") as fh:
            saved = (fh.metadata() or {}).get(TENSORS_SHA256)
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except (SafetensorError, OSError) as err:
        raise ConfigError(
            f"checkpoint={root}: {path.name} is unreadable (truncated or corrupt: {_one_line(err)}); {_retrain(root, path)}"
        ) from err
    if saved is None:
        raise ConfigError(f"checkpoint={root}: {path.name} carries no {TENSORS_SHA256} to verify its tensors by (written "
                          f"by an older less-exp); {_retrain(root, path)}")
    if tensors_digest(tensors) != saved:
        raise ConfigError(f"checkpoint={root}: {path.name} does not hold the tensors it was saved with (sha256 differs); "
                          f"{_retrain(root, path)}")
    return tensors


def load_layer(root: str | Path, layer: int, state: torch.nn.Module) -> None:
    """Load one finished layer file into ``state`` (its fingerprint was checked when the folder was opened)."""
    state.load_state_dict(_layer_tensors(root, layer))


def done_layers(root: Path) -> set[int]:
    return {int(p.stem.split("_")[1]) for p in Path(root).glob("layer_*.safetensors")}


def progress_fingerprint(head: dict) -> str:
    """The fingerprint string a progress dict carries under ``"fingerprint"``."""
    return json.dumps(fingerprint(head), sort_keys=True)


def _what(layer: int | str) -> str:
    return f"layer {layer}" if isinstance(layer, int) else layer.replace("_", " ")


def save_progress(root: Path, layer: int, progress: dict) -> None:
    _atomic(progress_file(root, layer), lambda tmp: torch.save(progress, tmp))


def load_progress(root: Path, layer: int, head: dict | None = None) -> dict | None:
    """A layer's saved progress (``weights_only``), or None; with ``head``, progress of another set-up is refused."""
    path = progress_file(root, layer)
    if not path.is_file():
        return None
    try:
        progress = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).split("WeightsUnpickler error:")[-1].strip().splitlines()[0].split(". ")[0]
        raise ConfigError(
            f"checkpoint={root}: progress/{path.name} is unreadable with weights_only=True ({_one_line(reason)}); "
            f"delete it to restart {_what(layer)} from its first epoch"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise ConfigError(
            f"checkpoint={root}: progress/{path.name} is unreadable ({_one_line(err)}); delete it to restart "
            f"{_what(layer)} from its first epoch"
        ) from err
    if head is not None:
        try:
            found = json.loads(progress["fingerprint"])
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(
                f"checkpoint={root}: progress/{path.name} carries no fingerprint (saved by an older less-exp); delete it "
                f"to restart {_what(layer)} from its first epoch"
            ) from err
        differs = _mismatch(found, head)
        if differs:
            raise ConfigError(
                f"checkpoint={root}: progress/{path.name} was saved with {differs[0]}, this job has {differs[1]}; "
                "use another checkpoint folder or delete that file to restart the layer"
            )
    return progress


# ------------------------------------------------------------------------------ evaluation
BUDGET_MATCH = ("trained", "any")
BUDGET_KEYS = ("sink", "heavy", "recent", "ratio_of")


def check(cfg: DictConfig) -> dict:
    """``cfg.checkpoint`` against the eval config and its layer files against the manifest, before the model loads."""
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
    for key, own in (("source", cfg.model.source), ("id", _model_id(cfg.model))):
        if manifest["model"].get(key) != own:
            raise ConfigError(
                f"checkpoint={root} was trained for model.{key}={manifest['model'].get(key)}, but this run's "
                f"model={cfg.model.name} has model.{key}={own}"
            )
    policy = OmegaConf.to_container(cfg.policy, resolve=True)
    policy.pop("baseline_plus", None)
    policy.pop("prefill", None)
    trained_policy = dict(manifest["policy"])
    trained_policy.pop("prefill", None)
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
    for group, default in (("normalizer", "joint"), ("reweighting", "none"), ("gating", "none")):
        own, trained = cfg[group].get("name", default), manifest.get(group, {"name": "none"})["name"]
        if own not in (default, trained):
            raise ConfigError(f"checkpoint={root} holds {group}={trained}, but this run sets {group}={own}; "
                              f"leave {group} unset to take the checkpoint's")
    _check_layers(Path(root), manifest)
    return manifest


def _check_layers(root: Path, manifest: dict) -> None:
    """Every layer file is there and carries the manifest's fingerprint (so an edited manifest is caught)."""
    expected = manifest["model"]["num_layers"]
    missing = [layer for layer in range(expected) if not layer_file(root, layer).is_file()]
    if missing:
        raise ConfigError(
            f"checkpoint={root} lacks layers {missing}; train them into the same folder "
            f"(less-train checkpoint={root} training.from_layer={missing[0]} ...)"
        )
    for layer in range(expected):
        found, _ = read_layer(root, layer)
        differs = _mismatch(found, manifest)
        if differs:
            raise ConfigError(
                f"checkpoint={root}: {layer_file(root, layer).name} was trained with {differs[0]}, but {MANIFEST} says "
                f"{differs[1]}; the manifest was edited or the file belongs to another checkpoint"
            )


def state_nodes(cfg: DictConfig, manifest: dict) -> tuple[DictConfig | dict, dict, dict, dict]:
    """The feature map to build (the run's config node when it names one, else the checkpoint's) and the
    checkpoint's normaliser, re-weighting and gating. A checkpoint's component is a plain dict, checked by
    :func:`read_manifest`, that :mod:`less_exp.factory` builds as data (its allow-listed class, no Hydra)."""
    feature_map = cfg.feature_map if cfg.feature_map.get("name", "none") != "none" else dict(manifest["feature_map"])
    reweighting, gating = (dict(manifest.get(group, {"name": "none"})) for group in OPTIONAL_COMPONENTS)
    return feature_map, dict(manifest["normalizer"]), reweighting, gating


def _flat(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}} -> {"a.b": 1}``."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_into(states, root: str | Path, manifest: dict | None = None, model: torch.nn.Module | None = None) -> None:
    """Load every layer of the checkpoint at ``root`` into ``states``; any mismatch is a ConfigError.

    With ``model`` (the model the states are for) its identity, config and weights hashes included,
    must be the one the checkpoint was trained for. Non-finite parameters are a NonFiniteError.
    """
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
        found, own = _flat(manifest["settings"]), _flat(settings)
        differs = ", ".join(f"{k}={found.get(k)} (this run: {own.get(k)})" for k in sorted(set(found) | set(own))
                            if found.get(k) != own.get(k))
        raise ConfigError(f"checkpoint={root} holds states with {differs}; leave those settings unset to take the checkpoint's")
    _check_layers(root, manifest)
    if model is not None:
        trained = {key: manifest["model"].get(key) for key in MODEL_DERIVED}
        differs = _mismatch({"model": trained}, {"model": model_identity(model)}, ("model",))
        if differs:
            raise ConfigError(
                f"checkpoint={root} was trained for {differs[0]}, but this run's model={manifest['model']['name']} has "
                f"{differs[1]}; the states belong to another model: use a checkpoint trained for this one"
            )
    for layer, state in enumerate(states):
        path = layer_file(root, layer)
        tensors = _layer_tensors(root, layer)
        own = state.state_dict()
        if set(tensors) != set(own) or any(tensors[k].shape != own[k].shape for k in own):
            raise ConfigError(
                f"checkpoint={root}: {path.name} holds {sorted((k, tuple(v.shape)) for k, v in tensors.items())}, "
                f"this run's state needs {sorted((k, tuple(v.shape)) for k, v in own.items())}"
            )
        bad = _non_finite(tensors)
        if bad:
            raise NonFiniteError(
                f"checkpoint={root}: {path.name} holds non-finite parameters ({', '.join(bad)}); {_retrain(root, path)}"
            )
        state.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})
