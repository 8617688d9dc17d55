# Sourced by the evaluation scripts: split_entry ENTRY sets NAME and CKPT from NAME=PATH (needed when PATH
# holds '=', as sweep folders do) or PATH (named by its folder, or by its job's folder for .../checkpoint).
split_entry() {
  CKPT=${1#*=}
  NAME=${1%%=*}
  if [ "$NAME" = "$1" ]; then
    NAME=$(basename "$CKPT")
    if [ "$NAME" = checkpoint ]; then NAME=$(basename "$(dirname "$CKPT")"); fi
  fi
}
