"""Every study preset (conf/study/) plans, and every train and eval job it plans composes into a config
whose training mode or task exists: a preset's typo shows here, not hours into a study. No model loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from less_exp import paths, tasks
from less_exp.studies import execute, plan as planning
from less_exp.training import MODES

PRESETS = sorted(p.stem for p in (Path(paths.conf_dir()) / "study").glob("*.yaml"))


def study_config(name: str, root: Path):
    with initialize_config_dir(config_dir=paths.conf_dir(), version_base="1.3", job_name="less-study"):
        return compose("study", overrides=[f"study={name}", f"root={root}", f"page={root / 'page.md'}", "logger=none"])


LARGE = {"feature_maps", "gating", "train_modes"}  # over 100 jobs between them: composed in the slow suite


def test_presets_are_found():
    assert {"sink_generation", "tiny_pipeline"} <= set(PRESETS)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in LARGE else n for n in PRESETS])
def test_preset_plans_and_every_job_composes(name, tmp_path):
    cfg = study_config(name, tmp_path)
    assert cfg.study.name == name, f"conf/study/{name}.yaml names itself {cfg.study.name}"
    assert cfg.study.get("about") and cfg.study.get("time"), f"conf/study/{name}.yaml needs about: and time:"
    jobs = planning.plan(cfg.study, tmp_path, group=name, logger="none")
    composed = [job for job in jobs if job.kind in ("train", "eval")]
    assert composed, f"study {name} plans no train or eval job"
    with execute.hydra_ready():
        for job in composed:
            job_cfg = execute.compose(job)
            if job.kind == "train":
                assert job_cfg.training.mode in MODES, f"{job.name}: training.mode={job_cfg.training.mode}"
            else:
                module = job_cfg.task.get("module") or job_cfg.task.name
                assert module in tasks.available(), f"{job.name}: task {module} is not a task"
