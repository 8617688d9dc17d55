#!/usr/bin/env bash
# The generation check: greedy XSum with the real evicting cache, each trained state paired with the
# plain policy on the same articles (less-report: <metric>_vs_plain and its standard error for ROUGE-1,
# ROUGE-L and the repeated 3-gram share), beside Baseline+ and the full cache.
#
#   POLICY=sink CHECKPOINTS="outputs/a/checkpoint gated=outputs/b/checkpoint" N=200 scripts/generation_check.sh
#
# POLICY is the policy the checkpoints were trained with, at its preset budget (POLICY_ARGS adds
# overrides, e.g. "policy.recent=100"); N articles from ../shared/data/xsum (the longest prompt is
# printed by less-report as mean_prompt_tokens and in each summaries.jsonl row as prompt_tokens).
# The long-prompt check: MIN_PROMPT_TOKENS=1025 N=null keeps only the prompts longer than 1024-token
# training windows, 103 of the 1000 articles (up to 4897 tokens; 28 of them among the first 200).
# DATA_PATH: another jsonl of the same fields (task.data_path).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/generation_check}
POLICY=${POLICY:-sink}
N=${N:-200}
read -ra POLICY_ARGS <<< "${POLICY_ARGS:-}"
read -ra CHECKPOINT_LIST <<< "${CHECKPOINTS:-}"
EVAL=(${LESS_EVAL:-.venv/bin/less-eval} model=smollm2_135m "logger=${LOGGER:-none}" task=xsum task.do_sample=false
      "task.num_samples=$N" "task.min_prompt_tokens=${MIN_PROMPT_TOKENS:-null}")
[ -n "${DATA_PATH:-}" ] && EVAL+=("task.data_path=$DATA_PATH")
source scripts/checkpoint_entry.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ "${PLAIN:-1}" = 1 ]; then  # PLAIN=0 keeps an OUT/plain run of the same N and policy (adding states to a check)
  "${EVAL[@]}" "policy=$POLICY" "${POLICY_ARGS[@]}" "hydra.run.dir=$OUT/plain"
fi
for entry in "${CHECKPOINT_LIST[@]}"; do
  split_entry "$entry"
  "${EVAL[@]}" "policy=$POLICY" "${POLICY_ARGS[@]}" "checkpoint='$CKPT'" "hydra.run.dir=$OUT/$NAME"
done
if [ "${BASELINE_PLUS:-1}" = 1 ]; then
  "${EVAL[@]}" "policy=$POLICY" "${POLICY_ARGS[@]}" feature_map=less_mlp policy.baseline_plus=true "hydra.run.dir=$OUT/baseline_plus"
fi
[ "${FULL:-1}" = 1 ] && "${EVAL[@]}" policy=full "hydra.run.dir=$OUT/full"
${LESS_REPORT:-.venv/bin/less-report} "$OUT" --out "$OUT/report"
