"""Shims that let megatron-core train on CPU over gloo (tests, laptops, CI).

Each module patches one CUDA assumption, names the megatron-core versions it
was checked against (``CHECKED``) and raises ``PatchVersionError`` on any
other. Load them through ``excitation_dist.megatron.cpu_patches.apply()``,
which refuses to patch a process that sees a GPU.
"""

from __future__ import annotations

from . import (_common, alltoall_splits, cuda_devices, expert_bias_inplace, jit_eager, rng, te_gemm, torch_norm,
               training_loop, triton_stub)

training_loop_patch = training_loop
PatchVersionError = _common.PatchVersionError
APPLIED = _common.APPLIED

# Order matters: triton_stub before megatron.core is imported (0.19.2 imports triton at import time), then
# jit_eager before the fused modules are.
PATCHES = (triton_stub, jit_eager, cuda_devices, rng, te_gemm, alltoall_splits, torch_norm, expert_bias_inplace)


def apply_all(training_loop: bool = False) -> dict[str, str]:
    """Apply every patch needed by the installed megatron-core (and, with
    ``training_loop``, the ones Megatron-LM's ``pretrain`` needs); returns name -> version."""
    for patch in PATCHES:
        if getattr(patch, "needed", lambda: True)():
            patch.apply()
    if training_loop:
        training_loop_patch.apply()
    return dict(APPLIED)
