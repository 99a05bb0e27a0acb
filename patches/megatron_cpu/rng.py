"""megatron-core's CUDA RNG tracker on the CPU generator.

``tensor_parallel.random`` saves and restores "CUDA" RNG states around
model-parallel regions (``get_cuda_rng_tracker().fork()``, activation
checkpointing) with ``torch.cuda.get_rng_state``/``manual_seed`` and its own
``_get_cuda_rng_state``/``_set_cuda_rng_state``. On CPU they are mapped to the CPU generator, so the
tracker swaps the CPU generator's state exactly as it would the CUDA one's.

Since the "CUDA" state now IS the CPU state, 0.19's ``fork()`` sanity check
("CPU RNG state changed within GPU RNG context") would fire on every fork; the
patch filters exactly that log record.

Checked against megatron-core 0.16.1 and 0.19.2.
"""

from __future__ import annotations

import logging

import torch

from . import _common

NAME = "rng"
CHECKED = ("0.16.1", "0.19.2")


def apply() -> None:
    version = _common.require(NAME, CHECKED)
    if not _common.mark(NAME, version):
        return
    from megatron.core.tensor_parallel import random as mrandom

    _common.target(mrandom, "_set_cuda_rng_state", NAME)
    _common.target(mrandom, "_get_cuda_rng_state", NAME)

    def get_cpu_rng_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_cpu_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    logging.getLogger(mrandom.__name__).addFilter(
        lambda record: "CPU RNG state changed within GPU RNG context" not in record.getMessage()
    )
    mrandom._get_cuda_rng_state = get_cpu_rng_state
    mrandom._set_cuda_rng_state = set_cpu_rng_state
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    # torch.manual_seed calls torch.cuda.manual_seed_all: seed the CPU generator directly.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
