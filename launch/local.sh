#!/usr/bin/env bash
# One machine: train CONFIG with one process per GPU (or NPROC CPU processes).
#   launch/local.sh configs/tiny_cpu.yaml [key.sub=value ...]
# NPROC defaults to parallel.gpus_per_node of the config; MAX_RESTARTS (default 0) restarts failed ranks
# from the latest checkpoint.
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG [overrides...]}; shift
nproc=${NPROC:-$(excitation-dist train "$config" "$@" --print gpus_per_node)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --standalone --nnodes 1 --nproc-per-node "$nproc" --max-restarts "${MAX_RESTARTS:-0}" -m excitation_dist.cli train "$config" "$@"
