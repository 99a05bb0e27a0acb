"""megatron-core's jit fusions run eagerly on CPU, and torch.compile's stack is not imported.

``megatron.core.jit.jit_fuser`` is ``torch.compile`` (torch >= 2.2), and every fused
bias-GeLU/SwiGLU/dropout-add function is decorated with it when its module is
imported by ``import megatron.core``: that imports ``torch._dynamo`` and inductor
(1.8 CPU-seconds of every megatron process here). On CPU the project runs those
functions eagerly. This patch calls megatron's own ``disable_jit_fuser()`` (the fuser
becomes its ``noop_decorator``) before the fused modules are imported, importing
``megatron.core.jit`` before the package ``__init__``
(:mod:`excitation_dist.megatron.deferred_import`), so the fused functions are the plain
ones. Where megatron-core's fusions were imported before the patch, they are already
wrapped by ``torch.compile``: then ``torch._dynamo.config.disable`` runs them eagerly
(what ``TORCHDYNAMO_DISABLE=1`` does). Either way the same eager functions run.

Checked against megatron-core 0.16.1 and 0.19.2 (``megatron/core/jit.py`` is the same file in both).
"""

from __future__ import annotations

import sys

from . import _common

NAME = "jit_eager"
CHECKED = ("0.16.1", "0.19.2")
_FUSED = "megatron.core.fusions"  # the jit-decorated modules live under it


def apply() -> None:
    version = _common.require(NAME, CHECKED)
    if not _common.mark(NAME, version):
        return
    if any(name == _FUSED or name.startswith(_FUSED + ".") for name in sys.modules):
        from torch import _dynamo

        _dynamo.config.disable = True  # already decorated with torch.compile: run them uncompiled
        return
    from excitation_dist.megatron.deferred_import import before_package_init

    with before_package_init(("megatron.core.jit",)) as modules:  # megatron.core's __init__ runs after the block
        _common.target(modules["megatron.core.jit"], "disable_jit_fuser", NAME)()
