"""What Excitation costs on the FSDP2 / DTensor backend (CPU, gloo), measured side by side.

Per model size, one baseline B (FSDP2 ``fully_shard`` per block and the root on
a 1-D CPU mesh, ``torch.optim.AdamW(foreach=True)`` stepping the DTensors, no
Excitation) and one model A per variant (folded / blend update path x ZeroSum /
PositiveSum, and the null control: a second B), identical models on the same
data, 2 processes. The expert weights are sharded ``Shard(0)`` over the mesh;
with ``--shard-dim 1`` every rank holds a piece of every expert; with
``--expert-parallel N`` the mesh is ``(dp, ep)`` and experts are ``Shard(0)`` over
``ep`` with tokens exchanged all-to-all (the recipe's ``parallel.expert_parallel``). Interleaved
A/B pairs repeated in rounds; memory, collectives and host syncs as in
benchmarks/overhead_table.py.

    python benchmarks/fsdp2_overhead.py                          # small medium, 2 ranks
    python benchmarks/fsdp2_overhead.py --sizes tiny --repeats 5 --pairs 1   # smoke run
    python benchmarks/fsdp2_overhead.py --expert-parallel 2                  # EP 2 with token exchange
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SIZES = {  # name: (layers, d_model, experts, d_ff, seq, batch)
    "tiny": (2, 16, 4, 32, 16, 4),  # smoke tests only
    "small": (2, 64, 8, 128, 64, 8),
    "medium": (4, 256, 16, 512, 128, 8),
    "large": (8, 256, 16, 512, 128, 8),
}


def _model_step(size: str, strategy_update: tuple[str, str] | None, rank: int, mesh, shard_dim: int,
                expert_parallel: int):
    import torch
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    import excitation_dist.fsdp2 as exfsdp
    from excitation_dist.models import GPTMoE, GPTMoEConfig
    from overhead_table import excitation_config, lm_train_step

    layers, d, e, f, seq, b = SIZES[size]
    cfg = GPTMoEConfig(vocab_size=256, seq_len=seq, d_model=d, n_layers=layers, n_heads=4, d_ff=f,
                       num_experts=e, top_k=2)
    torch.manual_seed(0)
    model = GPTMoE(cfg)
    params = sum(p.numel() for p in model.parameters())
    experts = {id(w) for blk in model.blocks for w in (blk.ffn.experts.w_in_EDF, blk.ffn.experts.w_out_EFD)}

    def placement(p):
        return Shard(shard_dim) if id(p) in experts else Shard(0)

    if expert_parallel > 1:
        from excitation_dist.models.expert_parallel import shard_expert_parallel

        for blk in model.blocks:
            shard_expert_parallel(blk.ffn.experts, mesh)
    for blk in model.blocks:
        fully_shard(blk, mesh=mesh, shard_placement_fn=None if expert_parallel > 1 else placement)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    config = excitation_config(*strategy_update) if strategy_update else None
    ex = exfsdp.attach(model, opt, config, mesh=mesh) if config else None
    step = lm_train_step(model, opt, rank, b, seq)

    return step, ex, params


def _worker(sizes, repeats, pairs, warmup, shard_dim, expert_parallel) -> list[dict]:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from overhead_table import compare_sizes, quiet_logs

    torch.set_num_threads(1)
    rank = dist.get_rank()
    world, ep = dist.get_world_size(), expert_parallel
    mesh = (init_device_mesh("cpu", (world // ep, ep), mesh_dim_names=("dp", "ep")) if ep > 1
            else init_device_mesh("cpu", (world,), mesh_dim_names=("dp",)))
    with quiet_logs():
        return compare_sizes(sizes, lambda size, variant: _model_step(size, variant, rank, mesh, shard_dim, ep),
                             repeats=repeats, pairs=pairs, warmup=warmup)


def main(argv=None) -> int:
    from overhead_table import add_timing_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2)
    add_timing_arguments(parser)
    parser.add_argument("--sizes", nargs="+", default=["small", "medium"], choices=list(SIZES))
    parser.add_argument("--shard-dim", type=int, default=0, choices=[0, 1],
                        help="FSDP2 shard dimension of the stacked expert weights "
                             "(1: every rank holds part of every expert)")
    parser.add_argument("--expert-parallel", type=int, default=1,
                        help="EP size: experts Shard(0) over an ep mesh dimension, tokens exchanged all-to-all")
    from overhead_table import add_variants_argument, select_variants

    add_variants_argument(parser)
    args = parser.parse_args(argv)
    select_variants(args.variants)

    from excitation_dist.testing import run_distributed
    from overhead_table import print_rounds, print_table

    if args.nproc % args.expert_parallel:
        parser.error(f"--expert-parallel {args.expert_parallel} must divide --nproc {args.nproc}")
    rows = run_distributed(_worker, args.nproc, args.sizes, args.repeats, args.pairs, args.warmup, args.shard_dim,
                           args.expert_parallel, env={"OMP_NUM_THREADS": "1"}, timeout=3600)[0]
    layout = (f"experts Shard(0) over ep={args.expert_parallel} with all-to-all token exchange, FSDP2 over dp"
              if args.expert_parallel > 1 else f"expert weights Shard({args.shard_dim})")
    print_table(f"FSDP2 backend: fully_shard per block + root, AdamW(foreach=True) on DTensors, {args.nproc} processes "
                f"(CPU, gloo), {layout}, {args.repeats} rounds x {args.pairs} interleaved pairs per variant", rows)
    print("params per size: " + ", ".join(sorted({f"{r['size']} {r['params']:,}" for r in rows})))
    print_rounds(rows)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
