"""Shared pieces of the megatron-core tests (run inside ``run_distributed`` workers).

A tiny GPTModel with MoE layers (local spec, SequentialMLP experts) wrapped in
megatron's DDP and optimizer, built twice from the same seed: the model under
test (Excitation attached) and a reference whose every local expert tensor that
the base optimizer steps sits in its own parameter group with learning rate
``phi * lr``. Counts are checked against an independent count: the tokens each
local expert receives (``tokens_per_expert`` at the experts' input, after
dispatch), summed over all ranks.

:func:`run_cases` is the worker entry of the backend tests: per case and step it
checks counts, multipliers, parameters against the reference, the phi = 0
expert, and the number of count collectives (see tests/test_megatron_backend.py).

Layer 0's pre-MLP norm feeds the router a constant coordinate (norm weight 0,
bias 30 in coordinate 0) that the router maps to -30 for the last expert and
+30 for the others, so no token ever reaches that expert: ZeroSum gives it
phi = 0 and its parameters must stay bit-exactly unchanged.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

VOCAB, SEQ, MICRO = 64, 8, 2
HIDDEN, HEADS, FFN, MOE_FFN = 16, 2, 24, 12
NUM_LAYERS, NUM_EXPERTS = 2, 4
LR, WEIGHT_DECAY = 1e-2, 0.1
DEAD_EXPERT = NUM_EXPERTS - 1  # in (global) layer 0
STEPS = 3
ENV = {"OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1", "EXCITATION_MEGATRON_CPU": "1"}


@dataclass(frozen=True)
class Case:
    name: str
    tp: int = 1
    ep: int = 1
    pp: int = 1
    dispatcher: str = "alltoall"
    dist_opt: bool = False
    dtype: str = "fp32"  # fp32 or bf16
    gas: int = 1  # micro-batches per optimizer step
    topk: int = 2
    recompute: bool = False
    skipped_step: int = -1  # megatron reports this step unsuccessful (found inf)
    vpp: int = 1  # virtual pipeline stages (model chunks) per rank
    capacity: float | None = None  # moe_expert_capacity_factor: routes beyond capacity are dropped
    pad: bool = False  # moe_pad_expert_input_to_capacity (the reference B runs the same model unpadded)
    drop_policy: str = "probs"  # moe_token_drop_policy
    dense_first: bool = False  # one more layer, dense, alone on pipeline stage 0 (DeepSeek-V3 style, uneven split)

    @property
    def sequence_parallel(self) -> bool:
        return self.tp > 1

    @property
    def num_layers(self) -> int:
        return NUM_LAYERS * self.vpp + self.dense_first


# The backend matrix (see tests/test_megatron_backend.py), run on megatron-core 0.16.1 and 0.19.2.
WORLD2 = [  # 2 ranks
    Case("ep2-a2a-fp32-ga2", ep=2, gas=2, skipped_step=1),
    Case("ep1-distopt-fp32", ep=1, dist_opt=True),
    Case("tp2sp-ep2-ag-bf16", tp=2, ep=2, dispatcher="allgather", dtype="bf16"),
    Case("ep2-a2a-cap1-pad-fp32-ga2", ep=2, gas=2, capacity=1.0, pad=True),
    Case("ep1-ag-cap1-drop-position-distopt", ep=1, dispatcher="allgather", dist_opt=True, capacity=1.0,
         drop_policy="position"),
]
WORLD4 = [  # 4 ranks
    Case("tp2sp-ep2-distopt-bf16", tp=2, ep=2, dist_opt=True, dtype="bf16"),
    Case("ep4-ag-fp32-ga2", ep=4, dispatcher="allgather", gas=2),
    Case("pp2-vpp2-dp2-ep2-ga2-recompute", pp=2, vpp=2, ep=2, gas=2, recompute=True),
]


def setup(case: Case) -> None:
    from excitation_dist.megatron import cpu_patches

    cpu_patches.apply_if_requested()
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    # megatron's aux-loss tracker is per process and sized by the first model's layer count: start afresh
    try:  # 0.19: a tracker object
        from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

        destroy_moe_metrics_tracker()
    except ImportError:  # 0.16: a module-level dict
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        get_moe_layer_wise_logging_tracker().clear()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=case.tp,
        pipeline_model_parallel_size=case.pp,
        expert_model_parallel_size=case.ep,
        expert_tensor_parallel_size=1,
        virtual_pipeline_model_parallel_size=case.vpp if case.vpp > 1 else None,
    )


def transformer_config(case: Case):
    from megatron.core.transformer.transformer_config import TransformerConfig

    bf16 = case.dtype == "bf16"
    extra = {}
    if case.recompute:
        extra.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if case.vpp > 1:
        extra.update(virtual_pipeline_model_parallel_size=case.vpp)
    if case.dense_first:  # layer 1 dense, then MoE layers; stage 0 holds layer 1 only
        extra.update(moe_layer_freq=[0] + [1] * (case.num_layers - 1), num_layers_in_first_pipeline_stage=1)
    return TransformerConfig(
        num_layers=case.num_layers, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=FFN,
        num_moe_experts=NUM_EXPERTS, moe_ffn_hidden_size=MOE_FFN, moe_router_topk=case.topk,
        moe_token_dispatcher_type=case.dispatcher, moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=1e-2, tensor_model_parallel_size=case.tp, sequence_parallel=case.sequence_parallel,
        expert_model_parallel_size=case.ep, expert_tensor_parallel_size=1, pipeline_model_parallel_size=case.pp,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32, bf16=bf16,
        params_dtype=torch.float32, use_cpu_initialization=True,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, gradient_accumulation_fusion=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        moe_router_dtype="fp32", moe_expert_capacity_factor=case.capacity,
        moe_pad_expert_input_to_capacity=case.pad, moe_token_drop_policy=case.drop_policy, **extra,
    )


def _make_dead_expert(model) -> None:
    from megatron.core.transformer.moe.moe_layer import BaseMoELayer

    for module in model.modules():
        if isinstance(module, BaseMoELayer) and module.layer_number == 1:
            layer = next(m for m in model.modules() if getattr(m, "mlp", None) is module)
            norm = layer.pre_mlp_layernorm
            with torch.no_grad():
                norm.weight[0] = 0.0
                norm.bias[0] = 30.0
                w = module.router.weight
                w[:, 0] = 1.0
                w[DEAD_EXPERT, 0] = -1.0


def build(case: Case, *, per_expert_lr: bool, seed: int = 1234):
    """(model chunks wrapped in DDP, megatron optimizer) of this rank's pipeline
    stage: one chunk, or ``case.vpp`` chunks (virtual pipeline stages)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    config = transformer_config(case)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=case.dist_opt, overlap_grad_reduce=case.dist_opt,
        bucket_size=100 if case.dist_opt else None,  # small buckets: every bucket, and expert, is split over DP ranks
    )
    chunks = []
    for vp in range(case.vpp):
        stage = {"ignore_virtual": False, "vp_stage": vp} if case.vpp > 1 else {}
        spec = get_gpt_layer_local_spec(num_experts=NUM_EXPERTS, moe_grouped_gemm=False)
        if case.dense_first:  # dense and MoE layers: the block spec built from config.moe_layer_freq
            from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

            spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, vp_stage=vp if case.vpp > 1 else None)
        model = GPTModel(
            config, spec, vocab_size=VOCAB,
            max_sequence_length=SEQ, pre_process=ps.is_pipeline_first_stage(**stage),
            post_process=ps.is_pipeline_last_stage(**stage), position_embedding_type="learned_absolute",
            vp_stage=vp if case.vpp > 1 else None,
        )
        _make_dead_expert(model)
        if case.dtype == "bf16":
            from megatron.core.transformer.module import Float16Module

            model = Float16Module(config, model)  # casts params and inputs, as Megatron-LM's get_model does
        chunks.append(DistributedDataParallel(config, ddp_config, model, disable_bucketing=vp > 0))
    config.finalize_model_grads_func = finalize_model_grads
    opt_config = OptimizerConfig(
        optimizer="adam", lr=LR, weight_decay=WEIGHT_DECAY, bf16=case.dtype == "bf16",
        use_distributed_optimizer=case.dist_opt, clip_grad=0.0, adam_beta1=0.9, adam_beta2=0.99,
    )
    optimizer = get_megatron_optimizer(opt_config, chunks)
    if per_expert_lr:
        split_expert_param_groups(chunks, optimizer)
    return chunks, optimizer


# ----------------------------------------------------------------- reference
def expert_params(chunks):
    """(global layer index, global expert, parameter) of this rank's routed experts."""
    from megatron.core.transformer.moe.moe_layer import BaseMoELayer

    for module in (m for chunk in chunks for m in chunk.modules()):
        if isinstance(module, BaseMoELayer):
            for j, expert in enumerate(module.experts.local_experts):
                for p in expert.parameters():
                    yield module.layer_number - 1, module.local_expert_indices[j], p


def _leaf_optimizers(optimizer):
    return [o for o in getattr(optimizer, "chained_optimizers", [optimizer]) if o.optimizer is not None]


def _belongs_to(tensor: torch.Tensor, param: torch.Tensor) -> bool:
    """True if ``tensor`` is the optimizer's copy of (a piece of) ``param``:
    its fp32 main copy, or a view into its storage (fp32 DistributedOptimizer shard)."""
    if getattr(param, "main_param", None) is tensor or tensor is param:
        return True
    if tensor.dtype != param.dtype or tensor.untyped_storage().data_ptr() != param.untyped_storage().data_ptr():
        return False
    lo = param.storage_offset()
    return lo <= tensor.storage_offset() < lo + param.numel()


def split_expert_param_groups(chunks, optimizer) -> None:
    """Give every stepped tensor of a routed expert its own param group
    (``group["slot"] = (global layer, global expert)``)."""
    experts = list(expert_params(chunks))
    for leaf in _leaf_optimizers(optimizer):
        groups = []
        for group in leaf.optimizer.param_groups:
            rest = []
            for t in group["params"]:
                owner = [(layer, e) for layer, e, p in experts if _belongs_to(t, p)]
                if owner:
                    groups.append({**group, "params": [t], "slot": owner[0]})
                else:
                    rest.append(t)
            groups.insert(0, {**group, "params": rest})
        leaf.optimizer.param_groups = [g for g in groups if g["params"]]


def set_expert_lrs(optimizer, phi_LE: torch.Tensor) -> None:
    """``phi_LE`` is indexed by global layer."""
    for leaf in _leaf_optimizers(optimizer):
        for group in leaf.optimizer.param_groups:
            if "slot" in group:
                layer, e = group["slot"]
                group["lr"] = LR * float(phi_LE[layer, e])


def zerosum_gamma1(counts_LE: torch.Tensor) -> torch.Tensor:
    """The paper's ZeroSum with gamma = 1: phi_k = c_k / mean_j c_j (phi = 1 for an empty layer)."""
    c = counts_LE.to(torch.float64)
    mean = c.mean(-1, keepdim=True)
    return torch.where(mean > 0, c / mean.clamp_min(1e-30), torch.ones_like(c))


class ExpertInputCounter:
    """Tokens each local expert receives (``tokens_per_expert`` passed to the
    experts module), indexed by (global layer, global expert)."""

    def __init__(self, chunks, num_layers: int) -> None:
        from megatron.core.transformer.moe.moe_layer import BaseMoELayer

        self.counts_LE = torch.zeros(num_layers, NUM_EXPERTS, dtype=torch.int64)
        for module in (m for chunk in chunks for m in chunk.modules()):
            if isinstance(module, BaseMoELayer):
                module.experts.register_forward_pre_hook(self._hook(module))

    def _hook(self, moe):
        def hook(experts, args):
            if experts.training and torch.is_grad_enabled():
                tokens = torch.as_tensor(args[1]).to(torch.int64).reshape(-1)
                for j, e in enumerate(moe.local_expert_indices):
                    self.counts_LE[moe.layer_number - 1, e] += int(tokens[j])
        return hook

    def global_counts(self) -> torch.Tensor:
        out = self.counts_LE.clone()
        dist.all_reduce(out)
        self.counts_LE.zero_()
        return out


# ---------------------------------------------------------------- training
def batch(case: Case, step: int, micro: int) -> dict:
    from megatron.core import parallel_state as ps

    rank = ps.get_data_parallel_rank()
    g = torch.Generator().manual_seed(10_000 * step + 100 * rank + micro)
    tokens = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=g)
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:]}


def train_step(chunks, optimizer, case: Case, step: int, before_step=None):
    """One optimizer step of ``case.gas`` micro-batches through megatron's schedule.
    Returns ``optimizer.step()``'s result."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batches = [batch(case, step, m) for m in range(case.gas)]
    data = [iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches)  # one iterator per chunk
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(MICRO, SEQ)

    def forward_step(data_iterator, chunk):
        b = next(data_iterator)
        out = chunk(b["tokens"], position_ids, mask, labels=b["labels"])

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"loss": loss.detach()}

        return out, loss_func

    optimizer.zero_grad()
    for chunk in chunks:
        chunk.zero_grad_buffer()
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data, model=chunks, num_microbatches=case.gas,
        seq_length=SEQ, micro_batch_size=MICRO, forward_only=False,
    )
    if before_step is not None:
        before_step()
    return optimizer.step()


def flat_params(chunks) -> dict[str, torch.Tensor]:
    return {f"{i}.{n}": p.detach().float().clone() for i, chunk in enumerate(chunks) for n, p in chunk.named_parameters()}


# ---------------------------------------------------------------- the check
def _expected_wrappers(case: Case) -> set[str]:
    if case.dist_opt:
        return {"DistributedOptimizer"}
    return {"FP32Optimizer"} if case.dtype == "fp32" else {"Float16OptimizerWithFloat16Params"}


def _tolerance(case: Case) -> dict:
    # fp32: blending vs. a scaled learning rate differ by fp32 rounding only.
    # bf16: the model params are bf16 copies of the fp32 main params (2**-8 relative).
    return {"rtol": 1e-5, "atol": 1e-6} if case.dtype == "fp32" else {"rtol": 1e-2, "atol": 1e-3}


def _splits_an_expert(excitation) -> bool:
    """True if some rank steps only part of an expert parameter (linear_fc1 and
    linear_fc2 weights both hold HIDDEN x MOE_FFN elements)."""
    split = any(s.end - s.start < HIDDEN * MOE_FFN for s in excitation.segments)
    flag = torch.tensor([int(split)])
    dist.all_reduce(flag)
    return int(flag) > 0


def _force_skipped_step(optimizer):
    """Make megatron's optimizer report found-inf for one step (what fp16 overflow does)."""
    optimizer.prepare_grads = lambda: True
    return lambda: delattr(optimizer, "prepare_grads")


def _run_case(case: Case, update: str = "auto") -> dict:
    """The checks of tests/test_megatron_backend.py for one case (all ranks)."""
    import excitation_dist.megatron as exmeg
    from excitation_dist.megatron import compat
    from excitation_dist.testing import count_collectives

    setup(case)
    a_chunks, a_opt = build(case, per_expert_lr=False)
    excitation = exmeg.attach(a_chunks, a_opt, {"strategy": "zerosum", "update": update})
    assert excitation.update_path == ("folded" if update == "auto" else "blend"), (case.name, excitation.update_path)
    # B never pads to capacity: its experts receive exactly the real (kept) assignments
    b_chunks, b_opt = build(dataclasses.replace(case, pad=False), per_expert_lr=True)
    kinds = {type(leaf).__name__ for leaf in compat.leaf_optimizers(a_opt)}
    assert kinds == _expected_wrappers(case), (case.name, kinds)
    count_a, count_b = ExpertInputCounter(a_chunks, case.num_layers), ExpertInputCounter(b_chunks, case.num_layers)
    layers = compat.moe_layers(a_chunks)
    stage_layers = [layer.layer_number - 1 for layer in layers]
    assert excitation.owned_expert_numel() > 0
    split = _splits_an_expert(excitation)
    if case.dist_opt:
        assert split, f"{case.name}: no DistributedOptimizer shard boundary inside an expert"

    dead = []
    if 0 in stage_layers and DEAD_EXPERT in layers[0].local_expert_indices:
        j = layers[0].local_expert_indices.index(DEAD_EXPERT)
        dead = list(layers[0].experts.local_experts[j].parameters())

    no_grad_forwards = []  # with recompute: the original forwards run under no_grad and must not count
    for layer in layers:
        layer.router.register_forward_hook(
            lambda m, args, out: no_grad_forwards.append(1) if m.training and not torch.is_grad_enabled() else None)

    skipped_at = case.skipped_step
    max_update = 0.0
    for step in range(STEPS):
        before = flat_params(a_chunks)
        dead_before = [p.detach().clone() for p in dead]
        steps_before = excitation.step
        restore = [_force_skipped_step(a_opt), _force_skipped_step(b_opt)] if step == skipped_at else []
        with count_collectives() as log:
            result = train_step(a_chunks, a_opt, case, step)
        assert excitation.reduce  # every case has > 1 rank holding distinct tokens per stage
        assert log.count("all_reduce", (len(layers), NUM_EXPERTS)) == 1, (case.name, step, log.calls)
        received_a = count_a.global_counts()
        reference = {}

        def reference_lrs():
            reference["counts"] = count_b.global_counts()
            set_expert_lrs(b_opt, zerosum_gamma1(reference["counts"]))

        train_step(b_chunks, b_opt, case, step, before_step=reference_lrs)
        processed = reference["counts"]  # tokens B's experts received: A's real assignments
        if case.pad:  # A's experts also received padding up to capacity, which must not count
            assert bool((received_a >= processed).all()) and not torch.equal(received_a, processed), case.name
        else:
            assert torch.equal(received_a, processed), (case.name, received_a, processed)
        for undo in restore:
            undo()

        if step == skipped_at:
            assert result[0] is False and excitation.step == steps_before, case.name
            after = flat_params(a_chunks)
            assert all(torch.equal(before[n], after[n]) for n in before), f"{case.name}: a skipped step changed params"
            continue
        assert result[0] is True
        expected = processed[stage_layers]
        if case.capacity is not None:  # capacity really dropped routes (else the case tests nothing)
            dp = dist.get_world_size() // (case.tp * case.pp)
            assert int(expected.sum()) < len(stage_layers) * case.topk * MICRO * SEQ * case.gas * dp, case.name
        assert torch.equal(excitation.last_counts_LE, expected), (case.name, step, excitation.last_counts_LE, expected)
        phi = zerosum_gamma1(expected)
        torch.testing.assert_close(excitation.last_multipliers_LE, phi, rtol=1e-12, atol=1e-12)
        if 0 in stage_layers:
            assert int(expected[stage_layers.index(0), DEAD_EXPERT]) == 0
            assert float(phi[stage_layers.index(0), DEAD_EXPERT]) == 0.0

        params_a, params_b = flat_params(a_chunks), flat_params(b_chunks)
        for name in params_a:
            torch.testing.assert_close(params_a[name], params_b[name], **_tolerance(case),
                                       msg=lambda m: f"{case.name} step {step} {name}: {m}")
        max_update = max(max_update, max(float((params_a[n] - before[n]).abs().max()) for n in params_a))
        for p, old in zip(dead, dead_before):
            assert torch.equal(p.detach(), old), f"{case.name}: the phi = 0 expert changed"

    assert bool(no_grad_forwards) == case.recompute, (case.name, len(no_grad_forwards))
    exmeg.detach(a_opt)
    return {"case": case.name, "phi_step": excitation.step, "max_update": max_update, "split": split,
            "megatron_core": compat.installed_version()}


def run_cases(cases, megatron_path: str | None = None, update: str = "auto") -> list[dict]:
    """Worker entry: run every case; ``megatron_path`` (an unpacked megatron-core
    wheel) goes first on sys.path, before anything imports megatron."""
    if megatron_path is not None:
        sys.path.insert(0, megatron_path)
        from excitation_dist.megatron import compat

        compat.backfill_typing_override()
    return [_run_case(case, update) for case in cases]


# ------------------------------------------------- a pipeline stage with dense layers only
DENSE_FIRST = Case("pp2-dp2-ep2-dense-first-stage-ga2", pp=2, ep=2, gas=2, dense_first=True)  # 4 ranks


def run_dense_first_stage(case: Case, megatron_path: str | None = None) -> dict:
    """Worker entry of the dense-first-stage test (tests/test_megatron_backend.py): PP 2 where
    stage 0 holds one dense layer and stage 1 two MoE layers, DP 2 per stage. Model A
    (Excitation) and the per-expert learning-rate reference B train side by side; per step:

    * stage 0: attach() gave no controller (no hook, no collective); A equals B (nothing scaled);
    * stage 1: one count all-reduce of its ``[2, E]`` counts, the counts equal the tokens
      its experts received, and A equals B (ZeroSum gamma 1).

    Every rank runs the same calls, so a rank waiting on a collective its peers never
    issue would hang the test (``run_distributed``'s timeout)."""
    if megatron_path is not None:
        sys.path.insert(0, megatron_path)
        from excitation_dist.megatron import compat

        compat.backfill_typing_override()
    import excitation_dist.megatron as exmeg
    from excitation_dist.megatron import compat
    from excitation_dist.testing import count_collectives

    setup(case)  # the CPU patches first: 0.19.2 imports triton with megatron.core
    from megatron.core import parallel_state as ps

    a_chunks, a_opt = build(case, per_expert_lr=False)
    excitation = exmeg.attach(a_chunks, a_opt, {"strategy": "zerosum"})
    b_chunks, b_opt = build(case, per_expert_lr=True)
    count_b = ExpertInputCounter(b_chunks, case.num_layers)
    layers = compat.moe_layers(a_chunks)
    dense_stage = ps.is_pipeline_first_stage(ignore_virtual=True)
    assert (excitation is None) == dense_stage == (not layers), (dense_stage, len(layers))
    stage_layers = [layer.layer_number - 1 for layer in layers]
    assert stage_layers == ([] if dense_stage else [1, 2]), stage_layers

    for step in range(STEPS):
        with count_collectives() as log:
            assert train_step(a_chunks, a_opt, case, step)[0] is True
        reference = {}

        def reference_lrs():
            reference["counts"] = count_b.global_counts()
            set_expert_lrs(b_opt, zerosum_gamma1(reference["counts"]))

        train_step(b_chunks, b_opt, case, step, before_step=reference_lrs)
        if not dense_stage:
            assert excitation.reduce and log.count("all_reduce", (len(layers), NUM_EXPERTS)) == 1, log.calls
            expected = reference["counts"][stage_layers]
            assert int(expected.sum()) > 0
            assert torch.equal(excitation.last_counts_LE, expected), (step, excitation.last_counts_LE, expected)
        params_a, params_b = flat_params(a_chunks), flat_params(b_chunks)
        for name in params_a:
            torch.testing.assert_close(params_a[name], params_b[name], **_tolerance(case),
                                       msg=lambda m: f"{case.name} step {step} {name}: {m}")
    exmeg.detach(a_opt)
    return {"dense_stage": dense_stage, "phi_step": None if excitation is None else excitation.step,
            "megatron_core": compat.installed_version()}
