#!/usr/bin/env bash
# The Even-LESS feature-map table on the embedded SmolLM2 (WikiText-2 valid for training, test for
# perplexity, 1024-token windows): every feature map at D' = 8 and 32, with `norm` and `leapformer`
# as extra rows, beside the full cache, the plain policy and Baseline+ at both memories. Each train
# job evaluates its states in the same job (task=perplexity: <job>/eval/results.json).
#
#   scripts/sweep_feature_maps.sh            # sink 4+100 and h2o 50+50 side by side, then the report
#   PRESET=layerwise_cpu MAPS=less_mlp,taylor SIZES=8 EXTRAS=0 POLICIES=sink OUT=outputs/fm_cpu scripts/sweep_feature_maps.sh
#   (BASELINES=0 skips the full, plain and Baseline+ evaluations, e.g. to add rows to an existing OUT)
#
# One policy's rows run one job at a time (OMP_NUM_THREADS=1); the policies run side by side, so on
# 2 CPU cores the whole table (16 rows a policy at the default layerwise_sweep) takes about 70 min.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/feature_maps}
PRESET=${PRESET:-layerwise_sweep}
MAPS=${MAPS:-less_mlp,elu1,relu,performer,taylor,dijiang,hedgehog}
SIZES=${SIZES:-8 32}
EXTRAS=${EXTRAS:-1}
BASELINES=${BASELINES:-1}
read -ra POLICY_LIST <<< "${POLICIES:-sink h2o}"
COMMON=(model=smollm2_135m "logger=${LOGGER:-none}" task=perplexity task.seq_len=1024 task.max_windows=4)
EVAL=(${LESS_EVAL:-.venv/bin/less-eval} -m "${COMMON[@]}")
TRAIN=(${LESS_TRAIN:-.venv/bin/less-train} -m "${COMMON[@]}" "training=$PRESET")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

line() {  # one policy's rows, one job at a time
  local policy=$1 size
  if [ "$BASELINES" = 1 ]; then
    "${EVAL[@]}" "policy=$policy" "hydra.sweep.dir=$OUT/$policy/plain"
    "${EVAL[@]}" "policy=$policy" feature_map=less_mlp "feature_map.features=${SIZES// /,}" policy.baseline_plus=true \
      "hydra.sweep.dir=$OUT/$policy/baseline_plus"
  fi
  for size in $SIZES; do
    "${TRAIN[@]}" "policy=$policy" "feature_map=$MAPS" "feature_map.features=$size" "hydra.sweep.dir=$OUT/$policy/maps_$size"
    if [ "$EXTRAS" = 1 ] && [ "$size" = 8 ]; then  # the extra rows, at the memory of D' = 8
      "${TRAIN[@]}" "policy=$policy" feature_map=less_mlp normalizer=norm "hydra.sweep.dir=$OUT/$policy/norm"
      "${TRAIN[@]}" "policy=$policy" feature_map=less_mlp feature_map.features=4 reweighting=leapformer \
        "hydra.sweep.dir=$OUT/$policy/leapformer"
    fi
  done
}

[ "$BASELINES" = 1 ] && "${EVAL[@]}" policy=full "hydra.sweep.dir=$OUT/full"
source scripts/sweep_lines.sh
run_lines ""
