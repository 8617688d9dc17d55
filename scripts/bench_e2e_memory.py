"""Peak memory and time of one end-to-end training step on the embedded SmolLM2, with and without
activation checkpointing over the decoder layers (``training.gradient_checkpointing``).

Each measurement runs in its own process (the model loaded, the states attached, one forward of the
output KL and its backward into every layer's state) and reports the growth of its peak resident
memory over what loading the model and the teacher's forward had reached, so allocator reuse
across runs cannot hide a peak.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_e2e_memory.py --tokens 1024
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(checkpointing: bool, tokens: int, policy: str) -> dict:
    import torch
    from hydra import compose, initialize_config_dir

    from less_exp import factory, paths
    from less_exp.models import load_model
    from less_exp.training import e2e, output, teacher

    with initialize_config_dir(config_dir=paths.conf_dir(), version_base="1.3"):
        cfg = compose("train", ["model=smollm2_135m", f"policy={policy}", "feature_map=less_mlp",
                                "feature_map.features=8", "experiment=e2e_cpu", "logger=none"])
    model, _ = load_model(cfg.model, torch.device("cpu"), cache_dir=cfg.paths.cache_dir)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        target = teacher.top_k_targets(model(input_ids=ids, use_cache=False).logits[:, :-1], 64)
    target = teacher.TopK(*(t.clone() for t in target))
    comp = output.attach(cfg, model, factory.make_states(cfg, model))
    comp.states.requires_grad_(True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    began = time.perf_counter()
    with e2e.checkpointed(model, checkpointing):
        output.losses(model, ids, target)[0].backward()
    seconds = time.perf_counter() - began
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"checkpointing": checkpointing, "peak_mib": (peak - before) / 1024, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--policy", default="sink")
    parser.add_argument("--one", choices=("on", "off"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one == "on", args.tokens, args.policy)))
        return
    rows = {}
    for mode in ("off", "on"):
        done = subprocess.run([sys.executable, __file__, "--tokens", str(args.tokens), "--policy", args.policy,
                               "--one", mode], capture_output=True, text=True, check=True)
        rows[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    off, on = rows["off"], rows["on"]
    print(f"e2e step on SmolLM2-135M, {args.tokens} tokens, policy={args.policy}, less_mlp D'=8 in every layer")
    print(f"{'checkpointing':14} {'peak MiB':>9} {'seconds':>8}")
    for mode in ("off", "on"):
        print(f"{mode:14} {rows[mode]['peak_mib']:9.0f} {rows[mode]['seconds']:8.1f}")
    print(f"memory ratio off/on: {off['peak_mib'] / max(on['peak_mib'], 1):.1f}x, time ratio on/off: "
          f"{on['seconds'] / off['seconds']:.2f}x")


if __name__ == "__main__":
    main()
