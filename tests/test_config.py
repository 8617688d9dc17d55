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
    assert cfg.seed == 0 and cfg.device == "auto" and cfg.checkpoint is None


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


def header(path: Path) -> str:
    """The leading comment block of a config file as one line of text."""
    lines = path.read_text().splitlines()
    return " ".join(line.lstrip("# ") for line in lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))])


def unresolved(node) -> dict:
    """A config node as written (interpolations such as the run folder left unresolved)."""
    return OmegaConf.to_container(node, resolve=False)


def test_training_holds_only_the_modes(compose_config):
    from less_exp.training import MODES

    assert options("training") == sorted(MODES)
    for mode in MODES:  # a mode picked alone keeps its own values: no preset's sizes creep in
        picked = compose_config("train", [f"training={mode}"]).training
        assert picked.mode == mode
        if mode != "layerwise":
            assert unresolved(picked) == unresolved(compose_config("train", ["~experiment", f"training={mode}"]).training)


@pytest.mark.parametrize("preset", options("experiment"))
def test_every_experiment_preset_composes_to_a_mode(compose_config, preset):
    from less_exp.training import MODES

    path = paths.CONF_DIR / "experiment" / f"{preset}.yaml"
    assert path.read_text().startswith("# @package _global_\n")
    says = header(path).lower()
    assert "needs a gpu" in says or ("cpu core" in says and " min" in says)  # its time on 2 CPU cores, or a GPU
    cfg = compose_config("train", [f"experiment={preset}"])
    assert cfg.training.mode in MODES
    OmegaConf.to_container(cfg, resolve=True)
    written = unresolved(OmegaConf.load(path)).get("training", {})
    assert {key: unresolved(cfg.training)[key] for key in written} == written  # the preset's values win


def test_train_defaults_to_the_smoke_preset(compose_config):
    plain = compose_config("train")
    assert unresolved(plain.training) == unresolved(compose_config("train", ["experiment=layerwise_smoke"]).training)
    assert unresolved(plain.training) != unresolved(compose_config("train", ["~experiment"]).training)


def test_command_line_wins_over_the_preset(compose_config):
    preset = OmegaConf.load(paths.CONF_DIR / "experiment" / "layerwise_cpu.yaml").training
    cfg = compose_config("train", ["experiment=layerwise_cpu", "policy=h2o", "training.epochs=3", "data=c4"])
    assert cfg.policy.name == "h2o" and cfg.data.name == "c4" and cfg.training.epochs == 3 != preset.epochs
    assert cfg.training.lr == preset.lr and cfg.training.num_sequences == preset.num_sequences
    assert compose_config("train", ["experiment=answers_cpu", "data=c4"]).data.name == "c4"


@pytest.mark.parametrize("preset", [p for p in options("experiment") if p.startswith("paper_")])
def test_paper_presets_size_budget_and_windows_by_the_models_positions(compose_config, preset):
    from less_exp import factory

    cfg = compose_config("train", [f"experiment={preset}"])
    assert cfg.training.seq_len == cfg.model.max_length and cfg.device == "cuda"
    if cfg.policy.ratio_of:
        budget = factory.instantiate_component(cfg.policy).budget(max_positions=cfg.model.max_length)
        assert 0 < budget.capacity < cfg.training.seq_len
