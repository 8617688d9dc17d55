"""scripts/quality_recipe.sh: every stage's training command composes and passes the job's checks (the
model stops it before loading), and stages chain, each starting from the checkpoint of the one before."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from less_exp import checkpoints, paths, train as train_job

SCRIPT = Path(paths.conf_dir()).parent / "scripts" / "quality_recipe.sh"
STAGES = ("mix", "answers", "progressive", "onpolicy", "unlikelihood", "loopfree", "decisive")


def recipe(tmp_path: Path, stages: str, **env) -> subprocess.CompletedProcess:
    """Run the script with a stand-in for less-train that prints each command's arguments, one per line."""
    stub = tmp_path / "less-train"
    stub.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\necho ---\n')
    stub.chmod(0o755)
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True,
                          env={**os.environ, "LESS_TRAIN": str(stub), "START": str(tmp_path / "start"),
                               "OUT": str(tmp_path / "out"), "STAGES": stages, **env})


def commands(done: subprocess.CompletedProcess) -> list[list[str]]:
    assert done.returncode == 0, done.stderr
    return [block.strip().splitlines() for block in done.stdout.split("---")[:-1]]


class Loaded(Exception):
    pass


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_composes_and_passes_the_jobs_checks(compose_config, tmp_path, monkeypatch, stage):
    (args,) = commands(recipe(tmp_path, stage))
    assert f"training.init_from='{tmp_path / 'start'}'" in args
    overrides = [a for a in args if not a.startswith(("hydra.", "training.init_from="))]
    monkeypatch.setattr(train_job, "load_model", lambda *a, **k: (_ for _ in ()).throw(Loaded()))
    with pytest.raises(Loaded):
        train_job.train(compose_config("train", overrides))


def test_stages_chain_and_an_unknown_stage_is_refused(tmp_path):
    first, second = commands(recipe(tmp_path, "answers decisive", POLICY="h2o", END_TARGET="0.8", MAX_REPETITION="0"))
    assert "data.answers.max_repetition=0" in first
    assert f"checkpoint={tmp_path / 'out/h2o/answers/checkpoint'}" in first
    assert f"training.init_from='{tmp_path / 'out/h2o/answers/checkpoint'}'" in second
    assert "training.end_target=0.8" in second and "policy=h2o" in second
    done = recipe(tmp_path, "answers nonsense")
    assert done.returncode == 2 and "unknown stage nonsense" in done.stderr
    missing = recipe(tmp_path, "answers", START="")
    assert missing.returncode == 2 and "set START" in missing.stderr
    alone = recipe(tmp_path, "blend")
    assert alone.returncode == 2 and "put it after a training stage" in alone.stderr


def test_blend_mixes_the_last_stages_start_and_result(compose_config, tmp_path, monkeypatch):
    _, blend = commands(recipe(tmp_path, "decisive blend", ALPHA="0.3"))
    decisive = tmp_path / "out/sink/decisive/checkpoint"
    assert "training=interpolate" in blend and "training.alpha=0.3" in blend
    assert f"training.init_from='{tmp_path / 'start'}'" in blend and f"training.toward='{decisive}'" in blend
    assert f"checkpoint={tmp_path / 'out/sink/blend/checkpoint'}" in blend
    for folder in (tmp_path / "start", decisive):  # stand-ins for the two ends, of one set-up
        folder.mkdir(parents=True)
        (folder / checkpoints.MANIFEST).write_text(f'{{"format": "{checkpoints.FORMAT}", "training": {{"data": "c4_answers"}}}}')
    overrides = [a.replace("'", "") for a in blend if not a.startswith("hydra.")]
    monkeypatch.setattr(train_job, "load_model", lambda *a, **k: (_ for _ in ()).throw(Loaded()))
    with pytest.raises(Loaded):
        train_job.train(compose_config("train", overrides))
