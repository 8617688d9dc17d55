"""The full-cache teacher's next-token distributions, kept compactly, and the KL a student is trained on.

Output-level training (``training=progressive``, ``training=e2e``) matches the compressed model's
next-token distribution q to the full-cache model's p. Holding p whole costs ``S x V`` floats per
sequence (200 MB for SmolLM2 at 1024 tokens), so the teacher runs once per sequence and keeps, per
position, its ``k`` most likely tokens with their log-probabilities and the log of the mass left over
(:class:`TopK`). The loss is then the exact KL divergence between the two distributions coarsened to
those ``k + 1`` outcomes (the k kept tokens, "any other token")::

    KL_k(p || q) = sum_{i in K} p_i (log p_i - log q_i) + p_R (log p_R - log q_R),   p_R = 1 - sum_{i in K} p_i

By the log-sum inequality ``0 <= KL_k <= KL``, with equality at ``k = V``, and the gap is only what q
gets wrong *inside* the teacher's leftover mass, which for k = 64 is typically a few percent of the
probability.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

DONE = "complete.json"


class TopK(NamedTuple):
    """Per position: the kept token ids ``[..., k]``, their log-probabilities ``[..., k]`` and the log of
    the remaining mass ``[...]`` (``-inf`` when nothing remains)."""

    index: torch.Tensor
    logp: torch.Tensor
    log_rest: torch.Tensor


def _log_rest(logp: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``log sum_{i not in index} exp(logp_i)``, summed directly (no ``log(1 - ...)`` cancellation)."""
    return logp.scatter(-1, index, float("-inf")).logsumexp(-1)


def top_k_targets(logits: torch.Tensor, k: int) -> TopK:
    """The teacher's :class:`TopK` from its logits ``[..., V]``, in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return TopK(top.indices, top.values, _log_rest(logp, top.indices))


def top_k_kl(student_logits: torch.Tensor, target: TopK) -> torch.Tensor:
    """``KL_k(p || q)`` per position ``[...]`` (float32) of the student's logits ``[..., V]`` against
    ``target``; a kept token at ``-inf`` (zero probability) adds nothing."""
    logq = torch.log_softmax(student_logits.float(), dim=-1)
    zero = ~torch.isfinite(target.logp)  # kept tokens a loop-free target took out: no mass, no term
    logp = target.logp.masked_fill(zero, 0.0)
    kept = (target.logp.exp() * (logp - logq.gather(-1, target.index))).sum(-1)
    rest = target.log_rest
    has_rest = torch.isfinite(rest)
    q_rest = _log_rest(logq, target.index)
    left = torch.where(has_rest, rest.exp() * (rest - q_rest), torch.zeros_like(rest))
    return kept + left


def sequence_file(folder: Path, index: int) -> Path:
    return Path(folder) / f"seq_{index:05d}.pt"


def record(model: torch.nn.Module, windows: torch.Tensor, folder: Path, k: int, fingerprint: dict) -> list[Path]:
    """Run the model (as it is: the caller leaves it on its full-cache attention) once per window and
    write each window's :class:`TopK` for its ``S - 1`` predicting positions; returns the files.

    A folder already complete with the same fingerprint (model, windows, k) is reused as it is.
    """
    folder = Path(folder)
    files = [sequence_file(folder, i) for i in range(len(windows))]
    done = folder / DONE
    if done.is_file() and json.loads(done.read_text()) == fingerprint and all(f.is_file() for f in files):
        return files
    done.unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    with torch.inference_mode():
        for i, window in enumerate(tqdm(windows, desc=f"teacher top-{k}", unit="seq")):
            logits = model(input_ids=window[None].to(device), use_cache=False).logits[0, :-1]
            target = top_k_targets(logits, k)
            item = {"index": target.index.to(torch.int32).cpu(), "logp": target.logp.cpu(),
                    "log_rest": target.log_rest.cpu()}
            tmp = files[i].with_name(f".{files[i].name}.{os.getpid()}.tmp")
            torch.save(item, tmp)
            os.replace(tmp, files[i])
    tmp = done.with_name(f".{DONE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(fingerprint))
    os.replace(tmp, done)
    return files


def load(files: list[Path], device: torch.device) -> TopK:
    """The :class:`TopK` of several sequences stacked on a batch dimension."""
    items = [torch.load(f, weights_only=True) for f in files]
    return TopK(torch.stack([it["index"] for it in items]).long().to(device),
                torch.stack([it["logp"] for it in items]).to(device),
                torch.stack([it["log_rest"] for it in items]).to(device))
