"""Answer windows: training text that looks like what a served model meets, an instruction prompt on a
document followed by the model's own answer.

Teacher-forced running text never shows a state the positions where generation fails: an answer
that follows an instruction while the document it is about sits evicted in the state. An answer
window packs, into ``seq_len`` tokens, episodes of a ``source`` document (the training split of a
text preset such as C4) inside an instruction ``template``, each followed by the full-cache model's
greedy answer, token for token up to and including the token that ends it (cut at ``stop``, at most
``max_new_tokens``), so the decision to stop is trained too. Earlier episodes of a window stay in
context, so a later answer is written with older documents evicted, as in a conversation. Windows
are built once per set-up and cached; the mask of answer tokens weights the loss
(``data.answers.weight``, the weight of a position that predicts an answer token relative to one
that predicts document text).

``data.answers.student_share`` of the episodes are answered by the *student* instead: the model
running the policy and the starting states with the real evicting cache, as generation runs them.
The teacher still scores every position, so on the student's own answers (its loops included) the
loss says what the full-cache model would write next: on-policy distillation, the usual cure for a
student that matches the teacher on the teacher's text but drifts on its own.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from less_exp import data, prompts
from less_exp.adapter import Compression, LessCache, cache_kwargs, switch
from less_exp.errors import ConfigError
from less_exp.models import end_token_ids
from less_exp.tasks.repetition import repeated_ngram_share, words
from less_exp.training.record import save_atomic

FORMAT = 3  # of the cached windows: 2 keeps each answer's tokens as generated, end token included; 3 drops loops

KEYS = ("templates", "max_doc_tokens", "min_doc_tokens", "max_new_tokens", "stop", "weight", "student_share",
        "drop_unfinished", "max_repetition")


def validate(answers: DictConfig) -> None:
    """Every ``data.answers`` setting is there (the schema bounds their values)."""
    missing = [k for k in KEYS if k not in answers]
    if missing:
        raise ConfigError(f"data.answers lacks {', '.join(missing)}; see conf/data/c4_answers.yaml")


def position_weights(answer: torch.Tensor, weight: float) -> torch.Tensor:
    """Loss weights ``[N, S - 1]`` of the predicting positions: ``weight`` where the predicted token
    (the next one) is an answer token, 1 elsewhere."""
    return torch.where(answer[:, 1:], torch.tensor(float(weight)), torch.tensor(1.0))


def reply_tokens(generated: list[int], end_ids: set[int], stop: str | None, tokenizer) -> list[int]:
    """The answer as generation leaves it, token for token: up to and including the model's end token
    (the token that stops generation is what a state must learn to keep predicting), or up to the token
    where ``stop`` begins. Re-encoding the decoded text would drop the end token and teach a state that
    an answer runs on into more text."""
    for n, token in enumerate(generated):
        if token in end_ids:
            return generated[: n + 1]
    text = tokenizer.decode(generated, skip_special_tokens=True) if stop else ""
    if stop and stop in text:  # keep the tokens whose text lies wholly before the stop
        start, m = text.index(stop), len(generated)
        while m and len(tokenizer.decode(generated[:m], skip_special_tokens=True)) > start:
            m -= 1
        return generated[:m]
    return generated


def _answer(model, tokenizer, context: list[int], answers: DictConfig,
            student: Compression | None = None) -> tuple[list[int], bool]:
    """The greedy answer to ``context`` (``reply_tokens``) and whether it ended before ``max_new_tokens``:
    the full-cache model's, or with ``student`` the model's running that compression with its real
    evicting cache."""
    device = next(model.parameters()).device
    stop = {"stop_strings": [answers.stop], "tokenizer": tokenizer} if answers.stop else {}
    switch(model, student)
    try:
        with torch.inference_mode():
            out = model.generate(input_ids=torch.tensor([context], device=device), max_new_tokens=int(answers.max_new_tokens),
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                                 **cache_kwargs(LessCache(model) if student is not None else None), **stop)
    finally:
        switch(model, None)
    generated, ends = out[0, len(context):].tolist(), end_token_ids(model, tokenizer)
    reply = reply_tokens(generated, ends, answers.stop, tokenizer)
    ended = len(generated) < int(answers.max_new_tokens) or len(reply) < len(generated) or bool(reply) and reply[-1] in ends
    return reply, ended


def kept(reply: list[int], ended: bool, answers: DictConfig, tokenizer) -> bool:
    """Whether a teacher's answer is a target worth training on: the small models we compress loop now
    and then even with the full cache, and a window holding such a loop teaches a state to keep one
    going. ``drop_unfinished`` drops answers still running at ``max_new_tokens``; ``max_repetition``
    those whose share of repeated word 3-grams exceeds it."""
    if answers.drop_unfinished and not ended:
        return False
    cap = answers.max_repetition
    return cap is None or repeated_ngram_share(words(tokenizer.decode(reply, skip_special_tokens=True))) <= cap


def student_writes(episode: int, share: float) -> bool:
    """Whether the student answers episode ``episode`` (counted over the whole set): spread evenly, a
    ``share`` of them."""
    return int((episode + 1) * share) > int(episode * share)


def _window(model, tokenizer, docs, templates: list[tuple[str, str]], answers: DictConfig, seq_len: int,
            student: Compression | None, episodes: list[int]) -> tuple[list[int], list[bool]]:
    """One window; ``templates`` are rendered (text before and after ``{text}``); ``episodes`` counts
    [episodes kept, teacher answers dropped] over the whole set."""
    ids: list[int] = []
    mask: list[bool] = []
    for n, doc in docs:
        head, tail = (tokenizer(part, add_special_tokens=False)["input_ids"] for part in templates[n % len(templates)])
        room = seq_len - len(ids) - len(head) - len(tail) - int(answers.max_new_tokens)
        doc_ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        if room < answers.min_doc_tokens:  # no room for an episode: the window ends with running text
            filler = doc_ids[: seq_len - len(ids)]
            ids += filler
            mask += [False] * len(filler)
            if len(ids) >= seq_len:
                break
            continue
        prompt = head + doc_ids[: min(room, int(answers.max_doc_tokens))] + tail
        by_student = student is not None and student_writes(episodes[0], float(answers.student_share))
        reply, ended = _answer(model, tokenizer, ids + prompt, answers, student if by_student else None)
        if not by_student and not kept(reply, ended, answers, tokenizer):
            episodes[1] += 1
            continue  # the student's own loops stay: on them the teacher's scores are the lesson
        episodes[0] += 1
        ids += prompt
        mask += [False] * len(prompt)
        ids += reply
        mask += [True] * len(reply)
        if len(ids) >= seq_len:
            break
    return ids[:seq_len], mask[:seq_len]


def _as_float(value):
    """A number as the cache key sees it: ``0`` and ``0.0`` (a user may write either) name the same windows."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def build(data_cfg: DictConfig, model: torch.nn.Module, tokenizer, split: str, seq_len: int, count: int,
          cache_dir: Path, model_name: str, student: Compression | None = None, chat: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``count`` answer windows ``[N, seq_len]`` and their answer-token mask (bool, same shape).

    Call while the model runs full attention (it is left so); ``student`` (built for this model, needed
    when ``student_share > 0``) answers its share of the prompts; with ``chat`` each episode's prompt
    goes through the tokenizer's chat template (:mod:`less_exp.prompts`), so answers end with its
    end-of-turn token. The result is cached in ``cache_dir`` under a hash of the model, the source
    documents, the settings and the student's parameters. Each
    finished window is saved as it comes (generation is greedy, so the rest of a build continues from
    the next document): a killed build resumes where it stopped rather than redoing minutes a window.
    """
    answers = data_cfg.answers
    validate(answers)
    if answers.student_share > 0 and student is None:
        raise ValueError("data.answers.student_share > 0 needs the student's compression")
    if answers.student_share == 0:
        student = None
    docs = data.load_documents(data_cfg.source, split)
    settings = {k: _as_float(v) for k, v in OmegaConf.to_container(answers, resolve=True).items()
                if k not in ("weight", "prompt_format")}  # weighs, builds nothing / resolved into ``chat``
    spec = {"format": FORMAT, "model": model_name, "settings": settings, "seq_len": seq_len, "count": count,
            "docs": hashlib.sha256("\x00".join(docs).encode()).hexdigest(),
            "student": None if student is None else _parameters_hash(student)}
    if chat:  # raw windows keep the key they had before prompt formats existed
        spec["chat"] = True
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"answers_{key}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        return saved["windows"], saved["answer"]
    templates = [prompts.split_template(tokenizer, t, chat) for t in answers.templates]
    partial = path.with_name(f"answers_{key}.partial.pt")
    progress = torch.load(partial, weights_only=True) if partial.is_file() else {"rows": [], "masks": [], "episodes": [0, 0], "next": 0}
    rows, masks, episodes = progress["rows"], progress["masks"], progress["episodes"]
    taken = [progress["next"]]

    def stream():
        for n in range(taken[0], len(docs)):
            taken[0] = n + 1
            yield n, docs[n]

    documents = stream()
    with tqdm(total=count, initial=len(rows), desc="answer windows", unit="window") as bar:
        while len(rows) < count:
            ids, mask = _window(model, tokenizer, documents, templates, answers, seq_len, student, episodes)
            if len(ids) < seq_len:
                break
            rows.append(ids)
            masks.append(mask)
            save_atomic({"rows": rows, "masks": masks, "episodes": episodes, "next": taken[0]}, partial)
            bar.update(1)
            bar.set_postfix(dropped=episodes[1])
    if len(rows) < 2:
        dropped = (f" ({episodes[1]} of the teacher's answers dropped as loops or unfinished: see data.answers.drop_unfinished "
                   f"and max_repetition)" if episodes[1] else "")
        raise ConfigError(f"data={data_cfg.name}: the {len(docs)} documents of data={data_cfg.source.name} split={split} "
                          f"fill only {len(rows)} answer window of {seq_len} tokens{dropped}; lower training.seq_len")
    windows, answer = torch.tensor(rows, dtype=torch.long), torch.tensor(masks, dtype=torch.bool)
    save_atomic({"windows": windows, "answer": answer}, path)
    partial.unlink(missing_ok=True)
    return windows, answer


def _parameters_hash(comp: Compression) -> str | None:
    """What the student's answers depend on besides the model: its policy and its states' parameters."""
    digest = hashlib.sha256(repr(comp.policy).encode())
    if comp.states is not None:
        for name, tensor in sorted(comp.states.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()
