"""Attach an eviction policy and (optionally) a LESS state to any transformers decoder.

Integration goes only through transformers' public extension points: the attention function
registered as ``"less"`` (see :mod:`less_exp.attention`) and :class:`less_exp.cache.LessCache`.
The model object is not modified beyond ``set_attn_implementation``; the policy and the per-layer
state parameters live in a :class:`Compression` kept beside it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from less_exp.errors import ConfigError
from less_exp.ops import attention_logits, parallel_less_attention
from less_exp.policies import Budget, EvictionPolicy, Full
from less_exp.state import LessStates

_BY_MODULE: "weakref.WeakKeyDictionary[torch.nn.Module, Compression]" = weakref.WeakKeyDictionary()
_BY_MODEL: "weakref.WeakKeyDictionary[torch.nn.Module, Compression]" = weakref.WeakKeyDictionary()

UNSUPPORTED_CONFIG = {
    "attn_logit_softcapping": "attention logit soft-capping",
    "query_pre_attn_scalar": "a custom query scaling",
}


@dataclass
class Compression:
    """A model's policy and LESS state, shared by the parallel form and the decoding cache."""

    policy: EvictionPolicy
    states: LessStates | None
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int
    state_tokens: float = 0.0
    _bound: dict = field(default_factory=dict, repr=False)

    def budget(self, length: int) -> Budget:
        return self.policy.budget(length=length, max_positions=self.max_positions, state_tokens=self.state_tokens)

    def state(self, layer_idx: int):
        return None if self.states is None else self.states[layer_idx]

    def bind(self, layer_idx: int, cache_layer) -> None:
        """Called by a cache layer's ``update`` so the attention call right after it finds the cache."""
        self._bound[layer_idx] = cache_layer

    def take_bound(self, layer_idx: int):
        return self._bound.pop(layer_idx, None)

    def parallel(self, layer_idx, query, key, value, valid, scaling):
        """Parallel form for one layer; also returns what a cache needs to continue from here."""
        B, _, S, _ = key.shape
        valid_or_all = valid if valid is not None else torch.ones(B, S, dtype=torch.bool, device=key.device)
        budget = self.budget(int(valid_or_all.sum(-1).max()))
        logits = attention_logits(query, key, scaling)
        keep, present, scores = self.policy.keep_mask(
            budget, valid_or_all, self.num_kv_heads, logits if self.policy.uses_scores else None
        )
        state = self.state(layer_idx)
        psi = state.psi(key) if state is not None else None
        out = parallel_less_attention(query, key, value, keep, valid, scaling, state, logits=logits, psi=psi)
        return out, {"budget": budget, "present": present, "scores": scores, "valid": valid_or_all, "psi": psi}

    def describe(self, length: int) -> dict:
        budget = self.budget(length)
        return {
            "policy": self.policy.name,
            "budget": budget.capacity,
            "sink": budget.sink,
            "heavy": budget.heavy,
            "recent": budget.recent,
            "state_token_equivalents": self.states.token_equivalents() if self.states is not None else 0.0,
        }


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention modules of a decoder, in layer order."""
    found = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
    return sorted(found, key=lambda m: m.layer_idx)


def check_supported(model: torch.nn.Module) -> None:
    """Fail before any heavy work on a model whose attention the LESS function cannot reproduce."""
    config = model.config
    for key, what in UNSUPPORTED_CONFIG.items():
        if getattr(config, key, None) is not None:
            raise ValueError(f"{config.model_type} uses {what} ({key}); less-exp's attention does not support it yet")
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        raise ValueError(
            f"{config.model_type} has a native sliding window ({config.sliding_window}); set it to null in the model "
            "config or use policy=window to get the same effect"
        )
    if not attention_modules(model):
        raise ValueError(f"{type(model).__name__} has no attention modules with layer_idx/num_key_value_groups")


def build(model: torch.nn.Module, policy: EvictionPolicy, states: LessStates | None, baseline_plus_tokens: float = 0.0):
    """Attach ``policy`` and ``states`` to ``model`` and switch it to the ``less`` attention."""
    from less_exp.attention import register

    check_supported(model)
    modules = attention_modules(model)
    config = model.config
    head_dim = modules[0].head_dim
    comp = Compression(
        policy=policy,
        states=states,
        num_layers=len(modules),
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        max_positions=config.max_position_embeddings,
        state_tokens=baseline_plus_tokens,
    )
    if states is not None:
        if len(states) != len(modules):
            raise ValueError(f"LESS state has {len(states)} layers but the model has {len(modules)}")
        param = next(model.parameters())
        states.to(device=param.device, dtype=param.dtype).train(model.training)
    register()
    switch(model, comp)
    return comp


def switch(model: torch.nn.Module, comp: Compression | None) -> None:
    """Make ``model`` run ``comp`` (built by :func:`build` for this model), or its plain sdpa attention."""
    if comp is None:
        _BY_MODEL.pop(model, None)
        model.set_attn_implementation("sdpa")
        return
    for m in attention_modules(model):
        _BY_MODULE[m] = comp
    _BY_MODEL[model] = comp
    model.set_attn_implementation("less")


def instantiate_component(node: DictConfig, **kwargs):
    """``hydra.utils.instantiate`` for a config-group node; its ``name`` key labels runs and is not an argument."""
    spec = OmegaConf.to_container(node, resolve=True)
    spec.pop("name", None)
    return instantiate(spec, **kwargs, _convert_="all")


def validate(cfg: DictConfig) -> None:
    """Check the policy, budget and state configs without a model, so mistakes surface in seconds."""
    try:
        policy = instantiate_component(cfg.policy)
    except Exception as err:  # hydra wraps constructor errors; report the cause in config terms
        raise ConfigError(f"policy={cfg.policy.get('name')}: {_root_cause(err)}") from err
    for group in ("gating", "reweighting"):
        if cfg[group].get("name", "none") != "none":
            raise ConfigError(f"{group}={cfg[group].name} is not implemented yet; use {group}=none")
    has_state = cfg.feature_map.get("name", "none") != "none"
    if policy.baseline_plus and not has_state:
        raise ConfigError("policy.baseline_plus=true needs a feature_map to size the state it stands in for")
    if has_state:
        try:
            instantiate_component(cfg.feature_map, head_dim=8, num_heads=1, num_kv_heads=1)
            instantiate_component(cfg.normalizer)
        except Exception as err:
            raise ConfigError(f"feature_map={cfg.feature_map.name}: {_root_cause(err)}") from err
    length = cfg.get("task", {}) and cfg.task.get("seq_len")
    if not length and policy.ratio_of == "length":
        return  # no fixed length: the budget resolves per prompt at prefill
    try:
        budget = policy.budget(length=length, max_positions=int(cfg.model.max_length))
        if length:
            policy.check_fits(budget, int(length))
    except ValueError as err:
        raise ConfigError(str(err)) from err


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    return str(err)


def make_states(cfg: DictConfig, model: torch.nn.Module, feature_map=None, normalizer=None) -> LessStates | None:
    """Instantiate the feature map and normaliser once per layer, or None for ``feature_map=none``.

    ``feature_map``/``normalizer`` nodes replace ``cfg``'s (a checkpoint supplies its own).
    """
    feature_map = cfg.feature_map if feature_map is None else feature_map
    normalizer = cfg.normalizer if normalizer is None else normalizer
    if feature_map.get("name", "none") == "none":
        return None
    for group in ("gating", "reweighting"):
        if cfg[group].get("name", "none") != "none":
            raise ValueError(f"{group}={cfg[group].name} is not implemented yet; use {group}=none")
    modules = attention_modules(model)
    config = model.config
    kwargs = dict(head_dim=modules[0].head_dim, num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads)
    return LessStates.build(
        lambda: instantiate_component(feature_map, **kwargs),
        lambda: instantiate_component(normalizer),
        len(modules),
        kwargs["head_dim"],
    )


def apply(model: torch.nn.Module, cfg: DictConfig) -> torch.nn.Module:
    """Set up the configured compression on ``model``; the full cache with no state stays on ``sdpa``.

    With ``cfg.checkpoint`` set the states are built as the checkpoint says and loaded from it.
    """
    policy: EvictionPolicy = instantiate_component(cfg.policy)
    if cfg.get("checkpoint"):
        from less_exp import checkpoints

        manifest = checkpoints.check(cfg)
        states = make_states(cfg, model, *checkpoints.state_nodes(cfg, manifest))
        checkpoints.load_into(states, cfg.checkpoint, manifest)
    else:
        states = make_states(cfg, model)
    extra = 0.0
    if policy.baseline_plus:
        if states is None:
            raise ValueError("policy.baseline_plus=true needs a feature_map to size the state it stands in for")
        extra, states = states.token_equivalents(), None
    if isinstance(policy, Full) and states is None:
        return model
    build(model, policy, states, baseline_plus_tokens=extra)
    return model


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


def compression_of(model: torch.nn.Module) -> Compression | None:
    return _BY_MODEL.get(model)


def compression_for_module(module: torch.nn.Module) -> Compression:
    try:
        return _BY_MODULE[module]
    except KeyError:
        raise RuntimeError(
            "the 'less' attention was called on a model that has no compression attached; use less_exp.compression.apply"
        ) from None
