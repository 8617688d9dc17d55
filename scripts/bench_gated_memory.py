"""Peak memory of the gated linear attention over the evicted stream: chunked against unchunked.

Each measurement runs in its own process (forward and backward, as training runs it) and reports the
growth of its peak resident memory over the inputs, so allocator reuse across runs cannot hide a peak.

    .venv/bin/python scripts/bench_gated_memory.py --tokens 4096 --chunk 64
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(form: str, gate: str, tokens: int, chunk: int, features: int, heads: int, group: int, dim: int) -> dict:
    import torch

    from less_exp.ops import chunk_linear_attention, parallel_linear_attention

    torch.manual_seed(0)
    phi = torch.rand(1, heads, group, tokens, features, requires_grad=True)
    psi = torch.rand(1, heads, tokens, features, requires_grad=True)
    value = torch.randn(1, heads, tokens, dim, requires_grad=True)
    width = features if gate == "vector" else 1
    g = (-torch.rand(1, heads, tokens, width) * 0.01).requires_grad_(True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    began = time.perf_counter()
    if form == "chunked":
        num, den, _ = chunk_linear_attention(phi, psi, value, chunk_size=chunk, g=g)
    else:
        num, den, _ = parallel_linear_attention(phi, psi, value, g=g)
    (num.sum() + den.sum()).backward()
    seconds = time.perf_counter() - began
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"form": form, "gate": gate, "peak_mib": (peak - before) / 1024, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--features", type=int, default=8, help="D'")
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--group", type=int, default=3, help="query heads per KV head")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--one", nargs=2, metavar=("FORM", "GATE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.tokens, args.chunk, args.features, args.kv_heads, args.group, args.head_dim)
    if args.one:
        print(json.dumps(measure(*args.one, *shape)))
        return
    print(f"gated linear attention, forward + backward, T={args.tokens}, D'={args.features}, "
          f"{args.kv_heads} KV heads x {args.group} queries, d={args.head_dim}, chunk {args.chunk} (SmolLM2's layer shape)")
    print(f"{'gate':8} {'unchunked MiB':>14} {'chunked MiB':>12} {'ratio':>7} {'unchunked s':>12} {'chunked s':>10}")
    for gate in ("scalar", "vector"):
        row = {}
        for form in ("unchunked", "chunked"):
            cmd = [sys.executable, __file__, "--one", form, gate, "--tokens", str(args.tokens), "--chunk", str(args.chunk),
                   "--features", str(args.features), "--kv-heads", str(args.kv_heads), "--group", str(args.group),
                   "--head-dim", str(args.head_dim)]
            row[form] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        u, c = row["unchunked"], row["chunked"]
        print(f"{gate:8} {u['peak_mib']:14.0f} {c['peak_mib']:12.0f} {u['peak_mib'] / max(c['peak_mib'], 1e-9):7.1f} "
              f"{u['seconds']:12.2f} {c['seconds']:10.2f}")


if __name__ == "__main__":
    main()
