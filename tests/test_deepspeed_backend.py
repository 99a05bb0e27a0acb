"""DeepSpeed backend over gloo, 2 and 4 CPU processes.

For each configuration of the matrix below, an engine with Excitation (A) and a
reference engine without it (B), in which every expert has its own parameter
group with learning rate phi * lr, train on the same data. Per optimizer step:

- A's global counts equal the tokens the experts really processed, counted
  independently at the experts' inputs after dispatch and summed over ranks
  (``counts="processed"``), or DeepSpeed's own ``exp_counts`` summed over
  micro-batches and ranks (``counts="routed"``);
- A's multipliers are the paper's ZeroSum of those counts;
- exactly one collective on the ``[L, E]`` count buffer (profiler-measured);
- every parameter of A equals B's (the per-expert learning-rate equivalence),
  including ZeRO partitions that cut an expert parameter mid-tensor;
- the expert that no token reaches (phi = 0) stays bit-exactly unchanged,
  although AdamW's weight decay would move it;
- expert-data-parallel replicas (and dense replicas) are bit-identical;
- the fp32 masters the base optimizer steps equal B's to fp32 rounding, in every wrapper layout;
- a step DeepSpeed skips on overflow changes nothing and its counts are dropped
  (bf16 with check_grad_overflow; fp16 through torch_autocast's GradScaler: DeepSpeed's own fp16
  wrappers need an fp16-capable accelerator).

Matrix (each row one reason):
  world 2: z2-fp32-ep1-top2-ga2  ZeRO-2 flat partitions split experts; accumulation; checkpoint round trip
           z2-fp32-ep1-top2-fusedadam  DeepSpeed's FusedAdam folded over ZeRO-2 partitions that split experts
                                 (its class; its CUDA kernel transcribed in torch: tests/fused_adam_kernel.py)
           z1-bf16-ep1-top1      BF16_Optimizer; config optimizer (torch_adam); routed counts
           z0-fp32-ep2-top3      no ZeRO (params stepped directly); top-k gate; expert parallel
           z2-fp32-ep1-offload   ZeRO-Offload (fp32 partitions on the CPU optimizer path)
           z2-bf16-ep1-overflow  ZeRO-2 bf16 with DeepSpeed's overflow check, one forced overflow (skip_step)
           z0-bf16-ep2-top2      bf16 without ZeRO (FP16_UnfusedOptimizer's fp32 master copies)
           z2-fp32-ep2-top2      ZeRO-2 with EP 2 on 2 ranks (experts not partitioned, dense params are)
           z2-fp32-ep2-top2-ga2-reentrant
                                 MoE layer 0 under reentrant checkpointing (original forward under no_grad):
                                 its tokens are counted in backward, once, and the count all-reduce waits for them
           z0-autocast-fp16-ep1-top2-overflow
                                 torch_autocast fp16 without ZeRO: the GradScaler skips an overflowing step that
                                 DeepSpeed still calls applied; nothing applied, counts dropped, next step fine
  world 4: z2-fp32-ep2-top2-ga2  EP 2 x EDP 2: expert partitions split across EDP ranks
           z1-bf16-ep4-top1      BF16_Optimizer with EP 4
"""

from __future__ import annotations

import pytest

pytest.importorskip("deepspeed")

from tests.batch_support import result, run_batch, selected  # noqa: E402
from tests.deepspeed_support import Case  # noqa: E402

STEPS = 3
ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": "0"}

WORLD2 = [
    Case("z2-fp32-ep1-top2-ga2", zero=2, k=2, gas=2),
    Case("z2-fp32-ep1-top2-fusedadam", zero=2, k=2, optimizer="fused_adam"),
    Case("z1-bf16-ep1-top1", zero=1, dtype="bf16", bf16_optimizer=True, k=1, config_optimizer=True, counts="routed"),
    Case("z0-fp32-ep2-top3", zero=0, ep=2, k=3),
    Case("z2-fp32-ep1-offload", zero=2, k=2, offload=True),
    Case("z2-bf16-ep1-top2-overflow", zero=2, dtype="bf16", k=2, overflow_step=1),
    Case("z0-bf16-ep2-top2", zero=0, dtype="bf16", ep=2, k=2),
    Case("z2-fp32-ep2-top2", zero=2, ep=2, k=2),
    Case("z2-fp32-ep2-top2-ga2-reentrant", zero=2, ep=2, k=2, gas=2, reentrant_layer0=True),
    Case("z0-autocast-fp16-ep1-top2-overflow", zero=0, k=2, overflow_step=1, overflow_scale=float("inf"),
         overflow_reported_applied=True, extra={"torch_autocast": {"enabled": True, "dtype": "torch.float16"}}),
]
WORLD4 = [
    Case("z2-fp32-ep2-top2-ga2", zero=2, ep=2, k=2, gas=2),
    Case("z1-bf16-ep4-top1", zero=1, dtype="bf16", bf16_optimizer=True, ep=4, k=1),
]


def _expected_wrapper(case: Case) -> str:
    if case.bf16_optimizer:
        return "BF16_Optimizer"
    if case.zero:
        return "DeepSpeedZeroOptimizer"
    if case.dtype == "fp32":
        return "FusedAdam" if case.optimizer == "fused_adam" else "AdamW"
    return "FP16_UnfusedOptimizer"


def _tolerance(case: Case) -> dict:
    # fp32: blending vs. a scaled learning rate differ only by fp32 rounding.
    # bf16/fp16: the model params are low precision; an ulp of 1 in bf16 is 2**-8 relative
    # (the fp32 masters behind them are compared tightly in _run_case).
    return {"rtol": 1e-5, "atol": 1e-6} if case.dtype == "fp32" else {"rtol": 1e-2, "atol": 1e-3}


def _all_equal_across(tensor, group) -> bool:
    import torch
    import torch.distributed as dist

    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, tensor.contiguous(), group=group)
    return all(torch.equal(gathered[0], t) for t in gathered)


def _check_replicas(engine, case: Case) -> None:
    import torch.distributed as dist
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.utils import groups

    edp = groups._get_expert_data_parallel_group(f"ep_size_{case.ep}")
    for name, p in engine.module.named_parameters():
        group = edp if is_moe_param(p) else dist.group.WORLD
        assert _all_equal_across(p.detach(), group), f"{case.name}: replicas of {name} differ"


def _splits_an_expert_mid_tensor(engine) -> bool:
    import torch
    import torch.distributed as dist
    from deepspeed.moe.utils import is_moe_param

    split = 0
    for p in engine.module.parameters():
        frag = getattr(p, "_hp_mapping", None)
        if is_moe_param(p) and frag is not None and frag.lp_fragment_address.numel < p.numel():
            split = 1
    flag = torch.tensor([split])
    dist.all_reduce(flag)
    return int(flag) > 0


def _train_step(engine, case: Case, step: int, before_last_backward=None):
    import torch

    from tests.deepspeed_support import FF_PER_LAYER, NUM_EXPERTS, tokens

    routed = torch.zeros(len(FF_PER_LAYER), NUM_EXPERTS, dtype=torch.int64)
    for m in range(case.gas):
        loss = engine(tokens(step, m))
        if step == case.overflow_step:
            loss = loss.float() * case.overflow_scale  # inf gradients: DeepSpeed's overflow check skips this step
        routed += torch.stack(engine.module.routed_counts)
        if m == case.gas - 1 and before_last_backward is not None:
            before_last_backward(routed)
        engine.backward(loss)
        engine.step()
    return routed


def _run_case(case: Case, checkpoint_dir: str | None, update: str = "auto") -> dict:
    import torch
    import torch.distributed as dist

    import excitation_dist.deepspeed as exds
    from excitation_dist.testing import count_collectives
    from tests import deepspeed_support as dc

    a = dc.build_engine(case, per_expert_lr=False)
    excitation = exds.attach(a, {"strategy": "zerosum", "counts": case.counts, "update": update})
    assert excitation.update_path == ("folded" if update == "auto" else "blend"), (case.name, excitation.update_path)
    b = dc.build_engine(case, per_expert_lr=True)
    assert type(a.optimizer).__name__ == _expected_wrapper(case), (case.name, type(a.optimizer))
    count_a, count_b = dc.ExpertInputCounter(a.module, case), dc.ExpertInputCounter(b.module, case)
    edp_size = dist.get_world_size() // case.ep
    if case.zero in (1, 2) and edp_size > 1:
        assert _splits_an_expert_mid_tensor(a), f"{case.name}: no ZeRO partition boundary inside an expert"
    assert excitation.owned_expert_numel() > 0

    nl = dc.NUM_EXPERTS // case.ep
    dead = None
    if dc.ep_rank(case) == dc.DEAD_EXPERT // nl:
        dead = list(a.module.moes[0].deepspeed_moe.experts.deepspeed_experts[dc.DEAD_EXPERT % nl].parameters())

    reference = {}

    def reference_lrs(routed):
        reference["processed"] = count_b.global_counts()
        counts = reference["processed"] if case.counts == "processed" else routed.clone()
        if case.counts == "routed":
            dist.all_reduce(counts)
        dc.set_expert_lrs(b, case, dc.zerosum_gamma1(counts))

    ratios = []
    for step in range(STEPS):
        before = dc.flat_params(a)
        dead_before = [p.detach().clone() for p in dead] if dead else []
        steps_before = excitation.step
        with count_collectives() as log:
            routed = _train_step(a, case, step)
        assert log.count("all_reduce", (len(dc.FF_PER_LAYER), dc.NUM_EXPERTS)) == 1, (case.name, log.calls)
        received_a = count_a.global_counts()  # misses layer 0's tokens when its forward runs under no_grad
        dist.all_reduce(routed)
        _train_step(b, case, step, before_last_backward=reference_lrs)
        processed = reference["processed"]  # B (never checkpointed): the tokens the experts processed
        if not case.reentrant_layer0:
            assert torch.equal(received_a, processed), (case.name, received_a, processed)

        if step == case.overflow_step:
            assert a.was_step_applied() == case.overflow_reported_applied, case.name
            assert excitation.step == steps_before, case.name
            after = dc.flat_params(a)
            assert all(torch.equal(before[n], after[n]) for n in before), f"{case.name}: a skipped step changed params"
            continue
        assert a.was_step_applied()
        expected = processed if case.counts == "processed" else routed
        assert torch.equal(excitation.last_counts_LE, expected), (case.name, step, excitation.last_counts_LE, expected)
        assert int(expected[0, dc.DEAD_EXPERT]) == 0
        phi = dc.zerosum_gamma1(expected)
        torch.testing.assert_close(excitation.last_multipliers_LE, phi, rtol=1e-12, atol=1e-12)
        assert float(phi[0, dc.DEAD_EXPERT]) == 0.0

        params_a, params_b = dc.flat_params(a), dc.flat_params(b)
        for name in params_a:
            torch.testing.assert_close(params_a[name], params_b[name], **_tolerance(case),
                                       msg=lambda m: f"{case.name} step {step} {name}: {m}")
        # the fp32 masters the base optimizer steps, in every wrapper layout: equal to fp32 rounding,
        # 1000x below one step's update (lr 1e-2), so a multiplier off by 0.1% would show
        masters_a, masters_b = dc.fp32_masters(a), dc.fp32_masters(b)
        for name in masters_a:
            torch.testing.assert_close(masters_a[name], masters_b[name], rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{case.name} step {step} fp32 master {name}: {m}")
        moved = max(float((params_a[n] - before[n]).abs().max()) for n in params_a)
        ratios.append(moved)
        for p, old in zip(dead or [], dead_before):
            assert torch.equal(p.detach(), old), f"{case.name}: the phi = 0 expert changed"
        _check_replicas(a, case)

    result = {"case": case.name, "phi_step": excitation.step, "max_update": max(ratios)}
    if checkpoint_dir is not None:
        result["checkpoint"] = _checkpoint_round_trip(a, excitation, case, checkpoint_dir, update)
    exds.detach(a)
    return result


def _checkpoint_round_trip(a, excitation, case: Case, checkpoint_dir: str, update: str) -> str:
    """Save A, load into a differently initialized engine, take one more step on
    both: the restored Excitation state and rebuilt segment map give equal params."""
    import torch

    import excitation_dist.deepspeed as exds
    from tests import deepspeed_support as dc

    a.save_checkpoint(checkpoint_dir, tag="t", client_state={"user": 7})
    c = dc.build_engine(case, per_expert_lr=False, seed=1)
    restored = exds.attach(c, {"strategy": "zerosum", "counts": case.counts, "update": update})
    _, client_state = c.load_checkpoint(checkpoint_dir, tag="t")
    assert client_state["user"] == 7 and exds.CLIENT_STATE_KEY not in client_state
    assert restored.step == excitation.step
    assert all(s.tensor is not t.tensor for s, t in zip(restored.segments, excitation.segments))  # c's own partitions
    assert [(s.start, s.end, s.layer, s.expert) for s in restored.segments] == \
        [(s.start, s.end, s.layer, s.expert) for s in excitation.segments]
    _train_step(a, case, STEPS)
    _train_step(c, case, STEPS)
    assert torch.equal(excitation.last_multipliers_LE, restored.last_multipliers_LE)
    pa, pc = dc.flat_params(a), dc.flat_params(c)
    for name in pa:
        torch.testing.assert_close(pa[name], pc[name], rtol=0, atol=0, msg=lambda m: f"after load {name}: {m}")
    exds.detach(c)
    return "ok"


def _world(cases, checkpoint_dir, update="auto"):
    from tests.deepspeed_support import setup_deepspeed

    setup_deepspeed()
    return [_run_case(case, checkpoint_dir if i == 0 else None, update) for i, case in enumerate(cases)]


# The cases of one world size, both update paths, share one process group (tests/batch_support.py).
@pytest.fixture(scope="module")
def world2(request, tmp_path_factory):
    jobs = [(u, _world, (WORLD2, str(tmp_path_factory.mktemp(f"ckpt_{u}") / "ckpt"), u))
            for u in selected(request, "test_deepspeed_two_ranks", "update")]
    return run_batch(2, jobs, env=ENV, timeout=400 * len(jobs))


@pytest.fixture(scope="module")
def world4(request):
    jobs = [(u, _world, (WORLD4, None, u)) for u in selected(request, "test_deepspeed_four_ranks", "update")]
    return run_batch(4, jobs, env=ENV, timeout=400 * len(jobs))


@pytest.mark.parametrize("update", ["auto", "blend"])  # auto: the folded path (torch AdamW)
def test_deepspeed_two_ranks(world2, update):
    results = result(world2, update)
    for rank_results in results:
        assert [r["case"] for r in rank_results] == [c.name for c in WORLD2]
        assert all(r["max_update"] > 0 for r in rank_results)
    assert results[0][0]["checkpoint"] == "ok"


@pytest.mark.parametrize("update", ["auto", "blend"])
def test_deepspeed_four_ranks(world4, update):
    results = result(world4, update)
    assert all(len(r) == len(WORLD4) for r in results)


def test_version_check_names_the_checked_range():
    from excitation_dist.deepspeed.compat import check_version

    check_version("0.19.8")
    with pytest.raises(RuntimeError, match="0.19"):
        check_version("0.20.0")


def test_zero3_is_refused_with_advice():
    import types

    from excitation_dist.deepspeed.backend import _check_engine

    fake = types.SimpleNamespace(zero_optimization_stage=lambda: 3)
    with pytest.raises(NotImplementedError, match="stage 0, 1 or 2"):
        _check_engine(fake)


def test_zenflow_is_refused_at_attach():
    """ZenFlow's selective optimizer never calls the base optimizer's step: Excitation would do nothing."""
    import types

    import excitation_dist.deepspeed as exds

    with pytest.raises(NotImplementedError, match="ZenFlow.*Remove the zenflow section"):
        exds.attach(types.SimpleNamespace(zenflow=True))


def test_deepspeed_launcher_runs_the_recipe_with_a_json_config(tmp_path):
    """`deepspeed --num_gpus 2 --module excitation_dist.cli train` (the launcher passes
    --local_rank): the tiny config with ZeRO-2 and the JSON's own optimizer section."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.process_support import free_port

    root = Path(__file__).resolve().parents[1]
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "excitation_dist.cli", "train",
           str(root / "configs/tiny_cpu.yaml"), f"deepspeed_config={root / 'configs/deepspeed/tiny_cpu.json'}",
           "parallel.zero_stage=2", "schedule.train_steps=3", "schedule.warmup_steps=1", "schedule.eval_interval=0",
           "logging.interval=1", f"logging.dir={tmp_path / 'log'}", "model.seq_length=32"]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "step      3/3 | loss" in proc.stdout
    records = [json.loads(line) for line in (tmp_path / "log" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert all(r["excitation/multiplier_max"] > 1 for r in records if "loss" in r)


@pytest.mark.parametrize("content, message", [
    ({"scheduler": {"type": "WarmupLR"}}, "has a 'scheduler'"),
    ({"train_micro_batch_size_per_gpu": 4}, "sets train_micro_batch_size_per_gpu=4 but the run config gives 8"),
    ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage=2 but parallel.zero_stage is 1"),
    ("{not json", "is not valid JSON"),
])
def test_deepspeed_json_conflicts_fail_before_launch(tmp_path, content, message):
    import json
    from pathlib import Path

    from excitation_dist.config import ConfigError
    from excitation_dist.recipe.backends.deepspeed import validate
    from excitation_dist.recipe.config import load_run_config

    path = tmp_path / "ds.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    cfg = load_run_config(Path(__file__).resolve().parents[1] / "configs/tiny_cpu.yaml", [f"deepspeed_config={path}"])
    with pytest.raises(ConfigError, match="deepspeed_config") as err:
        validate(cfg)
    assert message in str(err.value)


def test_recipe_refuses_what_the_deepspeed_model_cannot_build():
    from pathlib import Path

    from excitation_dist.config import ConfigError
    from excitation_dist.recipe.backends.deepspeed import validate
    from excitation_dist.recipe.config import load_run_config

    cfg = load_run_config(Path(__file__).resolve().parents[1] / "configs/deepseek-v2-lite/megatron-8gpu.yaml",
                          ["backend=deepspeed", "parallel.tensor_parallel=1", "parallel.pipeline_parallel=1",
                           "parallel.context_parallel=1", "parallel.expert_tensor_parallel=1",
                           # router settings DeepSpeed's gate cannot express are refused at config load already
                           "model.moe.normalize_topk=true", "model.moe.load_balancing=aux"])
    with pytest.raises(ConfigError, match="model.attention: multi-head latent attention"):
        validate(cfg)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_gate_counts_sparse_and_dense_outputs_agree(k):
    """Processed counts read from the gate's sparse routes (what MOELayer uses)
    equal those read from its dense dispatch mask, never exceed capacity, and
    exclude capacity-dropped assignments that the routed counts include."""
    import torch
    from deepspeed.moe.sharded_moe import TopKGate

    from excitation_dist.deepspeed.compat import gate_processed_counts, gate_routed_counts

    torch.manual_seed(k)
    gate = TopKGate(8, 4, k, capacity_factor=0.5, min_capacity=1, use_rts=False, top2_2nd_expert_sampling=False)
    x = torch.randn(40, 8)
    sparse, dense = gate(x, None, True), gate(x)
    processed, routed = gate_processed_counts(sparse, 4), gate_routed_counts(sparse)
    assert torch.equal(processed, gate_processed_counts(dense, 4))
    assert torch.equal(routed, gate_routed_counts(dense)) and int(routed.sum()) == 40 * k
    assert bool((processed <= routed).all()) and int(processed.sum()) < int(routed.sum())
    assert int(processed.max()) <= int(sparse[1])  # capacity


def test_cuda_optimizer_block_keeps_the_decay_of_every_optimizer_name():
    """On CUDA the recipe hands DeepSpeed an optimizer block (FusedAdam). DeepSpeed's ``{"type": "Adam"}``
    defaults to ``adam_w_mode: true`` (decoupled decay, i.e. AdamW), while the CPU path (torch.optim.Adam)
    and the Megatron backend use coupled L2 for ``adam``: the block must say which it is. Built from a
    described CUDA machine, no GPU needed; every name the recipe accepts."""
    import typing
    from pathlib import Path

    from excitation_dist.recipe import fast_paths
    from excitation_dist.recipe.backends.deepspeed import deepspeed_config
    from excitation_dist.recipe.config import OptimizerConfig, load_run_config

    names = typing.get_args(typing.get_type_hints(OptimizerConfig)["name"])
    assert set(names) == {"adam", "adamw", "sgd"}, names  # a new name needs its expected block below
    expected = {"adam": ("Adam", False), "adamw": ("AdamW", True), "sgd": None}
    config = Path(__file__).resolve().parents[1] / "configs/tiny_cpu.yaml"
    for name in names:
        cfg = load_run_config(config, ["device=cuda", f"optimizer.name={name}", "optimizer.weight_decay=0.1"])
        ds = deepspeed_config(cfg, fast_paths.resolve(cfg, fast_paths.Environment(cuda=True)))
        if expected[name] is None:  # no fused DeepSpeed kernel: the recipe passes a torch optimizer
            assert "optimizer" not in ds, (name, ds)
            continue
        kind, decoupled = expected[name]
        assert ds["optimizer"]["type"] == kind, (name, ds["optimizer"])
        assert ds["optimizer"]["params"]["adam_w_mode"] is decoupled, (name, ds["optimizer"])
        assert ds["optimizer"]["params"]["weight_decay"] == 0.1
