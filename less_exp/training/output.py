"""What the output-level training modes (``progressive``, ``e2e``; DESIGN.md §4) share.

Both train LESS state parameters of the frozen model on the model's next-token distribution: the
KL divergence from the full-cache teacher, whose top-k distributions are computed once per sequence
(:mod:`less_exp.training.teacher`) and reused for every layer and epoch. The student is the model
itself running the ``less`` attention with the states (the same parallel form as evaluation), so
what trains is what ``less-eval`` measures. :class:`OutputFit` is the resumable loop: Adam with a
step schedule, the best epoch by validation KL (the starting state counts as epoch 0), progress
saved after every epoch and every ``training.save_every`` steps, and every random draw seeded from
``(seed, stage, epoch, step)`` alone, so a killed job resumes to the parameters of an unbroken one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from less_exp import checkpoints, data, prompts
from less_exp.adapter import Compression, build, switch
from less_exp.errors import ConfigError, NonFiniteError
from less_exp.factory import chunk_size, instantiate_component, make_states
from less_exp.report_spec import ReportSpec
from less_exp.tracking import Tracker
from less_exp.models import end_token_ids
from less_exp.training import answers, decisive_stop, layerwise, loop_free, record, teacher, unlikelihood

REPORT = ReportSpec(  # the output-trained modes' (progressive, e2e) train table
    columns=("layers_done", "num_layers", "val_kl", "initial_val_kl", "plain_val_kl", "val_ppl", "plain_val_ppl", "val_answer_kl",
             "plain_val_answer_kl", "val_unlikelihood", "plain_val_unlikelihood", "train_s"),
    headline="val_kl",
)
AFTER = ("init", "plain")


def validate(cfg: DictConfig) -> None:
    """Layer-wise training's checks (state, policy, sizes, learning rates, data) and the output modes' own."""
    layerwise.validate(cfg)
    t = cfg.training
    if data.is_answers(cfg.data):
        answers.validate(cfg.data.answers)
    init = t.get("init_from")
    if init is not None:
        if not (Path(init) / checkpoints.MANIFEST).is_file():
            raise ConfigError(f"training.init_from={init}: no {checkpoints.MANIFEST} there; point it at a checkpoint "
                              "folder written by less-train for this set-up, or drop it to start from the untrained state")
        checkpoints.read_manifest(init)


def identity(cfg: DictConfig, **settings) -> dict:
    """What the checkpoint's fingerprint records of the training: the mode, the data preset, the
    checkpoint it started from (absolute) and the mode's settings that decide the parameters."""
    init, ul = cfg.training.get("init_from"), float(cfg.training.get("unlikelihood", 0.0))
    extra = {"unlikelihood": ul, "unlikelihood_ngram": int(cfg.training.unlikelihood_ngram)} if ul > 0 else {}
    if cfg.training.get("no_repeat_ngram") is not None:
        extra["no_repeat_ngram"] = int(cfg.training.no_repeat_ngram)
    if cfg.training.get("end_target") is not None:
        extra["end_target"] = float(cfg.training.end_target)
    if float(cfg.training.get("end_weight", 1.0)) != 1:
        extra["end_weight"] = float(cfg.training.end_weight)
    return {"mode": cfg.training.mode, "data": str(cfg.data.name),
            "init_from": None if init is None else str(Path(init).resolve()), **extra, **settings}


def open_job(cfg: DictConfig, model: torch.nn.Module, out_dir: Path, **settings) -> tuple:
    """The job's states (loaded from ``training.init_from`` when set), fingerprint and checkpoint folder,
    opened for training; ``settings`` are the mode's own entries of the fingerprint's ``training``."""
    t = cfg.training
    budget = instantiate_component(cfg.policy).budget(length=t.seq_len, max_positions=model.config.max_position_embeddings)
    torch.manual_seed(cfg.seed)
    states = make_states(cfg, model)
    head = checkpoints.header(cfg, model, states, budget, training=identity(cfg, **settings))
    init = t.get("init_from")
    if init is not None:
        manifest = checkpoints.check_start(init, head)
        checkpoints.load_into(states, init, manifest, model=model)
        print(f"less-train: starting from the {manifest['training']['mode']} states in {init}")
    root = Path(cfg.checkpoint) if cfg.get("checkpoint") else Path(out_dir) / "checkpoint"
    checkpoints.claim_layers(root, range(len(states)))
    checkpoints.open_for_training(root, head)
    return states, head, root


@dataclass
class Data:
    """The token windows, their split, the teacher's per-sequence top-k files and, for answer windows,
    the loss weights of the predicting positions ``[N, S - 1]``, which of them predict an answer and
    (with ``training.unlikelihood``) which predict a repeat of an answer's n-gram, (with
    ``training.no_repeat_ngram``) the tokens each position's loop-free target bans ``[N, S - 1, m]``,
    and (with ``training.end_target``) the answer positions where the teacher's favourite is an end
    token, the model's ``end_ids`` and the mass a decisive stop puts on it."""

    windows: torch.Tensor
    train_idx: list[int]
    val_idx: list[int]
    targets: list[Path]
    weights: torch.Tensor | None = None
    answer: torch.Tensor | None = None
    repeats: torch.Tensor | None = None
    banned: torch.Tensor | None = None
    stops: torch.Tensor | None = None
    end_ids: torch.Tensor | None = None
    end_target: float | None = None

    def batch_weights(self, idx: list[int], device) -> torch.Tensor | None:
        return None if self.weights is None else self.weights[idx].to(device)

    def batch_targets(self, idx: list[int], device) -> teacher.TopK:
        """The teacher's top-k targets of windows ``idx``, loop-free where ``banned`` says so and with
        decisive stops where ``stops`` does."""
        target = teacher.load([self.targets[i] for i in idx], device)
        if self.banned is not None:
            target = loop_free.without(target, self.banned[idx].to(device))
        if self.end_target is not None:
            target = decisive_stop.sharpened(target, self.stops[idx].to(device), self.end_ids, self.end_target)
        return target


def prepare(cfg: DictConfig, model: torch.nn.Module, tokenizer, states=None) -> Data:
    """Tokenize the training split, split it, and record the teacher (call while the model runs full
    attention). Answer windows with a student share are partly written by the policy with ``states``
    (the starting states)."""
    t = cfg.training
    weights = answer = repeats = banned = None
    if data.is_answers(cfg.data):
        student = None
        if cfg.data.answers.student_share > 0:
            student = build(model, instantiate_component(cfg.policy), states)
            student.chunk_size = chunk_size(cfg)
            states.eval()
            switch(model, None)
        chat = prompts.use_chat(cfg.data.answers.get("prompt_format", "raw"), cfg.model, tokenizer, "data.answers.prompt_format")
        windows, answer = answers.build(cfg.data, model, tokenizer, t.split, t.seq_len, t.num_sequences,
                                        Path(t.record_dir), cfg.model.name, student, chat)
        domains = [str(cfg.data.name)] * len(windows)
        if float(t.get("unlikelihood", 0.0)) > 0:
            repeats = unlikelihood.repeat_mask(windows, answer, int(t.get("unlikelihood_ngram", 4)))
        if t.get("no_repeat_ngram") is not None:
            banned = loop_free.banned_tokens(windows, answer, int(t.no_repeat_ngram))
        weights, answer = answers.position_weights(answer, float(cfg.data.answers.weight)), answer[:, 1:]
    else:
        windows, domains = data.training_windows(cfg.data, tokenizer, t.split, t.seq_len, t.num_sequences)
    if len(windows) < 2:
        raise ConfigError(f"data={cfg.data.name} split={t.split} has only {len(windows)} window of {t.seq_len} tokens")
    train_idx, val_idx = layerwise.split_domains(domains, float(t.val_fraction), cfg.seed)
    fingerprint = record.windows_fingerprint(cfg.model.name, windows, top_k=int(t.top_k))
    files = teacher.record(model, windows, Path(t.record_dir) / f"teacher_top{t.top_k}", int(t.top_k), fingerprint)
    stops = end_ids = None
    end_target, end_weight = t.get("end_target"), float(t.get("end_weight", 1.0))
    if answer is not None and (end_target is not None or end_weight != 1):
        end_ids = torch.tensor(sorted(end_token_ids(model, tokenizer)), dtype=torch.long)
        if not len(end_ids):
            raise ConfigError(f"model={cfg.model.name} names no end token (generation config or tokenizer); "
                              "training.end_target and end_weight need one")
        stops = decisive_stop.stop_mask(files, answer, end_ids)
        weights = torch.where(stops, weights * end_weight, weights)
    return Data(windows, train_idx, val_idx, files, weights, answer, repeats, banned, stops, end_ids,
                None if end_target is None else float(end_target))


def attach(cfg: DictConfig, model: torch.nn.Module, states) -> Compression:
    """Freeze the model and make it run the configured policy with ``states`` (the student)."""
    model.requires_grad_(False)
    comp = build(model, instantiate_component(cfg.policy), states)
    comp.chunk_size = chunk_size(cfg)
    states.requires_grad_(False)
    return comp


def losses(model: torch.nn.Module, ids: torch.Tensor, target: teacher.TopK, weights: torch.Tensor | None = None,
           repeats: torch.Tensor | None = None) -> tuple[torch.Tensor, float, int, torch.Tensor, torch.Tensor | None]:
    """The top-k KL over the predicting positions of ``ids [B, S]``, averaged (weighted by ``weights
    [B, S - 1]`` when given) with its graph; the summed next-token negative log-likelihood and its count
    (numbers, for perplexity); the per-position KL ``[B, S - 1]`` (detached); and, given the ``repeats``
    mask ``[B, S - 1]``, the unlikelihood of those repeats with its graph (else None)."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    per_position = teacher.top_k_kl(logits, target)
    kl = per_position.mean() if weights is None else (per_position * weights).sum() / weights.sum()
    ul = None if repeats is None else unlikelihood.unlikelihood(logits, ids[:, 1:], repeats)
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(logits.detach().float().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
    return kl, nll.item(), ids[:, 1:].numel(), per_position.detach(), ul


class OutputFit:
    """Trains ``trained`` (state modules of ``comp``) on the output KL; resumable under progress ``name``.

    ``stage`` keys the random seeds (a progressive stage's first layer; 0 for e2e). ``mse`` (optional)
    is a callable returning an extra loss term for a batch of window indices, already weighted.
    """

    def __init__(self, cfg: DictConfig, model, comp: Compression, sets: Data, trained: list[torch.nn.Module], root: Path,
                 head: dict, tracker: Tracker, name: str, stage: int, label: str, mse=None):
        self.cfg, self.t, self.model, self.comp, self.sets = cfg, cfg.training, model, comp, sets
        self.trained = torch.nn.ModuleList(trained)
        self.root, self.head, self.tracker, self.name, self.stage, self.label = Path(root), head, tracker, name, stage, label
        self.mse = mse
        self.device = next(model.parameters()).device

    def _ids(self, idx: list[int]) -> torch.Tensor:
        return self.sets.windows[idx].to(self.device)

    def _targets(self, idx: list[int]) -> teacher.TopK:
        return self.sets.batch_targets(idx, self.device)

    def _modes(self, training: bool) -> None:
        self.comp.states.eval()
        self.trained.train(training)

    def evaluate(self) -> dict:
        self._modes(False)
        return evaluate(self.model, self.sets, self.t.batch_size, float(self.t.get("unlikelihood", 0.0)))

    def __call__(self) -> dict:
        t = self.t
        self.trained.requires_grad_(True)
        optimizer = torch.optim.Adam(layerwise.param_groups(self.trained, t), lr=float(t.lr), weight_decay=float(t.weight_decay))
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=t.lr_step_epochs, gamma=float(t.lr_gamma))
        progress = checkpoints.load_progress(self.root, self.name, self.head)
        if progress is None:
            initial = self.evaluate()
            progress = {"fingerprint": checkpoints.progress_fingerprint(self.head), "epoch": 0, "step": 0,
                        "epoch_kl": 0.0, "epoch_count": 0, "history": [], "initial_val_kl": initial["kl"],
                        "initial_val_ppl": initial["ppl"], "initial_val_answer_kl": initial.get("answer_kl"),
                        "best_val_kl": initial["kl"], "best_val_ppl": initial["ppl"], "best_val_answer_kl": initial.get("answer_kl"),
                        "initial_val_unlikelihood": initial.get("unlikelihood"), "best_val_unlikelihood": initial.get("unlikelihood"),
                        "best_val_objective": initial["objective"],
                        "best_epoch": 0, "best_state": layerwise.detached_copy(self.trained.state_dict()), "elapsed_s": 0.0}
        else:
            self.trained.load_state_dict(progress["state"])
            optimizer.load_state_dict(progress["optimizer"])
            scheduler.load_state_dict(progress["scheduler"])
        elapsed_before, resumed_at = progress["elapsed_s"], time.perf_counter()
        steps_per_epoch = len(layerwise.chunks(self.sets.train_idx, t.batch_size))

        def save(**update):
            progress.update(state=self.trained.state_dict(), optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict(),
                            elapsed_s=elapsed_before + time.perf_counter() - resumed_at, **update)
            checkpoints.save_progress(self.root, self.name, progress)

        total = t.epochs * steps_per_epoch
        done = progress["epoch"] * steps_per_epoch + progress["step"]
        with tqdm(total=total, initial=done, desc=self.label, unit="step", leave=False) as bar:
            for epoch in range(progress["epoch"], t.epochs):
                epoch_started = time.perf_counter()
                torch.manual_seed(layerwise.epoch_seed(self.cfg.seed, self.stage, epoch))
                order = [self.sets.train_idx[i] for i in torch.randperm(len(self.sets.train_idx)).tolist()]
                batches = layerwise.chunks(order, t.batch_size)
                for step in range(progress["step"], len(batches)):
                    torch.manual_seed(layerwise.epoch_seed(self.cfg.seed, self.stage, epoch) + 7919 * (step + 1))
                    self._modes(True)
                    idx = batches[step]
                    repeats = None if self.sets.repeats is None else self.sets.repeats[idx].to(self.device)
                    kl, _, _, _, ul = losses(self.model, self._ids(idx), self._targets(idx),
                                             self.sets.batch_weights(idx, self.device), repeats)
                    loss = kl + (self.mse(idx) if self.mse is not None else 0.0)
                    if ul is not None:
                        loss = loss + float(t.unlikelihood) * ul
                    if not torch.isfinite(loss):
                        raise NonFiniteError(f"{self.label}, epoch {epoch + 1}, step {step + 1}: the training loss is "
                                             f"{loss.item()}; lower training.lr")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    progress["epoch_kl"] += kl.item()
                    progress["epoch_count"] += 1
                    self.tracker.log({f"{self.name}/train_kl": kl.item(), f"{self.name}/loss": loss.item(),
                                      **({f"{self.name}/unlikelihood": ul.item()} if ul is not None else {})})
                    bar.update(1)
                    bar.set_postfix(kl=f"{kl.item():.4g}")
                    if t.get("save_every") and (step + 1) % t.save_every == 0 and step + 1 < len(batches):
                        save(step=step + 1)
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                val = self.evaluate()
                if not all(map(math.isfinite, val.values())):
                    raise NonFiniteError(f"{self.label}, epoch {epoch + 1}: the validation KL / perplexity is "
                                         f"{val['kl']} / {val['ppl']}; lower training.lr")
                train_kl = progress["epoch_kl"] / max(progress["epoch_count"], 1)
                if val["objective"] < progress.get("best_val_objective", progress["best_val_kl"]):
                    progress.update(best_val_kl=val["kl"], best_val_ppl=val["ppl"], best_val_answer_kl=val.get("answer_kl"),
                                    best_val_unlikelihood=val.get("unlikelihood"), best_val_objective=val["objective"],
                                    best_epoch=epoch + 1,
                                    best_state=layerwise.detached_copy(self.trained.state_dict()))
                progress["history"].append({"epoch": epoch + 1, "train_kl": train_kl, "val_kl": val["kl"], "val_ppl": val["ppl"],
                                            "val_answer_kl": val.get("answer_kl"), "val_unlikelihood": val.get("unlikelihood"),
                                            "lr": lr, "seconds": time.perf_counter() - epoch_started})
                save(epoch=epoch + 1, step=0, epoch_kl=0.0, epoch_count=0)
                self.tracker.log({f"{self.name}/val_kl": val["kl"], f"{self.name}/val_ppl": val["ppl"],
                                  **({f"{self.name}/val_answer_kl": val["answer_kl"]} if "answer_kl" in val else {}),
                                  **({f"{self.name}/val_unlikelihood": val["unlikelihood"]} if "unlikelihood" in val else {}),
                                  f"{self.name}/train_kl_epoch": train_kl, "epoch": epoch + 1, "lr": lr})
                bar.set_postfix(val_kl=f"{val['kl']:.4g}", val_ppl=f"{val['ppl']:.4g}")
        self.trained.load_state_dict(progress["best_state"])
        self.trained.requires_grad_(False)
        history = progress["history"]
        return {
            "train_kl": history[-1]["train_kl"] if history else None,
            "val_kl": progress["best_val_kl"],
            "val_ppl": progress["best_val_ppl"],
            "initial_val_kl": progress["initial_val_kl"],
            "initial_val_ppl": progress["initial_val_ppl"],
            "val_answer_kl": progress.get("best_val_answer_kl"),
            "initial_val_answer_kl": progress.get("initial_val_answer_kl"),
            "val_unlikelihood": progress.get("best_val_unlikelihood"),
            "initial_val_unlikelihood": progress.get("initial_val_unlikelihood"),
            "best_epoch": progress["best_epoch"],
            "epochs": t.epochs,
            "num_train": len(self.sets.train_idx),
            "num_val": len(self.sets.val_idx),
            "val_history": [h["val_kl"] for h in history],
            "train_history": [h["train_kl"] for h in history],
            "duration_s": round(progress["elapsed_s"], 3),
        }


@torch.no_grad()
def evaluate(model, sets: Data, batch_size: int, unlikelihood_weight: float = 0.0) -> dict:
    """The validation windows' KL from the teacher (per predicted token, weighted as training weighs it)
    and perplexity, as the model runs now; for answer windows also the KL on the answer tokens alone,
    and with repeats flagged their unlikelihood. ``objective`` (what picks the best epoch) is the KL plus
    ``unlikelihood_weight`` times that unlikelihood, as training weighs them."""
    device = next(model.parameters()).device
    kl_sum, weight_sum, nll, count, answer_sum, answer_count = 0.0, 0.0, 0.0, 0, 0.0, 0
    ul_sum, ul_count = 0.0, 0
    for idx in layerwise.chunks(sets.val_idx, batch_size):
        weights = sets.batch_weights(idx, device)
        repeats = None if sets.repeats is None else sets.repeats[idx].to(device)
        _, n, c, per, ul = losses(model, sets.windows[idx].to(device), sets.batch_targets(idx, device), repeats=repeats)
        if ul is not None:
            ul_sum, ul_count = ul_sum + ul.item() * int(repeats.sum()), ul_count + int(repeats.sum())
        w = torch.ones_like(per) if weights is None else weights
        kl_sum, weight_sum, nll, count = kl_sum + (per * w).sum().item(), weight_sum + w.sum().item(), nll + n, count + c
        if sets.answer is not None:
            mask = sets.answer[idx].to(device)
            answer_sum, answer_count = answer_sum + per[mask].sum().item(), answer_count + int(mask.sum())
    result = {"kl": kl_sum / weight_sum, "ppl": float(torch.tensor(nll / count).exp())}
    if answer_count:
        result["answer_kl"] = answer_sum / answer_count
    if sets.repeats is not None:
        result["unlikelihood"] = ul_sum / ul_count if ul_count else 0.0
    result["objective"] = result["kl"] + unlikelihood_weight * result.get("unlikelihood", 0.0)
    return result


def plain_baseline(model, comp: Compression, sets: Data, batch_size: int) -> dict:
    """The plain policy's validation KL and perplexity (every state set aside): what training starts to beat."""
    before = comp.plain_layers
    comp.plain_layers = frozenset(range(len(comp.states)))
    try:
        return evaluate(model, sets, batch_size)
    finally:
        comp.plain_layers = before


def summarize(root: Path, trained: list[int], tracker: Tracker, plain: dict | None, state_parameters: int) -> dict:
    """The job's metrics from the checkpoint's manifest: per-layer (or per-stage) validation KL and perplexity."""
    manifest = checkpoints.read_manifest(root)
    layers = {int(k): m for k, m in manifest["layers"].items()}
    rows = [[layer, m["val_kl"], m["initial_val_kl"], m["val_ppl"], m["best_epoch"]] for layer, m in sorted(layers.items())]
    tracker.log_table("layers", ["layer", "val_kl", "initial_val_kl", "val_ppl", "best_epoch"], rows)
    last = layers[max(layers)] if layers else {}
    return {
        "checkpoint": str(root),
        "complete": manifest["complete"],
        "layers_done": len(manifest["layers_done"]),
        "num_layers": manifest["model"]["num_layers"],
        "layers_trained": trained,
        "val_kl": last.get("val_kl"),
        "val_ppl": last.get("val_ppl"),
        "initial_val_kl": layers[min(layers)]["initial_val_kl"] if layers else None,
        "initial_val_ppl": layers[min(layers)]["initial_val_ppl"] if layers else None,
        **({"plain_val_kl": plain["kl"], "plain_val_ppl": plain["ppl"]} if plain else {}),
        **({"plain_val_answer_kl": plain["answer_kl"]} if plain and "answer_kl" in plain else {}),
        **({"val_answer_kl": last["val_answer_kl"], "initial_val_answer_kl": layers[min(layers)].get("initial_val_answer_kl")}
           if last.get("val_answer_kl") is not None else {}),
        **({"val_unlikelihood": last["val_unlikelihood"], "initial_val_unlikelihood": layers[min(layers)].get("initial_val_unlikelihood")}
           if last.get("val_unlikelihood") is not None else {}),
        **({"plain_val_unlikelihood": plain["unlikelihood"]} if plain and "unlikelihood" in plain else {}),
        "state_token_equivalents": manifest["state_token_equivalents"],
        "train_s": round(sum({m.get("stage_first", k): m.get("duration_s", 0.0) for k, m in layers.items()}.values()), 1),
        "state_parameters": state_parameters,
        "layers": {str(layer): {k: v for k, v in m.items() if not isinstance(v, list)} for layer, m in layers.items()},
    }


def summary_line(metrics: dict) -> str:
    answer = (f"; answer tokens' KL {metrics['val_answer_kl']:.4g} from {metrics['initial_val_answer_kl']:.4g}"
              + (f" (plain {metrics['plain_val_answer_kl']:.4g})" if metrics.get("plain_val_answer_kl") is not None else "")
              if metrics.get("val_answer_kl") is not None else "")
    plain = (f" (plain policy {metrics['plain_val_kl']:.4g} / {metrics['plain_val_ppl']:.4f})"
             if metrics.get("plain_val_kl") is not None else "")
    repeats = (f"; repeats' unlikelihood {metrics['val_unlikelihood']:.4g} from {metrics['initial_val_unlikelihood']:.4g}"
               + (f" (plain {metrics['plain_val_unlikelihood']:.4g})" if metrics.get("plain_val_unlikelihood") is not None else "")
               if metrics.get("val_unlikelihood") is not None else "")
    return (f"layers done {metrics['layers_done']}/{metrics['num_layers']}, validation KL / perplexity "
            f"{metrics['val_kl']:.4g} / {metrics['val_ppl']:.4f}, from {metrics['initial_val_kl']:.4g} / "
            f"{metrics['initial_val_ppl']:.4f}{plain}" + answer + repeats)
