"""``task=consistency``: the parallel form and real-cache decoding must give the same logits.

The same tokens go once through the parallel form (masks over the whole sequence) and once through
a prefill of ``task.prefill`` tokens followed by token-by-token decoding with a :class:`LessCache`
that really evicts. ``metrics.max_abs_logit_diff`` is the largest difference over all positions.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from less_exp import data
from less_exp.cache import LessCache
from less_exp.errors import ConfigError


def position_ids(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Positions that skip left padding, as ``generate`` computes them; LESS's psi sees absolute RoPE positions."""
    if attention_mask is None:
        return None
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


@torch.no_grad()
def decode_logits(model, input_ids, attention_mask=None, prefill: int = 1, progress: bool = False) -> torch.Tensor:
    """Logits of every position computed by prefill + one-token decoding steps with a real cache."""
    cache = LessCache(model)
    positions = position_ids(attention_mask)

    def step(start, stop):
        mask = None if attention_mask is None else attention_mask[:, :stop]
        pos = None if positions is None else positions[:, start:stop]
        return model(input_ids[:, start:stop], attention_mask=mask, position_ids=pos, past_key_values=cache,
                     use_cache=True).logits

    chunks = [step(0, prefill)]
    for t in tqdm(range(prefill, input_ids.shape[1]), disable=not progress, desc="decode", leave=False):
        chunks.append(step(t, t + 1))
    return torch.cat(chunks, dim=1)


@torch.no_grad()
def max_abs_logit_diff(model, input_ids, attention_mask=None, prefill: int = 1, progress: bool = False) -> float:
    parallel = model(input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                     use_cache=False).logits
    decoded = decode_logits(model, input_ids, attention_mask, prefill, progress)
    if attention_mask is not None:
        keep = attention_mask.bool()[..., None]
        parallel, decoded = parallel * keep, decoded * keep
    return float((parallel.float() - decoded.float()).abs().max())


def validate(cfg) -> None:
    task = cfg.task
    if cfg.policy.name == "full" and cfg.feature_map.name == "none":
        raise ConfigError("task=consistency compares the two forms of the 'less' attention; choose a policy other "
                          "than full (policy=h2o, ...) or a feature_map")
    if not 1 <= task.prefill < task.seq_len:
        raise ConfigError(f"task.prefill={task.prefill} must be in [1, task.seq_len={task.seq_len})")


def run(model, tokenizer, cfg, tracker) -> dict:
    task = cfg.task
    ids = tokenizer(data.load_text(cfg.data, task.split), return_tensors="pt").input_ids[:, : task.seq_len]
    ids = ids.to(next(model.parameters()).device)
    diff = max_abs_logit_diff(model, ids, prefill=int(task.prefill), progress=True)
    return {"max_abs_logit_diff": diff, "num_tokens": int(ids.shape[1]), "prefill": int(task.prefill)}
