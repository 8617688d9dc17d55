#!/usr/bin/env bash
# The stop check: after each summary the plain policy ended at one sentence in a generation check, how
# likely is each model to end there too? task=stop_probability for the full cache, plain and each
# trained state on the same summaries; less-report pairs log_p_end with plain (log_p_end_vs_plain).
# A state whose extra repetition comes from stopping less readily shows a negative difference here.
#
#   POLICY=sink CHECKPOINTS="answers=outputs/.../checkpoint" scripts/stop_check.sh
#
# SUMMARIES is the reference run's summaries.jsonl (default: the plain run of scripts/generation_check.sh);
# MAX_PROMPT_TOKENS skips longer prompts (every prompt when unset).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/stop_check}
POLICY=${POLICY:-sink}
SUMMARIES=${SUMMARIES:-outputs/generation_check/plain/summaries.jsonl}
read -ra POLICY_ARGS <<< "${POLICY_ARGS:-}"
read -ra CHECKPOINT_LIST <<< "${CHECKPOINTS:-}"
EVAL=(${LESS_EVAL:-.venv/bin/less-eval} model=smollm2_135m "logger=${LOGGER:-none}" task=stop_probability
      "task.summaries='$SUMMARIES'" "task.max_prompt_tokens=${MAX_PROMPT_TOKENS:-null}")
source scripts/checkpoint_entry.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

[ "${FULL:-1}" = 1 ] && "${EVAL[@]}" policy=full "hydra.run.dir=$OUT/full"
[ "${PLAIN:-1}" = 1 ] && "${EVAL[@]}" "policy=$POLICY" "${POLICY_ARGS[@]}" "hydra.run.dir=$OUT/plain"
for entry in "${CHECKPOINT_LIST[@]}"; do
  split_entry "$entry"
  "${EVAL[@]}" "policy=$POLICY" "${POLICY_ARGS[@]}" "checkpoint='$CKPT'" "hydra.run.dir=$OUT/$NAME"
done
${LESS_REPORT:-.venv/bin/less-report} "$OUT" --out "$OUT/report"
