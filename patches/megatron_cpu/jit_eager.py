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

megatron-core 0.19.2 also decorates one method with a bare ``@torch.compile``
(``InferenceTopKRouter``'s top-k, in ``transformer/moe/router.py``), outside the jit fuser; decorating
imports TorchDynamo (2 CPU-seconds here). While the package ``__init__`` runs, ``torch.compile`` is
therefore the identity (on CPU the project runs every compiled function eagerly, as above), and is
restored right after.

Checked against megatron-core 0.16.1 and 0.19.2 (``megatron/core/jit.py`` is the same file in both).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

import torch

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

    with _compile_is_identity(), before_package_init(("megatron.core.jit",)) as modules:
        _common.target(modules["megatron.core.jit"], "disable_jit_fuser", NAME)()  # megatron.core's __init__ next


@contextlib.contextmanager
def _compile_is_identity() -> Iterator[None]:
    """``torch.compile(fn)``, ``@torch.compile`` and ``@torch.compile(...)`` return the function unchanged."""
    compile_ = torch.compile

    def identity(model=None, **_options):
        return model if model is not None else (lambda fn: fn)

    torch.compile = identity
    try:
        yield
    finally:
        torch.compile = compile_
