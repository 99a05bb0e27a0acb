#!/usr/bin/env bash
# One machine: train CONFIG with one process per GPU (or NPROC CPU processes).
#   launch/local.sh configs/tiny_cpu.yaml [key.sub=value ...]
# NPROC defaults to parallel.gpus_per_node of the config.
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG [overrides...]}; shift
nproc=${NPROC:-$(excitation-dist train "$config" "$@" --print gpus_per_node)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --standalone --nnodes 1 --nproc-per-node "$nproc" -m excitation_dist.cli train "$config" "$@"
