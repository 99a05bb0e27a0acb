"""megatron-core 0.19.x: expert linear biases at expert-model-parallel size 1 (local spec).

``MLP.forward`` (``transformer/mlp.py``) adds an expert's fc2 bias in place when the
MoE layer passes per-token routing scales (SequentialMLP always does):
``output += output_bias.unsqueeze(0) * per_token_scale.unsqueeze(-1)``. With EP 1 and
expert-TP 1, the local spec's ``RowParallelLinear`` returns its output through
``reduce_from_tensor_model_parallel_region``, whose autograd Function hands back its
input as-is on a one-rank group, and autograd forbids the in-place add on that
view: "Output 0 of _ReduceFromModelParallelRegion is a view and is being modified
inplace" (also without Excitation; TE's linear and EP > 1 return a fresh tensor).
On a one-rank group the reduction is the identity in forward and backward, so this
patch skips the autograd Function there and returns the tensor itself; any larger
group runs megatron's own code. The CPU runs use the local spec, hence a CPU patch.

Checked against megatron-core 0.19.2 (0.16.1 has no in-place add: not needed).
"""

from __future__ import annotations

from . import _common

NAME = "expert_bias_inplace"
CHECKED = ("0.19.2",)


def needed() -> bool:
    return _common.megatron_version().split("+")[0].startswith("0.19.")


def apply() -> None:
    version = _common.require(NAME, CHECKED)
    if not _common.mark(NAME, version):
        return
    from megatron.core.tensor_parallel import layers, mappings

    reduce = _common.target(layers, "reduce_from_tensor_model_parallel_region", NAME)
    group_if_none = _common.target(mappings, "get_tensor_model_parallel_group_if_none", NAME)

    def reduce_from_tensor_model_parallel_region(input_, group=None):
        group = group_if_none(group)
        if group.size() == 1:
            return input_  # what megatron's reduction returns there, minus the autograd view
        return reduce(input_, group)

    reduce_from_tensor_model_parallel_region.__wrapped__ = reduce
    layers.reduce_from_tensor_model_parallel_region = reduce_from_tensor_model_parallel_region
