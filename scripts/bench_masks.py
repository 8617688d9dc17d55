"""How long H2O's parallel keep-mask takes next to one layer-wise training step on the same layer.

Prints both times and their ratio for a SmolLM2 layer on one sequence (default 1024 tokens). The
training step is the layer-wise recipe's inner step: LESS attention in the parallel form with the
paper's state, o_proj, MSE, backward. Run: .venv/bin/python scripts/bench_masks.py [--seq-len N]
"""

from __future__ import annotations

import argparse
import time

import torch
from omegaconf import OmegaConf

from less_exp import paths
from less_exp.compression import attention_modules
from less_exp.models import load_model
from less_exp.ops import attention_logits, parallel_less_attention
from less_exp.policies import H2O
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
    policy = H2O(heavy=50, recent=50)
    budget = policy.budget()
    valid = torch.ones(1, S, dtype=torch.bool)
    logits = attention_logits(q, k, attn.scaling)
    keep = policy.keep_mask(budget, valid, Hkv, logits)[0]
    state = LessState(LessMLP(d, H, Hkv), JointNormalizer(), d).train()
    target = torch.randn(1, S, cfg.hidden_size, generator=gen)

    def train_step():
        out = parallel_less_attention(q, k, v, keep, None, attn.scaling, state, logits=logits)
        pred = attn.o_proj(out.transpose(1, 2).reshape(1, S, H * d))
        loss = (pred - target)[:, budget.capacity :].square().mean()
        loss.backward()

    mask_s = timed(lambda: policy.keep_mask(budget, valid, Hkv, attention_logits(q, k, attn.scaling)), args.repeats)
    step_s = timed(train_step, args.repeats)
    print(f"seq_len={S} layer={args.layer} threads={torch.get_num_threads()}")
    print(f"H2O keep-mask (incl. logits): {1000 * mask_s:.1f} ms")
    print(f"layer training step (fwd+bwd): {1000 * step_s:.1f} ms")
    print(f"ratio mask / step: {mask_s / step_s:.2f}")


if __name__ == "__main__":
    main()
