"""Load the model named by a ``conf/model`` preset, frozen and ready for evaluation.

Three sources: ``embedded`` (SmolLM2 converted from its PyPI wheel, see :mod:`less_exp.embedded`),
``tiny`` (random models built in memory, see :mod:`less_exp.tiny`) and ``hub`` (real research
models). Hub presets are checked first, so an offline machine fails in seconds with a message that
names the embedded alternative.

Run ``python -m less_exp.models --prepare smollm2_135m`` to convert the embedded model ahead of time.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from less_exp import embedded, paths, tiny
from less_exp.errors import ConfigError, UnavailableError
from less_exp.hub import hub_reachable

SOURCES = ("embedded", "tiny", "hub")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
EMBEDDED_ALTERNATIVE = "model=smollm2_135m"


def torch_dtype(model_cfg: DictConfig) -> torch.dtype:
    """The preset's ``dtype`` as a torch dtype."""
    name = model_cfg.get("dtype", "float32")
    if name not in DTYPES:
        raise ConfigError(f"model.dtype={name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def check_available(model_cfg: DictConfig) -> None:
    """Fail fast when a hub preset can be neither found locally nor downloaded."""
    if model_cfg.source not in SOURCES:
        raise ConfigError(f"model.source={model_cfg.source!r} is not one of {SOURCES}")
    torch_dtype(model_cfg)
    if model_cfg.source != "hub" or _hub_local(model_cfg) or hub_reachable():
        return
    raise UnavailableError(
        f"model={model_cfg.name} needs {model_cfg.hub_id} from the Hugging Face hub, which is not "
        f"reachable (offline or HF_HUB_OFFLINE set) and not in the local HF cache. Use "
        f"{EMBEDDED_ALTERNATIVE} (embedded, no network) or set model.hub_id to a local folder."
    )


def load_model(
    model_cfg: DictConfig, device: str | torch.device = "cpu", cache_dir: str | Path | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (eval mode, every parameter frozen, sdpa attention) and its tokenizer (left padding).

    ``cache_dir`` holds the converted embedded model; defaults to :func:`less_exp.paths.cache_dir`.
    """
    check_available(model_cfg)
    dtype = torch_dtype(model_cfg)
    if model_cfg.source == "tiny":
        model, tokenizer = tiny.build_tiny(model_cfg, dtype)
    else:
        if model_cfg.source == "embedded":
            location = embedded.prepare(model_cfg, Path(cache_dir or paths.cache_dir()))
            kwargs = {}
        else:
            location = model_cfg.hub_id
            kwargs = {"revision": model_cfg.get("revision"), "local_files_only": not hub_reachable()}
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, attn_implementation="sdpa", **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.requires_grad_(False)
    return model.to(device).eval(), tokenizer


def max_positions(model_cfg: DictConfig) -> int:
    """Longest sequence the preset supports (``model.max_length``)."""
    return int(model_cfg.max_length)


def end_token_ids(model, tokenizer) -> set[int]:
    """The token ids that end a generation: the generation config's end tokens, else the tokenizer's."""
    ids = model.generation_config.eos_token_id
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return set()
    return set(ids) if isinstance(ids, (list, tuple)) else {ids}


def _hub_local(model_cfg: DictConfig) -> bool:
    """True when ``hub_id`` is a local folder or its config is already in the HF cache."""
    if Path(str(model_cfg.hub_id)).expanduser().is_dir():
        return True
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model_cfg.hub_id, "config.json", revision=model_cfg.get("revision"))
    return isinstance(cached, str)


def main(argv: list[str] | None = None) -> None:
    """Command line: ``--prepare PRESET`` converts an embedded model into the cache."""
    parser = argparse.ArgumentParser(prog="python -m less_exp.models", description=main.__doc__)
    parser.add_argument("--prepare", metavar="PRESET", required=True, help="a conf/model preset, e.g. smollm2_135m")
    args = parser.parse_args(argv)
    model_cfg = OmegaConf.load(paths.CONF_DIR / "model" / f"{args.prepare}.yaml")
    if model_cfg.source != "embedded":
        parser.error(f"{args.prepare} is a {model_cfg.source} preset; only embedded presets need preparing")
    print(f"{args.prepare}: {embedded.prepare(model_cfg, paths.cache_dir())}")


if __name__ == "__main__":
    main()
