"""A study as a graph of submitit jobs on SLURM: stages in order, a stage's layer ranges as one job
array followed by its verify job, evaluations fanned out, the report last (``afterok`` dependencies).

Jobs already complete for the same key are not submitted; a job that needs one of them does not wait
for it. Each job runs :func:`less_exp.studies.execute.run_fresh` in its own process.
"""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig

from less_exp.errors import ConfigError
from less_exp.studies import execute
from less_exp.studies.plan import Job

# hydra/launcher=slurm keys (hydra-submitit-launcher) -> submitit AutoExecutor parameters
PARAMETERS = {"partition": "slurm_partition", "account": "slurm_account", "cpus_per_task": "cpus_per_task",
              "gpus_per_node": "gpus_per_node", "mem_gb": "mem_gb", "timeout_min": "timeout_min",
              "nodes": "nodes", "tasks_per_node": "tasks_per_node", "constraint": "slurm_constraint",
              "qos": "slurm_qos", "comment": "slurm_comment", "exclude": "slurm_exclude"}


def executor_parameters(launcher: DictConfig) -> dict:
    """The launcher config's resources as submitit parameters (unset ones left to SLURM)."""
    params = {ours: launcher.get(theirs) for theirs, ours in PARAMETERS.items() if launcher.get(theirs) is not None}
    extra = dict(launcher.get("additional_parameters") or {})
    if extra:
        params["slurm_additional_parameters"] = extra
    return params


def job_name(name: str) -> str:
    """The SLURM job name of a study job: ``eval/xsum/plain`` -> ``less-eval-xsum-plain``."""
    return "less-" + name.replace("/", "-")


def submit(jobs: list[Job], code_version: str, launcher: DictConfig, folder: Path) -> dict[str, str]:
    """Submit every incomplete job with ``afterok`` on the submitted jobs it needs; returns name -> SLURM id."""
    import submitit

    base = executor_parameters(launcher)
    ids: dict[str, str] = {}
    pending = [job for job in jobs if not execute.is_complete(job, code_version)]
    parts_of = {job.name: job.needs for job in pending if job.kind == "verify"}
    in_array = {name for parts in parts_of.values() for name in parts}
    executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster="slurm")

    def configure(job: Job, name: str) -> None:
        after = [ids[n] for n in job.needs if n in ids]
        params = dict(base)
        extra = dict(params.pop("slurm_additional_parameters", {}))
        if after:
            extra["dependency"] = "afterok:" + ":".join(after)
        executor.update_parameters(name=name, slurm_additional_parameters=extra, **params)

    for job in pending:
        if job.name in in_array:
            continue
        if job.kind == "verify":
            parts = [j for j in pending if j.name in job.needs]
            if parts:
                configure(parts[0], job_name(f"{job.name}/layers"))
                with executor.batch():
                    submitted = [executor.submit(execute.run_fresh, part, code_version) for part in parts]
                for part, sub in zip(parts, submitted):
                    ids[part.name] = sub.job_id
        configure(job, job_name(job.name))
        ids[job.name] = executor.submit(execute.run_fresh, job, code_version).job_id
    return ids


def wait(ids: dict[str, str], jobs: list[Job], code_version: str, poll_s: float = 5.0) -> dict[str, str]:
    """Block until none of the submitted jobs is queued or running; returns name -> COMPLETED when the job
    left its completion marker, else FAILED (its log is in the submitit folder). Needs no SLURM accounting."""
    import subprocess

    base = sorted({job_id.split("_")[0] for job_id in ids.values()})
    while True:
        proc = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(base)], capture_output=True, text=True)
        if proc.returncode != 0 or not proc.stdout.strip():
            break
        time.sleep(poll_s)
    by = {job.name: job for job in jobs}
    return {name: "COMPLETED" if execute.is_complete(by[name], code_version) else "FAILED" for name in ids}


def check() -> None:
    """Refuse, before submitting, a machine without ``sbatch``."""
    import shutil

    if shutil.which("sbatch") is None:
        raise ConfigError("hydra/launcher=slurm but sbatch is not on PATH; run on a SLURM login node, or drop "
                          "hydra/launcher=slurm to run the study here")
