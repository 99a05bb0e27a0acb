"""FSDP2 / DTensor backend over gloo on a CPU DeviceMesh, 2 and 4 ranks.

Every case trains the GPT-MoE sharded by FSDP2 (``fully_shard``), HSDP, or
expert parallel x FSDP (experts ``Shard(0)`` over ``ep``, and FSDP2 over ``dp``
on top of that as torchtitan does, which FSDP2 writes as ``_StridedShard``; with
tokens exchanged all-to-all in the ``ep_alltoall`` cases, see :mod:`tests.fsdp2_support`)
with ``torch.optim.AdamW``
stepping the DTensors, Excitation attached with :func:`excitation_dist.fsdp2.attach`,
and checks after each optimizer step that

* its parameters equal a single-process run over the same global batch with
  Excitation (the plain PyTorch backend), and a single-process run without
  Excitation whose AdamW runs each expert at ``phi * lr``, phi written out from
  counts measured independently (router top-k);
* the reduced counts are the sum over ranks of the independently measured
  local counts;
* exactly one collective on the ``[L, E]`` counts ran in the step (profiler).

The cases of one world size share one spawned process group (one
``run_distributed`` call).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from excitation_dist.testing import count_collectives, run_distributed
from tests.fsdp2_support import Case, build, chunk, experts_of, full_params, optimizer, phi_of, router_counts, shard

LR, WD = 1e-2, 0.1

CASES_2 = [
    Case("fsdp2-shard0-fused-blend", "fsdp", optim="fused", update="blend"),
    Case("fsdp2-shard1-accum", "fsdp", micro=2, expert_shard_dim=1, strategy="positivesum", check_syncs=True),
    Case("fsdp2-flat-uneven-experts-cut-checkpointing", "fsdp", flat_experts=True, num_experts=3,
         checkpointing=True, micro=2),
    Case("ep2-alltoall-checkpointing-accum", "ep_alltoall", micro=2, checkpointing=True),
]
CASES_4 = [
    Case("fsdp4-flat-uneven-experts-cut-accum", "fsdp", flat_experts=True, num_experts=3, micro=2),
    Case("fsdp4-uneven-empty-fused", "fsdp", num_experts=6, optim="fused"),
    Case("hsdp2x2-checkpointing-accum", "hsdp", micro=2, checkpointing=True, strategy="positivesum"),
    Case("ep2xfsdp2-uneven", "ep_fsdp", micro=2, num_experts=6),
    Case("ep2xfsdp2-shard1-checkpointing", "ep_fsdp", expert_shard_dim=1, checkpointing=True),
    Case("fsdp2-over-ep2-strided-accum", "ep_fsdp_native", num_experts=8, micro=2),
    Case("ep2xfsdp2-alltoall-accum", "ep_alltoall", num_experts=8, micro=2)]


def _train_case(case: Case, singleton: dist.ProcessGroup) -> dict:
    import excitation_dist.fsdp2 as exfsdp
    from excitation_dist.testing.reference import ElementLRAdamW
    from excitation_dist.torch import attach as torch_attach
    from excitation_dist.torch import detach as torch_detach

    rank, world = dist.get_rank(), dist.get_world_size()
    config = {"strategy": case.strategy, "counts": "routed", "update": case.update}
    E, L = case.num_experts, case.model.n_layers

    model = build(case)
    mesh = shard(model, case)
    opt = optimizer(model.parameters(), case)
    ex = exfsdp.attach(model, opt, config, mesh=mesh)
    local_counts = router_counts(model, E)
    owned = [(s.layer, s.expert, s.end - s.start) for s in ex.segments]

    checker = rank == 0  # the single-process references run on rank 0 only (the ranks share 2 CPU cores)
    if checker:
        ref = build(case)  # single process, the global batch, Excitation (plain PyTorch backend)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=WD)
        ref_ex = torch_attach(ref, ref_opt, config, process_group=singleton)
        assert ex.reduce and not ref_ex.reduce
        elr = build(case)  # single process, the global batch, no Excitation: AdamW at phi * lr per expert
        elr_opt = ElementLRAdamW(elr.parameters(), lr=LR, weight_decay=WD)
        elr_counts = router_counts(elr, E)

    for step in range(case.steps):
        local_counts.zero_()
        with count_collectives() as log:
            for m in range(case.micro):
                (model(chunk(step, rank, m)) / case.micro).backward()
            opt.step()
            opt.zero_grad()
        assert log.count("all_reduce", (L, E)) == 1, (case.name, log.summary())
        summed = local_counts.clone()
        dist.all_reduce(summed)
        assert torch.equal(ex.last_counts_LE, summed), case.name
        assert (ex.last_multipliers_LE != 1).any()
        sharded = full_params(model)  # a collective: every rank
        if not checker:
            continue

        for r in range(world):
            for m in range(case.micro):
                (ref(chunk(step, r, m)) / (case.micro * world)).backward()
        ref_opt.step()
        ref_opt.zero_grad()

        elr_counts.zero_()
        for r in range(world):
            for m in range(case.micro):
                (elr(chunk(step, r, m)) / (case.micro * world)).backward()
        phi_LE = phi_of(elr_counts, case.strategy)
        elr_opt.lr_scale = {id(w): phi_LE[layer].view(-1, 1, 1).expand_as(w).contiguous()
                            for layer, moe in enumerate(experts_of(elr)) for w in (moe.w_in_EDF, moe.w_out_EFD)}
        elr_opt.step()
        elr_opt.zero_grad()

        assert torch.equal(summed, elr_counts), case.name
        assert torch.equal(ex.last_multipliers_LE, ref_ex.last_multipliers_LE), case.name
        torch.testing.assert_close(ex.last_multipliers_LE, phi_LE, rtol=1e-12, atol=0)
        for (name, a), b, c in zip(sharded, ref.parameters(), elr.parameters()):
            a = a.reshape(b.shape)  # flat_experts stores [E * D, F] for the reference's [E, D, F]
            torch.testing.assert_close(a, b.detach(), rtol=1e-9, atol=1e-11,
                                       msg=lambda msg: f"{case.name} step {step} {name} vs single process: {msg}")
            torch.testing.assert_close(a, c.detach(), rtol=1e-9, atol=1e-11,
                                       msg=lambda msg: f"{case.name} step {step} {name} vs phi * lr: {msg}")
    if checker:
        torch_detach(ref)
    result = {"path": ex.update_path, "issued": ex.count_collectives_issued, "owned": owned, "checked": checker}
    if case.check_syncs:
        result["added_syncs"] = _added_host_syncs(case)
    return result


def _added_host_syncs(case: Case) -> dict:
    """One step with and one without Excitation, same layout: the host syncs
    Excitation adds (the first step, lazy optimizer state, runs unrecorded)."""
    import excitation_dist.fsdp2 as exfsdp
    from excitation_dist.testing.syncs import count_host_syncs

    rank = dist.get_rank()
    seen = []
    for excited in (False, True):
        model = build(case)
        mesh = shard(model, case)
        opt = optimizer(model.parameters(), case)
        if excited:
            exfsdp.attach(model, opt, {"strategy": case.strategy}, mesh=mesh)
        for step in range(2):
            with count_host_syncs() as syncs:
                for m in range(case.micro):
                    (model(chunk(step, rank, m)) / case.micro).backward()
                opt.step()
                opt.zero_grad()
        seen.append(syncs)
    assert seen[0]["_local_scalar_dense"] > 0  # the recorder sees the model's own syncs
    return dict(seen[1] - seen[0])


def _cases(cases: list[Case], refusals: bool = False, groups: bool = False) -> list:
    world = dist.get_world_size()
    singletons = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    results = [_train_case(case, singletons[dist.get_rank()]) for case in cases]
    return results + [_refusals() if refusals else None, _count_groups() if groups else None]


def _count_groups() -> dict:
    """Which ranks the count all-reduce spans, from mesh dimensions (4 ranks, mesh (dp 2, tp 2))."""
    from torch.distributed.device_mesh import init_device_mesh

    from excitation_dist.fsdp2 import count_group

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp = count_group(mesh, ["dp"])  # tensor-parallel ranks see the same tokens: not reduced over
    return {"all": count_group(mesh), "dp": dist.get_process_group_ranks(dp)}


def _refusals() -> dict:
    """attach's messages for layouts it refuses (2 ranks), and an uneven EP split of whole experts it accepts."""
    import excitation_dist.fsdp2 as exfsdp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    from excitation_dist.models.moe import TopKMoE

    def moe(num_experts, placement=None, mesh=None):
        torch.manual_seed(0)
        m = TopKMoE(4, 4, num_experts, top_k=1)
        if placement is not None:
            w = m.w_in_EDF.detach()
            dt = (DTensor.from_local(w, mesh, [placement]) if isinstance(placement, Partial)
                  else distribute_tensor(w, mesh, [placement]))
            m.w_in_EDF = torch.nn.Parameter(dt)
        return m

    def refusal(model) -> str:
        try:
            exfsdp.attach(model, torch.optim.AdamW(model.parameters(), lr=1e-3), mesh=mesh)
        except ValueError as err:
            return str(err)
        return "accepted"

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("ep",))
    out = {
        "partial": refusal(moe(2, Partial(), mesh)),
        "ep_split": refusal(moe(2, Shard(1), mesh)),
        "ep_uneven_whole": refusal(moe(3, Shard(0), mesh)),
    }
    fsdp1 = FullyShardedDataParallel(moe(2), device_id=torch.device("cpu"))
    out["fsdp1"] = refusal(fsdp1)
    return out


@pytest.fixture(scope="module")
def results_2():
    return run_distributed(_cases, 2, CASES_2, refusals=True, timeout=240)


@pytest.fixture(scope="module")
def results_4():
    return run_distributed(_cases, 4, CASES_4, groups=True, timeout=300)


def _check(results, cases, world):
    assert results[0][len(cases) - 1]["checked"]  # rank 0 compared every case with the references
    for i, case in enumerate(cases):
        per_rank = [results[r][i] for r in range(world)]
        # foreach AdamW folds; fused AdamW folds or blends (core's choice); update: blend forces the blend path
        expected = ({"blend"} if case.update == "blend" else {"folded"} if case.optim == "foreach"
                    else {"folded", "blend"})
        assert len({r["path"] for r in per_rank}) == 1 and per_rank[0]["path"] in expected, case.name
        assert {r["issued"] for r in per_rank} == {case.steps}, case.name
        # the ranks' local pieces add up to every expert of every layer exactly once
        held: dict[tuple[int, int], int] = {}
        for r in per_rank:
            for layer, expert, n in r["owned"]:
                held[(layer, expert)] = held.get((layer, expert), 0) + n
        replicas = 2 if case.layout == "hsdp" else 1
        m = case.model
        per_expert = 2 * m.d_model * m.d_ff * replicas
        assert held == {(l, e): per_expert for l in range(m.n_layers) for e in range(case.num_experts)}, case.name
        if case.check_syncs:
            assert all(r["added_syncs"] == {} for r in per_rank), [r["added_syncs"] for r in per_rank]


def test_fsdp2_two_ranks_equal_single_process_and_per_expert_lr(results_2):
    _check(results_2, CASES_2, 2)


def test_fsdp2_hsdp_and_expert_parallel_four_ranks_equal_single_process_and_per_expert_lr(results_4):
    _check(results_4, CASES_4, 4)


def test_count_all_reduce_spans_the_token_dimensions_of_the_mesh(results_4):
    groups = [r[-1] for r in results_4]
    assert all(g["all"] is None for g in groups)  # every mesh dimension sees different tokens: the world
    assert [g["dp"] for g in groups] == [[0, 2], [1, 3], [0, 2], [1, 3]]  # rank = 2 * dp + tp


def test_refusals_name_the_parameter_and_the_placement(results_2):
    refusals = results_2[0][-2]
    assert "w_in_EDF" in refusals["partial"] and "Partial" in refusals["partial"], refusals["partial"]
    msg = refusals["ep_split"]
    assert "w_in_EDF" in msg and "ep: Shard(1)" in msg and "splits expert(s) [0, 1]" in msg, msg
    assert refusals["ep_uneven_whole"] == "accepted"  # 3 experts on 2 EP ranks: [2, 1] whole experts
    assert "FSDP1" in refusals["fsdp1"] and "fully_shard" in refusals["fsdp1"], refusals["fsdp1"]


def test_placements_map_local_shards_to_global_elements():
    """The placement -> (global runs) math against DTensor's own cutting, on
    layouts the runs above do not reach: FSDP2 after EP on one dimension
    (``_StridedShard``), ``Shard(2)``, an empty uneven shard."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    from excitation_dist.fsdp2.placements import local_expert_ranges, local_runs, shard_indices
    from excitation_dist.segments import stacked_expert_ranges

    def runs(shape, mesh, coord, placements):
        return local_runs(shape, shard_indices(shape, mesh, coord, placements))

    # [E=8, 2] experts Shard(0) over ep (mesh dim 1), FSDP2's dp shard after it: _StridedShard(0, split_factor=2)
    strided = (_StridedShard(0, split_factor=2), Shard(0))
    assert runs((8, 2), (2, 2), (0, 1), strided) == [(0, 8, 4)]  # ep rank 1 holds experts 4-7, its dp rank 0: 4, 5
    assert runs((8, 2), (2, 2), (1, 0), strided) == [(0, 4, 4)]
    # Shard(2) of [E=2, 2, 3] over 2: every expert cut, local runs of 2 (rank 0) and 1 (rank 1) elements
    assert runs((2, 2, 3), (2,), (1,), (Shard(2),)) == [(0, 2, 1), (1, 5, 1), (2, 8, 1), (3, 11, 1)]
    pieces = local_expert_ranges(runs((2, 2, 3), (2,), (0,), (Shard(2),)), stacked_expert_ranges(12, 2))
    assert [tuple(p) for p in pieces] == [(0, 0, 4), (1, 4, 8)]
    # uneven Shard(0): 3 rows over 4 ranks gives the last rank nothing; Replicate keeps everything
    assert runs((3, 5), (4,), (3,), (Shard(0),)) == []
    assert runs((3, 5), (2, 2), (1, 1), (Replicate(), Shard(0))) == [(0, 10, 5)]
    # a flat [E * D, F] expert weight (E=3, D=8) split over 4 ranks: boundaries inside experts
    pieces = local_expert_ranges(runs((24, 2), (4,), (1,), (Shard(0),)), stacked_expert_ranges(48, 3))
    assert [tuple(p) for p in pieces] == [(0, 0, 4), (1, 4, 12)]
