"""All-to-all split sizes as Python lists on the CPU.

The all-to-all token dispatcher computes ``input_splits``/``output_splits`` as
tensors and moves them to host memory (numpy) only when they live on a CUDA
device (``moe_utils.maybe_move_tensor_to_cpu`` checks ``tensor.is_cuda``). On
CPU they stay tensors, which ``all_to_all_single`` over gloo rejects; this
patch converts them to lists inside ``tensor_parallel.mappings._AllToAll``.

Checked against megatron-core 0.16.1 and 0.19.2.
"""

from __future__ import annotations

import torch

from . import _common

NAME = "alltoall_splits"
CHECKED = ("0.16.1", "0.19.2")


def _as_list(splits):
    if splits is None or isinstance(splits, list):
        return splits
    if torch.is_tensor(splits):
        return [int(x) for x in splits.reshape(-1).tolist()]
    return [int(x) for x in splits]  # numpy arrays, tuples


def apply() -> None:
    version = _common.require(NAME, CHECKED)
    if not _common.mark(NAME, version):
        return
    from megatron.core.tensor_parallel import mappings

    all_to_all = _common.target(mappings, "_AllToAll", NAME)
    original = all_to_all.forward

    def forward(ctx, group, input, output_split_sizes, input_split_sizes, *rest):  # 0.19: + use_nccl_stream
        return original(ctx, group, input, _as_list(output_split_sizes), _as_list(input_split_sizes), *rest)

    all_to_all.forward = staticmethod(forward)
