#!/usr/bin/env bash
# The DeepSpeed launcher over a hostfile (see hostfile.example: "host slots=N" per line).
#   HOSTFILE=launch/hostfile.example launch/deepspeed_hostfile.sh CONFIG [overrides...]
# Extra launcher flags (e.g. --launcher openmpi, --master_addr) go in DS_LAUNCHER_ARGS.
set -euo pipefail
config=${1:?usage: launch/deepspeed_hostfile.sh CONFIG [overrides...]}; shift
here=$(cd "$(dirname "$0")" && pwd)
[ -f "$here/nccl.env" ] && source "$here/nccl.env"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# shellcheck disable=SC2086
exec deepspeed --hostfile "${HOSTFILE:?set HOSTFILE}" ${DS_LAUNCHER_ARGS:-} \
  --module excitation_dist.cli train "$config" "$@"
