"""Megatron backend (megatron-core 0.16.1 on Python 3.11) over gloo, 2 and 4 CPU processes.

For each configuration of the matrix below, a GPTModel with MoE layers and
Excitation (A) and a reference (B) built from the same seed, in which every
routed expert's main-parameter tensor has its own parameter group with
learning rate phi * lr, train on the same data through megatron's own
forward-backward schedule and ``optimizer.step()``. Per optimizer step:

- A's global counts (per MoE layer of this pipeline stage) equal the tokens the
  local experts received (``tokens_per_expert`` at the experts' input, after
  dispatch), summed over all ranks;
- A's multipliers are the paper's ZeroSum (gamma = 1) of those counts;
- exactly one collective on this stage's ``[L, E]`` count buffer (profiler-measured);
- every parameter of A equals B's (the per-expert learning-rate equivalence),
  including DistributedOptimizer shards that cut an expert mid-tensor;
- the expert no token reaches (phi = 0) stays bit-exactly unchanged although
  AdamW's weight decay would move it;
- a step megatron reports unsuccessful (found inf) changes nothing and drops its counts.

Matrix (each row one reason; expert-TP is 1 throughout: gloo cannot all-gather unevenly):
  world 2: ep2-a2a-fp32-ga2         EP 2, alltoall, FP32Optimizer, 2 micro-batches, a skipped step
           ep1-distopt-fp32         DistributedOptimizer (fp32 shards are views of the param buffer) over
                                    DP 2: shards split experts; experts in the dense optimizer (EP 1)
           tp2sp-ep2-ag-bf16        TP 2 + sequence parallel, EP 2, allgather, Float16Optimizer
  world 4: tp2sp-ep2-distopt-bf16   TP 2 + SP, EP 2 x expert-DP 2, DistributedOptimizer bf16 (expert
                                    shards split over expert-DP ranks), alltoall
           ep4-ag-fp32-ga2          EP 4 (one expert per rank), allgather, 2 micro-batches
           pp2-vpp2-dp2-ep2-ga2-recompute
                                    PP 2 x virtual PP 2 x DP 2: two model chunks per rank (4 layers), one
                                    count collective per stage over that stage's DP ranks; full activation
                                    recompute (each token counted once, in backward); 2 micro-batches
           pp2-dp2-ep2-dense-first-stage-ga2 (its own test)
                                    PP 2 x DP 2, stage 0 one dense layer, stage 1 two MoE layers (uneven,
                                    DeepSeek-V3 style): stage 0 gets no controller, no collective and is
                                    not scaled; stage 1 as above

(Not in the matrix: TP 2 with EP 1 and expert-TP 1. megatron-core marks expert params
``allreduce = EP > 1``, so there they land in the dense buffer, reduced over DP only, and the
TP ranks' expert copies diverge (measured: 4e-2 apart after 2 steps); attach() refuses it.
TEGroupedMLP and legacy GroupedMLP need Transformer Engine / grouped_gemm (GPU): their expert
ranges and a DistributedOptimizer shard cutting a stacked GroupedMLP weight are unit-tested
in tests/test_megatron_units.py.)
"""

from __future__ import annotations

import pytest

pytest.importorskip("megatron.core")

from tests.batch_support import result, run_batch, runs, selected  # noqa: E402
from tests.megatron_support import DENSE_FIRST, ENV, STEPS, WORLD2, WORLD4, run_cases, run_dense_first_stage  # noqa: E402

# The tests of one world size share one process group (tests/batch_support.py): the ranks import megatron-core once.


@pytest.fixture(scope="module")
def world2(request):
    updates = selected(request, "test_megatron_two_ranks", "update")
    return run_batch(2, [(u, run_cases, (WORLD2, None, u)) for u in updates], env=ENV, timeout=500 * len(updates))


@pytest.fixture(scope="module")
def world4(request):
    jobs = [(u, run_cases, (WORLD4, None, u)) for u in selected(request, "test_megatron_four_ranks", "update")]
    if runs(request, "test_megatron_pipeline_stage_with_dense_layers_only"):
        jobs.append(("dense_first", run_dense_first_stage, (DENSE_FIRST,)))
    return run_batch(4, jobs, env=ENV, timeout=500 * len(jobs))


@pytest.mark.parametrize("update", ["auto", "blend"])  # auto: the folded path (torch AdamW)
def test_megatron_two_ranks(world2, update):
    results = result(world2, update)
    for rank_results in results:
        assert [r["case"] for r in rank_results] == [c.name for c in WORLD2]
        assert all(r["max_update"] > 0 for r in rank_results)


@pytest.mark.parametrize("update", ["auto", "blend"])
def test_megatron_four_ranks(world4, update):
    results = result(world4, update)
    assert all(len(r) == len(WORLD4) for r in results)


def test_megatron_pipeline_stage_with_dense_layers_only(world4):
    """PP 2 x DP 2 x EP 2 (4 ranks), stage 0 one dense layer, stage 1 two MoE layers (moe_layer_freq
    [0, 1, 1], num_layers_in_first_pipeline_stage 1): attach() gives stage 0 no controller and no
    collective, stage 1 counts and scales as usual; see run_dense_first_stage."""
    results = result(world4, "dense_first")
    assert [r["dense_stage"] for r in results] == [True, True, False, False]  # pipeline rank = global rank // 2
    assert [r["phi_step"] for r in results] == [None, None, STEPS, STEPS]
