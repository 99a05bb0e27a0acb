"""DDP over gloo, 2 and 4 processes: counts, replicas, single-process equality,
and one count collective per optimizer step (measured with the profiler)."""

import pytest
import torch
import torch.distributed as dist

from excitation_dist.models import GPTMoE, GPTMoEConfig
from excitation_dist.testing import count_collectives, run_distributed
from excitation_dist.torch import attach

MODEL = GPTMoEConfig(vocab_size=32, seq_len=12, d_model=16, n_layers=3, n_heads=2, d_ff=16,
                     num_experts=4, top_k=2, capacity_factor=1.25, aux_loss_coef=0.01)
STEPS = 3
SEQS_PER_MICRO = 2


def _chunk(step, rank, micro):
    """The sequences of (step, rank, micro-batch): the global batch of a step is
    all (rank, micro) chunks."""
    g = torch.Generator().manual_seed(10_000 * step + 100 * rank + micro)
    return torch.randint(0, MODEL.vocab_size, (SEQS_PER_MICRO, MODEL.seq_len + 1), generator=g)


def _router_counts(model):
    """Independent local counts: top-k of each router's logits, before capacity
    dropping, from forward hooks (only grad-enabled forwards outside backward)."""
    counts = torch.zeros(MODEL.n_layers, MODEL.num_experts, dtype=torch.int64)

    def hook_for(layer):
        def hook(module, inputs, logits):
            if torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1:
                idx = logits.topk(MODEL.top_k, dim=-1).indices
                counts[layer] += torch.bincount(idx.reshape(-1), minlength=MODEL.num_experts)
        return hook

    for layer, block in enumerate(model.blocks):
        block.ffn.experts.router.register_forward_hook(hook_for(layer))
    return counts


def _ddp_equals_single_process(micro_batches, strategy):
    torch.set_default_dtype(torch.float64)
    rank, world = dist.get_rank(), dist.get_world_size()
    singletons = [dist.new_group([r]) for r in range(world)]  # every rank creates every group

    torch.manual_seed(0)
    model = GPTMoE(MODEL)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2, weight_decay=0.1)
    ex = attach(ddp, opt, {"strategy": strategy, "counts": "routed"})
    local_routed = _router_counts(model)

    torch.manual_seed(0)
    ref_model = GPTMoE(MODEL)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, weight_decay=0.1)
    ref_ex = attach(ref_model, ref_opt, {"strategy": strategy, "counts": "routed"}, process_group=singletons[rank])
    assert not ref_ex.reduce and ex.reduce

    count_shape = (MODEL.n_layers, MODEL.num_experts)
    for step in range(STEPS):
        local_routed.zero_()
        with count_collectives() as log:
            for m in range(micro_batches):
                sync = m == micro_batches - 1
                ctx = ddp.no_sync() if not sync else torch.enable_grad()
                with ctx:
                    loss = ddp(_chunk(step, rank, m))
                    (loss / micro_batches).backward()
            opt.step()
            opt.zero_grad()
        # exactly one collective on the [L, E] count buffer per optimizer step
        assert log.count("all_reduce", count_shape) == 1, log.calls

        # reference: one process, the whole global batch as world x micro chunks
        for r in range(world):
            for m in range(micro_batches):
                loss = ref_model(_chunk(step, r, m))
                (loss / (micro_batches * world)).backward()
        ref_opt.step()
        ref_opt.zero_grad()

        # reduced counts == sum over ranks of the independently measured local counts
        summed = local_routed.clone()
        dist.all_reduce(summed)
        assert torch.equal(ex.last_counts_LE, summed)
        assert torch.equal(ex.last_counts_LE, ref_ex.last_counts_LE)
        assert torch.equal(ex.last_multipliers_LE, ref_ex.last_multipliers_LE)
        assert (ex.last_multipliers_LE != 1).any()

        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        for other in gathered:
            assert torch.equal(other, flat), "replicas differ after a step"
        ref_flat = torch.cat([p.detach().reshape(-1) for p in ref_model.parameters()])
        torch.testing.assert_close(flat, ref_flat, rtol=1e-9, atol=1e-11)
    return ex.last_counts_LE.tolist()


@pytest.mark.parametrize("world, micro_batches, strategy", [(2, 1, "zerosum"), (2, 3, "positivesum"), (4, 2, "zerosum")])
def test_ddp_equals_single_process_over_the_global_batch(world, micro_batches, strategy):
    counts = run_distributed(_ddp_equals_single_process, world, micro_batches, strategy)
    assert all(c == counts[0] for c in counts)


def _one_collective_without_overlap():
    """Without DDP (plain model, gradients averaged by hand): the optimizer step
    issues the one count all-reduce itself."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = GPTMoE(MODEL)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ex = attach(model, opt)
    for step in range(2):
        for m in range(3):
            model(_chunk(step, rank, m)).backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
        with count_collectives() as log:
            opt.step()
        assert log.count() == 1 and log.count("all_reduce", (MODEL.n_layers, MODEL.num_experts)) == 1, log.calls
    return ex.count_collectives_issued


def test_one_collective_per_step_in_the_optimizer_step():
    assert run_distributed(_one_collective_without_overlap, 2) == [2, 2]


def _counter_against_the_profilers_events():
    """The same collectives (and a backward pass between them) under ``count_collectives`` and under a
    plain profiler whose ``events()`` list is filtered by name: the same calls, in the same order."""
    from torch.profiler import ProfilerActivity, profile

    def work():
        x = torch.ones(3, 4)
        dist.all_reduce(x)
        dist.broadcast(torch.ones(5), 0)
        torch.nn.Linear(4, 4)(x).sum().backward()
        dist.all_gather([torch.zeros(2) for _ in range(2)], torch.ones(2))
        dist.barrier()

    with count_collectives() as log:
        work()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        work()
    reference = [(e.name, str(e.input_shapes)) for e in prof.events() if e.name.startswith(("gloo:", "nccl:"))]
    assert log.calls == reference and len(reference) == 4, (log.calls, reference)
    return log.calls


def test_count_collectives_reads_what_the_profilers_event_list_holds():
    calls = run_distributed(_counter_against_the_profilers_events, 2)
    assert [name for name, _ in calls[0]] == ["gloo:all_reduce", "gloo:broadcast", "gloo:all_gather", "gloo:barrier"]


def _stacked_experts_match_per_expert_lr(micro_batches):
    """A (DDP, AdamW, Excitation) against B (DDP, no Excitation, AdamW with a
    per-element learning rate): B's expert e of each stacked weight is located
    independently, as ``w[e]`` along the stacked dimension (not through
    ``excitation_expert_slices``), and runs at ``phi[layer, e] * lr`` with phi the
    paper's ZeroSum of independently measured counts (router top-k, all ranks)."""
    from excitation_dist.testing.reference import ElementLRAdamW

    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    lr, wd = 1e-2, 0.1

    def build():
        torch.manual_seed(0)
        model = GPTMoE(MODEL)
        return model, torch.nn.parallel.DistributedDataParallel(model)

    model_a, ddp_a = build()
    opt_a = torch.optim.AdamW(ddp_a.parameters(), lr=lr, weight_decay=wd)
    ex = attach(ddp_a, opt_a, {"strategy": "zerosum", "counts": "routed"})
    model_b, ddp_b = build()
    opt_b = ElementLRAdamW(ddp_b.parameters(), lr=lr, weight_decay=wd)
    counts_b = _router_counts(model_b)

    for step in range(STEPS):
        for ddp, opt in ((ddp_a, opt_a), (ddp_b, opt_b)):
            counts_b.zero_()
            for m in range(micro_batches):
                ctx = ddp.no_sync() if m < micro_batches - 1 else torch.enable_grad()
                with ctx:
                    loss = ddp(_chunk(step, rank, m))
                    (loss / micro_batches).backward()
            if opt is opt_b:
                counts = counts_b.clone()
                dist.all_reduce(counts)
                phi_LE = counts.double() / counts.double().mean(-1, keepdim=True)
                opt_b.lr_scale = {
                    id(w): phi_LE[layer].view(-1, 1, 1).expand_as(w).contiguous()
                    for layer, block in enumerate(model_b.blocks) for w in (block.ffn.experts.w_in_EDF, block.ffn.experts.w_out_EFD)
                }
            opt.step()
            opt.zero_grad()
        assert torch.equal(ex.last_counts_LE, counts)
        assert (ex.last_multipliers_LE != 1).any()
        for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"step {step} {name}: {m}")
    return float(ex.last_multipliers_LE.max())


def test_stacked_experts_equal_a_per_expert_learning_rate_reference():
    phis = run_distributed(_stacked_experts_match_per_expert_lr, 2, 2)
    assert phis[0] == phis[1] > 1
