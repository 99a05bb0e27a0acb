"""Excitation's overhead in megatron-core training (CPU, gloo), printed as a table.

For each model size, two identical GPTModel MoE models (megatron-core, local
spec, SequentialMLP experts) with megatron's DDP and fp32 DistributedOptimizer
train on the same data in one run, steps interleaved (A, B then B, A,
alternating) so that machine noise hits both alike: A with Excitation
(ZeroSum), B without. A step is one forward-backward through megatron's
schedule plus ``optimizer.step()``. Reported per size:

- step time ratio A / B (median over steps, and median of per-pair ratios);
- collectives and bytes Excitation adds per optimizer step (profiler-measured:
  all collectives of A's step minus B's);
- peak transient snapshot bytes versus the expert parameter elements this rank
  owns (its slices of the fp32 main parameters).

The models are built as tests/megatron_support.py builds them (its process-group
setup and TransformerConfig, resized), without the tests' dead expert and with
megatron's default gradient buckets.

    python benchmarks/megatron_overhead.py                   # 2 ranks, EP 2, 3 sizes
    python benchmarks/megatron_overhead.py --sizes small --steps 40
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {  # name: (hidden, moe_ffn_hidden per expert, layers, experts)
    "small": (64, 128, 2, 8),
    "medium": (192, 768, 4, 8),
    "large": (384, 1536, 4, 8),
}
HEADS = 4
VOCAB = 256  # byte-level tokens


def _build(size: str, ep_size: int, micro: int, seq_len: int):
    """(model chunks, optimizer) of this rank: tests/megatron_support.build's
    recipe (fp32, DistributedOptimizer, overlapped grad reduce) at ``size``."""
    import dataclasses

    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from tests import megatron_support as ms

    hidden, moe_ffn, layers, experts = SIZES[size]
    torch.manual_seed(1234)
    model_parallel_cuda_manual_seed(1234)
    case = ms.Case(size, ep=ep_size, dist_opt=True)
    config = dataclasses.replace(
        ms.transformer_config(case), num_layers=layers, hidden_size=hidden, num_attention_heads=HEADS,
        ffn_hidden_size=4 * hidden, num_moe_experts=experts, moe_ffn_hidden_size=moe_ffn,
    )
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True,
                                               overlap_grad_reduce=True)
    model = GPTModel(config, get_gpt_layer_local_spec(num_experts=experts, moe_grouped_gemm=False), vocab_size=VOCAB,
                     max_sequence_length=seq_len, position_embedding_type="learned_absolute")
    chunks = [DistributedDataParallel(config, ddp_config, model)]
    config.finalize_model_grads_func = finalize_model_grads
    opt_config = OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.1, use_distributed_optimizer=True,
                                 clip_grad=0.0, adam_beta1=0.9, adam_beta2=0.99)
    return chunks, get_megatron_optimizer(opt_config, chunks)


def _step(chunks, optimizer, tokens, seq_len: int):
    """One optimizer step: megatron's forward-backward schedule (one micro-batch) + step."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    micro = tokens.shape[0]
    mask = torch.triu(torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool), diagonal=1)
    position_ids = torch.arange(seq_len).unsqueeze(0).expand(micro, seq_len)

    def forward_step(data_iterator, chunk):
        b = next(data_iterator)
        out = chunk(b[:, :-1], position_ids, mask, labels=b[:, 1:])

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"loss": loss.detach()}

        return out, loss_func

    optimizer.zero_grad()
    for chunk in chunks:
        chunk.zero_grad_buffer()
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([tokens]), model=chunks,
                                num_microbatches=1, seq_length=seq_len, micro_batch_size=micro, forward_only=False)
    result = optimizer.step()
    assert result[0] is True, "megatron reported an unsuccessful step"
    return result


def _global_params(chunks) -> int:
    """Parameters of the whole model: this rank's, plus the experts the other EP ranks hold."""
    from megatron.core import parallel_state as ps

    from tests.megatron_support import expert_params

    local = sum(p.numel() for chunk in chunks for p in chunk.parameters())
    experts = sum(p.numel() for _, _, p in expert_params(chunks))
    return local + (ps.get_expert_model_parallel_world_size() - 1) * experts


def _measure(size: str, ep_size: int, steps: int, warmup: int, micro: int, seq_len: int) -> dict:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    import excitation_dist.megatron as exmeg
    from excitation_dist.data import byte_batches, embedded_corpus_bytes
    from excitation_dist.testing import count_collectives
    from tests.megatron_support import Case, setup

    setup(Case(size, ep=ep_size, dist_opt=True))
    corpus = torch.frombuffer(bytearray(embedded_corpus_bytes(1_000_000)), dtype=torch.uint8)
    a_chunks, a_opt = _build(size, ep_size, micro, seq_len)
    excitation = exmeg.attach(a_chunks, a_opt, {"strategy": "zerosum"})
    b_chunks, b_opt = _build(size, ep_size, micro, seq_len)
    rank = ps.get_data_parallel_rank()

    times_a, times_b = [], []
    for step in range(warmup + steps):
        tokens = byte_batches(corpus, micro, seq_len, step, rank=rank)
        a, b = (a_chunks, a_opt, times_a), (b_chunks, b_opt, times_b)
        for chunks, opt, times in ([a, b] if step % 2 == 0 else [b, a]):
            dist.barrier()
            t0 = time.perf_counter()
            _step(chunks, opt, tokens, seq_len)
            if step >= warmup:
                times.append(time.perf_counter() - t0)

    tokens = byte_batches(corpus, micro, seq_len, 10**6, rank=rank)
    dist.barrier()
    with count_collectives() as log_a:
        _step(a_chunks, a_opt, tokens, seq_len)
    dist.barrier()
    with count_collectives() as log_b:
        _step(b_chunks, b_opt, tokens, seq_len)
    from overhead_table import overhead_row

    row = overhead_row(size, _global_params(a_chunks), times_a, times_b, log_a, log_b, excitation)
    exmeg.detach(a_opt)
    return row


def _worker(sizes, ep_size, steps, warmup, micro, seq_len):
    import warnings

    warnings.filterwarnings("ignore")
    return [_measure(s, ep_size, steps, warmup, micro, seq_len) for s in sizes]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--ep-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--micro", type=int, default=8, help="sequences per micro-batch per data-parallel rank")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    args = parser.parse_args()

    from excitation_dist.testing import run_distributed
    from overhead_table import print_overhead_table
    from tests.megatron_support import ENV

    results = run_distributed(_worker, args.world_size, args.sizes, args.ep_size, args.steps, args.warmup,
                              args.micro, args.seq_len, env=dict(ENV), timeout=3600)[0]
    print_overhead_table(f"megatron-core, DistributedOptimizer fp32, {args.world_size} ranks (CPU, gloo), "
                         f"EP {args.ep_size}, micro-batch {args.micro} x {args.seq_len} tokens, {args.steps} interleaved "
                         "steps per model", results, note="params: whole model (all EP ranks' experts); ")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
