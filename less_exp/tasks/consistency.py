"""``task=consistency``: the parallel form and real-cache decoding must give the same logits.

The same tokens go once through the parallel form (masks over the whole sequence) and once through
a prefill of ``task.prefill`` tokens followed by decoding calls of ``task.chunk`` tokens each (1:
token by token; more: chunked prefill) with a :class:`LessCache` that really evicts. With
``task.pad > 0`` a second row holds the same text left-padded by that many tokens, so padding and
(when ``pad > prefill``) padding that arrives while decoding are covered too.
``metrics.max_abs_logit_diff`` is the largest difference over all real positions.

``metrics.sdpa_logit_diff`` is the same comparison for the full cache on transformers' own sdpa
attention and DynamicCache: what the model's dtype alone gives between a whole-sequence pass and
incremental decoding, the noise floor against which half-precision differences are judged.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from less_exp import data
from less_exp.adapter import LessCache, cache_kwargs, compression_of, switch
from less_exp.errors import ConfigError
from less_exp.report_spec import ReportSpec

REPORT = ReportSpec(columns=("max_abs_logit_diff",), headline="max_abs_logit_diff")

def position_ids(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Positions that skip left padding, as ``generate`` computes them; LESS's psi sees absolute RoPE positions."""
    if attention_mask is None:
        return None
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


@torch.no_grad()
def decode_logits(model, input_ids, attention_mask=None, prefill: int = 1, chunk: int = 1, progress: bool = False,
                  cache=None) -> torch.Tensor:
    """Logits of every position from a prefill and then decoding calls of ``chunk`` tokens with a real cache."""
    cache = LessCache(model) if cache is None else cache
    positions = position_ids(attention_mask)

    def step(start, stop):
        mask = None if attention_mask is None else attention_mask[:, :stop]
        pos = None if positions is None else positions[:, start:stop]
        return model(input_ids[:, start:stop], attention_mask=mask, position_ids=pos, **cache_kwargs(cache),
                     use_cache=True).logits

    S = input_ids.shape[1]
    chunks = [step(0, prefill)]
    for t in tqdm(range(prefill, S, chunk), disable=not progress, desc="decode", leave=False):
        chunks.append(step(t, min(t + chunk, S)))
    return torch.cat(chunks, dim=1)


@torch.no_grad()
def max_abs_logit_diff(model, input_ids, attention_mask=None, prefill: int = 1, chunk: int = 1,
                       progress: bool = False, cache=None) -> float:
    parallel = model(input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                     use_cache=False).logits
    decoded = decode_logits(model, input_ids, attention_mask, prefill, chunk, progress, cache)
    if attention_mask is not None:
        keep = attention_mask.bool()[..., None]
        parallel, decoded = parallel * keep, decoded * keep
    return float((parallel.float() - decoded.float()).abs().max())


def sdpa_logit_diff(model, input_ids, attention_mask=None, prefill: int = 1, chunk: int = 1) -> float:
    """The same comparison on the model's own sdpa attention and DynamicCache (full cache)."""
    from transformers import DynamicCache

    comp = compression_of(model)
    switch(model, None)
    try:
        return max_abs_logit_diff(model, input_ids, attention_mask, prefill, chunk, cache=DynamicCache())
    finally:
        if comp is not None:
            switch(model, comp)


def validate(cfg) -> None:
    """The two forms must differ (a policy or a state) and the budget be fixed (the schema bounds the lengths)."""
    if cfg.policy.name == "full" and cfg.feature_map.name == "none":
        raise ConfigError("task=consistency compares the two forms of the 'less' attention; choose a policy other "
                          "than full (policy=h2o, ...) or a feature_map")
    if cfg.policy.get("ratio_of") == "length":
        raise ConfigError("task=consistency cannot use policy.ratio_of=length: the parallel form would size the budget "
                          "at the whole sequence and the cache at its prefill. Use absolute counts (e.g. "
                          "policy.heavy=50 policy.recent=50) or policy.ratio_of=max_positions")


def batch(ids: torch.Tensor, pad: int, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``ids [1, S]`` alone, or with a second row holding its first ``S - pad`` tokens left-padded."""
    if pad == 0:
        return ids, None
    S = ids.shape[1]
    padded = torch.full_like(ids, pad_token_id)
    padded[:, pad:] = ids[:, : S - pad]
    mask = torch.ones(2, S, dtype=torch.long, device=ids.device)
    mask[1, :pad] = 0
    return torch.cat([ids, padded]), mask


def run(model, tokenizer, cfg, tracker) -> dict:
    task = cfg.task
    ids = tokenizer(data.load_text(cfg.data, task.split), return_tensors="pt").input_ids[:, : task.seq_len]
    ids, mask = batch(ids.to(next(model.parameters()).device), int(task.pad), tokenizer.pad_token_id or 0)
    prefill, chunk = int(task.prefill), int(task.chunk)
    diff = max_abs_logit_diff(model, ids, mask, prefill=prefill, chunk=chunk, progress=True)
    floor = sdpa_logit_diff(model, ids, mask, prefill=prefill, chunk=chunk)
    print(f"consistency: max |logit difference| {diff:.3g} (sdpa + DynamicCache on the same tokens: {floor:.3g})")
    return {"max_abs_logit_diff": diff, "sdpa_logit_diff": floor, "num_tokens": int(ids.shape[1]),
            "prefill": prefill, "chunk": chunk, "pad": int(task.pad)}
