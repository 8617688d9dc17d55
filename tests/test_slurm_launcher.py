"""The `slurm` launcher for real: a two-job sweep through a single-node SLURM on this machine.

scripts/local_slurm.sh starts munged, slurmctld and slurmd in a temporary folder; the sweep submits a
job array with sbatch, and the jobs write their results like any other sweep. Skips when SLURM is not
installed (`apt-get install -y slurm-wlm munge`, or scripts/install_slurm.sh) or not running as root.
"""

from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "local_slurm.sh"
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
MISSING = [b for b in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(b, path=SEARCH_PATH) is None]

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(
        bool(MISSING),
        reason=f"SLURM not installed ({', '.join(MISSING)} missing): apt-get install -y slurm-wlm munge",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="the local SLURM (scripts/local_slurm.sh) runs as root"),
]


@pytest.fixture
def slurm_conf():
    """Path of the slurm.conf of a SLURM running for this test only; always stopped afterwards."""
    # Not tmp_path: munge's socket path must stay short (unix sockets allow ~100 characters).
    root = tempfile.mkdtemp(prefix="less-slurm-", dir="/tmp")
    try:
        proc = subprocess.run(["bash", str(SCRIPT), "start", root], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"local SLURM did not start:\n{proc.stderr[-3000:]}"
        assert proc.stdout.strip() == f"export SLURM_CONF={root}/slurm.conf"
        yield f"{root}/slurm.conf"
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", root], capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def test_sweep_runs_as_a_slurm_job_array(slurm_conf, tmp_path):
    env = {**os.environ, "SLURM_CONF": slurm_conf, "LESS_OUTPUT_DIR": str(tmp_path)}
    cmd = [
        sys.executable, "-m", "less_exp.eval", "-m",
        "model=tiny_llama", "task.seq_len=64", "task.max_windows=1,2", "logger=none",
        "hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.timeout_min=5",
        "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]

    (sweep,) = (tmp_path / "multirun" / "eval").iterdir()
    results = sorted(sweep.glob("*/results.json"))
    names = [p.parent.name for p in results]  # <job number>_<overrides>_<hash of all overrides>
    assert [name.rsplit("_", 1)[0] for name in names] == [
        f"{i}_model=tiny_llama,task.max_windows={i + 1},task.seq_len=64" for i in range(2)
    ]
    assert all(re.fullmatch(r"[0-9a-f]{8}", name.rsplit("_", 1)[1]) for name in names)
    assert [json.loads(p.read_text())["metrics"]["num_windows"] for p in results] == [1, 2]

    # submitit's folder: the array's sbatch script, then one folder per task, <array job id>_<index>.
    submitit = sweep / ".submitit"
    (script,) = submitit.glob("*/*_submission.sh")
    job_id = script.parent.name
    assert job_id.isdigit()
    text = script.read_text()
    assert "#SBATCH --array=0-1" in text and "#SBATCH --partition=debug" in text and "#SBATCH --mem=1GB" in text
    assert "srun --unbuffered" in text and sys.executable in text

    # Submitit returns once the results are pickled; the jobs finish (and flush their logs) just after.
    deadline = time.monotonic() + 60
    while _slurm(env, "squeue", "-h", "-j", job_id, check=False).strip() and time.monotonic() < deadline:
        time.sleep(0.5)
    # SLURM itself ran them: the controller still knows both array tasks, completed.
    jobs = _slurm(env, "scontrol", "-o", "show", "job", job_id).strip().splitlines()
    assert len(jobs) == 2 and all("JobState=COMPLETED" in j and "Partition=debug" in j for j in jobs), jobs
    for i in range(2):
        task = f"{job_id}_{i}"
        log = (submitit / task / f"{task}_0_log.out").read_text()  # submitit's and the job's output
        assert f"JobEnvironment(job_id={task}," in log and "Job completed successfully" in log
        assert f"num_windows={i + 1} " in log


def _slurm(env, *cmd, check=True):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 or not check, proc.stderr
    return proc.stdout


def test_study_runs_as_a_slurm_graph_with_dependencies(slurm_conf, tmp_path):
    """less-study with hydra/launcher=slurm: the layer ranges as one array, its verify job after it, the
    evaluations after the verify job (the state's) or at once (the others), the report after them all."""
    env = {**os.environ, "SLURM_CONF": slurm_conf, "LESS_OUTPUT_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    root = tmp_path / "study"
    cmd = [
        sys.executable, "-m", "less_exp.studies.cli", "study=tiny_pipeline", f"root={root}",
        f"page={tmp_path / 'page.md'}", "logger=none", "hydra/launcher=slurm", "hydra.launcher.partition=debug",
        "hydra.launcher.timeout_min=5", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ids = dict(re.findall(r"submitted (\S+) as (\S+)", proc.stdout))
    assert set(ids) == {"layerwise/layers_0", "layerwise/layers_1", "layerwise", "eval/wikitext2/full",
                        "eval/wikitext2/plain", "eval/wikitext2/baseline_plus", "eval/wikitext2/layerwise", "report"}
    array = ids["layerwise/layers_0"].split("_")[0]
    assert ids["layerwise/layers_1"] == f"{array}_1"  # one array for the layer ranges

    scripts = {}  # SLURM job name -> the dependency its sbatch script asked for
    for script in (root / "slurm").rglob("*.sh"):
        text = script.read_text()
        name = re.search(r"#SBATCH --job-name=(\S+)", text).group(1)
        found = re.search(r"#SBATCH --dependency=afterok:(\S+)", text)
        scripts[name] = set(found.group(1).split(":")) if found else set()

    def dependency(name):
        return scripts["less-layerwise-layers" if name.startswith("layerwise/layers_") else "less-" + name.replace("/", "-")]

    assert dependency("layerwise/layers_0") == set()
    assert dependency("layerwise") == {ids["layerwise/layers_0"], ids["layerwise/layers_1"]}
    assert dependency("eval/wikitext2/layerwise") == {ids["layerwise"]} and dependency("eval/wikitext2/plain") == set()
    assert dependency("report") == {ids[f"eval/wikitext2/{m}"] for m in ("full", "plain", "baseline_plus", "layerwise")}
    for name in ids:
        assert (root / name / "study.json").is_file(), name
    assert json.loads((root / "eval/wikitext2/layerwise/results.json").read_text())["status"] == "ok"
    assert "eval/wikitext2/layerwise" in (tmp_path / "page.md").read_text()

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and "8 jobs, 8 complete" in rerun.stdout and "submitted" not in rerun.stdout
