#!/usr/bin/env bash
# The training-mode table on the embedded SmolLM2 (WikiText-2 valid for training, test for perplexity,
# 1024-token windows): progressive and e2e training, each starting from a layer-wise checkpoint of the
# same set-up and evaluating its states in the same job (task=perplexity: <job>/eval/results.json).
# The full, plain, Baseline+ and layer-wise rows come from scripts/sweep_feature_maps.sh (or any
# less-train/less-eval run at the same settings); less-report puts every folder side by side.
#
#   SINK_INIT=outputs/.../checkpoint H2O_INIT=outputs/.../checkpoint scripts/train_modes.sh
#   MODES=progressive POLICIES=sink SINK_INIT=... OUT=outputs/train_modes scripts/train_modes.sh
#
# Each policy's jobs run one at a time (OMP_NUM_THREADS=1), the policies side by side. On 2 CPU cores
# progressive_cpu takes about 40 min (sink) and 75 min (h2o), e2e_cpu about 20 and 35 min.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/train_modes}
MODES=${MODES:-progressive e2e}
FEATURES=${FEATURES:-8}
read -ra POLICY_LIST <<< "${POLICIES:-sink h2o}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

line() {  # one policy's modes, one job at a time
  local policy=$1 init
  init=$([ "$policy" = sink ] && echo "${SINK_INIT:-}" || echo "${H2O_INIT:-}")
  if [ -z "$init" ]; then
    echo "train_modes.sh: set ${policy^^}_INIT to a layer-wise checkpoint for policy=$policy" >&2
    return 2
  fi
  for mode in $MODES; do
    ${LESS_TRAIN:-.venv/bin/less-train} model=smollm2_135m "logger=${LOGGER:-none}" "policy=$policy" \
      feature_map=less_mlp "feature_map.features=$FEATURES" "training=${mode}_cpu" "training.init_from='$init'" \
      task=perplexity task.seq_len=1024 task.max_windows=4 "hydra.run.dir=$OUT/$policy/$mode" \
      "checkpoint=$OUT/$policy/$mode/checkpoint"
  done
}

source scripts/sweep_lines.sh
run_lines train_modes.
