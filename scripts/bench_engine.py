"""Engine timings on one SmolLM2 layer, side by side: the policies' parallel face (the step rule run
over a sequence) and one layer-wise training step with the state part in each form.

Prints milliseconds and ratios for one sequence (default 1024 tokens, one thread per
OMP_NUM_THREADS). The training step is the layer-wise recipe's inner step: the paper's state over the
evicted stream, o_proj, MSE, backward. Run: OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_engine.py
"""

from __future__ import annotations

import argparse
import time

import torch
from omegaconf import OmegaConf

from less_exp import paths
from less_exp.adapter import attention_modules
from less_exp.models import load_model
from less_exp.ops import attention_logits, gather_stream, sparse_attention
from less_exp.policies import H2O, Sink
from less_exp.state import JointNormalizer, LessMLP, LessState


def timed(fn, repeats):
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model, _ = load_model(OmegaConf.load(f"{paths.conf_dir()}/model/smollm2_135m.yaml"))
    attn = attention_modules(model)[args.layer]
    cfg = model.config
    H, Hkv, d, S = cfg.num_attention_heads, cfg.num_key_value_heads, attn.head_dim, args.seq_len
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, S, d, generator=gen) for h in (H, Hkv, Hkv))
    valid = torch.ones(1, S, dtype=torch.bool)
    logits = attention_logits(q, k, attn.scaling)
    print(f"seq_len={S} layer={args.layer} threads={torch.get_num_threads()}")
    for policy in (Sink(sink=4, recent=100), H2O(heavy=50, recent=50)):
        budget = policy.budget()
        ms = 1000 * timed(lambda: policy.keep_mask(budget, valid, Hkv, logits), args.repeats)
        print(f"{policy.name} schedule (parallel face): {ms:.1f} ms")

    policy = H2O(heavy=50, recent=50)
    sched = policy.keep_mask(policy.budget(), valid, Hkv, logits)
    o_sparse, lse, _ = sparse_attention(logits, sched.keep, v)
    stream_k, stream_v, has = gather_stream(k, sched.evicted), gather_stream(v, sched.evicted), sched.evicted >= 0
    state = LessState(LessMLP(d, H, Hkv), JointNormalizer(), d).train()
    target = torch.randn(1, S, cfg.hidden_size, generator=gen)
    mask = has.any(1)

    def train_step(chunk_size):
        def step():
            out, _ = state.attend(q, stream_k, stream_v, has, o_sparse, lse, chunk_size=chunk_size)
            pred = attn.o_proj(out.reshape(1, H, S, d).transpose(1, 2).reshape(1, S, H * d))
            ((pred - target).square() * mask[..., None]).mean().backward()
        return step

    sizes = [32, 64, 128, 256, S]
    times = {c: timed(train_step(c), args.repeats) for c in sizes}
    for c, s in times.items():
        name = "one chunk (quadratic)" if c == S else f"chunks of {c}"
        print(f"layer training step, state part in {name}: {1000 * s:.1f} ms ({s / times[S]:.2f} x quadratic)")


if __name__ == "__main__":
    main()
