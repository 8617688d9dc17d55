"""The Python API: :func:`compress` a transformers model the caller loaded, no Hydra app needed.

``compress`` turns its arguments into the config that ``less-eval`` would compose (presets from
``conf/<group>/``, a checkpoint's manifest) and sets the model up through the same
:func:`less_exp.factory.apply`, so a compressed ``generate`` gives the tokens ``less-eval`` gives and a
checkpoint is checked exactly as there: its manifest against the settings, its layer files against
the manifest, and the model's identity (config and weights hashes) against the one it was trained for.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from less_exp import checkpoints, factory, presets
from less_exp.adapter import LessCache, cache_kwargs, compression_of, switch
from less_exp.adapter.introspection import dimensions
from less_exp.errors import ConfigError
from less_exp.policies import EvictionPolicy

STATE_GROUPS = {"feature_map": "none", "normalizer": "joint", "reweighting": "none", "gating": "none"}
OTHER_SETTINGS = ("chunk_size", "checkpoint_budget")


@dataclass
class Compressed:
    """A model set up by :func:`compress`: ``model.generate(**inputs, **compressed.generate_kwargs())``.

    ``config`` holds the settings as ``less-eval`` records them (policy, state components, checkpoint).
    A plain forward pass (perplexity, scoring) needs nothing more; ``generate`` needs the evicting cache,
    a fresh one per call. :meth:`remove` (or leaving a ``with`` block) restores the model.
    """

    model: torch.nn.Module
    config: DictConfig
    attn_implementation: str

    @property
    def compressing(self) -> bool:
        """False for the full cache without a state, which leaves the model as it was."""
        return compression_of(self.model) is not None

    def cache(self) -> LessCache | None:
        """A new evicting cache for one ``generate`` call, or None (transformers' default) when not compressing."""
        return LessCache(self.model) if self.compressing else None

    def generate_kwargs(self) -> dict:
        """``{<cache argument of this transformers>: a new evicting cache}`` for one ``model.generate`` call."""
        return cache_kwargs(self.cache())

    def describe(self, length: int | None = None) -> dict:
        """Policy, budget resolved at ``length`` tokens (default: the model's maximum) and the state's size."""
        return factory.summary(self.model, self.config, length)

    def remove(self) -> torch.nn.Module:
        """Detach the compression and restore the model's attention implementation; returns the model."""
        if self.compressing:
            switch(self.model, None)
            if self.attn_implementation != "sdpa":
                self.model.set_attn_implementation(self.attn_implementation)
        return self.model

    def __enter__(self) -> "Compressed":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def compress(model: torch.nn.Module, policy: str | EvictionPolicy | None = None, checkpoint: str | Path | None = None,
             **settings) -> Compressed:
    """Set ``model`` up for compressed inference with ``policy`` and, optionally, a trained ``checkpoint``.

    ``policy`` is a preset name (``full``, ``h2o``, ``sink``, ``tova``, ``window``: ``conf/policy/``), a
    policy object, or None to take the checkpoint's policy and budget. ``checkpoint`` is a ``less-train``
    folder; it supplies the state's feature map, normaliser, re-weighting and gating and is refused,
    before anything changes, unless it was trained for this very model and policy. ``settings`` override
    the policy's ``sink``, ``heavy``, ``recent``, ``ratio_of``, ``baseline_plus``; name the state's
    ``feature_map``, ``normalizer``, ``reweighting``, ``gating`` (a preset name, or a dict of its name and
    overrides); ``chunk_size`` (of the chunked linear attention) and ``checkpoint_budget`` (``"any"``
    accepts the checkpoint's policy at another budget). Any mistake is one :class:`ConfigError` line.
    """
    if compression_of(model) is not None:
        raise ConfigError("compress: this model is already compressed; call .remove() on the first compress's result")
    manifest = checkpoints.read_manifest(checkpoint) if checkpoint is not None else None
    cfg = _config(model, _policy_node(policy, manifest, checkpoint), checkpoint, manifest, settings)
    factory.validate(cfg)
    attn = model.config._attn_implementation
    try:
        factory.apply(model, cfg)
    except ConfigError:
        raise
    except ValueError as err:  # the adapter's refusals (unsupported attention, Baseline+ without a state)
        raise ConfigError(f"compress: {err}") from err
    return Compressed(model, cfg, attn)


def _policy_node(policy, manifest: dict | None, checkpoint) -> DictConfig:
    """The config node of ``policy``: a preset, a policy object's fields, or the checkpoint's own."""
    if policy is None:
        if manifest is None:
            raise ConfigError(f"compress: give policy= (one of {', '.join(presets.names('policy'))}) or checkpoint=")
        return presets.checkpoint_policy(manifest, checkpoint)
    if isinstance(policy, str):
        return presets.load("policy", policy, setting="policy")
    if not isinstance(policy, EvictionPolicy):
        raise ConfigError(f"policy={policy!r} is neither a preset name nor an EvictionPolicy")
    target = f"{type(policy).__module__}.{type(policy).__qualname__}"
    if policy.name in presets.names("policy"):
        preset = presets.load("policy", policy.name)
        target = preset._target_ if get_class(preset._target_) is type(policy) else target
    return OmegaConf.create({"_target_": target, "name": policy.name, **dataclasses.asdict(policy)})


def _component(group: str, value) -> DictConfig:
    """A state component's node from a preset name or ``{"name": ..., <overrides>}``."""
    if isinstance(value, (dict, DictConfig)):
        node = presets.load(group, value.get("name"), setting=f"{group}.name")
        return _override(node, {k: v for k, v in value.items() if k != "name"}, group)
    return presets.load(group, value)


def _override(node: DictConfig, values: dict, where: str) -> DictConfig:
    for key, value in values.items():
        if key not in node or key == "_target_":
            known = ", ".join(k for k in node if k not in ("_target_", "name"))
            raise ConfigError(f"compress: {where} has no setting {key}={value!r}; its settings are {known or 'none'}")
        node[key] = value
    return node


def _config(model, policy: DictConfig, checkpoint, manifest: dict | None, settings: dict) -> DictConfig:
    """The config ``less-eval`` would compose for these arguments (``factory`` and ``checkpoints`` read it)."""
    policy_keys = [k for k in policy if k not in ("_target_", "name")]
    unknown = sorted(set(settings) - set(policy_keys) - set(STATE_GROUPS) - set(OTHER_SETTINGS))
    if unknown:
        raise ConfigError(f"compress: unknown setting {unknown[0]}={settings[unknown[0]]!r}; known: "
                          f"{', '.join([*policy_keys, *STATE_GROUPS, *OTHER_SETTINGS])}")
    _override(policy, {k: v for k, v in settings.items() if k in policy_keys}, f"policy={policy.name}")
    groups = {group: _component(group, settings.get(group, default)) for group, default in STATE_GROUPS.items()}
    if "chunk_size" in settings:
        groups["gating"].chunk_size = settings["chunk_size"]
    return OmegaConf.create({
        "model": _model_node(model, manifest), "policy": policy, **groups,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "checkpoint_budget": settings.get("checkpoint_budget", "trained"), "task": {},
    })


def _model_node(model, manifest: dict | None) -> dict:
    """The model as a config names it. With a checkpoint these are the manifest's names, as the model is
    the caller's: what proves it is the one trained for is its identity, checked when the states load."""
    dims = dimensions(model)
    if manifest is None:
        return {"name": model.config.name_or_path or model.config.model_type, "source": "user",
                "max_length": dims["max_positions"]}
    trained = manifest["model"]
    node = {"name": trained["name"], "source": trained["source"], "hub_id": trained["id"],
            "max_length": dims["max_positions"]}
    if trained["source"] == "tiny":  # factory.model_shape reads a tiny preset's shape from its config
        node["config"] = {"num_hidden_layers": dims["num_layers"], "num_attention_heads": dims["num_heads"],
                          "num_key_value_heads": dims["num_kv_heads"], "head_dim": dims["head_dim"]}
    return node
