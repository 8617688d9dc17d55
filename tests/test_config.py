"""Config composition through Hydra's compose API: defaults, groups, overrides, paths, launchers."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from less_exp import paths

GROUPS = ("model", "data", "task", "logger")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (paths.CONF_DIR / group).glob("*.yaml"))


def test_eval_defaults(compose_config):
    cfg = compose_config("eval")
    assert cfg.model.name == "smollm2_135m"
    assert cfg.data.name == "wikitext2"
    assert cfg.task.name == "perplexity" and cfg.task.seq_len == 1024 and cfg.task.max_windows == 4
    assert cfg.logger.name == "wandb"
    for group in ("policy", "feature_map", "gating", "reweighting", "normalizer"):
        assert "name" in cfg[group]
    assert cfg.seed == 0 and cfg.device == "cpu" and cfg.checkpoint is None


def test_train_composes_without_task(compose_config):
    cfg = compose_config("train", ["model=tiny_qwen2"])
    assert cfg.task is None and cfg.model.name == "tiny_qwen2"
    assert compose_config("train", ["task=perplexity"]).task.seq_len == 1024  # evaluated after training


def test_overrides_apply(compose_config):
    cfg = compose_config("eval", ["model=tiny_llama", "task.seq_len=64", "logger=none", "seed=3"])
    assert (cfg.model.name, cfg.task.seq_len, cfg.logger.name, cfg.seed) == ("tiny_llama", 64, "none", 3)


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_resolves(compose_config, group):
    for option in options(group):
        cfg = compose_config("eval", [f"{group}={option}"])
        resolved = OmegaConf.to_container(cfg[group], resolve=True)
        assert resolved["name"] == option


def test_unknown_option_is_rejected(compose_config):
    with pytest.raises(ConfigCompositionException):
        compose_config("eval", ["model=no_such_model"])


def test_paths_follow_environment(compose_config, monkeypatch, tmp_path):
    monkeypatch.setenv("LESS_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("LESS_CACHE_DIR", str(tmp_path / "cache"))
    cfg = compose_config("eval")
    assert cfg.paths.data_root == str(tmp_path / "data")
    assert cfg.data.local.dir == str(tmp_path / "data" / "wikitext-2")
    assert cfg.paths.cache_dir == str(tmp_path / "cache")
    assert Path(cfg.paths.root_dir) == paths.ROOT_DIR


def test_default_data_root_is_beside_checkout(compose_config, monkeypatch):
    monkeypatch.delenv("LESS_DATA_ROOT", raising=False)
    assert Path(compose_config("eval").paths.data_root) == paths.ROOT_DIR.parent / "shared" / "data"


def hydra_node(config_name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=paths.conf_dir(), version_base="1.3", job_name=config_name):
        return compose(config_name, overrides=overrides, return_hydra_config=True).hydra


def test_run_folders_under_output_root(monkeypatch, tmp_path):
    monkeypatch.setenv("LESS_OUTPUT_DIR", str(tmp_path))
    hydra = hydra_node("eval", [])
    assert hydra.run.dir.startswith(f"{tmp_path}/eval/")
    assert hydra.sweep.dir.startswith(f"{tmp_path}/multirun/eval/")
    assert hydra.job.chdir is False


@pytest.mark.parametrize(("launcher", "target"), [("slurm", "SlurmLauncher"), ("local", "LocalLauncher")])
def test_submitit_launchers(launcher, target):
    node = hydra_node("eval", [f"hydra/launcher={launcher}"]).launcher
    assert node._target_.endswith(target)
    assert node.timeout_min > 0 and node.cpus_per_task >= 1 and node.mem_gb > 0
