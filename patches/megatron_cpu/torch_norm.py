"""torch LayerNorm/RMSNorm with sequence parallelism.

Without Transformer Engine or apex, the local layer spec uses
``WrappedTorchNorm``, which refuses ``sequence_parallel``. The norm itself does
not care how the sequence is split; what sequence parallelism needs is that the
norm's weights are marked ``sequence_parallel`` so that ``finalize_model_grads``
all-reduces their gradients over the tensor-parallel group (what TE and apex
norms do). This patch builds the torch norm with the assertion skipped and sets
that mark.

Checked against megatron-core 0.16.1 and 0.19.2.
"""

from __future__ import annotations

from . import _common

NAME = "torch_norm"
CHECKED = ("0.16.1", "0.19.2")


def apply() -> None:
    version = _common.require(NAME, CHECKED)
    if not _common.mark(NAME, version):
        return
    from megatron.core.transformer import torch_norm

    wrapped = _common.target(torch_norm, "WrappedTorchNorm", NAME)
    original_new = wrapped.__new__

    def new(cls, config, hidden_size, *args, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls, config, hidden_size, *args, **kwargs)
        config.sequence_parallel = False  # only for the assertion; restored at once
        try:
            norm = original_new(cls, config, hidden_size, *args, **kwargs)
        finally:
            config.sequence_parallel = True
        for p in norm.parameters():
            setattr(p, "sequence_parallel", True)
        return norm

    wrapped.__new__ = new
