"""Excitation's work per optimizer step does not grow with layers x experts.

Counted inside ``optimizer.step()`` with a TorchDispatchMode (benchmarks/step_ops.py
prints the full table): the aten ops dispatched and the kernels a GPU would launch
for them, with and without Excitation, on both layouts a GPU run has (one tensor
per expert: Megatron's DistributedOptimizer over TEGroupedMLP / SequentialMLP; one
flat partition: ZeRO), for torch AdamW single-tensor, foreach and fused, on the
folded and the blend path. Before the multi-tensor update, the per-expert layout
added ~17-19 ops per expert tensor (+26,216 at 24 x 32)."""

import logging
import sys
from pathlib import Path

import pytest

from excitation_dist.testing.syncs import count_host_syncs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import step_ops  # noqa: E402

SMALL, LARGE = (2, 4), (8, 16)
LIMIT = 64  # the target: at most 64 added operations per step, whatever L x E


@pytest.fixture(autouse=True)
def _quiet():
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


@pytest.mark.parametrize("layout", ["per-expert", "flat"])
@pytest.mark.parametrize("base", list(step_ops.BASES))
@pytest.mark.parametrize("update", ["auto", "blend"])
def test_added_operations_are_few_and_do_not_grow_with_layers_times_experts(layout, base, update):
    added = {}
    for size in (SMALL, LARGE):
        ops0, launches0, _ = step_ops.count(layout, *size, base, None)
        ops, launches, path = step_ops.count(layout, *size, base, update)
        assert path == ("folded" if update == "auto" else "blend")
        added[size] = (ops - ops0, launches - launches0)
    # no growth with L x E (on the folded path the excited tensors leave the base optimizer's own
    # per-tensor work, so against a single-tensor or foreach base the excited step is cheaper)
    assert added[LARGE][0] <= added[SMALL][0] and added[LARGE][1] <= added[SMALL][1], added
    assert added[LARGE][0] <= LIMIT and added[LARGE][1] <= LIMIT, added


@pytest.mark.parametrize("base", list(step_ops.BASES))
@pytest.mark.parametrize("update", ["auto", "blend"])
def test_the_excited_step_adds_no_host_sync(base, update):
    syncs = {}
    for variant in (None, update):
        prepare, opt, _ = step_ops._setup("per-expert", 4, 8, base, variant)
        prepare()
        opt.step()
        prepare()
        with count_host_syncs() as counted:
            opt.step()
        syncs[variant] = sum(counted.values())
    assert syncs[update] <= syncs[None], syncs  # torch reads CPU step counters; Excitation reads none per step
