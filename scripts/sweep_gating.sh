#!/usr/bin/env bash
# The Even-LESS gating table on the embedded SmolLM2 (WikiText-2 valid for training, test for perplexity,
# 1024-token windows): every gating x {less_mlp, elu1} at D' = 8 (about 4 token-equivalents), trained with
# one preset, each job evaluating its states in the same job (task=perplexity: <job>/eval/results.json).
# The ungated rows, the plain policy and Baseline+ come from scripts/sweep_feature_maps.sh at the same
# preset; point OUT at the same folder and less-report puts them side by side.
#
#   scripts/sweep_gating.sh                       # sink 4+100 and h2o 50+50 side by side, then the report
#   PRESET=layerwise_cpu MAPS=elu1 GATINGS=scalar_gate POLICIES=sink OUT=outputs/gating_cpu scripts/sweep_gating.sh
#
# One policy's rows run one job at a time (OMP_NUM_THREADS=1); the policies run side by side: on 2 CPU
# cores the 8 rows a policy take about 35 min at the default layerwise_sweep.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/feature_maps}
PRESET=${PRESET:-layerwise_sweep}
MAPS=${MAPS:-less_mlp,elu1}
FEATURES=${FEATURES:-8}
GATINGS=${GATINGS:-decay,scalar_gate,vector_gate}
LEARNED_DECAY=${LEARNED_DECAY:-1}
read -ra POLICY_LIST <<< "${POLICIES:-sink h2o}"
COMMON=(model=smollm2_135m "logger=${LOGGER:-none}" task=perplexity task.seq_len=1024 task.max_windows=4)
TRAIN=(${LESS_TRAIN:-.venv/bin/less-train} -m "${COMMON[@]}" "training=$PRESET" "feature_map=$MAPS"
       "feature_map.features=$FEATURES")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

line() {  # one policy's rows, one job at a time
  local policy=$1
  "${TRAIN[@]}" "policy=$policy" "gating=$GATINGS" "hydra.sweep.dir=$OUT/$policy/gating"
  if [ "$LEARNED_DECAY" = 1 ]; then
    "${TRAIN[@]}" "policy=$policy" gating=decay gating.learned=true "hydra.sweep.dir=$OUT/$policy/gating_learned_decay"
  fi
}

source scripts/sweep_lines.sh
run_lines gating.
