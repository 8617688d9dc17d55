"""What code produced a result: the package's code version and the checkout's commit.

:func:`code_version` changes exactly when a ``less_exp/**/*.py`` file does (a README, test or config
commit leaves it alone), so a finished stage of a study can be skipped while it is unchanged;
:func:`git_commit` says which commit a results page came from.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import less_exp

PACKAGE_DIR = Path(less_exp.__file__).resolve().parent
SOURCE_TREES = ("less_exp", "conf")  # the trees whose uncommitted changes make a commit "-dirty"


def code_version() -> str:
    """``<package version>+<12 hex>``: a sha256 over the path and contents of every ``less_exp``
    source file, in sorted path order."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return f"{less_exp.__version__}+{digest.hexdigest()[:12]}"


def git_commit() -> str | None:
    """The checkout's short HEAD, with ``-dirty`` when ``less_exp/`` or ``conf/`` has uncommitted
    changes (untracked files included); ``None`` outside a git checkout or without git."""
    root = PACKAGE_DIR.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return None
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", *SOURCE_TREES)
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")
