"""Megatron backend pieces that need no process group: counts at the router
(padding excluded), expert ranges of the three expert layouts, main-shard
segments that cut a stacked expert tensor, refusals, version gates."""

from __future__ import annotations

import types

import pytest
import torch

from excitation_dist.megatron import compat
from excitation_dist.segments import ExpertRange


def test_router_counts_exclude_padding():
    # routing_map [tokens=4 (seq 2 x batch 2), E=3]; megatron's padding mask is [seq, batch], True = padding
    routing_map = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    probs = routing_map.float() * 0.5
    padding = torch.tensor([[False, True], [False, False]])
    assert compat.routed_tokens_per_expert(probs, routing_map, None).tolist() == [3, 3, 2]
    assert compat.routed_tokens_per_expert(probs, routing_map, padding).tolist() == [3, 2, 1]
    mask = compat.router_padding_mask((torch.zeros(1), padding), {})
    assert mask is padding and compat.router_padding_mask((torch.zeros(1),), {"padding_mask": padding}) is padding


@pytest.mark.parametrize("drop_policy", ["probs", "position"])
def test_router_counts_are_real_assignments_on_every_capacity_setting(drop_policy):
    """megatron's own top-k and capacity functions on a toy router with one popular
    expert: with pad-to-capacity the routing map shows every expert at capacity,
    yet the counted assignments equal those of plain dropping (the real ones)."""
    from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping, topk_routing_with_score_function

    torch.manual_seed(0)
    tokens, experts, topk = 32, 4, 2
    logits = torch.randn(tokens, experts)
    logits[:, 0] += 3.0  # expert 0 is in almost every token's top 2
    probs, routing_map = topk_routing_with_score_function(logits, topk, score_function="softmax")
    routed = routing_map.sum(0)
    assert int(routed.sum()) == tokens * topk
    count = compat.routed_tokens_per_expert
    assert torch.equal(count(probs, routing_map, None), routed)

    capacity = tokens * topk // experts  # capacity factor 1.0
    assert int(routed[0]) > capacity  # the popular expert overflows
    drop_p, drop_map = apply_router_token_dropping(probs, routing_map, topk, 1.0, drop_policy, pad_to_capacity=False)
    pad_p, pad_map = apply_router_token_dropping(probs, routing_map, topk, 1.0, drop_policy, pad_to_capacity=True)
    kept = drop_map.sum(0)
    assert torch.equal(kept, routed.clamp_max(capacity))
    assert pad_map.sum(0).tolist() == [capacity] * experts  # what a routing-map count would see: phi = 1 everywhere
    assert torch.equal(count(drop_p, drop_map, None), kept)
    assert torch.equal(count(pad_p, pad_map, None), kept)

    # a capacity above the token count drops nothing; padding then fills every expert to all tokens
    big_p, big_map = apply_router_token_dropping(probs, routing_map, topk, 4.0, drop_policy, pad_to_capacity=True)
    assert big_map.all() and torch.equal(count(big_p, big_map, None), routed)


def test_router_output_layout_is_checked():
    with pytest.raises(RuntimeError, match="TopKRouter"):
        compat.router_output((torch.zeros(4, 3),))
    with pytest.raises(RuntimeError, match="TopKRouter"):
        compat.router_output((torch.zeros(4, 3), torch.zeros(4, 2, dtype=torch.bool)))


def _fake_layer(kind: str, experts_module, local_expert_indices):
    experts = type(kind, (), {})()
    experts.__dict__.update(experts_module)
    return types.SimpleNamespace(experts=experts, local_expert_indices=local_expert_indices)


def test_expert_ranges_of_the_three_layouts():
    lin = [torch.nn.Linear(4, 3, bias=False) for _ in range(2)]
    seq = _fake_layer("SequentialMLP", {"local_experts": [torch.nn.Sequential(lin[0]), torch.nn.Sequential(lin[1])]}, [2, 3])
    assert [(p is lin[i].weight, r) for i, (p, r) in enumerate(compat.local_expert_ranges(seq))] == [
        (True, [ExpertRange(2, 0, 12)]), (True, [ExpertRange(3, 0, 12)])]

    fc1, fc2 = torch.nn.Module(), torch.nn.Module()
    for i in range(2):
        fc1.register_parameter(f"weight{i}", torch.nn.Parameter(torch.zeros(6, 4)))
        fc2.register_parameter(f"weight{i}", torch.nn.Parameter(torch.zeros(4, 3)))
    te = _fake_layer("TEGroupedMLP", {"linear_fc1": fc1, "linear_fc2": fc2}, [4, 5])
    got = [(tuple(p.shape), r) for p, r in compat.local_expert_ranges(te)]
    assert got == [((6, 4), [ExpertRange(4, 0, 24)]), ((6, 4), [ExpertRange(5, 0, 24)]),
                   ((4, 3), [ExpertRange(4, 0, 12)]), ((4, 3), [ExpertRange(5, 0, 12)])]

    w1, w2 = torch.nn.Parameter(torch.zeros(4, 2 * 6)), torch.nn.Parameter(torch.zeros(2 * 6, 4))
    grouped = _fake_layer("GroupedMLP", {"weight1": w1, "weight2": w2, "num_local_experts": 2}, [2, 3])
    assert compat.local_expert_ranges(grouped) == [
        (w1, [ExpertRange(2, 0, 24), ExpertRange(3, 24, 48)]), (w2, [ExpertRange(2, 0, 24), ExpertRange(3, 24, 48)])]


def test_expert_ranges_of_a_single_grouped_weight():
    """TEGroupedMLP with moe_single_grouped_weight / _bias (0.19.x, TE >= 2.14): one ``weight``
    ``[num_gemms, out, in]`` (and ``bias`` ``[num_gemms, out]``) per linear layer, expert i the
    leading-dimension slice i. (Checked against megatron-core 0.19.2's own sharded_state_dict
    in tests/test_megatron_0192.py.)"""
    fc1, fc2 = torch.nn.Module(), torch.nn.Module()
    fc1.num_gemms = fc2.num_gemms = 2
    fc1.register_parameter("weight", torch.nn.Parameter(torch.zeros(2, 6, 4)))
    fc1.register_parameter("bias", torch.nn.Parameter(torch.zeros(2, 6)))
    fc2.register_parameter("weight", torch.nn.Parameter(torch.zeros(2, 4, 3)))
    te = _fake_layer("TEGroupedMLP", {"linear_fc1": fc1, "linear_fc2": fc2}, [4, 5])
    got = [(tuple(p.shape), r) for p, r in compat.local_expert_ranges(te)]
    assert got == [((2, 6, 4), [ExpertRange(4, 0, 24), ExpertRange(5, 24, 48)]),
                   ((2, 6), [ExpertRange(4, 0, 6), ExpertRange(5, 6, 12)]),
                   ((2, 4, 3), [ExpertRange(4, 0, 12), ExpertRange(5, 12, 24)])]

    fc2.num_gemms = 3  # a stacked weight that does not hold this layer's local experts
    with pytest.raises(RuntimeError, match="single grouped 'weight'.*2 local experts"):
        compat.local_expert_ranges(te)


def test_distributed_optimizer_shard_cutting_a_stacked_expert_tensor():
    """A DistributedOptimizer rank owning elements [10, 40) of a legacy GroupedMLP
    weight (2 experts of 24 elements) steps expert 2's tail and expert 3's head."""
    from excitation_dist.megatron.master_segments import owned_expert_segments

    w1 = torch.nn.Parameter(torch.zeros(4, 12))
    shard = torch.zeros(30)
    layer = _fake_layer("GroupedMLP", {"weight1": w1, "weight2": torch.nn.Parameter(torch.zeros(12, 4)),
                                       "num_local_experts": 2}, [2, 3])
    leaf = type("DistributedOptimizer", (), {})()
    leaf.__dict__.update(
        optimizer=torch.optim.SGD([shard], lr=0.1), is_stub_optimizer=False,
        model_float16_groups=[[]], shard_fp32_from_float16_groups=[[]],
        model_fp32_groups=[[w1]], shard_fp32_groups=[[shard]],
        _get_model_param_range_map=lambda p: {"param": types.SimpleNamespace(start=10, end=40)},
    )
    chained = types.SimpleNamespace(chained_optimizers=[leaf])
    segments = owned_expert_segments([layer], chained)
    assert [(s.tensor is shard, s.start, s.end, s.layer, s.expert) for s in segments] == [
        (True, 0, 14, 0, 2), (True, 14, 30, 0, 3)]


@pytest.mark.parametrize("setting", ["use_precision_aware_optimizer", "optimizer_cpu_offload"])
def test_unsupported_optimizer_settings_are_refused_by_name(setting):
    optimizer = types.SimpleNamespace(config=types.SimpleNamespace(**{setting: True}), chained_optimizers=[])
    with pytest.raises(NotImplementedError, match=setting):
        compat.check_supported([torch.nn.Linear(1, 1)], optimizer)


def test_optimizer_cuda_graph_is_refused_naming_the_flag_and_the_fix():
    """Megatron-LM's --optimizer-cuda-graph (0.19.x) replays a captured optimizer.step(): Excitation's
    step wrapper and torch optimizer hooks would not run on replays."""
    optimizer = types.SimpleNamespace(config=types.SimpleNamespace(optimizer_cuda_graph=True), chained_optimizers=[])
    with pytest.raises(NotImplementedError, match=r"\(--optimizer-cuda-graph.*replays.*drop --optimizer-cuda-graph"):
        compat.check_supported([torch.nn.Linear(1, 1)], optimizer)
    optimizer.config.optimizer_cuda_graph = False
    compat.check_supported([torch.nn.Linear(1, 1)], optimizer)


def test_megatron_fsdp_is_refused_by_name():
    chunk = torch.nn.Linear(1, 1)
    chunk.ddp_config = types.SimpleNamespace(use_megatron_fsdp=True)
    with pytest.raises(NotImplementedError, match="use_megatron_fsdp"):
        compat.check_supported([chunk], types.SimpleNamespace(config=None, chained_optimizers=[]))


def test_tensor_parallel_experts_without_expert_parallelism_are_refused():
    chunk = torch.nn.Linear(1, 1)
    chunk.config = types.SimpleNamespace(tensor_model_parallel_size=2, expert_model_parallel_size=1,
                                         expert_tensor_parallel_size=1)
    with pytest.raises(NotImplementedError, match="expert_tensor_parallel_size=1"):
        compat.check_supported([chunk], types.SimpleNamespace(config=None, chained_optimizers=[]))


@pytest.mark.parametrize("setting", [{"enable_cuda_graph": True}, {"external_cuda_graph": True},
                                     {"cuda_graph_impl": "local"}, {"cuda_graph_impl": "transformer_engine"}])
def test_cuda_graphs_are_refused_at_attach(setting):
    """A captured graph replays the router without its forward hooks: counting would stop silently."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    chunk = torch.nn.Linear(1, 1)
    chunk.config = TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2, num_moe_experts=4,
                                     moe_router_topk=2, **setting)
    with pytest.raises(NotImplementedError, match="CUDA graphs.*turn CUDA graphs off"):
        compat.check_supported([chunk], types.SimpleNamespace(config=None, chained_optimizers=[]))
    chunk.config = TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2, num_moe_experts=4,
                                     moe_router_topk=2)
    compat.check_supported([chunk], types.SimpleNamespace(config=None, chained_optimizers=[]))


def test_attach_on_a_stage_without_moe_layers():
    """A pipeline stage of dense layers only, in a model with experts, gets no controller
    (nothing to count or scale); a model without experts is refused."""
    import excitation_dist.megatron as exmeg

    chunk, optimizer = torch.nn.Linear(1, 1), types.SimpleNamespace(config=None, chained_optimizers=[])
    chunk.config = types.SimpleNamespace(num_moe_experts=4)
    assert exmeg.attach([chunk], optimizer, {"strategy": "zerosum"}) is None
    assert exmeg.attached(optimizer) is None and optimizer.__dict__.keys() == {"config", "chained_optimizers"}
    chunk.config = types.SimpleNamespace(num_moe_experts=None)
    with pytest.raises(ValueError, match="num_moe_experts is not set"):
        exmeg.attach([chunk], optimizer, {"strategy": "zerosum"})


def test_unknown_optimizer_wrapper_is_refused():
    leaf = type("LayerWiseDistributedOptimizer", (), {})()
    with pytest.raises(NotImplementedError, match="LayerWiseDistributedOptimizer"):
        compat.check_supported([torch.nn.Linear(1, 1)], types.SimpleNamespace(config=None, chained_optimizers=[leaf]))


def test_version_check_names_the_checked_range():
    compat.check_version("0.16.1")
    compat.check_version("0.19.2")
    for version in ("0.15.0", "0.20.0"):
        with pytest.raises(RuntimeError, match="0.16.1"):
            compat.check_version(version)


def test_step_result_is_read_as_update_successful():
    assert compat.step_succeeded((True, 1.0, 0)) and not compat.step_succeeded((False, None, None))


def test_cpu_patches_refuse_a_gpu_process(monkeypatch):
    from excitation_dist.megatron import cpu_patches

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="sees a GPU"):
        cpu_patches.apply()


def test_cpu_patches_fail_loudly_on_an_unchecked_version(monkeypatch):
    from excitation_dist.megatron import cpu_patches

    patches = cpu_patches._load()
    common = patches._common
    monkeypatch.setattr(common, "megatron_version", lambda: "0.18.0")
    for module in patches.PATCHES:
        with pytest.raises(patches.PatchVersionError, match=r"0\.18\.0"):
            common.require(module.NAME, module.CHECKED)


def test_checked_versions_read_from_source_equal_the_imported_patches():
    """The launcher reads the CPU patches' versions from their source (importing them imports torch): the
    same answer as the imported modules, and in a process that then has not imported torch."""
    import subprocess
    import sys

    from excitation_dist.megatron import cpu_patches

    patches = cpu_patches._load().PATCHES
    always = [set(p.CHECKED) for p in patches if not hasattr(p, "needed")]
    assert cpu_patches.checked_versions() == sorted(set.intersection(*always)) != []
    probe = ("import sys; from excitation_dist.megatron import cpu_patches; "
             "print(cpu_patches.checked_versions(), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"{cpu_patches.checked_versions()} False"


def test_the_cpu_device_mode_raises_no_warning_of_its_own():
    """Reading ``.grad`` through patches/megatron_cpu's device mode (megatron reads main_grad views)
    warned from the mode's own frame: the one warning a CPU run printed from this project."""
    import warnings

    import torch

    from patches.megatron_cpu.cuda_devices import CpuDeviceMode

    leaf = torch.ones(2, requires_grad=True)
    view = leaf * 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with CpuDeviceMode():
            assert view.grad is None and leaf.grad is None
            assert torch.zeros(1, device="cuda").device.type == "cpu"  # the mode still rewrites devices
    assert not caught, [str(w.message) for w in caught]


def test_known_megatron_cpu_warnings_are_summarized_in_one_line(capsys, monkeypatch):
    import warnings

    from excitation_dist.megatron import cpu_patches
    from excitation_dist.megatron.cpu_patches import quiet_known_cpu_warnings

    monkeypatch.setattr(cpu_patches, "_QUIETED", [])  # as in a fresh process
    monkeypatch.delenv("EXCITATION_MEGATRON_WARNINGS", raising=False)
    monkeypatch.setenv("RANK", "0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert quiet_known_cpu_warnings()
        warnings.warn("Apex is not installed. Falling back to Torch Norm")
        warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.")
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("something else")  # not a known CPU warning: still shown
    assert [str(w.message) for w in caught] == ["something else"]
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "EXCITATION_MEGATRON_WARNINGS=all shows them" in out[0]
