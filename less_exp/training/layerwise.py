"""Layer-wise LESS training (the paper's recipe; DESIGN.md §4).

For every layer in ``training.from_layer <= l < training.to_layer`` the frozen full-cache model's
Q, K, V and attention output O are recorded (:mod:`less_exp.training.record`), and that layer's
state parameters are fitted so that ``o_proj(LESS output)`` matches O: MSE over the positions where
the policy has evicted something, Adam with a step schedule, best epoch by validation MSE (the
untrained state, which acts as the plain policy, counts as epoch 0).

Everything that does not depend on the state (the policy's schedule, the sparse attention and its
log-sum-exp, the evicted stream's keys and values) is computed once per sequence before the first
epoch; each epoch then runs only :meth:`LessState.attend`, the chunked linear attention over the
evicted stream that the parallel form and the cache use too, which never builds an ``S x S`` kernel. Validation also reports the plain policy's MSE and Baseline+'s (the plain policy given the
state's size in extra tokens), so each layer shows whether the state beats equal memory.

Layers are independent: each is seeded from ``(seed, layer, epoch)`` alone, so splitting the range
across jobs, or resuming a killed job from its last finished epoch, gives the same parameters.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from less_exp import checkpoints, data, paths
from less_exp.adapter import attention_modules
from less_exp.factory import chunk_size, instantiate_component, make_states
from less_exp.errors import ConfigError, NonFiniteError
from less_exp.models import DTYPES
from less_exp.ops import attention_logits, blocked_sparse_attention, gather_stream, stream_positions
from less_exp.policies import Budget, EvictionPolicy
from less_exp.report_spec import ReportSpec
from less_exp.state import LessState
from less_exp.tracking import Tracker
from less_exp.training import record

REPORT = ReportSpec(  # the default mode: method labels do not name it
    columns=("layers_done", "num_layers", "mean_val_mse", "mean_plain_mse", "mean_baseline_plus_mse"),
    headline="mean_val_mse", labelled=False,
)


def validate(cfg: DictConfig) -> None:
    """Check ``cfg.training`` and what layer-wise training needs of the rest, before the model loads."""
    t = cfg.training
    policy = instantiate_component(cfg.policy)
    if not policy.evicts:
        raise ConfigError(f"policy={policy.name} evicts nothing, so the state has nothing to learn; pick sink, h2o, ...")
    try:
        policy.check_fits(policy.budget(length=t.seq_len, max_positions=int(cfg.model.max_length)), t.seq_len)
    except ValueError as err:
        raise ConfigError(f"training.seq_len={t.seq_len}: {err}") from err
    data.check_available(cfg.data, t.split, mixture=True)
    for setting, folder in (("checkpoint", cfg.get("checkpoint")), ("training.record_dir", t.get("record_dir"))):
        problem = folder and paths.cannot_create(folder)
        if problem:
            raise ConfigError(f"{setting}={paths.shorten(str(folder))}: {problem}")


def _layer_range(t: DictConfig, num_layers: int | None) -> list[int]:
    start, stop = t.from_layer, t.to_layer
    if not isinstance(start, int) or start < 0 or (stop is not None and (not isinstance(stop, int) or stop <= start)):
        raise ConfigError(f"training.from_layer={start}, to_layer={stop}: need 0 <= from_layer < to_layer (or to_layer=null)")
    if num_layers is None:
        return []
    stop = num_layers if stop is None else stop
    if stop > num_layers or start >= stop:
        raise ConfigError(
            f"training.from_layer={start}, to_layer={stop} but the model has {num_layers} layers (to_layer is exclusive)"
        )
    return list(range(start, stop))


def run(cfg: DictConfig, model: torch.nn.Module, tokenizer, tracker: Tracker, out_dir: Path) -> dict:
    """Train every pending layer of the range into the checkpoint folder; returns the job's metrics."""
    t = cfg.training
    device = next(model.parameters()).device
    modules = attention_modules(model)
    layers = _layer_range(t, len(modules))
    policy: EvictionPolicy = instantiate_component(cfg.policy)
    max_positions = model.config.max_position_embeddings
    budget = policy.budget(length=t.seq_len, max_positions=max_positions)
    torch.manual_seed(cfg.seed)
    states = make_states(cfg, model)
    plus = dataclasses.replace(policy, baseline_plus=True)
    plus_budget = plus.budget(length=t.seq_len, max_positions=max_positions, state_tokens=states.token_equivalents())
    root = Path(cfg.checkpoint) if cfg.get("checkpoint") else Path(out_dir) / "checkpoint"
    head = checkpoints.header(cfg, model, states, budget)
    checkpoints.claim_layers(root, layers)
    checkpoints.open_for_training(root, head)
    done = checkpoints.done_layers(root)
    todo = [layer for layer in layers if layer not in done]
    print(f"less-train: layers {layers[0]}-{layers[-1]} into {root}: {len(todo)} to train, {len(layers) - len(todo)} already done")

    if todo:
        windows, domains = data.training_windows(cfg.data, tokenizer, t.split, t.seq_len, t.num_sequences)
        if len(windows) < 2:
            raise ConfigError(f"data={cfg.data.name} split={t.split} has only {len(windows)} window of {t.seq_len} tokens")
        if len(windows) < t.num_sequences:
            print(f"less-train: data={cfg.data.name} split={t.split} holds {len(windows)} of the {t.num_sequences} sequences")
        train_idx, val_idx = split_domains(domains, float(t.val_fraction), cfg.seed)
        fingerprint = record.windows_fingerprint(cfg.model.name, windows, dtype=t.record_dtype)
        record_dir = Path(t.record_dir)
        chunk = t.layers_per_recording or len(todo)
        fit = LayerFit(policy, budget, plus, plus_budget, t, cfg.seed, device, root, tracker, head,
                       chunk_size=chunk_size(cfg))
        with tqdm(total=len(todo), desc="layers", unit="layer") as bar:
            for first in range(0, len(todo), chunk):
                group = todo[first : first + chunk]
                record.record_layers(
                    model, windows, group, record_dir, DTYPES[t.record_dtype], fingerprint, t.record_batch_size
                )
                for layer in group:
                    files = [record.sequence_file(record_dir, layer, i) for i in range(len(windows))]
                    metrics = fit(layer, states[layer], modules[layer], files, train_idx, val_idx)
                    if not t.keep_records:
                        shutil.rmtree(record.layer_dir(record_dir, layer), ignore_errors=True)
                    bar.update(1)
                    bar.set_postfix(layer=layer, val=f"{metrics['val_mse']:.3g}", plus=f"{metrics['baseline_plus_mse']:.3g}")
    return {**summarize(root, layers, todo, tracker), "state_parameters": states.num_parameters()}


SCALE_PARAMETERS = ("log_key_scale", "mix")


def param_groups(state: torch.nn.Module, t: DictConfig) -> list[dict]:
    """The state's parameters for Adam: its scales (the key's log-scale, a normaliser's mix) at
    ``training.scale_lr`` and its gating at ``training.gate_lr`` when set, the rest at ``lr``. Scales
    and gates start saturated for the plain start (a scale near 0, a gate near 1) and must move by
    nats, which Adam does at about its lr a step: a short schedule needs a larger lr for them."""
    params = [(n, p) for n, p in state.named_parameters() if p.requires_grad]

    def kind(name: str) -> str:
        if name.startswith("gating.") and t.get("gate_lr") is not None:
            return "gate_lr"
        if name.rsplit(".", 1)[-1] in SCALE_PARAMETERS and t.get("scale_lr") is not None:
            return "scale_lr"
        return "lr"

    groups = []
    for key in ("lr", "scale_lr", "gate_lr"):
        chosen = [p for n, p in params if kind(n) == key]
        if chosen:
            groups.append({"params": chosen} if key == "lr" else {"params": chosen, "lr": float(t[key])})
    return groups


def split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded random ``(train, validation)`` split of ``n`` sequences; validation gets at least one."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return sorted(order[n_val:]), sorted(order[:n_val])


def split_domains(domains: list[str], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """:func:`split` within each domain of a mixture's windows (``domains[i]`` names window i's preset), so
    validation holds every domain that has two windows or more; one domain is :func:`split` itself."""
    names = list(dict.fromkeys(domains))
    if len(names) == 1:
        return split(len(domains), val_fraction, seed)
    train, val = [], []
    for name in names:
        idx = [i for i, d in enumerate(domains) if d == name]
        if len(idx) < 2:
            train += idx
            continue
        part_train, part_val = split(len(idx), val_fraction, seed)
        train += [idx[i] for i in part_train]
        val += [idx[i] for i in part_val]
    if not val:
        return split(len(domains), val_fraction, seed)
    return sorted(train), sorted(val)


def epoch_seed(seed: int, layer: int, epoch: int) -> int:
    """The RNG seed of one epoch of one layer (shuffling and dropout): independent of any other layer."""
    return (seed * 1_000_003 + layer * 10_007 + epoch) % (2**63)


def masked_sq_error(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of squared errors over ``mask [B, S]`` positions and the number of terms in it."""
    err = (pred - target).pow(2).sum(-1)
    return (err * mask).sum(), int(mask.sum()) * pred.shape[-1]


class LayerFit:
    """Fits one layer's state on its recorded sequences, with per-epoch progress for resuming.

    ``head`` is the job's checkpoint fingerprint (:func:`less_exp.checkpoints.header`): the layer file and
    the progress carry it, and progress saved under another one is refused.
    """

    def __init__(self, policy, budget: Budget, plus, plus_budget: Budget, t, seed, device, root: Path, tracker: Tracker,
                 head: dict, chunk_size: int = 64):
        self.policy, self.budget, self.plus, self.plus_budget = policy, budget, plus, plus_budget
        self.t, self.seed, self.device, self.root, self.tracker = t, seed, device, Path(root), tracker
        self.head, self.chunk_size = head, chunk_size
        self._unscored: dict = {}

    # -------------------------------------------------------------- preparation
    def prepare(self, module, o_proj, files: list[Path], val_idx: list[int]) -> tuple[list[Path], dict]:
        """Per sequence, the state-independent tensors; returns their files and the validation baselines."""
        sums = {"plain": 0.0, "baseline_plus": 0.0, "count": 0}
        prepared = []
        for i, path in enumerate(files):
            rec = {k: v.float()[None].to(self.device) for k, v in torch.load(path, weights_only=True).items()}
            q, k, v, o = rec["q"], rec["k"], rec["v"], rec["o"]
            def rows(start, stop, q=q, k=k):  # a ranking policy reads the attention a block of queries at a time
                return attention_logits(q[..., start:stop, :], k, module.scaling)

            sched = self._schedule(self.policy, self.budget, rows, q, k.shape[1])
            keep, ev = sched.keep, sched.evicted
            o_sparse, lse = blocked_sparse_attention(q, k, v, keep, module.scaling)
            mask = ((ev >= 0).long().cumsum(-1) > 0).any(1)  # positions where the policy has evicted something
            if i in val_idx:
                plain, count = masked_sq_error(self._project(o_proj, o_sparse), o, mask)
                keep_plus = self._schedule(self.plus, self.plus_budget, rows, q, k.shape[1]).keep
                plus, _ = masked_sq_error(self._project(o_proj, blocked_sparse_attention(q, k, v, keep_plus, module.scaling)[0]), o, mask)
                sums["plain"] += plain.item()
                sums["baseline_plus"] += plus.item()
                sums["count"] += count
            q_pos, s_pos = stream_positions(sched.logical, ev, q.shape[-2])
            item = {"q": q, "stream_k": gather_stream(k, ev), "stream_v": gather_stream(v, ev), "has": ev >= 0,
                    "o": o, "o_sparse": o_sparse, "lse": lse, "mask": mask, "q_pos": q_pos, "s_pos": s_pos,
                    "v": v, "evicted": ev}  # what a gating reads
            item = {name: x[0].cpu() for name, x in item.items()}
            out = path.with_name(f"prepared_{path.name}")
            record.save_atomic(item, out)
            prepared.append(out)
        count = max(sums["count"], 1)
        return prepared, {"plain_mse": sums["plain"] / count, "baseline_plus_mse": sums["baseline_plus"] / count}

    def _schedule(self, policy, budget, rows, query, num_kv_heads):
        """The policy's parallel face (``rows(start, stop)``: the logits of those queries); a ranking that
        ignores attention is the same for every sequence and layer of one length, so it is computed once."""
        B, _, S, _ = query.shape
        valid = torch.ones(B, S, dtype=torch.bool, device=query.device)
        if policy.uses_scores:
            return policy.keep_mask(budget, valid, num_kv_heads, rows)
        key = (id(policy), budget, B, S, num_kv_heads)
        if key not in self._unscored:
            self._unscored[key] = policy.keep_mask(budget, valid, num_kv_heads)
        return self._unscored[key]

    @staticmethod
    def o_proj(module) -> torch.nn.Module:
        """A float32 copy of the layer's frozen output projection (the model itself is left as it is)."""
        return copy.deepcopy(module.o_proj).float().requires_grad_(False)

    @staticmethod
    def _project(o_proj, out: torch.Tensor) -> torch.Tensor:
        """``[B, Hkv, G, S, d]`` or ``[B, H, S, d]`` attention output -> ``o_proj`` input layout -> O ``[B, S, hidden]``."""
        B, S, d = out.shape[0], out.shape[-2], out.shape[-1]
        return o_proj(out.reshape(B, -1, S, d).transpose(1, 2).reshape(B, S, -1))

    # -------------------------------------------------------------- one pass
    def _batch(self, files: list[Path]) -> dict:
        """Stack prepared sequences."""
        items = [torch.load(f, weights_only=True) for f in files]
        return {k: torch.stack([it[k] for it in items]).to(self.device) for k in items[0]}

    def _error(self, state: LessState, o_proj, batch: dict) -> tuple[torch.Tensor, int]:
        b = batch
        gates = state.gates(b["v"], None, b["evicted"])
        out, _ = state.attend(b["q"], b["stream_k"], b["stream_v"], b["has"], b["o_sparse"], b["lse"],
                              chunk_size=self.chunk_size, query_pos=b["q_pos"], stream_pos=b["s_pos"], gates=gates)
        return masked_sq_error(self._project(o_proj, out), b["o"], b["mask"])

    @torch.no_grad()
    def evaluate(self, state, o_proj, files) -> float:
        state.eval()
        total, count = 0.0, 0
        for chunk in chunks(files, self.t.batch_size):
            err, n = self._error(state, o_proj, self._batch(chunk))
            total, count = total + err.item(), count + n
        return total / max(count, 1)

    # -------------------------------------------------------------- the fit
    def __call__(self, layer: int, state: LessState, module, files, train_idx, val_idx) -> dict:
        t = self.t
        started = time.perf_counter()
        state.to(self.device).float()
        o_proj = self.o_proj(module)
        prepared, baselines = self.prepare(module, o_proj, files, val_idx)
        train_files = [prepared[i] for i in train_idx]
        val_files = [prepared[i] for i in val_idx]
        optimizer = torch.optim.Adam(param_groups(state, t), lr=float(t.lr), weight_decay=float(t.weight_decay))
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=t.lr_step_epochs, gamma=float(t.lr_gamma))

        progress = checkpoints.load_progress(self.root, layer, self.head)
        if progress is None:
            initial = self.evaluate(state, o_proj, val_files)
            progress = {"fingerprint": checkpoints.progress_fingerprint(self.head), "epoch": 0, "history": [],
                        "initial_val_mse": initial, "best_val_mse": initial, "best_epoch": 0,
                        "best_state": detached_copy(state.state_dict()), "elapsed_s": 0.0}
        else:
            state.load_state_dict(progress["state"])
            optimizer.load_state_dict(progress["optimizer"])
            scheduler.load_state_dict(progress["scheduler"])
        elapsed_before = progress["elapsed_s"]

        with tqdm(total=t.epochs, initial=progress["epoch"], desc=f"layer {layer}", unit="epoch", leave=False) as bar:
            for epoch in range(progress["epoch"], t.epochs):
                epoch_started = time.perf_counter()
                torch.manual_seed(epoch_seed(self.seed, layer, epoch))
                order = torch.randperm(len(train_files)).tolist()
                state.train()
                total, count = 0.0, 0
                for chunk in chunks([train_files[i] for i in order], t.batch_size):
                    err, n = self._error(state, o_proj, self._batch(chunk))
                    if not torch.isfinite(err):
                        raise NonFiniteError(
                            f"layer {layer}, epoch {epoch + 1}: the training loss is {err.item()} (records "
                            f"{', '.join(Path(f).name for f in chunk)}); lower training.lr, or record in float32"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    (err / n).backward()
                    optimizer.step()
                    total, count = total + err.item(), count + n
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                train_mse = total / count
                val_mse = self.evaluate(state, o_proj, val_files)
                if val_mse < progress["best_val_mse"]:
                    progress.update(best_val_mse=val_mse, best_epoch=epoch + 1, best_state=detached_copy(state.state_dict()))
                seconds = time.perf_counter() - epoch_started
                progress["history"].append(
                    {"epoch": epoch + 1, "train_mse": train_mse, "val_mse": val_mse, "lr": lr, "seconds": seconds}
                )
                progress.update(
                    epoch=epoch + 1,
                    state=state.state_dict(),
                    optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(),
                    elapsed_s=elapsed_before + time.perf_counter() - started,
                )
                checkpoints.save_progress(self.root, layer, progress)
                self.tracker.log({
                    "layer": layer, "epoch": epoch + 1, "lr": lr,
                    f"layer_{layer:03d}/train_mse": train_mse, f"layer_{layer:03d}/val_mse": val_mse,
                    f"layer_{layer:03d}/epoch_s": seconds,
                })
                bar.update(1)
                bar.set_postfix(train=f"{train_mse:.3g}", val=f"{val_mse:.3g}", plain=f"{baselines['plain_mse']:.3g}")

        history = progress["history"]
        metrics = {
            "train_mse": history[-1]["train_mse"],
            "val_mse": progress["best_val_mse"],
            "best_epoch": progress["best_epoch"],
            "initial_val_mse": progress["initial_val_mse"],
            **baselines,
            "beats_plain": progress["best_val_mse"] < baselines["plain_mse"],
            "beats_baseline_plus": progress["best_val_mse"] < baselines["baseline_plus_mse"],
            "epochs": t.epochs,
            "num_train": len(train_files),
            "num_val": len(val_files),
            "val_history": [h["val_mse"] for h in history],
            "train_history": [h["train_mse"] for h in history],
            "duration_s": round(progress["elapsed_s"], 3),
            "epoch_s": round(sum(h.get("seconds", 0.0) for h in history) / max(len(history), 1), 3),
        }
        state.load_state_dict(progress["best_state"])
        checkpoints.save_layer(self.root, layer, progress["best_state"], metrics, self.head)
        for path in prepared:
            path.unlink(missing_ok=True)
        self.tracker.log({"layer": layer, **{f"layers/{k}": v for k, v in metrics.items() if not isinstance(v, list)}})
        return metrics


def summarize(root: Path, layers: list[int], trained: list[int], tracker: Tracker) -> dict:
    """The job's metrics: per-layer metrics of its range from the manifest, their means and counts."""
    manifest = checkpoints.read_manifest(root)
    per_layer = {layer: manifest["layers"][str(layer)] for layer in layers if str(layer) in manifest["layers"]}
    rows = [[layer, m["train_mse"], m["val_mse"], m["plain_mse"], m["baseline_plus_mse"], m["best_epoch"]] for layer, m in per_layer.items()]
    tracker.log_table("layers", ["layer", "train_mse", "val_mse", "plain_mse", "baseline_plus_mse", "best_epoch"], rows)

    def mean(key):
        return sum(m[key] for m in per_layer.values()) / max(len(per_layer), 1)

    return {
        "checkpoint": str(root),
        "complete": manifest["complete"],
        "layers_done": len(manifest["layers_done"]),
        "num_layers": manifest["model"]["num_layers"],
        "layers_trained": trained,
        "layers_skipped": [layer for layer in layers if layer not in trained],
        "mean_val_mse": mean("val_mse"),
        "mean_plain_mse": mean("plain_mse"),
        "mean_baseline_plus_mse": mean("baseline_plus_mse"),
        "layers_beating_plain": sum(m["beats_plain"] for m in per_layer.values()),
        "layers_beating_baseline_plus": sum(m["beats_baseline_plus"] for m in per_layer.values()),
        "state_token_equivalents": manifest["state_token_equivalents"],
        "train_s": round(sum(m.get("duration_s", 0.0) for m in per_layer.values()), 1),
        "layers": {str(layer): {k: v for k, v in m.items() if not isinstance(v, list)} for layer, m in per_layer.items()},
    }


def summary_line(metrics: dict) -> str:
    return (f"layers done {metrics['layers_done']}/{metrics['num_layers']}, mean val MSE {metrics['mean_val_mse']:.4g} "
            f"(plain {metrics['mean_plain_mse']:.4g}, Baseline+ {metrics['mean_baseline_plus_mse']:.4g})")


def chunks(items: list, size: int) -> list[list]:
    """``items`` in consecutive batches of ``size`` (the last one shorter)."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def detached_copy(state_dict: dict) -> dict:
    """A copy of a state dict that later optimizer steps leave alone (a best epoch's parameters)."""
    return {k: v.detach().clone() for k, v in state_dict.items()}
