"""Config-group presets (``conf/<group>/<name>.yaml``) read with OmegaConf alone, for callers without
a Hydra app (the Python API), and the policy a checkpoint was trained with, rebuilt from its preset.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from less_exp import paths
from less_exp.checkpoints import BUDGET_KEYS
from less_exp.errors import ConfigError


def names(group: str) -> list[str]:
    """The preset names of config group ``group``."""
    return sorted(p.stem for p in (Path(paths.conf_dir()) / group).glob("*.yaml"))


def load(group: str, name: str, setting: str | None = None) -> DictConfig:
    """Preset ``name`` of ``group``; an unknown name is a ConfigError naming ``setting`` (default: the group)."""
    path = Path(paths.conf_dir()) / group / f"{name}.yaml"
    if not isinstance(name, str) or "/" in name or not path.is_file():
        raise ConfigError(f"{setting or group}={name!r} is not a preset of conf/{group}/; "
                          f"choose one of {', '.join(names(group))}")
    return OmegaConf.load(path)


def is_default_policy(policy: DictConfig) -> bool:
    """Whether ``policy`` is ``conf/policy/full.yaml`` untouched (eval.yaml's default): a run that sets no policy."""
    return OmegaConf.to_container(policy, resolve=True) == OmegaConf.to_container(load("policy", "full"))


def checkpoint_policy(manifest: dict, root) -> DictConfig:
    """The policy and budget ``manifest`` records, on the preset of its name (so its ``_target_`` is the
    repository's, never the manifest's), without Baseline+."""
    trained = manifest["policy"]
    node = load("policy", trained.get("name"), setting=f"checkpoint={root}: its manifest's policy")
    for key in BUDGET_KEYS:
        if key in trained:
            node[key] = trained[key]
    node.baseline_plus = False
    return node


def describe_policy(policy: DictConfig) -> str:
    """``sink (sink=4 heavy=0 recent=8)``, with ``ratio_of`` when the counts are ratios."""
    counts = " ".join(f"{k}={policy.get(k)}" for k in BUDGET_KEYS if k != "ratio_of" or policy.get(k) is not None)
    return f"{policy.name} ({counts})"
