#!/usr/bin/env bash
# Multi-node torchrun with c10d rendezvous. Run the same command on every node:
#   MASTER_ADDR=node0 NNODES=2 launch/torchrun_multinode.sh CONFIG [overrides...]
# MASTER_ADDR: a host every node reaches (the rendezvous endpoint); NNODES: node count;
# NPROC: processes per node (default parallel.gpus_per_node); RUN_ID: same on all nodes;
# LOCAL_ADDR: the address this node advertises (default: torchrun looks up the hostname).
set -euo pipefail
config=${1:?usage: launch/torchrun_multinode.sh CONFIG [overrides...]}; shift
: "${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host}"
: "${NNODES:?set NNODES to the number of nodes}"
here=$(cd "$(dirname "$0")" && pwd)
[ -f "$here/nccl.env" ] && source "$here/nccl.env"
nproc=${NPROC:-$(excitation-dist train "$config" "$@" --print gpus_per_node)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --nnodes "$NNODES" --nproc-per-node "$nproc" --max-restarts "${MAX_RESTARTS:-0}" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id "${RUN_ID:-excitation}" \
  ${LOCAL_ADDR:+--local-addr "$LOCAL_ADDR"} \
  -m excitation_dist.cli train "$config" "$@"
