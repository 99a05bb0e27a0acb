"""Excitation's overhead in megatron-core training (CPU, gloo), printed as a table.

Per model size, one baseline B (no Excitation) and one model A per variant
(folded / blend update path x ZeroSum / PositiveSum): identical GPTModel MoE
models (megatron-core, local spec, SequentialMLP experts) with megatron's DDP
and fp32 DistributedOptimizer, trained on the same data in one run. A step is
one forward-backward through megatron's schedule plus ``optimizer.step()``.
Default layout: 2 ranks, EP 1 (expert-data-parallel 2), gradient buckets of
three expert weight matrices (``bucket_size``): the DistributedOptimizer shards
each bucket in two, so shard boundaries fall inside expert weights (column
"split"). With megatron's default 40M-element buckets (``--no-cut``) the halves
of the one expert bucket fall on an expert boundary and no expert is cut. Step times are interleaved A/B
pairs, the whole comparison repeated in rounds; memory is measured by the
allocator and the RSS high-water mark, not self-reported; collectives and host
syncs added per optimizer step are counted (see benchmarks/overhead_table.py).

    python benchmarks/megatron_overhead.py                        # 2 ranks, EP 1, small medium large
    python benchmarks/megatron_overhead.py --ep-size 2            # experts not cut (EP 2 x expert-DP 1)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SIZES = {  # name: (hidden, moe_ffn_hidden per expert, layers, experts)
    "tiny": (16, 32, 2, 4),  # smoke tests only
    "small": (64, 128, 2, 8),
    "medium": (192, 768, 4, 8),
    "large": (384, 1536, 4, 8),
}
HEADS = 4
VOCAB = 256  # byte-level tokens
ENV = {"OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1", "EXCITATION_MEGATRON_CPU": "1"}


def _setup(ep_size: int) -> None:
    """Megatron's process groups (TP 1, PP 1, EP ``ep_size``) on the CPU."""
    from excitation_dist.megatron import cpu_patches

    cpu_patches.apply_if_requested()
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    try:  # 0.19: the aux-loss tracker is an object sized by the first model's layers
        from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

        destroy_moe_metrics_tracker()
    except ImportError:  # 0.16: a module-level dict
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        get_moe_layer_wise_logging_tracker().clear()
    ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                 expert_model_parallel_size=ep_size, expert_tensor_parallel_size=1)


_LR_ENV = "EXCITATION_BENCH_LR"  # --lr, read in the worker processes


def _build(size: str, ep_size: int, seq_len: int, cut: bool):
    """(model chunks, optimizer): fp32, DistributedOptimizer, overlapped grad reduce."""
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    hidden, moe_ffn, layers, experts = SIZES[size]
    torch.manual_seed(1234)
    model_parallel_cuda_manual_seed(1234)
    config = TransformerConfig(
        num_layers=layers, hidden_size=hidden, num_attention_heads=HEADS, ffn_hidden_size=4 * hidden,
        num_moe_experts=experts, moe_ffn_hidden_size=moe_ffn, moe_router_topk=2, moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-2, tensor_model_parallel_size=1,
        expert_model_parallel_size=ep_size, expert_tensor_parallel_size=1, pipeline_model_parallel_size=1,
        pipeline_dtype=torch.float32, params_dtype=torch.float32, use_cpu_initialization=True,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, gradient_accumulation_fusion=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        moe_router_dtype="fp32",
    )
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True,
                                               overlap_grad_reduce=True,
                                               **({"bucket_size": 3 * hidden * moe_ffn} if cut else {}))
    model = GPTModel(config, get_gpt_layer_local_spec(num_experts=experts, moe_grouped_gemm=False), vocab_size=VOCAB,
                     max_sequence_length=seq_len, position_embedding_type="learned_absolute")
    chunks = [DistributedDataParallel(config, ddp_config, model)]
    config.finalize_model_grads_func = finalize_model_grads
    lr = float(os.environ.get(_LR_ENV, "1e-3"))
    opt_config = OptimizerConfig(optimizer="adam", lr=lr, weight_decay=0.1, use_distributed_optimizer=True,
                                 clip_grad=0.0, adam_beta1=0.9, adam_beta2=0.99)
    return chunks, get_megatron_optimizer(opt_config, chunks)


def _stepper(chunks, optimizer, corpus, micro: int, seq_len: int, rank: int):
    """One optimizer step per call: megatron's forward-backward schedule (one micro-batch) + step."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from excitation_dist.data import byte_batches

    mask = torch.triu(torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool), diagonal=1)
    position_ids = torch.arange(seq_len).unsqueeze(0).expand(micro, seq_len)
    state = {"step": 0}

    def forward_step(data_iterator, chunk):
        b = next(data_iterator)
        out = chunk(b[:, :-1], position_ids, mask, labels=b[:, 1:])

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"loss": loss.detach()}

        return out, loss_func

    def step() -> None:
        tokens = byte_batches(corpus, micro, seq_len, state["step"], rank=rank)
        state["step"] += 1
        optimizer.zero_grad()
        for chunk in chunks:
            chunk.zero_grad_buffer()
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([tokens]), model=chunks,
                                    num_microbatches=1, seq_length=seq_len, micro_batch_size=micro,
                                    forward_only=False)
        result = optimizer.step()
        assert result[0] is True, "megatron reported an unsuccessful step"

    return step


def _global_params(chunks) -> int:
    """Parameters of the whole model: this rank's, plus the experts the other EP ranks hold."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_layer import BaseMoELayer

    local = sum(p.numel() for chunk in chunks for p in chunk.parameters())
    experts = sum(p.numel() for chunk in chunks for m in chunk.modules() if isinstance(m, BaseMoELayer)
                  for p in m.experts.parameters())
    return local + (ps.get_expert_model_parallel_world_size() - 1) * experts


def _measure(size: str, ep_size: int, repeats: int, pairs: int, warmup: int, micro: int, seq_len: int,
             cut: bool) -> list[dict]:
    import torch
    from megatron.core import parallel_state as ps

    import excitation_dist.megatron as exmeg
    from excitation_dist.data import embedded_corpus_bytes
    from overhead_table import check_update_path, compare, excitation_config, selected_variants

    _setup(ep_size)
    corpus = torch.frombuffer(bytearray(embedded_corpus_bytes(1_000_000)), dtype=torch.uint8)
    rank = ps.get_data_parallel_rank()
    b_chunks, b_opt = _build(size, ep_size, seq_len, cut)
    variants, optimizers = {}, []
    for update, strategy in selected_variants():
        chunks, opt = _build(size, ep_size, seq_len, cut)
        config = excitation_config(update, strategy)
        ex = exmeg.attach(chunks, opt, config) if config else None
        variants[f"{update}-{strategy}"] = (_stepper(chunks, opt, corpus, micro, seq_len, rank), ex)
        optimizers.append(opt)
    rows = compare(_stepper(b_chunks, b_opt, corpus, micro, seq_len, rank), variants, repeats=repeats, pairs=pairs,
                   warmup=warmup)
    for name, (_, ex) in variants.items():
        check_update_path(name, ex)
    params = _global_params(b_chunks)
    for opt, (_, ex) in zip(optimizers, variants.values()):
        if ex is not None:
            exmeg.detach(opt)
    return [dict(row, size=size, params=params) for row in rows.values()]


def _worker(sizes, ep_size, repeats, pairs, warmup, micro, seq_len, cut):
    import gc
    import warnings

    warnings.filterwarnings("ignore")
    rows = []
    for s in sizes:
        rows += _measure(s, ep_size, repeats, pairs, warmup, micro, seq_len, cut)
        gc.collect()
    return rows


def main(argv=None) -> int:
    from overhead_table import add_timing_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--ep-size", type=int, default=1)
    add_timing_arguments(parser)
    parser.add_argument("--micro", type=int, default=8, help="sequences per micro-batch per data-parallel rank")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--sizes", nargs="+", default=["small", "medium", "large"], choices=list(SIZES))
    parser.add_argument("--no-cut", dest="cut", action="store_false",
                        help="megatron's default bucket size: shards fall on expert boundaries")
    from overhead_table import add_variants_argument, select_variants

    parser.add_argument("--lr", type=float, default=1e-3,
                        help="Adam learning rate; a tiny one (1e-9) keeps A's and B's routing identical, so that step"
                             " times differ only by Excitation's own work")
    add_variants_argument(parser)
    args = parser.parse_args(argv)
    select_variants(args.variants)
    os.environ[_LR_ENV] = repr(args.lr)

    from excitation_dist.testing import run_distributed
    from overhead_table import print_rounds, print_table

    rows = run_distributed(_worker, args.world_size, args.sizes, args.ep_size, args.repeats, args.pairs, args.warmup,
                           args.micro, args.seq_len, args.cut, env=dict(ENV), timeout=3600)[0]
    print_table(f"megatron-core, DistributedOptimizer fp32, Adam, {args.world_size} ranks (CPU, gloo), EP "
                f"{args.ep_size} (expert-data-parallel {args.world_size // args.ep_size}), micro-batch {args.micro} x "
                f"{args.seq_len} tokens, {'buckets of 3 expert matrices' if args.cut else 'default buckets'}, {args.repeats} "
                f"rounds x {args.pairs} interleaved pairs per variant", rows)
    print("params per size (whole model): " + ", ".join(sorted({f"{r['size']} {r['params']:,}" for r in rows})))
    print_rounds(rows)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
