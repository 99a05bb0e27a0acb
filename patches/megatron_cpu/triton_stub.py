"""megatron-core 0.19.x imports ``triton`` at import time without a GPU.

``transformer/moe/ops/paged_stash.py`` (pulled in by ``import megatron.core``
through ``transformer/moe/paged_stash.py``) does ``import triton`` / ``import triton.language as tl`` and decorates kernels with
``@triton.jit``. Those kernels only run for paged stashing on GPUs. A fake
top-level ``triton`` package would break ``torch._dynamo`` (it probes for
triton), so instead this patch pre-registers a stand-in for that single
megatron module when triton is not installed: importing its names works, calling
one of them raises. ``GLOBAL_BLOCK_SIZE`` keeps its upstream value (1024).

Checked against megatron-core 0.19.2 (0.16.1 has no such import).
"""

from __future__ import annotations

import importlib.util
import sys
import types

from . import _common

NAME = "triton_stub"
CHECKED = ("0.19.2",)
MODULE = "megatron.core.transformer.moe.ops.paged_stash"


def needed() -> bool:
    return (
        _common.megatron_version().split("+")[0].startswith("0.19.")
        and importlib.util.find_spec("triton") is None
    )


class _Unavailable(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args, **kwargs):
            raise RuntimeError(f"{MODULE}.{name} needs triton and a GPU (excitation_dist CPU stand-in)")

        return unavailable


def apply() -> None:
    version = _common.require(NAME, CHECKED)
    if not _common.mark(NAME, version):
        return
    if MODULE in sys.modules:
        raise _common.PatchVersionError(f"CPU patch {NAME!r} must run before {MODULE} is imported")
    stand_in = _Unavailable(MODULE)
    stand_in.GLOBAL_BLOCK_SIZE = 1024
    sys.modules[MODULE] = stand_in
