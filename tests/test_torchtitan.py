"""torchtitan integration (excitation_dist.torchtitan) with torchtitan's own MoE
modules, parallelize function and optimizer container.

The model is a tiny Qwen3-MoE built from torchtitan's config builders (2 MoE
blocks, 4 experts, top-2, torchtitan's ``TokenChoiceTopKRouter``,
``GroupedExperts`` with ``torch._grouped_mm``, load-balancing bias buffers).
One CPU stand-in: FlexAttention has no backward on CPU, so its inner attention
is swapped for torchtitan's ``ScaledDotProductAttention`` (Excitation does not
touch attention). Specifications checked:

* each expert's update equals that of the same AdamW at ``lr * phi`` (a
  reference with one parameter group per expert slice), with phi computed in
  the test from torchtitan's own ``tokens_per_expert_E`` counts;
* tokens are counted once per step under gradient accumulation and under
  torchtitan's full activation checkpointing (whose own buffer counts twice);
* the override line of the docs turns the optimizer config of torchtitan's
  ``--module qwen3 --config qwen3_moe_debug`` job into the excited one (parsed
  by torchtitan's ConfigManager), and Excitation's state goes through
  torch.distributed.checkpoint inside the optimizer state;
* 2 CPU ranks over gloo, parallelized by torchtitan's ``parallelize_qwen3``
  (FSDP2 over ``fsdp``): the same per-expert-learning-rate reference on the
  global batch, one count all-reduce per step. Expert parallel does not run on
  CPU here (see ``_distributed_cases``);
* torchtitan's own trainer end to end (``torchtitan.train`` through
  ``tests/torchtitan_cpu.py``'s CPU stand-ins, offline tokenizer and data in
  ``tests/fixtures/torchtitan``) with the docs' argument: 1 process, a resume
  from its checkpoint, 2 ranks.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torchtitan")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from excitation_dist.testing import count_collectives, run_distributed  # noqa: E402
from tests.process_support import free_port  # noqa: E402

E, TOP_K, N_LAYERS, DIM, VOCAB, SEQ = 4, 2, 2, 32, 64, 8
LR, WD, BETAS, EPS = 1e-2, 0.1, (0.9, 0.95), 1e-8
SEQS_PER_RANK = 2


def tiny_moe_config():
    """A Qwen3-MoE config from torchtitan's builders, small enough for a CPU test."""
    from tests.torchtitan_cpu import tiny_qwen3_moe

    return tiny_qwen3_moe(vocab=VOCAB, dim=DIM, n_layers=N_LAYERS, n_heads=4, n_kv_heads=2, head_dim=8,
                          moe_hidden=16, num_experts=E, top_k=TOP_K, max_seq_len=64, theta=10000.0)


def build_model(seed: int = 0, device: str = "cpu"):
    cfg = tiny_moe_config()
    with torch.device("meta"):
        model = cfg.build()
    model.to_empty(device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        model.init_weights(buffer_device=None)
    model.train()
    return model


def tokens(step: int, micro: int, seqs: int = SEQS_PER_RANK * 2) -> torch.Tensor:
    """The global batch of one micro-batch: ``[seqs, SEQ + 1]`` token ids, skewed
    towards a few ids so that routing is uneven."""
    g = torch.Generator().manual_seed(1000 * step + micro)
    return torch.multinomial(torch.linspace(1.0, 0.05, VOCAB), seqs * (SEQ + 1), replacement=True,
                             generator=g).view(seqs, SEQ + 1)


def lm_loss(model, batch: torch.Tensor, denominator: int) -> torch.Tensor:
    """Summed next-token cross entropy over ``denominator`` global tokens (torchtitan's
    normalization: local sum / global tokens; FSDP2 sums gradients over ranks)."""
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum") / denominator


def adamw_config(excitation: dict | None, implementation: str = "foreach", eps: float = EPS):
    from torchtitan.components.optimizer import OptimizersContainer, ParamGroupConfig

    from excitation_dist.torchtitan import ExcitedOptimizersContainer

    groups = [ParamGroupConfig(pattern=r".*", optimizer_name="AdamW",
                               optimizer_kwargs={"lr": LR, "betas": BETAS, "eps": eps, "weight_decay": WD})]
    if excitation is None:
        return OptimizersContainer.Config(param_groups=groups, implementation=implementation)
    return ExcitedOptimizersContainer.Config(param_groups=groups, implementation=implementation, excitation=excitation)


def moe_modules(model):
    from torchtitan.models.common.moe import MoE

    return [m for m in model.modules() if isinstance(m, MoE)]


def zerosum(counts_LE: torch.Tensor) -> torch.Tensor:
    """The paper's ZeroSum at gamma 1: u_k / mean_j u_j = c_k * E / sum_j c_j."""
    counts = counts_LE.double()
    return counts * counts.shape[-1] / counts.sum(-1, keepdim=True)


class PerExpertAdamW:
    """The reference: torch AdamW with one parameter group per expert slice of
    every stacked ``[E, ...]`` expert weight, at ``lr * phi[layer, expert]``,
    and one group for everything else at ``lr``."""

    def __init__(self, model, eps: float = EPS) -> None:
        self.model = model
        self.slices = []  # (stacked param, layer, expert, leaf)
        expert_ids = set()
        groups = []
        for layer, moe in enumerate(moe_modules(model)):
            for p in moe.routed_experts.inner_experts.parameters():
                expert_ids.add(id(p))
                for e in range(p.shape[0]):
                    leaf = p.detach()[e].clone().requires_grad_(True)
                    self.slices.append((p, layer, e, leaf))
                    groups.append({"params": [leaf], "lr": LR})
        rest = [p for p in model.parameters() if id(p) not in expert_ids]
        self.opt = torch.optim.AdamW([{"params": rest, "lr": LR}] + groups, lr=LR, betas=BETAS, eps=eps,
                                     weight_decay=WD, foreach=True)

    def step(self, phi_LE: torch.Tensor) -> None:
        for (p, layer, e, leaf), group in zip(self.slices, self.opt.param_groups[1:]):
            leaf.grad = p.grad[e].clone()
            group["lr"] = LR * float(phi_LE[layer, e])
        self.opt.step()
        with torch.no_grad():
            for p, _layer, e, leaf in self.slices:
                p[e].copy_(leaf)

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)
        self.opt.zero_grad(set_to_none=True)


def torchtitan_counts(model) -> torch.Tensor:
    """torchtitan's own tokens per expert since the last call ([L, E]); zeroes them
    (its load-balancing hook is not registered in these tests)."""
    counts = torch.stack([m.tokens_per_expert_E.detach().clone() for m in moe_modules(model)]).to(torch.int64)
    for m in moe_modules(model):
        m.tokens_per_expert_E.zero_()
    return counts


def assert_models_close(model, reference, atol: float = 2e-6) -> None:
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=atol, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------- one process
def _train_against_reference(steps: int = 3, micro: int = 2, checkpointing: bool = False,
                             implementation: str = "foreach"):
    model, reference = build_model(), build_model()
    if checkpointing:
        from torchtitan.distributed.activation_checkpoint import FullAC

        FullAC.Config().build(dump_folder="").apply(model)
    container = adamw_config({"strategy": "zerosum"}, implementation).build(model_parts=[model])
    excitation = container.excitation
    ref = PerExpertAdamW(reference)
    denominator = micro * SEQS_PER_RANK * 2 * SEQ
    phis = []
    for step in range(steps):
        container.zero_grad()
        ref.zero_grad()
        for m in range(micro):
            lm_loss(model, tokens(step, m), denominator).backward()
            lm_loss(reference, tokens(step, m), denominator).backward()
        titan_excited = torchtitan_counts(model)
        counts = torchtitan_counts(reference)
        container.step()
        phi = zerosum(counts)
        ref.step(phi)
        phis.append(phi)
        assert torch.equal(excitation.last_counts_LE.cpu(), counts), f"step {step}"
        # torchtitan's own buffer under full activation checkpointing counts every token twice
        assert torch.equal(titan_excited, counts * (2 if checkpointing else 1))
        torch.testing.assert_close(excitation.last_multipliers_LE.cpu(), phi)
        assert_models_close(model, reference)
    assert excitation.step == steps
    assert max(float((p - 1).abs().max()) for p in phis) > 0.2  # routing is uneven: the test is not vacuous
    return excitation


def test_each_expert_update_equals_adamw_at_lr_times_phi():
    _train_against_reference()


def test_full_activation_checkpointing_counts_each_token_once():
    _train_against_reference(steps=2, checkpointing=True)


def test_fused_adamw_as_torchtitan_builds_it_by_default():
    excitation = _train_against_reference(steps=2, micro=1, implementation="fused")
    assert excitation.update_path in ("folded", "blend")


def parse_job(override: str):
    """torchtitan's own command line for its Qwen3-MoE debug job, with ``override``."""
    from torchtitan.config import ConfigManager

    return ConfigManager().parse_args(["--module", "qwen3", "--config", "qwen3_moe_debug",
                                       "--override.imports", override])


def docs_override_argument() -> str:
    """The ``--override.imports`` argument that docs/torchtitan.md gives."""
    import re
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[1] / "docs" / "torchtitan.md").read_text()
    (argument,) = set(re.findall(r"--override\.imports '([^']+)'", docs))
    return argument


def test_override_line_of_the_docs_enables_excitation():
    """The one line a torchtitan user adds, through torchtitan's own CLI parser and override code."""
    from torchtitan.config.override import apply_overrides
    from torchtitan.trainer import Trainer

    from excitation_dist.config import ConfigError
    from excitation_dist.torchtitan import ExcitedOptimizersContainer

    config = parse_job(docs_override_argument())
    assert type(config) is Trainer.Config
    apply_overrides(config.override, config)  # what Trainer.__init__ does before building any component
    assert type(config.optimizer) is ExcitedOptimizersContainer.Config
    assert config.optimizer.excitation == {"strategy": "zerosum", "gamma": 1.0}
    assert config.optimizer.param_groups[0].optimizer_kwargs["lr"] == 3e-4  # the job's optimizer, unchanged

    model = build_model()
    container = config.optimizer.build(model_parts=[model])  # what Trainer.__init__ does next
    assert container.excitation.config.strategy == "zerosum"

    bad = parse_job('excitation_dist.torchtitan.excitation={"stratgy": "zerosum"}')
    with pytest.raises(ConfigError, match="unknown excitation key"):
        apply_overrides(bad.override, bad)


def test_state_goes_through_dcp_inside_the_optimizer_state(tmp_path):
    import torch.distributed.checkpoint as dcp

    def run(steps):
        model = build_model()
        container = adamw_config({"strategy": "zerosum", "utilization_ema": 0.5}).build(model_parts=[model])
        assert container.excitation.step == 0
        for step in range(steps):
            container.zero_grad()
            lm_loss(model, tokens(step, 0), SEQ).backward()
            container.step()
        return model, container

    _, saved = run(2)
    dcp.save({"optimizer": saved}, checkpoint_id=str(tmp_path))

    _, fresh = run(0)
    fresh.state_dict()  # a fresh optimizer's state is made by a zero-lr step: not an Excitation step
    assert fresh.excitation.step == 0
    dcp.load({"optimizer": fresh}, checkpoint_id=str(tmp_path))
    assert fresh.excitation.step == 2
    torch.testing.assert_close(fresh.excitation.utilization_ema_LE, saved.excitation.utilization_ema_LE)
    for key, value in saved.optimizers[0].state_dict()["state"].items():
        torch.testing.assert_close(fresh.optimizers[0].state_dict()["state"][key], value)


def test_load_balancing_hook_keeps_its_own_counts():
    """torchtitan's bias update (its optimizer pre-hook) reads and zeroes its own
    buffer; Excitation's counts are unaffected by it, and it by Excitation."""
    from torchtitan.components.optimizer import register_moe_load_balancing_hook

    class NoMesh:  # ParallelDims of a single process: no mesh to reduce over
        ep_enabled, tp = False, 1

        def get_optional_mesh(self, name):
            return None

    model = build_model()
    container = adamw_config({"strategy": "zerosum"}).build(model_parts=[model])
    register_moe_load_balancing_hook(container, [model], NoMesh())
    lm_loss(model, tokens(0, 0), SEQ).backward()
    expected = torch.stack([m.tokens_per_expert_E.clone() for m in moe_modules(model)]).to(torch.int64)
    container.step()
    assert torch.equal(container.excitation.last_counts_LE.cpu(), expected)
    assert all(float(m.tokens_per_expert_E.abs().sum()) == 0 for m in moe_modules(model))  # zeroed by its hook
    assert any(float(m.expert_bias_E.abs().sum()) > 0 for m in moe_modules(model))  # and its bias moved


# ----------------------------------------------------------- 2 ranks over gloo
def _distributed_cases(steps: int = 2) -> dict:
    import torch.distributed as dist
    import torchtitan.distributed.parallel_dims as parallel_dims_module
    from torch.distributed.fsdp import FSDPModule
    from torchtitan.config import CompileConfig, ParallelismConfig, TrainingConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed.utils import get_spmd_context, set_spmd_backend
    from torchtitan.models.qwen3.parallelize import parallelize_qwen3

    parallel_dims_module.device_type = "cpu"  # torchtitan picks "cuda" on a machine without an accelerator
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    # Expert parallel 2 (FSDP2 over efsdp) is not run: on CPU/gloo torchtitan 0.3's all-to-all dispatch reaches
    # GroupedExperts but torch._grouped_mm fails with "matrix batch sizes have to match" (docs/torchtitan.md).
    for name, ep in (("fsdp", 1),):
        # torchtitan 0.3's default backend, spmd_types, made fully_shard refuse a plain-tensor norm weight of this
        # model built outside the Trainer; partial_dtensor is its other FSDP2 path (set globally, as the Trainer does).
        parallelism = ParallelismConfig(data_parallel_shard_degree=world, expert_parallel_degree=ep,
                                        spmd_backend="partial_dtensor")
        set_spmd_backend(parallelism.spmd_backend)
        parallel_dims = ParallelDims.from_config(parallelism, world)
        parallel_dims.build_mesh()
        train_context = get_spmd_context(parallel_dims=parallel_dims, spmd_typechecking=False)
        with torch.device("meta"):
            model = tiny_moe_config().build()
        model = parallelize_qwen3(model, parallel_dims=parallel_dims,
                                  training=TrainingConfig(mixed_precision_param="float32"), parallelism=parallelism,
                                  compile_config=CompileConfig(), ac_config=None, dump_folder="")
        for module in model.modules():  # gloo has no PREMUL_SUM (torchtitan's divide factor 1.0): plain sums
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)
        model.to_empty(device="cpu")
        torch.manual_seed(0)
        with torch.no_grad():
            model.init_weights(buffer_device=None)
        model.train()
        reference = build_model()  # every rank: the whole global batch in one process
        # same initial weights as the sharded model (init under DTensor draws differently)
        with torch.no_grad():
            for (_, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
                q.copy_(p.full_tensor() if hasattr(p, "full_tensor") else p)
        # bf16 expert matmuls (torchtitan's GroupedExperts) sum a rank's tokens before the cross-rank sum: the
        # gradients differ from the one-process ones by bf16 rounding, which Adam's eps 1e-8 would blow up to a
        # whole step on elements whose gradient is ~0; eps 1e-3 keeps that below 1e-4 (updates are ~1e-2 * phi).
        container = adamw_config({"strategy": "zerosum"}, eps=1e-3).build(model_parts=[model])
        excitation = container.excitation
        ref = PerExpertAdamW(reference, eps=1e-3)
        denominator = SEQS_PER_RANK * world * SEQ
        placements = sorted({str(tuple(p.placements)) for m in moe_modules(model)
                             for p in m.routed_experts.inner_experts.parameters()})
        for step in range(steps):
            container.zero_grad()
            ref.zero_grad()
            batch = tokens(step, 0, SEQS_PER_RANK * world)
            with train_context():  # the trainer's context: the mesh torchtitan's all-to-all dispatcher reads
                lm_loss(model, batch[rank * SEQS_PER_RANK:(rank + 1) * SEQS_PER_RANK], denominator).backward()
            lm_loss(reference, batch, denominator).backward()
            counts = torchtitan_counts(reference)
            with count_collectives() as log:
                container.step()
            ref.step(zerosum(counts))
            assert torch.equal(excitation.last_counts_LE.cpu(), counts), (name, step)
            assert log.count(shape=(N_LAYERS, E)) == 1, log.summary()
            assert_models_close(model, reference, atol=2e-4)
        results[name] = {"collectives": excitation.count_collectives_issued, "placements": placements,
                         "segments": len(excitation.segments)}
    return results


def test_two_ranks_fsdp2_match_per_expert_lr():
    results = run_distributed(_distributed_cases, 2, timeout=240)
    for per_rank in results:
        assert per_rank["fsdp"]["collectives"] == 2
        assert per_rank["fsdp"]["placements"] == ["(Shard(dim=0),)"], per_rank
    # FSDP2 Shard(0) of [4, ...] over 2 ranks: each rank holds (and scales) 2 whole experts of each weight
    assert all(r["fsdp"]["segments"] == N_LAYERS * 3 * (E // 2) for r in results), results


# ----------------------------------------------- torchtitan's trainer, end to end
def _train(tmp_path, nproc: int, steps: int, dump: str) -> str:
    """``torchrun -m tests.torchtitan_cpu --module qwen3 --config qwen3_moe_debug`` (torchtitan's
    ``torchtitan.train`` with the CPU stand-ins of tests/torchtitan_cpu.py: tiny debugmodel_moe flavor,
    SDPA inner attention, device type cpu) plus the docs' override argument; its log."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    fixtures = root / "tests" / "fixtures" / "torchtitan"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets")}
    if nproc == 1:  # torchrun's environment of one process, without torchrun's start-up
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port()))
        launcher = [sys.executable]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    command = [*launcher, "-m", "tests.torchtitan_cpu", "--module", "qwen3", "--config", "qwen3_moe_debug",
               "--hf_assets_path", str(fixtures / "tokenizer"), "--dataloader.dataset_path", str(fixtures / "c4_test"),
               "--training.steps", str(steps), "--training.local_batch_size", "2", "--training.seq_len", "32",
               "--training.disable_cuda_graphs", "--metrics.disable_color_printing",
               # torchtitan's default spmd_types backend: fully_shard refuses a parameter it did not annotate
               "--parallelism.spmd_backend", "partial_dtensor",
               "--checkpoint.enable", "--checkpoint.interval", "2", "--dump_folder", str(tmp_path / dump),
               "--override.imports", docs_override_argument()]
    run = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=240)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-6000:]
    return log


def _losses(log: str) -> dict[int, list[float]]:
    import re

    losses: dict[int, list[float]] = {}
    for step, loss in re.findall(r"step:\s+(\d+)\s+loss:\s+(\S+)", log):
        losses.setdefault(int(step), []).append(float(loss))
    return losses


def _saved_excitation(checkpoint) -> dict:
    """Excitation's state in a torchtitan DCP checkpoint (``optimizer.excitation``)."""
    import io
    import warnings

    import torch.distributed.checkpoint as dcp

    state = {"optimizer": {"excitation": io.BytesIO()}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
        dcp.load(state, checkpoint_id=str(checkpoint))
    saved = state["optimizer"]["excitation"]
    if isinstance(saved, io.BytesIO):
        saved.seek(0)
        saved = torch.load(saved, weights_only=False)
    return saved


def test_torchtitan_trainer_with_the_override_line_trains_resumes_and_runs_on_two_ranks(tmp_path):
    """torchtitan's own trainer, config and command line on CPU: 1 process for 4 steps, a resume from its
    step-4 checkpoint to step 6, and 2 ranks over gloo (FSDP2) for 2 steps, each with the docs' argument."""
    import math

    override = "[Override] excitation_dist.torchtitan.excitation: optimizer OptimizersContainer.Config -> " \
               "ExcitedOptimizersContainer.Config with strategy='zerosum', gamma=1.0"

    log = _train(tmp_path, nproc=1, steps=4, dump="one")
    assert override in log and "Training completed" in log
    losses = _losses(log)
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(x) for v in losses.values() for x in v), losses
    for step in (2, 4):  # Excitation stepped once per training step, its state saved with the optimizer's
        saved = _saved_excitation(tmp_path / "one" / "checkpoint" / f"step-{step}")
        assert saved["step"] == step and saved["shape"] == [2, 8], saved
        assert saved["config"]["strategy"] == "zerosum" and saved["config"]["gamma"] == 1.0

    log = _train(tmp_path, nproc=1, steps=6, dump="one")  # resumes from step-4
    assert "Training starts at step 5" in log and "Training completed" in log
    assert sorted(_losses(log)) == [5, 6]
    assert _saved_excitation(tmp_path / "one" / "checkpoint" / "step-6")["step"] == 6  # restored 4, then 2 more

    log = _train(tmp_path, nproc=2, steps=2, dump="two")
    assert log.count(override) == 2 and log.count("Training completed") == 2
    losses = _losses(log)
    assert sorted(losses) == [1, 2] and all(len(v) == 2 and v[0] == v[1] and math.isfinite(v[0])
                                            for v in losses.values()), losses  # the global loss on both ranks
    assert _saved_excitation(tmp_path / "two" / "checkpoint" / "step-2")["step"] == 2
