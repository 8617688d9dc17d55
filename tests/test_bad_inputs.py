"""Bad inputs at the command line: each is one line on stderr naming the setting or file, a distinct
exit code, no traceback, within a minute even on a loaded machine (the lm-eval task index alone
takes about 20 s there), and nothing left behind that a later run could read as a result.

The cases run as real ``less-eval``/``less-train``/``less-report`` processes, two at a time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
EVAL = ["less-eval", "model=tiny_llama", "logger=none"]
TRAIN = ["less-train", "model=tiny_llama", "logger=none", "training.seq_len=64", "training.num_sequences=4"]
H2O = ["policy=h2o", "policy.heavy=8", "policy.recent=8"]

# (id, command, files to write first {name: text}, exit code, message pattern)
CASES = [
    ("unknown-policy", [*EVAL, "policy=nope"], {}, 2, r"Could not find 'policy/nope'.*h2o"),
    ("unknown-key", [*EVAL, "task.seqlen=5"], {}, 2, r"task\.seqlen"),
    ("plus-unknown-key", [*EVAL, "+unknown_key=1"], {}, 2,
     r"\+unknown_key=1: the config has no top-level key unknown_key .*set an existing key without '\+'"),
    ("plus-key-typo", [*EVAL, "+task.seqlen=64"], {}, 2,
     r"\+task\.seqlen=64: task has no key seqlen \(did you mean task\.seq_len\?\)"),
    ("override-syntax", [*EVAL, "policy.heavy==3"], {}, 2, r"Error parsing override 'policy\.heavy==3'"),
    ("not-a-number", [*EVAL, "policy=h2o", "policy.recent=abc"], {}, 2, r"policy\.recent='abc' must be a number"),
    ("negative-budget", [*EVAL, "policy=h2o", "policy.heavy=-1"], {}, 2, r"policy\.heavy=-1 must be a number >= 0"),
    ("fraction-without-ratio", [*EVAL, "policy=h2o", "policy.heavy=0.5"], {}, 2, r"fractional.*ratio_of"),
    ("unknown-ratio-base", [*EVAL, "policy=h2o", "policy.ratio_of=tokens"], {}, 2, r"policy\.ratio_of='tokens' must be one of max_positions, length"),
    ("sink-with-heavy", [*EVAL, "policy=sink", "policy.heavy=3"], {}, 2, r"sink ranks no tokens.*policy\.heavy=0"),
    ("window-without-recent", [*EVAL, "policy=window", "policy.recent=0"], {}, 2, r"policy\.recent must resolve to >= 1"),
    ("budget-over-length", [*EVAL, "policy=h2o", "task.seq_len=64"], {}, 2, r"not smaller than the sequence length 64"),
    ("baseline-plus-no-state", [*EVAL, *H2O, "policy.baseline_plus=true"], {}, 2, r"baseline_plus=true needs a feature_map"),
    ("baseline-plus-not-bool", [*EVAL, *H2O, "feature_map=less_mlp", "policy.baseline_plus=maybe"], {}, 2, r"baseline_plus='maybe' must be true or false"),
    ("gating-option", [*EVAL, "gating=nope"], {}, 2, r"Could not find 'gating/nope'.*scalar_gate"),
    ("gating-no-state", [*EVAL, "gating=decay"], {}, 2, r"gating=decay shapes a LESS state, but feature_map=none"),
    ("gating-gamma", [*EVAL, *H2O, "feature_map=elu1", "gating=decay", "gating.gamma=1.5"], {}, 2,
     r"gating\.gamma=1\.5 must be a number in \(0, 1\]"),
    ("gating-chunk", [*EVAL, *H2O, "feature_map=elu1", "gating=scalar_gate", "gating.chunk_size=0"], {}, 2,
     r"gating\.chunk_size=0 must be a positive integer"),
    ("zero-features", [*EVAL, *H2O, "feature_map=less_mlp", "feature_map.features=0"], {}, 2, r"features=0"),
    ("features-not-int", [*EVAL, *H2O, "feature_map=less_mlp", "feature_map.features=eight"], {}, 2,
     r"feature_map\.features='eight' must be a positive integer"),
    ("dropout-range", [*EVAL, *H2O, "feature_map=less_mlp", "feature_map.dropout=1.5"], {}, 2, r"dropout=1\.5"),
    ("dtype", [*EVAL, "model.dtype=float64"], {}, 2, r"model\.dtype='float64'"),
    ("no-cuda", [*EVAL, "device=cuda"], {}, 2, r"CUDA is not available.*device=cpu"),
    ("bad-device", [*EVAL, "device=tpu9"], {}, 2, r"device='tpu9' is not a torch device"),
    ("seed-not-int", [*EVAL, "seed=abc"], {}, 2, r"seed='abc' must be an integer"),
    ("seq-len-one", [*EVAL, "task.seq_len=1"], {}, 2, r"task\.seq_len"),
    ("max-windows-zero", [*EVAL, "task.max_windows=0"], {}, 2, r"task\.max_windows"),
    ("windows-kind", [*EVAL, "task.windows=sliding"], {}, 2, r"task\.windows"),
    ("prompt-format", [*EVAL, "task=xsum", "task.prompt_format=chatml"], {}, 2, r"task\.prompt_format='chatml' must be"),
    ("chat-without-template", [*EVAL, "task=xsum", "task.prompt_format=chat", "task.num_samples=1"], {}, 2,
     r"task\.prompt_format=chat: the tokenizer of model=tiny_llama has no chat template; use task\.prompt_format=raw"),
    ("prefill-zero", [*EVAL, *H2O, "task=consistency", "task.prefill=0"], {}, 2, r"task\.prefill=0"),
    ("consistency-ratio", [*EVAL, "task=consistency", "policy=h2o", "policy.ratio_of=length", "policy.heavy=0.1",
                           "policy.recent=0.1"], {}, 2, r"ratio_of=length"),
    ("consistency-chunk", [*EVAL, *H2O, "task=consistency", "task.chunk=0"], {}, 2, r"task\.chunk"),
    ("memory", [*EVAL, *H2O, "task=consistency", "model.max_length=200000", "task.seq_len=100000", "task.prefill=10"], {}, 2,
     r"task\.seq_len=100000: the parallel form would need about \d+.*GiB"),
    ("passkey-depth", [*EVAL, "task=passkey", "task.context_lengths=[256]", "task.depths=[0,1.5]"], {}, 2, r"task\.depths"),
    ("passkey-trials", [*EVAL, "task=passkey", "task.context_lengths=[256]", "task.trials=0"], {}, 2, r"task\.trials"),
    ("generate-tokens", [*EVAL, "task=generate", "task.max_new_tokens=0"], {}, 2, r"task\.max_new_tokens"),
    ("bench-full", [*EVAL, "task=bench", "task.context_lengths=[64]", "policy=full"], {}, 2, r"compares the full cache"),
    ("harness-typo", [*EVAL, "task=harness", "task.names=[hellaswagg]"], {}, 2, r"hellaswagg.*did you mean"),
    ("missing-data-file", [*EVAL, "task=xsum", "task.data_path={tmp}/none.jsonl"], {}, 2, r"none\.jsonl is not a file"),
    ("empty-records", [*EVAL, "task=xsum", "task.data_path={tmp}/empty.jsonl"], {"empty.jsonl": ""}, 2,
     r"empty\.jsonl holds no records"),
    ("missing-field", [*EVAL, "task=xsum", "task.data_path={tmp}/field.jsonl"], {"field.jsonl": '{"article": "x"}\n'}, 2,
     r"field\.jsonl line 1 has no field 'summary_gt'"),
    ("corrupt-jsonl", [*EVAL, "task=xsum", "task.data_path={tmp}/corrupt.jsonl"],
     {"corrupt.jsonl": '{"article": "a", "summary_gt": "b"}\n{not json\n'}, 2, r"corrupt\.jsonl line 2 is not JSON"),
    ("empty-text", [*EVAL, "data.local.files.test={tmp}/empty.txt"], {"empty.txt": "\n"}, 2, r"empty\.txt is empty"),
    ("binary-text", [*EVAL, "data.local.files.test={tmp}/binary.txt"], {"binary.txt": b"\xff\xfe\x00bad"}, 2,
     r"binary\.txt is not UTF-8"),
    ("no-checkpoint", [*EVAL, "policy=sink", "checkpoint={tmp}/nowhere"], {}, 2, r"checkpoint=.*nowhere.*no manifest\.json"),
    ("corrupt-manifest", [*EVAL, "policy=sink", "checkpoint={tmp}/ckpt"], {"ckpt/manifest.json": "{oops"}, 2,
     r"manifest\.json is not valid JSON"),
    ("checkpoint-budget", [*EVAL, "checkpoint_budget=nearest"], {}, 2, r"checkpoint_budget"),
    ("unwritable-output", [*EVAL, "hydra.run.dir=/proc/less/run"], {}, 2, r"hydra\.run\.dir=/proc/less/run: cannot create"),
    ("output-is-a-file", [*EVAL, "hydra.run.dir={tmp}/afile/run"], {"afile": "x"}, 2, r"cannot create folders in .*afile"),
    ("training-mode", [*TRAIN, "training.mode=qat"], {}, 2, r"training\.mode"),
    ("training-epochs", [*TRAIN, "training.epochs=0"], {}, 2, r"training\.epochs"),
    ("training-gate-lr", [*TRAIN, "training.gate_lr=0"], {}, 2, r"training\.gate_lr=0 must be a number > 0"),
    ("training-val-fraction", [*TRAIN, "training.val_fraction=0"], {}, 2, r"val_fraction"),
    ("training-record-dtype", [*TRAIN, "training.record_dtype=int8"], {}, 2, r"record_dtype"),
    ("training-no-state", [*TRAIN, "feature_map=none"], {}, 2, r"feature_map"),
    ("training-short", [*TRAIN, "training.seq_len=8"], {}, 2, r"not smaller than the sequence"),
    ("training-layers", [*TRAIN, "training.from_layer=1", "training.to_layer=1"], {}, 2, r"from_layer"),
    ("report-missing", ["less-report", "{tmp}/nothing"], {}, 2, r"nothing does not exist"),
    ("report-empty", ["less-report", "{tmp}/emptydir"], {"emptydir/.keep": ""}, 2, r"no readable results\.json"),
    ("report-corrupt", ["less-report", "{tmp}/runs"], {"runs/a/results.json": "{broken"}, 2, r"no readable results\.json"),
    ("report-unwritable-out", ["less-report", "{tmp}/runs", "--out", "/proc/less/report"],
     {"runs/a/results.json": json.dumps({"job": "eval", "status": "ok", "metrics": {"perplexity": 3.0},
                                         "config": {"model": {"name": "m"}, "task": {"name": "perplexity"},
                                                    "policy": {"name": "full"}}})}, 2,
     r"cannot write the report to /proc/less"),
    ("report-logger", ["less-report", "{tmp}", "--logger", "nope"], {}, 2, r"--logger: invalid choice"),
    # the schema (less_exp/schema.py): unknown keys, types, ranges, non-finite values, choices, cross-key rules
    ("forced-unknown-key", [*EVAL, "++task.seqlen=64"], {}, 2, r"task\.seqlen is not a setting \(did you mean task\.seq_len\?\)"),
    ("forced-unknown-top", [*EVAL, "++sed=1"], {}, 2, r"sed is not a setting \(did you mean seed\?\)"),
    ("string-for-int", [*EVAL, "task.seq_len=long"], {}, 2, r"task\.seq_len='long' must be an integer >= 2"),
    ("float-for-int", [*EVAL, "task.seq_len=64.5"], {}, 2, r"task\.seq_len=64\.5 must be an integer"),
    ("bool-for-int", [*EVAL, "task.batch_size=true"], {}, 2, r"task\.batch_size=True must be a positive integer"),
    ("list-for-int", [*EVAL, "task.batch_size=[1,2]"], {}, 2, r"task\.batch_size=\[1, 2\] must be a positive integer"),
    ("mapping-for-group", [*EVAL, "policy=h2o", "++policy.heavy={a:1}"], {}, 2, r"policy\.heavy=\{'a': 1\} must be a number"),
    ("nan-budget", [*EVAL, "policy=h2o", "policy.heavy=nan"], {}, 2, r"policy\.heavy=nan must be a number >= 0"),
    ("inf-budget", [*EVAL, "policy=h2o", "policy.recent=inf"], {}, 2, r"policy\.recent=inf must be a number >= 0"),
    ("nan-key-scale", [*EVAL, *H2O, "feature_map=elu1", "feature_map.key_scale_init=nan"], {}, 2,
     r"feature_map\.key_scale_init=nan must be a number > 0"),
    ("inf-gate-bias", [*EVAL, *H2O, "feature_map=elu1", "gating=scalar_gate", "gating.bias=inf"], {}, 2,
     r"gating\.bias=inf must be a finite number"),
    ("gate-temperature", [*EVAL, *H2O, "feature_map=elu1", "gating=scalar_gate", "gating.temperature=-1"], {}, 2,
     r"gating\.temperature=-1 must be a number > 0"),
    ("gamma-list", [*EVAL, *H2O, "feature_map=elu1", "gating=decay", "gating.gamma=[0.5,2]"], {}, 2, r"gating\.gamma=\[0\.5, 2\]"),
    ("gamma-string", [*EVAL, *H2O, "feature_map=elu1", "gating=decay", "gating.gamma=fast"], {}, 2, r"gating\.gamma='fast'"),
    ("norm-eps", [*EVAL, *H2O, "feature_map=elu1", "normalizer=norm", "normalizer.eps=-1"], {}, 2, r"normalizer\.eps=-1"),
    ("leap-hidden", [*EVAL, *H2O, "feature_map=elu1", "reweighting=leapformer", "reweighting.hidden=0"], {}, 2,
     r"reweighting\.hidden=0 must be a positive integer"),
    ("cosformer-horizon", [*EVAL, *H2O, "feature_map=elu1", "reweighting=cosformer", "reweighting.horizon=-5"], {}, 2,
     r"reweighting\.horizon=-5"),
    ("features-negative", [*EVAL, *H2O, "feature_map=taylor", "feature_map.features=-8"], {}, 2, r"feature_map\.features=-8"),
    ("per-head-string", [*EVAL, *H2O, "feature_map=less_mlp", "feature_map.per_head=sometimes"], {}, 2,
     r"feature_map\.per_head='sometimes' must be true or false"),
    ("hidden-zero", [*EVAL, *H2O, "feature_map=less_mlp", "feature_map.hidden=0"], {}, 2, r"feature_map\.hidden=0"),
    ("ratio-of-number", [*EVAL, "policy=h2o", "policy.ratio_of=5"], {}, 2, r"policy\.ratio_of=5 must be one of"),
    ("dtype-typo", [*EVAL, "model.dtype=fp16"], {}, 2, r"model\.dtype='fp16' must be one of float32, float16, bfloat16"),
    ("max-length-one", [*EVAL, "model.max_length=1"], {}, 2, r"model\.max_length=1 must be an integer >= 2"),
    ("model-source", [*EVAL, "model.source=cloud"], {}, 2, r"model\.source='cloud' must be one of"),
    ("model-seed", [*EVAL, "model.seed=-1"], {}, 2, r"model\.seed=-1"),
    ("seed-list", [*EVAL, "seed=[1,2]"], {}, 2, r"seed=\[1, 2\] must be an integer"),
    ("device-number", [*EVAL, "device=3"], {}, 2, r"device=3 must be a string"),
    ("checkpoint-number", [*EVAL, "checkpoint=5"], {}, 2, r"checkpoint=5 must be a string"),
    ("task-split", [*EVAL, "task.split=dev"], {}, 2, r"task\.split='dev' must be one of train, validation, test"),
    ("max-windows-negative", [*EVAL, "task.max_windows=-2"], {}, 2, r"task\.max_windows=-2"),
    ("seq-len-over-model", [*EVAL, "task.seq_len=4096"], {}, 2, r"task\.seq_len=4096 must be an integer in \[2, 2048\] \(model\.max_length\)"),
    ("passkey-lengths-empty", [*EVAL, "task=passkey", "task.context_lengths=[]"], {}, 2, r"task\.context_lengths=\[\] must be a non-empty list"),
    ("passkey-lengths-twice", [*EVAL, "task=passkey", "task.context_lengths=[256,256]"], {}, 2, r"lists a value twice"),
    ("passkey-lengths-long", [*EVAL, "task=passkey", "task.context_lengths=[2048]"], {}, 2, r"exceed model\.max_length=2048"),
    ("passkey-digits", [*EVAL, "task=passkey", "task.digits=0"], {}, 2, r"task\.digits=0"),
    ("bench-methods", [*EVAL, *H2O, "task=bench", "task.methods=[full,fast]"], {}, 2, r"task\.methods=\['full', 'fast'\]"),
    ("bench-warmup", [*EVAL, *H2O, "task=bench", "task.context_lengths=[64]", "task.decode_tokens=4", "task.warmup_tokens=8"], {}, 2,
     r"task\.decode_tokens=4 must be larger than task\.warmup_tokens=8"),
    ("xsum-top-p", [*EVAL, "task=xsum", "task.top_p=0"], {}, 2, r"task\.top_p=0 must be a number in \(0, 1\]"),
    ("xsum-temperature", [*EVAL, "task=xsum", "task.do_sample=true", "task.temperature=0"], {}, 2,
     r"task\.temperature=0 must be > 0 when task\.do_sample=true"),
    ("xsum-sample-string", [*EVAL, "task=xsum", "task.do_sample=yes"], {}, 2, r"task\.do_sample='yes' must be true or false"),
    ("xsum-new-tokens", [*EVAL, "task=xsum", "task.max_new_tokens=4096"], {}, 2, r"leaves no room for a prompt"),
    ("generate-prompts", [*EVAL, "task=generate", "task.prompts=[1,2]"], {}, 2, r"task\.prompts=\[1, 2\] must be a list of strings"),
    ("harness-fewshot", [*EVAL, "task=harness", "task.num_fewshot=-1"], {}, 2, r"task\.num_fewshot=-1"),
    ("consistency-pad", [*EVAL, *H2O, "task=consistency", "task.pad=-1"], {}, 2, r"task\.pad=-1 must be an integer >= 0"),
    ("consistency-pad-long", [*EVAL, *H2O, "task=consistency", "task.seq_len=64", "task.prefill=8", "task.pad=64"], {}, 2,
     r"task\.pad=64 must be smaller than task\.seq_len=64"),
    ("consistency-prefill-long", [*EVAL, *H2O, "task=consistency", "task.seq_len=64", "task.prefill=64"], {}, 2,
     r"task\.prefill=64 must be in \[1, task\.seq_len=64\)"),
    ("logger-mode", [*EVAL, "logger=wandb", "logger.mode=cloud"], {}, 2, r"logger\.mode='cloud' must be one of offline, online"),
    ("logger-tags", [*EVAL, "logger=wandb", "logger.tags=[1]"], {}, 2, r"logger\.tags=\[1\] must be a list of strings"),
    ("data-files-number", [*EVAL, "data.local.files.test=5"], {}, 2, r"data\.local\.files\.test=5 must be a string"),
    ("data-rows", [*EVAL, "data=c4", "data.local.rows.test=[a,b]"], {}, 2, r"data\.local\.rows\.test=\['a', 'b'\] must be a list of integers"),
    ("data-hub-rows", [*EVAL, "data=c4", "data.hub.max_rows=0"], {}, 2, r"data\.hub\.max_rows=0"),
    ("training-lr-string", [*TRAIN, "training.lr=fast"], {}, 2, r"training\.lr='fast' must be a number > 0"),
    ("training-lr-inf", [*TRAIN, "training.lr=inf"], {}, 2, r"training\.lr=inf must be a number > 0"),
    ("training-epochs-float", [*TRAIN, "training.epochs=1.5"], {}, 2, r"training\.epochs=1\.5 must be a positive integer"),
    ("training-lr-gamma", [*TRAIN, "training.lr_gamma=2"], {}, 2, r"training\.lr_gamma=2 must be a number in \(0, 1\]"),
    ("training-weight-decay", [*TRAIN, "training.weight_decay=-0.1"], {}, 2, r"training\.weight_decay=-0\.1"),
    ("training-one-sequence", [*TRAIN, "training.num_sequences=1"], {}, 2, r"training\.num_sequences=1 must be an integer >= 2"),
    ("training-seq-len-over-model", [*TRAIN, "training.seq_len=4096"], {}, 2, r"training\.seq_len=4096 must be an integer in \[2, 2048\]"),
    ("training-keep-records", [*TRAIN, "training.keep_records=perhaps"], {}, 2, r"training\.keep_records='perhaps' must be true or false"),
    ("training-to-layer", [*TRAIN, "training.to_layer=0"], {}, 2, r"training\.to_layer=0"),
    ("training-alpha", [*TRAIN[:3], "training=interpolate", "training.alpha=1.5"], {}, 2, r"training\.alpha=1\.5 must be a number in \[0, 1\]"),
    ("training-after", [*TRAIN, "training=progressive", "training.after=trained"], {}, 2, r"training\.after='trained' must be one of init, plain"),
    ("training-window", [*TRAIN, "training=progressive", "training.window=0"], {}, 2, r"training\.window=0"),
    ("training-checkpointing", [*TRAIN, "training=e2e", "training.gradient_checkpointing=sometimes"], {}, 2,
     r"training\.gradient_checkpointing='sometimes' must be true or false"),
    ("answers-template-field", [*TRAIN, "training=e2e", "data=c4_answers", "data.answers.templates=[Summarize.]"], {}, 2,
     r"data\.answers\.templates must each have a \{text\} field"),
    ("answers-docs", [*TRAIN, "training=e2e", "data=c4_answers", "data.answers.min_doc_tokens=100", "data.answers.max_doc_tokens=50"],
     {}, 2, r"min_doc_tokens=100 exceeds max_doc_tokens=50"),
    # sizes refused with an estimate before anything is allocated
    ("state-features-memory", [*EVAL, *H2O, "feature_map=elu1", "feature_map.features=300000000"], {}, 2,
     r"the state \(feature_map\.features=300000000\) would need about [\d,.]+ GiB .* this machine has"),
    ("batch-memory", [*EVAL, *H2O, "task=consistency", "model.max_length=200000", "task.seq_len=20000", "task.pad=10"], {}, 2,
     r"task\.seq_len=20000: the parallel form would need about \d+.*GiB"),
    ("decode-batch-memory", [*EVAL, "task=generate", "task.batch_size=100000000"], {}, 2,
     r"task\.batch_size=100000000 with task\.max_new_tokens=64: the KV cache would need about [\d,.]+ GiB"),
    # model overrides, logger settings, paths and data records
    ("model-heads", [*EVAL, "model.config.num_attention_heads=3"], {}, 2,
     r"model=tiny_llama: its model\.config makes no valid llama model \(The hidden size \(64\) is not a multiple"),
    ("model-no-layers", [*EVAL, "model.config.num_hidden_layers=0"], {}, 2, r"model\.config\.num_hidden_layers=0 must be a positive integer"),
    ("model-no-width", [*EVAL, "model.config.hidden_size=0"], {}, 2, r"model\.config\.hidden_size=0 must be a positive integer"),
    ("logger-online-without-key", [*EVAL, "logger=wandb", "logger.mode=online"], {}, 2,
     r"logger=wandb \(mode=online.*W&B refused the run.*logger\.mode=offline"),
    ("run-dir-name-too-long", [*EVAL, "hydra.run.dir={tmp}/" + "x" * 300], {}, 2, r"hydra\.run\.dir=.*longer than the file system's \d+ bytes"),
    ("checkpoint-unwritable", [*TRAIN, "policy.recent=8", "checkpoint=/proc/less/ckpt"], {}, 2,
     r"checkpoint=/proc/less/ckpt: cannot create folders"),
    ("record-dir-too-long", [*TRAIN, "policy.recent=8", "training.record_dir={tmp}/" + "x" * 300], {}, 2,
     r"training\.record_dir=.*longer than the file system's"),
    ("data-file-is-a-folder", [*EVAL, "data.local.files.test={tmp}"], {}, 2, r"is a folder, not a file; set data\.local\.files\.test"),
    ("jsonl-list-record", [*EVAL, "task=xsum", "task.data_path={tmp}/list.jsonl"], {"list.jsonl": "[1, 2]\n"}, 2,
     r"list\.jsonl line 1 is a JSON list, not an object of fields"),
    ("summaries-file-rows", [*EVAL, "task=stop_probability", "task.summaries={tmp}/s.jsonl"], {"s.jsonl": '{"index": "a"}\n'}, 2,
     r"task\.summaries=.*s\.jsonl: line 1 is not a summaries\.jsonl row"),
    # malformed report inputs: skipped with a line, and none left is one error line
    ("report-headline-not-number", ["less-report", "{tmp}/runs"],
     {"runs/a/results.json": json.dumps({"job": "eval", "status": "ok", "metrics": {"perplexity": "abc"},
                                         "config": {"model": {"name": "m"}, "task": {"name": "perplexity"},
                                                    "policy": {"name": "full"}}})}, 2, r"no readable results\.json"),
    ("report-binary", ["less-report", "{tmp}/runs"], {"runs/a/results.json": b"\xff\xfe\x00"}, 2, r"no readable results\.json"),
]


def _run(case, root: Path):
    name, command, files, _, _ = case
    tmp = root / name
    tmp.mkdir(parents=True)
    for rel, content in files.items():
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    argv = [str(BIN / command[0]), *(arg.replace("{tmp}", str(tmp)) for arg in command[1:])]
    began = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=_env(tmp), timeout=120, cwd=tmp)
    return done, time.perf_counter() - began, tmp


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory):
    """The selected cases' outcomes (``-k`` runs only those), two processes at a time."""
    chosen = {item.callspec.params["case"][0] for item in request.session.items
              if "case" in getattr(getattr(item, "callspec", None), "params", {})}
    cases = [c for c in CASES if c[0] in chosen]
    root = tmp_path_factory.mktemp("bad_inputs")
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip((c[0] for c in cases), pool.map(lambda c: _run(c, root), cases)))


def test_there_are_at_least_120_cases():
    assert len(CASES) >= 120 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(outcomes, case):
    import re

    name, command, _, code, pattern = case
    done, seconds, tmp = outcomes[name]
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert done.returncode == code, done.stderr[-1500:]
    assert "Traceback" not in done.stderr, done.stderr[-1500:]
    assert errors and re.search(pattern, errors[-1]), done.stderr[-1500:]
    assert len(errors[-1]) < 400
    assert seconds < 60
    for path in tmp.rglob("results.json"):
        text = path.read_bytes().decode("utf-8", errors="replace")
        record = json.loads(text) if text.strip().startswith("{\n") else {}
        assert record.get("status") != "ok", f"{path} would read as a good result"


@pytest.mark.parametrize("config_name, overrides", [
    ("eval", ["model=tiny_llama", "+hparams_search=tiny_perplexity"]),
    ("eval", ["model=tiny_llama", "+model.config.rope_theta=5.0", "++task.anything=1"]),
    ("study", ["study=tiny_pipeline", '+study.methods.extra={overrides:["policy=full"]}']),
])
def test_plus_adds_groups_and_open_entries(config_name, overrides):
    """``+group=option``, ``++key`` and new entries of an open mapping are not taken for unknown keys."""
    from less_exp import commandline

    problem = commandline.compose_error(config_name, overrides)
    assert problem is None or "has no" not in problem, problem
    if problem is None:  # without Hydra's optuna plugin, +hparams_search fails on that, not on a key
            assert commandline.compose_error(config_name, [*overrides, "+seed_value=1"]).startswith("+seed_value=1: the config has no")


LONG_TRAIN = [*TRAIN, "training.num_sequences=8", "training.epochs=20", "policy.recent=8"]


def _env(tmp: Path) -> dict:
    env = {**os.environ, "LESS_OUTPUT_DIR": str(tmp / "outputs"), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    for key in ("HYDRA_FULL_ERROR", "LESS_DEBUG"):
        env.pop(key, None)
    return env


def _epochs_done(ckpt: Path, epochs: int) -> int:
    """Epochs trained into ``ckpt`` so far, over all layers (a finished layer counts all of them)."""
    import torch

    done = epochs * len(list(ckpt.glob("layer_*.safetensors")))
    for path in ckpt.glob("progress/layer_*.pt"):
        try:
            done += torch.load(path, weights_only=True)["epoch"]
        except (OSError, RuntimeError, EOFError, KeyError):
            pass
    return done


def _interrupt(argv: list[str], tmp: Path, ckpt: Path, sig, until) -> subprocess.CompletedProcess:
    """Run ``argv``, send ``sig`` once ``until(epochs done)`` holds, and wait for the process to end."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp), cwd=tmp)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and not until(_epochs_done(ckpt, 20)):
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@pytest.mark.slow  # three trainings, about 40 s: kept out of CI's budget
def test_sigterm_and_sigint_end_in_one_line_and_a_rerun_resumes(tmp_path):
    import signal

    ckpt = tmp_path / "ckpt"
    argv = [str(BIN / LONG_TRAIN[0]), *LONG_TRAIN[1:], f"checkpoint={ckpt}"]
    seen = 0
    for number, (sig, code) in enumerate([(signal.SIGTERM, 143), (signal.SIGINT, 130)]):
        run_dir = tmp_path / f"run{number}"
        done = _interrupt([*argv, f"hydra.run.dir={run_dir}"], tmp_path, ckpt, sig, lambda n: n >= 4 and n > seen)
        assert done.returncode == code, done.stderr[-1500:]
        assert "Traceback" not in done.stderr, done.stderr[-1500:]
        assert done.stderr.strip().splitlines()[-1] == (f"less-train: interrupted ({sig.name}); rerun the same command "
                                                        "to resume")
        record = json.loads((run_dir / "results.json").read_text())
        assert record["status"] == "failed" and record["error"] == f"interrupted ({sig.name})"
        now = _epochs_done(ckpt, 20)
        assert now > seen, "the rerun started over instead of continuing the saved epochs"
        seen = now
    final = subprocess.run([*argv, f"hydra.run.dir={tmp_path / 'run2'}"], capture_output=True, text=True,
                           env=_env(tmp_path), timeout=300, cwd=tmp_path)
    assert final.returncode == 0, final.stderr[-1500:]
    assert json.loads((tmp_path / "run2" / "results.json").read_text())["status"] == "ok"
    assert json.loads((ckpt / "manifest.json").read_text())["complete"]


def test_a_bad_point_of_a_sweep_leaves_a_failed_record_that_the_report_lists(tmp_path):
    sweep = tmp_path / "sweep"
    argv = [str(BIN / "less-eval"), "-m", *EVAL[1:], *H2O[:2], "policy.heavy=8,-1", "task.seq_len=64",
            "task.max_windows=1", f"hydra.sweep.dir={sweep}"]
    done = subprocess.run(argv, capture_output=True, text=True, env=_env(tmp_path), timeout=300, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-1500:]
    assert done.stderr.strip().splitlines()[-1] == "less-eval: error: policy.heavy=-1 must be a number >= 0 (a token count, or a ratio with policy.ratio_of)"
    records = {path.parent.name.split("_")[0]: json.loads(path.read_text()) for path in sweep.glob("*/results.json")}
    assert set(records) == {"0", "1"}
    assert records["0"]["status"] == "ok"
    assert records["1"]["status"] == "failed" and "policy.heavy=-1 must be a number >= 0" in records["1"]["error"]
    report = subprocess.run([str(BIN / "less-report"), str(sweep)], capture_output=True, text=True, env=_env(tmp_path),
                            timeout=300, cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-1500:]
    assert "failed runs: 1" in report.stdout.strip().splitlines()[-1]


@pytest.mark.slow  # four trainings, about 35 s: kept out of CI's budget
def test_a_checkpoint_folder_is_trained_by_one_less_train_per_layer(tmp_path):
    import signal

    ckpt = tmp_path / "ckpt"
    argv = [str(BIN / LONG_TRAIN[0]), *LONG_TRAIN[1:], f"checkpoint={ckpt}"]
    first = subprocess.Popen([*argv, "training.epochs=2000", f"hydra.run.dir={tmp_path / 'first'}"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while first.poll() is None and time.monotonic() < deadline and not _epochs_done(ckpt, 20):
            time.sleep(0.05)
        second = subprocess.run([*argv, "training.from_layer=1", f"hydra.run.dir={tmp_path / 'second'}"],
                                capture_output=True, text=True, env=_env(tmp_path), timeout=120, cwd=tmp_path)
        assert first.poll() is None, "the first training ended before the second started"
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-1500:]
    assert second.stderr.strip().splitlines()[-1] == (
        f"less-train: error: checkpoint={ckpt} is being trained by another less-train (pid {first.pid}, layer 1); "
        "wait for it or use another folder")

    shared = tmp_path / "shared"
    ranges = [["training.from_layer=0", "training.to_layer=1"], ["training.from_layer=1"]]
    procs = [subprocess.Popen([str(BIN / LONG_TRAIN[0]), *LONG_TRAIN[1:], f"checkpoint={shared}", *layers,
                               f"hydra.run.dir={tmp_path / f'range{i}'}"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=_env(tmp_path), cwd=tmp_path)
             for i, layers in enumerate(ranges)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-1500:]
    assert json.loads((shared / "manifest.json").read_text())["layers_done"] == [0, 1]
