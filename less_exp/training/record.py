"""Record what layer-wise training fits: each layer's post-RoPE Q, K, V and its attention output O.

The frozen full-cache model runs once per sequence under the attention function ``"less_record"``
(sdpa plus a hook that keeps q, k, v; registered with transformers' ``AttentionInterface``), and a
forward hook on each recorded layer's ``o_proj`` takes O. Every (layer, sequence) goes to its own
file as soon as the layer has run, so memory holds one layer of one batch at a time; the forward
stops after the last recorded layer.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from less_exp.adapter import attention_modules

NAME = "less_record"
DONE = "complete.json"
_RECORDERS: "weakref.WeakKeyDictionary[torch.nn.Module, Recorder]" = weakref.WeakKeyDictionary()


class _Stop(Exception):
    """Raised after the last recorded layer so the rest of the forward is skipped."""


def record_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    recorder = _RECORDERS.get(module)
    if recorder is not None:
        recorder.pending[module.layer_idx] = (query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def register() -> None:
    AttentionInterface.register(NAME, record_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def layer_dir(record_dir: Path, layer: int) -> Path:
    return Path(record_dir) / f"layer_{layer:03d}"


def sequence_file(record_dir: Path, layer: int, index: int) -> Path:
    return layer_dir(record_dir, layer) / f"seq_{index:05d}.pt"


def save_atomic(obj, path: Path) -> None:
    """``torch.save`` to a temporary name, then rename: a kill never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Recorder:
    """Context that switches ``model`` to ``"less_record"`` and writes the chosen layers' records."""

    def __init__(self, model: torch.nn.Module, layers: list[int], record_dir: Path, dtype: torch.dtype):
        self.model = model
        self.layers = sorted(layers)
        self.record_dir = Path(record_dir)
        self.dtype = dtype
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.index = 0
        self._hooks = []
        self._previous = model.config._attn_implementation

    def __enter__(self) -> "Recorder":
        register()
        modules = attention_modules(self.model)
        for layer in self.layers:
            _RECORDERS[modules[layer]] = self
            self._hooks.append(modules[layer].o_proj.register_forward_hook(self._hook(layer)))
        self.model.set_attn_implementation(NAME)
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        modules = attention_modules(self.model)
        for layer in self.layers:
            _RECORDERS.pop(modules[layer], None)
        self.model.set_attn_implementation(self._previous)

    def _hook(self, layer: int):
        def hook(module, args, output):
            query, key, value = self.pending.pop(layer)
            for b in range(output.shape[0]):
                record = {"q": query[b], "k": key[b], "v": value[b], "o": output[b]}
                record = {name: t.detach().to("cpu", self.dtype).contiguous() for name, t in record.items()}
                save_atomic(record, sequence_file(self.record_dir, layer, self.index + b))
            if layer == self.layers[-1]:
                raise _Stop

        return hook

    @torch.inference_mode()
    def record(self, input_ids: torch.Tensor) -> None:
        """Run ``input_ids [B, S]`` (no padding) and write the records of its ``B`` sequences."""
        try:
            self.model(input_ids=input_ids, use_cache=False)
        except _Stop:
            pass
        finally:
            self.pending.clear()
        self.index += input_ids.shape[0]


def record_layers(
    model: torch.nn.Module,
    windows: torch.Tensor,
    layers: list[int],
    record_dir: Path,
    dtype: torch.dtype,
    fingerprint: dict,
    batch_size: int = 1,
) -> None:
    """Record ``layers`` on every row of ``windows``, skipping layers already recorded with ``fingerprint``.

    A layer is complete when its folder holds ``complete.json`` with the same fingerprint (model,
    data, windows, dtype); anything else is recorded again.
    """
    todo = [layer for layer in layers if _fingerprint(record_dir, layer) != fingerprint]
    if not todo:
        return
    device = next(model.parameters()).device
    with Recorder(model, todo, record_dir, dtype) as recorder:
        for batch in tqdm(windows.split(batch_size), desc=f"recording layers {todo[0]}-{todo[-1]}", unit="batch"):
            recorder.record(batch.to(device))
    for layer in todo:
        done = layer_dir(record_dir, layer) / DONE
        tmp = done.with_name(f".{DONE}.tmp")
        tmp.write_text(json.dumps({**fingerprint, "num_sequences": len(windows)}))
        os.replace(tmp, done)


def windows_fingerprint(model_name: str, windows: torch.Tensor, **extra) -> dict:
    """What recorded files are a function of: the model, the exact token windows, and ``extra`` (dtype, k)."""
    return {"model": model_name, "windows": hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
            "shape": list(windows.shape), **extra}


def _fingerprint(record_dir: Path, layer: int) -> dict | None:
    done = layer_dir(record_dir, layer) / DONE
    if not done.is_file():
        return None
    found = json.loads(done.read_text())
    found.pop("num_sequences", None)
    return found
