#!/usr/bin/env bash
# Perplexity on more than one domain: WikiText-2 test, the C4 sample's held-out documents (270-299)
# and XSum articles as plain text, for the full cache, the plain policy, Baseline+ and each trained
# state at the same budget; less-report lays the runs out per data set. A state that lowers WikiText
# perplexity can still hurt other text: judge states here and with scripts/generation_check.sh.
#
#   POLICY=sink CHECKPOINTS="layerwise=outputs/a/checkpoint progressive=outputs/b/checkpoint" scripts/cross_domain.sh
#
# POLICY is the policy the checkpoints were trained with (POLICY_ARGS adds overrides); FEATURES sizes
# Baseline+ like the states (D' of less_mlp); WINDOWS 1024-token windows per data set.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/cross_domain}
POLICY=${POLICY:-sink}
read -ra POLICY_ARGS <<< "${POLICY_ARGS:-}"
read -ra CHECKPOINT_LIST <<< "${CHECKPOINTS:-}"
read -ra DATA_LIST <<< "${DATA:-wikitext2 c4 xsum_articles}"
source scripts/checkpoint_entry.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

for data in "${DATA_LIST[@]}"; do
  EVAL=(${LESS_EVAL:-.venv/bin/less-eval} model=smollm2_135m "logger=${LOGGER:-none}" task=perplexity task.seq_len=1024
        "task.max_windows=${WINDOWS:-4}" "data=$data")
  [ "${FULL:-1}" = 1 ] && "${EVAL[@]}" policy=full "hydra.run.dir=$OUT/$data/full"
  [ "${PLAIN:-1}" = 1 ] && "${EVAL[@]}" "policy=$POLICY" "${POLICY_ARGS[@]}" "hydra.run.dir=$OUT/$data/plain"
  if [ "${BASELINE_PLUS:-1}" = 1 ]; then
    "${EVAL[@]}" "policy=$POLICY" "${POLICY_ARGS[@]}" feature_map=less_mlp "feature_map.features=${FEATURES:-8}" \
      policy.baseline_plus=true "hydra.run.dir=$OUT/$data/baseline_plus"
  fi
  for entry in "${CHECKPOINT_LIST[@]}"; do
    split_entry "$entry"
    "${EVAL[@]}" "policy=$POLICY" "${POLICY_ARGS[@]}" "checkpoint='$CKPT'" "hydra.run.dir=$OUT/$data/$NAME"
  done
done
${LESS_REPORT:-.venv/bin/less-report} "$OUT" --out "$OUT/report"
