"""``task=bench``: prefill, decode and throughput under a memory cap versus context length, side by side.

Three methods share one model and one token stream: ``full`` (transformers' own sdpa attention and
DynamicCache, the honest baseline), the configured eviction ``policy`` on a real
:class:`LessCache` (its ``policy.prefill``, stepwise or one-shot), and the same policy plus the LESS
state (``less``). For every context length each method prefills the context (in one forward, or in
``task.prefill_chunk`` pieces), with its time and peak memory measured (:mod:`less_exp.peak_memory`);
then ``decode_tokens`` greedy tokens are decoded round-robin across the methods and the median time
per token is reported. Last, throughput: each method's cache is copied to the largest batch whose
weights, caches and decode step fit ``task.memory_cap_gb`` (the per-row cost measured, at most
``task.max_batch`` rows), and ``task.throughput_tokens`` steps are timed at that batch; the
memory it held (weights, caches, a step's measured peak) is reported beside it, so the fit can be
checked. Prefill times are taken while its memory is measured, alike for every method; decode times
are not.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm.auto import tqdm

from less_exp import data
from less_exp.adapter import CACHE_ARG, LessCache, build, cache_kwargs, compression_of, switch
from less_exp.factory import instantiate_component, make_states
from less_exp.errors import ConfigError
from less_exp.models import max_positions
from less_exp.peak_memory import PeakMemory
from less_exp.policies import Full
from less_exp.report_spec import ReportSpec
from less_exp.tracking import Tracker

REPORT = ReportSpec(columns=("*/speedup_vs_full", "*/memory_vs_full", "*/throughput_vs_full", "*/prefill_memory_vs_full"))
MB = 2**20
COLUMNS = ("prefill_s", "prefill_peak_mb", "decode_ms_per_token", "decode_tokens_per_s", "cache_mb",
           "throughput_batch", "throughput_tokens_per_s", "throughput_peak_gb")


def validate(cfg: DictConfig) -> None:
    """The policy must evict within a fixed budget shorter than every context (the schema bounds the grid)."""
    lengths, limit = list(cfg.task.context_lengths), max_positions(cfg.model)
    policy = instantiate_component(cfg.policy)
    if isinstance(policy, Full):
        raise ConfigError("task=bench compares the full cache with an eviction policy: set policy=h2o, sink, ...")
    if policy.ratio_of == "length":
        raise ConfigError("task=bench needs a fixed budget across context lengths: use absolute counts or ratio_of=max_positions")
    budget = policy.budget(max_positions=limit)
    if budget.capacity >= min(lengths):
        raise ConfigError(f"the policy keeps {budget.capacity} tokens, not fewer than the shortest context {min(lengths)}")


def _cache_bytes(cache) -> int:
    if isinstance(cache, LessCache):
        sizes = cache.nbytes()
        return sizes["kv"] + sizes["state"]
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)


def _prefill(model, ids, context: int, chunk: int | None, cache):
    """The context through the model (whole, or ``chunk`` tokens at a time), logits of the last token only."""
    step = chunk or context
    for start in range(0, context, step):
        out = model(ids[:, start : min(context, start + step)], **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
        cache = getattr(out, CACHE_ARG)
    return out.logits[:, -1:].argmax(-1), cache


def _weights_bytes(model, comp) -> int:
    params = list(model.parameters()) + (list(comp.states.parameters()) if comp is not None and comp.states is not None else [])
    return sum(p.numel() * p.element_size() for p in params)


def _step(model, cache, tokens):
    return model(tokens, **cache_kwargs(cache), use_cache=True).logits[:, -1:].argmax(-1)


def _step_peak(model, cache, tokens) -> int:
    with PeakMemory(tokens.device) as peak:
        _step(model, cache, tokens)
    return peak.bytes or 0


@torch.inference_mode()
def throughput(model, comp, cache, token: torch.Tensor, task: DictConfig, probe: int = 4) -> dict:
    """Decode tokens/s at the largest batch whose weights and rows fit ``task.memory_cap_gb``: a row costs
    its cache plus the growth of a decode step's peak per row (measured between 1 and ``probe`` rows, so
    what does not grow with the batch is not counted per row); the batch-1 ``cache`` is copied to that
    many rows and ``task.throughput_tokens`` steps are timed after an untimed one."""
    switch(model, comp)
    one = _step_peak(model, cache, token)
    row_cache = _cache_bytes(cache)
    cache.batch_repeat_interleave(probe)
    per_row = row_cache + max(0, _step_peak(model, cache, token.repeat(probe, 1)) - one) / (probe - 1)
    cache.batch_select_indices(torch.tensor([0], device=token.device))
    cap = float(task.memory_cap_gb) * 2**30
    batch = min(max(0, math.floor((cap - _weights_bytes(model, comp)) / per_row)), int(task.max_batch))
    if batch == 0:
        return {"throughput_batch": 0, "throughput_tokens_per_s": 0.0, "throughput_peak_gb": 0.0}
    cache.batch_repeat_interleave(batch)
    tokens = token.repeat(batch, 1)
    with PeakMemory(token.device) as peak:
        tokens = _step(model, cache, tokens)
    times = []
    for _ in range(int(task.throughput_tokens)):
        started = time.perf_counter()
        tokens = _step(model, cache, tokens)
        times.append(time.perf_counter() - started)
    held = _weights_bytes(model, comp) + _cache_bytes(cache) + (peak.bytes or 0)
    return {"throughput_batch": batch, "throughput_tokens_per_s": batch / statistics.median(times),
            "throughput_peak_gb": held / 2**30}


@torch.inference_mode()
def measure(model, ids: torch.Tensor, context: int, task: DictConfig, setups: dict) -> dict:
    """Prefill ``context`` tokens for every method, decode them round-robin one token each, then time
    each method's throughput under the memory cap.

    Interleaving the methods token by token exposes them to the same machine load, and the median
    per-token time ignores bursts from other processes; both matter on a shared CPU.
    """
    caches, tokens, results = {}, {}, {method: {} for method in setups}
    for method, comp in setups.items():
        switch(model, comp)
        with PeakMemory(ids.device) as peak:
            started = time.perf_counter()
            tokens[method], caches[method] = _prefill(model, ids, context, task.get("prefill_chunk"),
                                                      LessCache(model) if comp is not None else None)
            results[method]["prefill_s"] = time.perf_counter() - started
        if peak.bytes is not None:
            results[method]["prefill_peak_mb"] = peak.bytes / MB
    times = {method: [] for method in setups}
    for step in range(task.decode_tokens):
        for method, comp in setups.items():
            switch(model, comp)
            started = time.perf_counter()
            logits = model(tokens[method], **cache_kwargs(caches[method]), use_cache=True).logits
            elapsed = time.perf_counter() - started
            tokens[method] = logits[:, -1:].argmax(-1)
            if step >= task.warmup_tokens:
                times[method].append(elapsed)
    for method, comp in setups.items():
        median = statistics.median(times[method])
        cache_bytes = _cache_bytes(caches[method])
        results[method].update({
            "decode_ms_per_token": 1000 * median,
            "decode_tokens_per_s": 1 / median,
            "cache_mb": cache_bytes / MB,
        })
        if task.get("memory_cap_gb"):
            results[method].update(throughput(model, comp, caches.pop(method), tokens[method], task))
    return results


def run(model, tokenizer, cfg: DictConfig, tracker: Tracker) -> dict:
    task = cfg.task
    limit = max_positions(cfg.model)
    lengths = sorted(task.context_lengths)
    ids = tokenizer(data.load_text(cfg.data, task.split), return_tensors="pt").input_ids
    need = max(lengths)
    if ids.shape[1] < need:
        ids = ids.repeat(1, need // ids.shape[1] + 1)
    ids = ids[:, :need].to(next(model.parameters()).device)
    policy = instantiate_component(cfg.policy)
    states = compression_of(model).states if compression_of(model) is not None else None
    if states is None:
        less_cfg = cfg.copy()
        if cfg.feature_map.get("name", "none") == "none":
            with open_dict(less_cfg):
                less_cfg.feature_map = OmegaConf.load(_feature_map_default())
        states = make_states(less_cfg, model)
    setups = {}
    for method in task.methods:
        setups[method] = None if method == "full" else build(model, policy, states if method == "less" else None)
    rows, metrics = [], {}
    for context in tqdm(lengths, desc="bench"):
        for method, result in measure(model, ids, context, task, setups).items():
            rows.append([method, context, *(round(result[k], 3) if k in result else "" for k in COLUMNS)])
            for key, value in result.items():
                metrics[f"{method}/{context}/{key}"] = value
    columns = ["method", "context", *COLUMNS]
    tracker.log_table("bench", columns, rows)
    for context in lengths:
        for method in task.methods:
            if method != "full" and "full" in task.methods:
                metrics[f"{method}/{context}/speedup_vs_full"] = (
                    metrics[f"{method}/{context}/decode_tokens_per_s"] / metrics[f"full/{context}/decode_tokens_per_s"]
                )
                metrics[f"{method}/{context}/memory_vs_full"] = (
                    metrics[f"{method}/{context}/cache_mb"] / metrics[f"full/{context}/cache_mb"]
                )
                for key, ratio in (("prefill_peak_mb", "prefill_memory_vs_full"), ("prefill_s", "prefill_time_vs_full"),
                                   ("throughput_tokens_per_s", "throughput_vs_full")):
                    base = metrics.get(f"full/{context}/{key}")
                    if base:
                        metrics[f"{method}/{context}/{ratio}"] = metrics[f"{method}/{context}/{key}"] / base
        if {"policy", "less"} <= set(task.methods):
            metrics[f"less/{context}/overhead_vs_policy"] = (
                metrics[f"policy/{context}/decode_tokens_per_s"] / metrics[f"less/{context}/decode_tokens_per_s"] - 1
            )
    print(format_table(rows, columns, metrics, lengths, task.methods))
    metrics["budget"] = policy.budget(max_positions=limit).capacity
    metrics["state_token_equivalents"] = states.token_equivalents()
    return metrics


RATIOS = ("speedup_vs_full", "memory_vs_full", "prefill_time_vs_full", "prefill_memory_vs_full", "throughput_vs_full")


def format_table(rows, columns, metrics, lengths, methods) -> str:
    """Markdown table of the measurements with the ratios to ``full`` beside them."""
    head = columns + list(RATIOS)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        method, context = row[0], row[1]
        extra = [f"{metrics.get(f'{method}/{context}/{ratio}', 1.0):.3g}x" for ratio in RATIOS]
        lines.append("| " + " | ".join(str(v) for v in row + extra) + " |")
    if {"policy", "less"} <= set(methods):
        lines.append("")
        lines.append("LESS overhead per decoded token vs the plain policy: " + ", ".join(
            f"{n}: {100 * metrics[f'less/{n}/overhead_vs_policy']:+.1f}%" for n in lengths))
    return "\n".join(lines)


def _feature_map_default():
    from less_exp.paths import conf_dir

    return f"{conf_dir()}/feature_map/less_mlp.yaml"
