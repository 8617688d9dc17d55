"""less-study: a study config planned into jobs, run here, rerun, killed and continued."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from less_exp.errors import ConfigError
from less_exp.studies import cli, execute, plan as planning
from wandb_records import read_run

STUDY = "tiny_pipeline"
JOBS = ["layerwise/layers_0", "layerwise/layers_1", "layerwise", "eval/wikitext2/full", "eval/wikitext2/plain",
        "eval/wikitext2/baseline_plus", "eval/wikitext2/layerwise", "report"]


def study_config(compose_config, tmp_path, *overrides):
    return compose_config("study", [f"study={STUDY}", f"root={tmp_path / 'study'}", f"page={tmp_path / 'page.md'}",
                                    *overrides])


def test_merge_overrides_replaces_keys_and_the_settings_below_them():
    merged = planning.merge_overrides(["policy=sink", "feature_map=less_mlp", "feature_map.hidden=32"],
                                      ["feature_map=none", "policy.recent=8"])
    assert merged == ["policy=sink", "feature_map=none", "policy.recent=8"]
    assert planning.merge_overrides(["a.b=1"], ["+a.b=2"]) == ["+a.b=2"]
    with pytest.raises(ConfigError, match="not key=value"):
        planning.merge_overrides(["policy"])


def _study(**changes):
    base = {"name": "s", "setup": ["model=tiny_llama"], "stages": [{"name": "a", "overrides": ["training=e2e"]}],
            "methods": {"plain": {"overrides": []}, "state": {"checkpoint": "a"}}, "evaluations": {"ppl": ["task=perplexity"]}}
    base.update(changes)
    return OmegaConf.create(base)


def test_plan_chains_stages_and_fans_out_evaluations(tmp_path):
    study = _study(stages=[{"name": "a", "overrides": ["training=e2e"], "layer_ranges": [[0, 1], [1, None]]},
                           {"name": "b", "init_from": "a", "overrides": ["training=e2e"]}],
                   methods={"plain": {"overrides": []}, "state": {"checkpoint": "b"}})
    jobs = planning.plan(study, tmp_path, group="g", logger="none")
    assert [j.name for j in jobs] == ["a/layers_0", "a/layers_1", "a", "b", "eval/ppl/plain", "eval/ppl/state", "report"]
    by = planning.by_name(jobs)
    assert by["a"].kind == "verify" and by["a"].needs == ["a/layers_0", "a/layers_1"]
    assert "training.from_layer=1" in by["a/layers_1"].overrides and "training.to_layer=null" in by["a/layers_1"].overrides
    assert by["b"].needs == ["a"] and f"training.init_from='{tmp_path / 'a' / 'checkpoint'}'" in by["b"].overrides
    assert by["eval/ppl/state"].needs == ["b"] and f"checkpoint='{tmp_path / 'b' / 'checkpoint'}'" in by["eval/ppl/state"].overrides
    assert by["eval/ppl/plain"].needs == [] and "++logger.group=g" in by["eval/ppl/plain"].overrides
    assert by["report"].needs == ["eval/ppl/plain", "eval/ppl/state"]
    only = planning.plan(_study(evaluations={"ppl": {"overrides": ["task=perplexity"], "methods": ["state"]}}), tmp_path)
    assert [j.name for j in only if j.kind == "eval"] == ["eval/ppl/state"]
    # every job comes after what it needs
    order = {j.name: i for i, j in enumerate(jobs)}
    assert all(order[n] < order[j.name] for j in jobs for n in j.needs)
    # a different override or code version is a different job
    assert by["b"].key("v1") != by["b"].key("v2")


@pytest.mark.parametrize("changes, message", [
    ({"stages": [{"name": "b", "init_from": "a"}]}, "init_from='a', which is not an earlier stage"),
    ({"methods": {"state": {"checkpoint": "nope"}}}, "checkpoint='nope', which is not an earlier stage"),
    ({"stages": [{"name": "a", "layer_ranges": [[1, 2]]}]}, "contiguous"),
    ({"stages": [{"name": "a", "overides": []}]}, "unknown key"),
    ({"stages": [{"name": "a"}, {"name": "a"}]}, "two stages are named a"),
    ({"evaluations": {"ppl": "task=perplexity"}}, "must be a list of overrides"),
    ({"evaluations": {"ppl": {"overrides": ["task=perplexity"], "methods": ["nope"]}}}, "which are not methods"),
    ({"name": "a b"}, "study.name"),
    ({"colour": 1}, "unknown key"),
])
def test_plan_refuses_a_malformed_study_in_one_line(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message) as err:
        planning.plan(_study(**changes), tmp_path)
    assert "\n" not in str(err.value)


def test_tiny_study_runs_reports_logs_to_one_group_and_a_rerun_skips_everything(compose_config, tmp_path, monkeypatch,
                                                                                 one_thread):
    monkeypatch.setattr("less_exp.version.code_version", lambda: "v1")  # the tree may change while a test runs
    cfg = study_config(compose_config, tmp_path, "logger=wandb")
    assert cli.study(cfg) == 0
    root = tmp_path / "study"
    for name in JOBS:
        assert (root / name / execute.MARKER).is_file(), name
    results = {m: json.loads((root / "eval" / "wikitext2" / m / "results.json").read_text())
               for m in ("full", "plain", "baseline_plus", "layerwise")}
    assert all(r["status"] == "ok" for r in results.values())
    assert results["layerwise"]["metrics"]["state_token_equivalents"] > 0
    assert results["baseline_plus"]["metrics"]["budget"] > results["plain"]["metrics"]["budget"]

    page = (tmp_path / "page.md").read_text()
    assert f"less-study study={STUDY}" in page or "less-study" in page
    assert "Code version" in page and page.count("eval/wikitext2/") >= 4

    # W&B: every job of the study in one group, with its job type and flat axis keys
    runs = {}
    for folder in [root / n for n in JOBS if n != "layerwise"]:
        (run_dir,) = (folder / "wandb").glob("offline-run-*")
        runs[folder.relative_to(root).as_posix()] = read_run(run_dir)
    assert {r["group"] for r in runs.values()} == {STUDY}
    assert runs["layerwise/layers_0"]["job_type"] == "train" and runs["report"]["job_type"] == "report"
    state = runs["eval/wikitext2/layerwise"]
    assert state["job_type"] == "eval" and state["config"]["axis/policy"] == "sink"
    assert state["config"]["axis/feature_map"] == "less_mlp" and "policy:sink" in state["tags"]
    assert runs["eval/wikitext2/full"]["config"]["axis/policy"] == "full"
    assert "perplexity" in state["summary"]

    # a job is stale when its resolved config changes (an edited preset), even with the same overrides
    job = planning.by_name(planning.plan(cfg.study, root, group=STUDY, logger="wandb"))["layerwise/layers_0"]
    assert execute.is_complete(job, "v1")
    compose = execute.compose

    def edited(j):
        changed = compose(j)
        changed.training.lr = 0.5
        return changed

    monkeypatch.setattr(execute, "compose", edited)
    assert not execute.is_complete(job, "v1")
    monkeypatch.setattr(execute, "compose", compose)

    # a rerun with the same code finds every job complete and runs none
    def refuse(*args, **kwargs):
        raise AssertionError("a complete job ran again")

    monkeypatch.setattr(execute, "run", refuse)
    assert cli.study(study_config(compose_config, tmp_path, "logger=wandb")) == 0
    # a code change makes the jobs stale: they run again in their folders
    monkeypatch.setattr("less_exp.version.code_version", lambda: "other")
    with pytest.raises(AssertionError, match="ran again"):
        cli.study(study_config(compose_config, tmp_path, "logger=wandb"))


def test_evaluations_sharing_a_model_match_a_fresh_process(compose_config, tmp_path, one_thread):
    from less_exp.eval import evaluate

    cfg = study_config(compose_config, tmp_path, "logger=none")
    assert cli.study(cfg) == 0
    root = tmp_path / "study"
    jobs = planning.by_name(planning.plan(cfg.study, root, logger="none"))
    for method in ("plain", "layerwise", "baseline_plus"):
        job = jobs[f"eval/wikitext2/{method}"]
        fresh = evaluate(compose_config("eval", [*job.overrides]))
        shared = json.loads((job.folder / "results.json").read_text())["metrics"]
        assert fresh["perplexity"] == pytest.approx(shared["perplexity"], rel=1e-6), method


def test_a_failed_job_stops_what_needs_it_in_one_line(compose_config, tmp_path, capsys, one_thread):
    # a refusal that only the job itself can make (the schema passes it): a policy that evicts nothing
    cfg = study_config(compose_config, tmp_path, "logger=none", "study.stages.0.overrides=['training=layerwise','policy=full']")
    assert cli.study(cfg) == 2
    err = capsys.readouterr().err
    assert "evicts nothing" in err and "Traceback" not in err
    root = tmp_path / "study"
    assert not (root / "layerwise" / execute.MARKER).exists()
    assert not (root / "eval" / "wikitext2" / "layerwise" / "results.json").exists()
    assert (root / "eval" / "wikitext2" / "plain" / execute.MARKER).is_file()  # independent of the failure


def _less_study(tmp_path, *args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LESS_OUTPUT_DIR": str(tmp_path / "outputs")}
    cmd = [sys.executable, "-m", "less_exp.studies.cli", f"study={STUDY}", f"root={tmp_path / 'study'}",
           f"page={tmp_path / 'page.md'}", "logger=none", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)


@pytest.mark.slow  # two less-study processes, about 45 s: kept out of CI's budget
def test_killed_study_continues_where_it_stopped(tmp_path):
    proc = _less_study(tmp_path, "parallel=2")
    marker = tmp_path / "study" / "layerwise" / "layers_0" / execute.MARKER
    deadline = time.monotonic() + 240
    while not marker.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.is_file(), proc.communicate()[1][-2000:]
    os.kill(proc.pid, signal.SIGKILL)  # the study only: its workers die with it
    proc.wait()
    time.sleep(1)
    done_before = {p.parent.relative_to(tmp_path / "study").as_posix() for p in (tmp_path / "study").rglob(execute.MARKER)}
    assert "report" not in done_before
    rerun = _less_study(tmp_path)
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-3000:]
    for name in done_before:
        assert f"{name} " in out and "complete" in out.split(f"{name} ", 1)[1].splitlines()[0], name
        assert f"] train {name}" not in out and f"] eval {name}" not in out
    for name in JOBS:
        assert (tmp_path / "study" / name / execute.MARKER).is_file(), name


@pytest.mark.parametrize("args, message", [
    ([], "choose a study: less-study study=<name> ("),
    ([f"study={STUDY}", "parallel=x"], "parallel='x' must be a whole number"),
    ([f"study={STUDY}", "parallel=0"], "parallel=0 must be a whole number"),
    (["study=nope"], "Could not find 'study/nope'"),
    ([f"study={STUDY}", '+study.methods.bad={overrides:["policy.recent=abc"]}'],
     "job eval/wikitext2/bad: policy.recent='abc' must be a number >= 0"),
])
def test_less_study_refuses_a_bad_command_line_in_one_line(tmp_path, args, message):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LESS_OUTPUT_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "less_exp.studies.cli", *args, "logger=none"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("results.json")) and not list(tmp_path.rglob(execute.MARKER))
