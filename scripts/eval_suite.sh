#!/usr/bin/env bash
# The evaluation suite on the embedded SmolLM2 at about 10% budget: full cache, sink, h2o and, when
# checkpoints are given, LESS; on WikiText-2 (lm-eval harness and the own perplexity task), XSum
# (100 samples) and passkey; then one less-report over everything. WikiText also gets Baseline+
# (the plain policy with the state's token-equivalents added to its budget). The own perplexity task
# runs with task.windows=rolling, lm-eval's windowing, so its numbers and the harness's are of one kind
# (less-report would still keep a disjoint run apart: task.windows becomes a column and a plot line).
#
#   CKPT_SINK=outputs/ckpt/smollm2_sink_cpu CKPT_H2O=outputs/ckpt/smollm2_h2o_cpu \
#     scripts/eval_suite.sh [wikitext] [xsum] [passkey] [report]      (all four when none is named)
#
# Budgets: WikiText windows are 1024 tokens, so sink 4+100 and h2o 50+50 (the presets, and what the
# checkpoints were trained with) are ~10%. XSum prompts and passkey contexts vary in length, so there
# the budget is a ratio of each prompt (sink 0.5%+9.5%, h2o 5%+5%) and trained states are used at it
# with checkpoint_budget=any. Sections run one job at a time; start two sections side by side on a
# 2-core machine (OMP_NUM_THREADS=1 each). OUT (default outputs/suite) holds one sweep folder a section.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/suite}
EVAL=(${LESS_EVAL:-.venv/bin/less-eval} -m model=smollm2_135m "logger=${LOGGER:-none}")
SECTIONS=("$@")
[ ${#SECTIONS[@]} -eq 0 ] && SECTIONS=(wikitext xsum passkey report)
SINK_RATIO=(policy=sink policy.ratio_of=length policy.sink=0.005 policy.recent=0.095)
H2O_RATIO=(policy=h2o policy.ratio_of=length policy.heavy=0.05 policy.recent=0.05)

# with_states SECTION ARGS...: the section's runs with each given checkpoint's trained state
with_states() {
  local section=$1; shift
  [ -n "${CKPT_SINK:-}" ] && run "$section" "$@" "${SINK_POLICY[@]}" "checkpoint=$CKPT_SINK" "${TRANSFER[@]}"
  [ -n "${CKPT_H2O:-}" ] && run "$section" "$@" "${H2O_POLICY[@]}" "checkpoint=$CKPT_H2O" "${TRANSFER[@]}"
  return 0
}
run() { local section=$1; shift; "${EVAL[@]}" "$@" "hydra.sweep.dir=$OUT/$section"; }

for section in "${SECTIONS[@]}"; do
  case $section in
    wikitext)
      SINK_POLICY=(policy=sink); H2O_POLICY=(policy=h2o); TRANSFER=()
      for task in "task=perplexity task.windows=rolling" task=wikitext_harness; do
        read -ra TASK <<< "$task"
        run wikitext "${TASK[@]}" policy=full,sink,h2o
        run wikitext "${TASK[@]}" policy=sink,h2o feature_map=less_mlp policy.baseline_plus=true
        with_states wikitext "${TASK[@]}"
      done ;;
    xsum|passkey)  # the section is the task
      SINK_POLICY=("${SINK_RATIO[@]}"); H2O_POLICY=("${H2O_RATIO[@]}"); TRANSFER=(checkpoint_budget=any)
      run "$section" "task=$section" policy=full
      run "$section" "task=$section" "${SINK_RATIO[@]}"
      run "$section" "task=$section" "${H2O_RATIO[@]}"
      with_states "$section" "task=$section" ;;
    report)
      ${LESS_REPORT:-.venv/bin/less-report} "$OUT" --out "$OUT/report" ;;
    *) echo "unknown section $section (wikitext, xsum, passkey, report)" >&2; exit 2 ;;
  esac
done
