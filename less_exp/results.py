"""``results.json``: what every job leaves in its output folder, and :class:`Run`, one of them as
tables and plots read it.

``{"job", "metrics", "config" (resolved), "versions", "duration_s"}``, written atomically so a
reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from less_exp import paths

FILENAME = "results.json"


@dataclass(frozen=True)
class Run:
    """One ``results.json``, reduced to what a report row and a plot need."""

    name: str
    job: str
    model: str
    task: str
    policy: str
    method: str
    budget: int | None
    state_tokens: float
    metrics: Mapping[str, Any]
    passkey_grid: Mapping[str, Any] | None = None

    @property
    def memory(self) -> int | None:
        """Tokens the cache holds: the budget plus the state's size rounded to whole tokens."""
        return None if self.budget is None else self.budget + round(self.state_tokens)

    def sort_key(self) -> tuple:
        return (self.model, self.policy != "full", self.policy, -1 if self.budget is None else self.budget, self.method, self.name)


def versions() -> dict[str, str | None]:
    """Versions of Python, the main libraries, less_exp and the checkout's git commit."""
    import torch
    import transformers

    import less_exp

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "less_exp": less_exp.__version__,
        "git_commit": git_commit(),
    }


def git_commit() -> str | None:
    """HEAD of the source checkout (with ``-dirty`` when it has uncommitted changes), if any."""
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(paths.ROOT_DIR), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def write_results(
    output_dir: str | Path,
    job: str,
    metrics: Mapping[str, Any],
    config: Mapping[str, Any],
    duration_s: float,
    status: str = "ok",
    error: str | None = None,
) -> Path:
    """Write ``results.json`` into ``output_dir`` atomically; returns its path.

    ``status`` is ``"ok"``, or ``"failed"`` with ``error`` saying why: a failed run's metrics are never
    to be read as results (``less-report`` lists such runs apart).
    """
    record = {
        "job": job,
        "status": status,
        **({"error": error} if error else {}),
        "metrics": dict(metrics),
        "config": dict(config),
        "versions": versions(),
        "duration_s": round(float(duration_s), 3),
    }
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / FILENAME
    tmp = out / f".{FILENAME}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return target


def read_record(path: str | Path) -> dict | None:
    """A JSON object written by a job (``results.json``, a study's marker), or None when the file is
    missing, unreadable or not an object."""
    try:
        found = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def write_failure(output_dir: str | Path, job: str, config: Mapping[str, Any], error: str) -> Path | None:
    """Record a job that failed before it wrote ``results.json`` itself (refused by its checks), so a
    sweep's report lists it as failed; a record already there is kept. Returns the path written, if any."""
    if (Path(output_dir) / FILENAME).is_file():
        return None
    return write_results(output_dir, job, {}, config, 0.0, status="failed", error=error)
