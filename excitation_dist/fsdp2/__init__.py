"""FSDP2 / DTensor backend: expert weights sharded on a DeviceMesh, any ``torch.optim`` optimizer.

Covers FSDP2 (``torch.distributed.fsdp.fully_shard``: ``Shard(0)``, or
``Shard(1)`` through ``shard_placement_fn``, over a data-parallel mesh
dimension, uneven and empty shards included), expert parallel (the stacked
``[E, ...]`` expert weights ``Shard(0)`` over a mesh dimension named ``ep``),
both on a 2-D mesh, and HSDP (``Replicate`` + ``Shard``). The MoE layers are
the plain PyTorch backend's (:class:`excitation_dist.torch.ExcitableMoE`,
:func:`excitation_dist.torch.report_expert_counts`), describing their experts in
each parameter's global (full tensor) coordinates; this adapter maps each
rank's local shard to (layer, global expert, element range) from the DTensor's
placements and mesh coordinate (:mod:`excitation_dist.fsdp2.placements`)::

    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, foreach=True)
    excitation = excitation_dist.fsdp2.attach(model, optimizer, {"strategy": "zerosum"}, mesh=mesh)

The counts of all micro-batches of a step are all-reduced once, in the
optimizer step, over the mesh dimensions that see different tokens
(``token_dims``, default all); the excited update runs on the local shards
(folded or blend path of the core), with no extra communication. FSDP1
(``FullyShardedDataParallel``) and ``Partial`` placements are refused at attach.
"""

from excitation_dist.fsdp2.backend import attach, count_group, detach, owned_expert_segments

__all__ = ["attach", "detach", "count_group", "owned_expert_segments"]
