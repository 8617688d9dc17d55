#!/usr/bin/env bash
# Install Debian's SLURM and munge (for scripts/local_slurm.sh and the slurm-marked test), quietly.
# Does nothing when they are already there. Needs root (or sudo) and a reachable Debian mirror.
set -euo pipefail

PATH=$PATH:/usr/sbin:/sbin
missing=0
for b in munged slurmctld slurmd sbatch sinfo; do
  command -v "$b" >/dev/null 2>&1 || missing=1
done
if [ "$missing" -eq 0 ]; then
  echo "install_slurm: slurm-wlm and munge already installed"
  exit 0
fi

sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
export DEBIAN_FRONTEND=noninteractive
echo "install_slurm: apt-get install slurm-wlm munge"
${sudo[@]+"${sudo[@]}"} apt-get update -qq
${sudo[@]+"${sudo[@]}"} apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
echo "install_slurm: done ($(slurmctld -V))"
