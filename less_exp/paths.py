"""Where the platform finds its configs, data, caches and output folders.

The Hydra configs live in the repository's top-level ``conf/`` (next to the package, as an
editable install keeps it), so every path here is derived from the source checkout or from an
environment variable that overrides it.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import tempfile
from pathlib import Path

from omegaconf import ListConfig, OmegaConf

ROOT_DIR = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT_DIR / "conf"


def conf_dir() -> str:
    """Absolute path of the Hydra config folder; fails clearly when the checkout lacks it."""
    if not (CONF_DIR / "eval.yaml").is_file():
        raise FileNotFoundError(
            f"Hydra configs not found at {CONF_DIR}; install less-exp from its source checkout "
            "with `pip install -e .` (scripts/setup.sh does)."
        )
    return str(CONF_DIR)


def cache_dir() -> Path:
    """Cache for converted models and downloads: ``$LESS_CACHE_DIR`` or ``~/.cache/less-exp``."""
    env = os.environ.get("LESS_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "less-exp"


def data_root() -> Path:
    """Offline data sets: ``$LESS_DATA_ROOT`` or ``../shared/data`` beside the checkout."""
    env = os.environ.get("LESS_DATA_ROOT")
    return Path(env).expanduser() if env else (ROOT_DIR.parent / "shared" / "data")


def run_dirname(overrides: str, limit: int = 160) -> str:
    """A sweep job's folder name from its overrides: path values shortened to their last part
    (``checkpoint=/x/ckpt/h2o`` -> ``checkpoint=h2o``), so a folder is never nested by a value's
    slashes, and very long names cut with a hash that keeps them apart."""
    name = re.sub(r"=(?:[^,=/]*/)+(?=[^,=/])", "=", overrides).replace("/", "_")
    if len(name) > limit:
        name = f"{name[: limit - 9]}~{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


def unwritable_output(argv: list[str]) -> str | None:
    """Why the run folder that ``argv`` asks for cannot be created (checked before Hydra creates it)."""
    wanted = {}
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in ("hydra.run.dir", "hydra.sweep.dir", "paths.output_root") and value:
            wanted[key] = value
    if not wanted:
        wanted["LESS_OUTPUT_DIR"] = os.environ.get("LESS_OUTPUT_DIR") or str(ROOT_DIR / "outputs")
    for key, value in wanted.items():
        problem = None if "${" in value else cannot_create(value)
        if problem:
            return f"{key}={shorten(value)}: {problem}"
    return None


def shorten(text: str, limit: int = 80) -> str:
    """``text`` cut in the middle to about ``limit`` characters, for a one-line message."""
    return text if len(text) <= limit else f"{text[: limit // 2]}...{text[-(limit // 2):]}"


def cannot_create(folder: str | Path) -> str | None:
    """Why ``folder`` (and its missing parents) cannot be created here, in words; None when it can.
    Checks the deepest existing parent for writing and every part of the name against the file
    system's limit, without creating anything that stays."""
    folder = Path(folder).expanduser().absolute()
    limit = os.pathconf("/", "PC_NAME_MAX")
    long = next((part for part in folder.parts if len(part.encode()) > limit), None)
    if long is not None:
        return f"the folder name {long[:40]}... is longer than the file system's {limit} bytes; choose a shorter one"
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    try:
        if existing is None or not existing.is_dir():
            raise NotADirectoryError
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".less-write-check-"))
    except OSError as err:
        reason = err.strerror or "not a folder"
        return f"cannot create folders in {existing or folder} ({reason}); choose a writable folder"
    return None


# one per process, so that runs started in the same second (here or on SLURM) never share a folder
RUN_ID = secrets.token_hex(3)


def short_hash(value) -> str:
    """8 hex characters of the sorted overrides (or any value): folders of jobs whose overrides differ
    in anything, excluded keys such as ``seed`` included, never collide."""
    items = sorted(str(v) for v in value) if isinstance(value, (list, tuple, ListConfig)) else [str(value)]
    return hashlib.sha1("\n".join(items).encode()).hexdigest()[:8]


def register_resolvers() -> None:
    """Expose the defaults above to the configs as ``${less.root:}`` etc."""
    resolvers = {
        "less.root": lambda: str(ROOT_DIR),
        "less.cache": lambda: str(cache_dir()),
        "less.data": lambda: str(data_root()),
        "less.dirname": run_dirname,
        "less.run_id": lambda: RUN_ID,
        "less.hash": short_hash,
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            # cached like Hydra's ${now:}: a config carries the value it first resolved (to SLURM workers too)
            OmegaConf.register_new_resolver(name, fn, use_cache=name == "less.run_id")


register_resolvers()
