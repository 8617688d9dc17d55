"""``task=bench``: decode speed and cache memory versus context length, measured side by side.

Three methods share one model and one token stream: ``full`` (transformers' own sdpa attention and
DynamicCache, the honest baseline), the configured eviction ``policy`` on a real
:class:`LessCache`, and the same policy plus the LESS state (``less``). For every context length the
context is prefilled in chunks, then ``decode_tokens`` greedy tokens are decoded round-robin
across the methods and the median time per token is reported.
"""

from __future__ import annotations

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
from less_exp.policies import Full
from less_exp.report_spec import ReportSpec
from less_exp.tracking import Tracker

REPORT = ReportSpec(columns=("*/speedup_vs_full", "*/memory_vs_full"))  # per context length: no single headline


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


@torch.inference_mode()
def measure(model, ids: torch.Tensor, context: int, task: DictConfig, setups: dict) -> dict:
    """Prefill ``context`` tokens for every method, then decode them round-robin, one token each.

    Interleaving the methods token by token exposes them to the same machine load, and the median
    per-token time ignores bursts from other processes; both matter on a shared CPU.
    """
    caches, tokens, prefill_s = {}, {}, {}
    for method, comp in setups.items():
        switch(model, comp)
        cache = LessCache(model) if comp is not None else None
        started = time.perf_counter()
        for start in range(0, context, task.prefill_chunk):
            out = model(ids[:, start : min(context, start + task.prefill_chunk)], **cache_kwargs(cache), use_cache=True)
            cache = getattr(out, CACHE_ARG)
        prefill_s[method] = time.perf_counter() - started
        caches[method], tokens[method] = cache, out.logits[:, -1:].argmax(-1)
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
    results = {}
    for method in setups:
        median = statistics.median(times[method])
        results[method] = {
            "prefill_s": prefill_s[method],
            "decode_ms_per_token": 1000 * median,
            "decode_tokens_per_s": 1 / median,
            "cache_mb": _cache_bytes(caches[method]) / 2**20,
        }
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
            rows.append([method, context, *(round(result[k], 3) for k in sorted(result))])
            for key, value in result.items():
                metrics[f"{method}/{context}/{key}"] = value
    columns = ["method", "context", *sorted(result)]
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
        if {"policy", "less"} <= set(task.methods):
            metrics[f"less/{context}/overhead_vs_policy"] = (
                metrics[f"policy/{context}/decode_tokens_per_s"] / metrics[f"less/{context}/decode_tokens_per_s"] - 1
            )
    print(format_table(rows, columns, metrics, lengths, task.methods))
    metrics["budget"] = policy.budget(max_positions=limit).capacity
    metrics["state_token_equivalents"] = states.token_equivalents()
    return metrics


def format_table(rows, columns, metrics, lengths, methods) -> str:
    """Markdown table of the measurements with the ratios to ``full`` beside them."""
    head = columns + ["speedup_vs_full", "memory_vs_full"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        method, context = row[0], row[1]
        extra = [
            f"{metrics.get(f'{method}/{context}/speedup_vs_full', 1.0):.2f}x",
            f"{metrics.get(f'{method}/{context}/memory_vs_full', 1.0):.3f}x",
        ]
        lines.append("| " + " | ".join(str(v) for v in row + extra) + " |")
    if {"policy", "less"} <= set(methods):
        lines.append("")
        lines.append("LESS overhead per decoded token vs the plain policy: " + ", ".join(
            f"{n}: {100 * metrics[f'less/{n}/overhead_vs_policy']:+.1f}%" for n in lengths))
    return "\n".join(lines)


def _feature_map_default():
    from less_exp.paths import conf_dir

    return f"{conf_dir()}/feature_map/less_mlp.yaml"
