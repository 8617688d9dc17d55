"""The parallel form of one attention layer, whole (S x S float32 logits) against query blocks over the
kept columns (``ops.blocked_sparse_attention``; a ranking policy's schedule reads its logits a block of
steps at a time), side by side: time and peak resident memory, each
measured in its own process so that one's allocations do not hide the other's.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_parallel_form.py --length 8192 --policy sink

SmolLM2-135M's attention shape by default (9 query heads, 3 KV heads, head_dim 64); the schedule is the
policy's, so both forms compute the same output (checked).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(form: str, length: int, policy_name: str, heads: int, kv_heads: int, head_dim: int) -> dict:
    import torch

    from less_exp.ops import attention_logits, blocked_sparse_attention, sparse_attention
    from less_exp.policies import H2O, Sink, Window

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, length, head_dim, generator=gen)
    k, v = (torch.randn(1, kv_heads, length, head_dim, generator=gen) for _ in range(2))
    policy = {"sink": Sink(sink=4, recent=100), "window": Window(recent=104), "h2o": H2O(heavy=50, recent=50)}[policy_name]
    scaling = head_dim**-0.5
    valid = torch.ones(1, length, dtype=torch.bool)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    began = time.perf_counter()
    budget = policy.budget(length=length)
    with torch.no_grad():
        if form == "whole":
            logits = attention_logits(q, k, scaling)
            keep = policy.keep_mask(budget, valid, kv_heads, logits if policy.uses_scores else None).keep
            out, lse, _ = sparse_attention(logits, keep, v)
        else:
            def rows(start, stop):
                return attention_logits(q[..., start:stop, :], k, scaling)

            keep = policy.keep_mask(budget, valid, kv_heads, rows if policy.uses_scores else None).keep
            out, lse = blocked_sparse_attention(q, k, v, keep, scaling)
    seconds = time.perf_counter() - began
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    return {"seconds": seconds, "peak_mib": peak / 1024, "checksum": float(out.double().sum()), "lse": float(lse.double().sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--policy", choices=("sink", "window", "h2o"), default="sink")
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--form", choices=("whole", "blocked"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.length, args.policy, args.heads, args.kv_heads, args.head_dim)
    if args.form:
        print(json.dumps(one(args.form, *shape)))
        return
    results = {}
    for form in ("whole", "blocked"):
        command = [sys.executable, __file__, "--form", form, "--length", str(args.length), "--policy", args.policy,
                   "--heads", str(args.heads), "--kv-heads", str(args.kv_heads), "--head-dim", str(args.head_dim)]
        results[form] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        r = results[form]
        print(f"{form:8s} {r['seconds']:8.2f} s  peak {r['peak_mib']:9.1f} MiB")
    whole, blocked = results["whole"], results["blocked"]
    same = abs(whole["checksum"] - blocked["checksum"]) <= 1e-4 * max(1.0, abs(whole["checksum"]))
    print(f"blocked / whole: time {blocked['seconds'] / whole['seconds']:.3f}x, peak memory "
          f"{blocked['peak_mib'] / max(whole['peak_mib'], 1e-9):.3f}x; outputs {'agree' if same else 'DIFFER'}")


if __name__ == "__main__":
    main()
