"""A study's jobs on this machine: in this process, or in ``parallel`` worker processes.

Jobs start as soon as every job they need has finished, so layer ranges and evaluations run side by
side when ``parallel`` > 1. A worker keeps its loaded model between the evaluations it runs, and dies
with the study (Linux: ``PR_SET_PDEATHSIG``), so a killed study leaves no job running behind it and a
rerun continues where it stopped.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context

from less_exp.errors import LessError
from less_exp.studies import execute
from less_exp.studies.plan import Job

_MODELS: execute.ModelCache | None = None


def _worker_init(threads: int) -> None:
    global _MODELS
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the study
    except (OSError, AttributeError):
        pass
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    _MODELS = execute.ModelCache()


def _work(job: Job, code_version: str) -> tuple[str, float, str | None, int]:
    """Run one job in a worker: (name, seconds, the error's line or None, its exit code)."""
    started = time.perf_counter()
    try:
        with execute.hydra_ready():
            execute.run(job, code_version, _MODELS)
    except LessError as err:
        return job.name, time.perf_counter() - started, str(err), err.exit_code
    return job.name, time.perf_counter() - started, None, 0


def run(jobs: list[Job], code_version: str, done: set[str], parallel: int = 1, log=print) -> int:
    """Run every job not in ``done`` after what it needs; returns 0, or the first failure's exit code
    (jobs that do not depend on the failed one still run)."""
    todo = [job for job in jobs if job.name not in done]
    total, finished, failed = len(todo), set(done), {}
    if parallel <= 1:
        models = execute.ModelCache()
        for index, job in enumerate(todo, 1):
            blocked = [n for n in job.needs if n in failed]
            if blocked:
                log(f"[{index}/{total}] {job.name}: not run, it needs {', '.join(blocked)}")
                failed[job.name] = failed[blocked[0]]
                continue
            log(f"[{index}/{total}] {job.kind} {job.name}")
            started = time.perf_counter()
            try:
                execute.run(job, code_version, models)
            except LessError as err:
                print(f"less-study: error: {job.name}: {err}", file=sys.stderr)
                failed[job.name] = err.exit_code
                continue
            log(f"[{index}/{total}] {job.name} done in {time.perf_counter() - started:.0f} s")
        return next(iter(failed.values()), 0)

    threads = max(1, (os.cpu_count() or 1) // parallel)
    pending = {job.name: job for job in todo}
    count = 0
    pool = ProcessPoolExecutor(parallel, mp_context=get_context("spawn"), initializer=_worker_init, initargs=(threads,))
    try:
        running = {}
        while pending or running:
            for name, job in list(pending.items()):
                if any(n in failed for n in job.needs):
                    log(f"{name}: not run, it needs {', '.join(n for n in job.needs if n in failed)}")
                    failed[name] = failed[next(n for n in job.needs if n in failed)]
                    del pending[name]
                elif all(n in finished for n in job.needs) and len(running) < parallel:
                    count += 1
                    log(f"[{count}/{total}] {job.kind} {name}")
                    running[pool.submit(_work, job, code_version)] = name
                    del pending[name]
            if not running:
                continue
            ready, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in ready:
                name, seconds, error, code = future.result()
                del running[future]
                if error is None:
                    finished.add(name)
                    log(f"{name} done in {seconds:.0f} s")
                else:
                    print(f"less-study: error: {name}: {error}", file=sys.stderr)
                    failed[name] = code
    except BaseException:  # Ctrl-C, SIGTERM: end the running jobs now (they resume on a rerun), do not wait for them
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return next(iter(failed.values()), 0)
