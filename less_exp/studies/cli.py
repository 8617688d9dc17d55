"""``less-study``: run a study (``conf/study/``) end to end, here or on SLURM (``conf/study.yaml``).

    less-study study=sink_generation                      # every stage in order, here
    less-study study=sink_generation dry_run=true         # the jobs and which are already complete
    less-study study=sink_generation hydra/launcher=slurm # a graph of SLURM jobs with dependencies

A rerun skips what is complete for the same overrides and code version and resumes the rest.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from less_exp import commandline, paths, runtime
from less_exp.errors import ConfigError
from less_exp.studies import execute, local, plan as planning

PROG = "less-study"


def _launcher() -> DictConfig | None:
    """The launcher config when ``hydra/launcher`` names a submitit SLURM launcher, else None (run here)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():  # composed by hand (tests, notebooks): run here
        return None
    launcher = HydraConfig.get().launcher
    return launcher if "SlurmLauncher" in str(launcher.get("_target_", "")) else None


def command() -> str:
    return " ".join([PROG, *sys.argv[1:]])


def study(cfg: DictConfig) -> int:
    """Plan the study, list its jobs, then run the incomplete ones here or submit them to SLURM."""
    from less_exp.version import code_version

    parallel = cfg.parallel
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ConfigError(f"parallel={parallel!r} must be a whole number of jobs side by side, at least 1")
    jobs = planning.plan(cfg.study, Path(cfg.root), group=cfg.group, logger=cfg.logger.name, page=Path(cfg.page),
                         command=command())
    for job in jobs:  # every job's config against the schema, before any of them runs
        if job.config_name is not None:
            execute.compose(job)
    version = code_version()
    done = {job.name for job in jobs if execute.is_complete(job, version)}
    print(f"{PROG}: study {cfg.study.name} ({cfg.study.get('time') or 'time not stated'}): {len(jobs)} jobs, "
          f"{len(done)} complete; folder {cfg.root}")
    for job in jobs:
        print(f"  {job.kind:6s} {job.name:40s} {'complete' if job.name in done else 'to run'}")
    if cfg.dry_run:
        return 0
    launcher = _launcher()
    if launcher is None:
        started = time.perf_counter()
        code = local.run(jobs, version, done, parallel=parallel, log=lambda line: print(f"{PROG}: {line}", flush=True))
        if not code:
            print(f"{PROG}: study {cfg.study.name} complete in {(time.perf_counter() - started) / 60:.1f} min; page {cfg.page}")
        return code
    from less_exp.studies import slurm

    slurm.check()
    folder = Path(cfg.root) / "slurm"
    ids = slurm.submit(jobs, version, launcher, folder)
    for name, job_id in ids.items():
        print(f"  submitted {name} as {job_id}")
    if not cfg.wait or not ids:
        return 0
    states = slurm.wait(ids, jobs, version)
    for name, state in states.items():
        print(f"  {name}: {state}")
    bad = [name for name, state in states.items() if not state.startswith("COMPLETED")]
    if bad:
        print(f"{PROG}: error: {len(bad)} job(s) did not complete ({', '.join(bad)}); their logs are in {folder}",
              file=sys.stderr)
        return 1
    return 0


@hydra.main(config_path=paths.conf_dir(), config_name="study", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Command line: ``less-study study=<name> [overrides]``."""
    code = runtime.run_cli(PROG, study, cfg)
    if code:
        sys.exit(code)


def cli() -> None:
    """The ``less-study`` console script; without ``study=`` it lists the studies in one line."""
    if not any(arg.split("=", 1)[0].lstrip("+") == "study" for arg in sys.argv[1:]):
        names = sorted(p.stem for p in (Path(paths.conf_dir()) / "study").glob("*.yaml"))
        print(f"{PROG}: error: choose a study: less-study study=<name> ({', '.join(names)})", file=sys.stderr)
        sys.exit(2)
    commandline.cli(PROG, "study", main)


if __name__ == "__main__":
    cli()
