# Sourced by the sweep scripts: run_lines LOG_SUFFIX runs `line POLICY` for every policy in POLICY_LIST
# side by side (logs in $OUT.<LOG_SUFFIX><policy>.log), then less-report over $OUT; exits 1 if a line failed.
run_lines() {
  local suffix=$1 policy pid status=0 pids=()
  mkdir -p "$OUT"
  for policy in "${POLICY_LIST[@]}"; do
    line "$policy" > "$OUT.$suffix$policy.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  ${LESS_REPORT:-.venv/bin/less-report} "$OUT" --out "$OUT/report"
  exit $status
}
