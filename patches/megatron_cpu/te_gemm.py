"""megatron-core 0.16.1 without Transformer Engine: ``moe_utils.te_general_gemm``.

0.16.1 imports ``te_general_gemm`` inside a try block whose failure leaves the
name undefined, while the router's fp32/fp64 gating (``RouterGatingLinearFunction``)
tests ``te_general_gemm is not None``: a NameError without TE. Setting it to
None selects the plain torch matmul path. 0.19.2 defines the name itself.

Checked against megatron-core 0.16.1 (not needed on 0.19.2).
"""

from __future__ import annotations

from . import _common

NAME = "te_gemm"
CHECKED = ("0.16.1",)


def needed() -> bool:
    return _common.megatron_version().split("+")[0].startswith("0.16.")


def apply() -> None:
    version = _common.require(NAME, CHECKED)
    if not _common.mark(NAME, version):
        return
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
