"""Non-finite guards: a NaN or infinity stops the job where it first appears, never becomes a result.

:class:`FiniteGuard` hooks every attention module and decoder layer of a model and raises
:class:`~less_exp.errors.NonFiniteError` naming the layer, the position and the dtype of the first
non-finite output; :func:`check_metrics` refuses a metric that is not finite.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from less_exp.adapter import attention_modules
from less_exp.errors import NonFiniteError


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return getattr(output, "last_hidden_state", None)


class FiniteGuard:
    """``with FiniteGuard(model): ...``: the first non-finite attention or layer output raises."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.handles = []

    def __enter__(self) -> "FiniteGuard":
        names = {m: n for n, m in self.model.named_modules()}
        for module in attention_modules(self.model):
            layer = module.layer_idx
            parent = self.model.get_submodule(names[module].rpartition(".")[0])
            self.handles.append(module.register_forward_hook(self._hook(f"the attention of layer {layer}")))
            self.handles.append(parent.register_forward_hook(self._hook(f"decoder layer {layer}")))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    @staticmethod
    def _hook(where: str):
        def check(module, inputs, output):
            x = _first_tensor(output)
            if x is None or not x.is_floating_point() or bool(torch.isfinite(x).all()):
                return
            bad = (~torch.isfinite(x)).nonzero()[0].tolist()
            position = f"row {bad[0]}, position {bad[1]}" if x.dim() >= 3 else f"index {bad}"
            raise NonFiniteError(
                f"non-finite output of {where} at {position} (dtype {str(x.dtype).removeprefix('torch.')}); "
                "nothing was written as a result. Try model.dtype=float32, or check the checkpoint's states"
            )

        return check


def check_metrics(metrics: Mapping, prefix: str = "") -> None:
    """Every float in ``metrics`` (nested too) must be finite; the first that is not is named."""
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            check_metrics(value, f"{prefix}{key}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise NonFiniteError(f"metric {prefix}{key} is {value}; the run is marked failed, not written as a result")
