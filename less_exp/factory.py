"""Config to objects: the platform's side of the engine (Hydra in, engine objects out).

Builds the configured policy and LESS states, checks configs before any model loads, attaches them
to a model through :func:`less_exp.adapter.build` (with a checkpoint's states when one is given) and
summarises the compression for results tables.
"""

from __future__ import annotations

import os

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from less_exp import checkpoints
from less_exp.adapter import attention_modules, build, compression_of
from less_exp.errors import ConfigError
from less_exp.policies import EvictionPolicy, Full
from less_exp.state import LessState, LessStates


def instantiate_component(node: DictConfig, **kwargs):
    """``hydra.utils.instantiate`` for a config-group node; its ``name`` key labels runs and is not an argument."""
    spec = OmegaConf.to_container(node, resolve=True)
    spec.pop("name", None)
    return instantiate(spec, **kwargs, _convert_="all")


def validate(cfg: DictConfig) -> None:
    """Check what needs the engine's objects without a model (the policy's budget against the length,
    the state's components and size), so mistakes surface in seconds; the config rules that need no
    object are :mod:`less_exp.schema`'s."""
    try:
        policy = instantiate_component(cfg.policy)
    except Exception as err:  # hydra wraps constructor errors; report the cause in config terms
        raise ConfigError(f"policy={cfg.policy.get('name')}: {_root_cause(err)}") from err
    if cfg.feature_map.get("name", "none") != "none":
        state = _config_state(cfg)
        if state is not None:
            print(f"state: {describe_state(state, model_shape(cfg.model))}", flush=True)
    length = cfg.get("task", {}) and cfg.task.get("seq_len")
    if not length and policy.ratio_of == "length":
        return  # no fixed length: the budget resolves per prompt at prefill
    try:
        budget = policy.budget(length=length, max_positions=int(cfg.model.max_length))
        if length:
            policy.check_fits(budget, int(length))
    except ValueError as err:
        raise ConfigError(str(err)) from err


def model_shape(model_cfg: DictConfig) -> dict | None:
    """``{layers, heads, kv_heads, head_dim}`` from the model config without loading it: a tiny model's
    own config, or the ``shape`` a model file states; None when neither says."""
    if model_cfg.get("source") == "tiny":
        c = model_cfg.config
        heads = int(c.num_attention_heads)
        return {"layers": int(c.num_hidden_layers), "heads": heads, "kv_heads": int(c.get("num_key_value_heads", heads)),
                "head_dim": int(c.get("head_dim") or c.hidden_size // heads)}
    shape = model_cfg.get("shape")
    return None if shape is None else {k: int(shape[k]) for k in ("layers", "heads", "kv_heads", "head_dim")}


def _chosen(node: DictConfig | dict | None) -> bool:
    return node is not None and node.get("name", "none") != "none"


def _component(group: str, node: DictConfig | dict, **kwargs):
    """Build a state component: a config node through Hydra; a checkpoint's (a plain dict, see
    :func:`less_exp.checkpoints.state_nodes`) as data, its allow-listed engine class called with its values."""
    if isinstance(node, DictConfig):
        return instantiate_component(node, **kwargs)
    cls = checkpoints.engine_class(group, node)
    try:
        return cls(**{k: v for k, v in node.items() if k not in ("_target_", "name")}, **kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"the checkpoint's {group}={node.get('name')} does not build with this less-exp ({err}); "
                          "retrain it into a new folder") from err


def _state_builders(feature_map: DictConfig | dict, normalizer: DictConfig | dict, reweighting: DictConfig | dict | None,
                    gating: DictConfig | dict | None, shape: dict):
    """Constructors of one layer's components; the gating's takes the state's D' (``features``)."""
    kwargs = dict(head_dim=shape["head_dim"], num_heads=shape["heads"], num_kv_heads=shape["kv_heads"])
    return (lambda: _component("feature_map", feature_map, **kwargs),
            lambda: _component("normalizer", normalizer, **kwargs),
            (lambda: _component("reweighting", reweighting, **kwargs)) if _chosen(reweighting) else None,
            (lambda features: _component("gating", gating, **kwargs, features=features)) if _chosen(gating) else None)


def _config_state(cfg: DictConfig):
    """One layer's state as configured, at the model's shape when the config states it (else a small
    stand-in, to check the settings); a bad setting is one ConfigError naming its group."""
    shape = model_shape(cfg.model) or {"layers": 1, "heads": 2, "kv_heads": 1, "head_dim": 64}
    fm, norm, rw, gate = _state_builders(cfg.feature_map, cfg.normalizer, cfg.reweighting, cfg.gating, shape)

    def made(group, make, *args):
        if make is None:
            return None
        try:
            return make(*args)
        except Exception as err:  # hydra wraps constructor errors; report the cause in config terms
            raise ConfigError(f"{group}={cfg[group].get('name')}: {_root_cause(err)}") from err

    def build():
        state = LessState(made("feature_map", fm), made("normalizer", norm), shape["head_dim"], made("reweighting", rw))
        state.gating = made("gating", gate, state.num_features)
        return state

    _check_state_memory(cfg, build, shape)
    state = build()
    return state if model_shape(cfg.model) is not None else None


def _check_state_memory(cfg: DictConfig, build, shape: dict) -> None:
    """Refuse, with the figure, a state whose tensors alone (float32, every layer) exceed the machine's
    memory: first by the largest size set (heads x head_dim x that size, which one projection takes),
    then exactly on torch's meta device, so nothing is allocated to find out."""
    sizes = {f"{group}.{key}": value for group in ("feature_map", "gating", "reweighting")
             for key, value in (cfg.get(group) or {}).items()
             if key in ("features", "hidden", "rank") and isinstance(value, int)}
    have = available_memory(torch.device("cpu"))
    per_layer = shape["heads"] * shape["head_dim"] * max(sizes.values(), default=0)  # at least this: one projection
    if 4 * per_layer * shape["layers"] <= have:
        try:
            with torch.device("meta"):
                state = build()
            per_layer = sum(t.numel() for t in (*state.parameters(), *state.buffers()))
        except ConfigError:
            raise
        except Exception:  # e.g. a random projection drawn from a CPU generator: the real build reports its errors
            pass
    need = 4 * per_layer * shape["layers"]
    if need > have:
        settings = ", ".join(f"{k}={v}" for k, v in sizes.items())
        raise ConfigError(f"the state ({settings}) would need about {need / 2**30:,.1f} GiB for its tensors ({per_layer:,} "
                          f"numbers a layer x {shape['layers']} layers, float32) but this machine has "
                          f"{have / 2**30:.1f} GiB; lower those sizes")


def describe_state(state: LessState, shape: dict | None) -> str:
    """D', parameters and token-equivalents of a state, for a line printed before any model loads."""
    layers = shape["layers"] if shape else 1
    rw = f" x {type(state.reweighting).__name__} re-weighting" if state.reweighting is not None else ""
    gate = f" with {type(state.gating).__name__}" if state.gating is not None else ""
    return (f"{type(state.feature_map).__name__}{rw}{gate}, D'={state.num_features}, {state.num_parameters():,} parameters "
            f"a layer ({state.num_parameters() * layers:,} for {layers} layers), "
            f"{state.token_equivalents():.2f} token-equivalents per KV head"
            + (f", and a gate age of {state.gate_width} number{'s' if state.gate_width > 1 else ''} per cached token" if state.gating is not None else ""))


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    return str(err)


def make_states(cfg: DictConfig, model: torch.nn.Module, feature_map=None, normalizer=None,
                reweighting=None, gating=None) -> LessStates | None:
    """Instantiate the feature map, normaliser, re-weighting and gating once per layer, or None for
    ``feature_map=none``. Nodes given replace ``cfg``'s (a checkpoint supplies its own, as plain dicts).
    """
    feature_map = cfg.feature_map if feature_map is None else feature_map
    normalizer = cfg.normalizer if normalizer is None else normalizer
    reweighting = cfg.reweighting if reweighting is None else reweighting
    gating = cfg.gating if gating is None else gating
    if feature_map.get("name", "none") == "none":
        return None
    modules = attention_modules(model)
    config = model.config
    shape = {"layers": len(modules), "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
             "head_dim": modules[0].head_dim}
    stated = model_shape(cfg.model)
    if stated is not None and stated != shape:
        raise ConfigError(f"model.shape={stated} does not match the loaded model={cfg.model.name} ({shape}); "
                          "correct model.shape in its config file")
    fm, norm, rw, gate = _state_builders(feature_map, normalizer, reweighting, gating, shape)
    return LessStates.build(fm, norm, len(modules), shape["head_dim"], rw, gate)


def apply(model: torch.nn.Module, cfg: DictConfig) -> torch.nn.Module:
    """Set up the configured compression on ``model``; the full cache with no state stays on ``sdpa``.

    With ``cfg.checkpoint`` set the states are built as the checkpoint says and loaded from it.
    """
    policy: EvictionPolicy = instantiate_component(cfg.policy)
    if cfg.get("checkpoint"):
        manifest = checkpoints.check(cfg)
        states = make_states(cfg, model, *checkpoints.state_nodes(cfg, manifest))
        checkpoints.load_into(states, cfg.checkpoint, manifest, model=model)
    else:
        states = make_states(cfg, model)
    extra = 0.0
    if policy.baseline_plus:
        if states is None:
            raise ValueError("policy.baseline_plus=true needs a feature_map to size the state it stands in for")
        extra, states = states.token_equivalents(), None
    if isinstance(policy, Full) and states is None:
        return model
    comp = build(model, policy, states, baseline_plus_tokens=extra)
    comp.chunk_size = chunk_size(cfg)
    return model


def chunk_size(cfg: DictConfig) -> int:
    """``gating.chunk_size``: steps per chunk of the chunked linear attention (64 when unset)."""
    return int(cfg.gating.get("chunk_size", 64))


def summary(model: torch.nn.Module, cfg: DictConfig, length: int | None = None) -> dict:
    """What a results table needs to group runs: policy, resolved budget and the state's size.

    The budget is resolved at ``length`` (a task's representative length: its longest context, its
    mean prompt), else ``task.seq_len``, else the model's maximum positions.
    """
    comp = compression_of(model)
    if comp is None:
        return {"policy": "full", "budget": None, "state_token_equivalents": 0.0}
    length = length or cfg.task.get("seq_len") or comp.max_positions
    return comp.describe(int(length))


def available_memory(device: torch.device) -> int:
    """Bytes of memory on ``device``: the GPU's total, or the machine's physical memory."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_decode_memory(model: torch.nn.Module, task: DictConfig, max_length: int) -> None:
    """Refuse, with the estimate, a decoding task whose KV cache cannot fit: ``task.batch_size`` rows of
    every layer's keys and values over the longest sequence it may reach (its context or prompt length
    plus ``task.max_new_tokens``, at most ``model.max_length``), in the model's dtype."""
    new, batch = task.get("max_new_tokens"), task.get("batch_size")
    if not new or not batch:
        return
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(config, "num_attention_heads", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    prompt = max(task.get("context_lengths") or [0]) or task.get("max_prompt_tokens") or task.get("seq_len") or max_length
    length = min(int(prompt) + int(new), max_length)
    param = next(model.parameters())
    need = int(batch) * config.num_hidden_layers * 2 * kv_heads * head_dim * length * param.element_size()
    have = available_memory(param.device)
    if need > have:
        raise ConfigError(f"task.batch_size={batch} with task.max_new_tokens={new}: the KV cache would need about "
                          f"{need / 2**30:,.1f} GiB ({batch} x {config.num_hidden_layers} layers x 2 x {kv_heads} heads x "
                          f"{head_dim} x {length} tokens) but this machine has {have / 2**30:.1f} GiB; lower task.batch_size")


def check_memory(model: torch.nn.Module, setting: str, length: int | None, batch: int = 1) -> None:
    """Refuse, with the estimate, a parallel form whose attention logits cannot fit: it holds
    ``batch x heads x length^2`` float32 logits about three times (logits, masked copy, weights)."""
    comp = compression_of(model)
    if comp is None or not length:
        return
    need = 3 * 4 * batch * comp.num_heads * int(length) ** 2
    have = available_memory(next(model.parameters()).device)
    if need > have:
        raise ConfigError(
            f"{setting}={length}: the parallel form would need about {need / 2**30:.1f} GiB for its attention "
            f"logits ({batch} x {comp.num_heads} heads x {length}^2 float32, x3) but this machine has "
            f"{have / 2**30:.1f} GiB; lower {setting}"
        )
