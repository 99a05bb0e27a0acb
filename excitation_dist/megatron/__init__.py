"""Megatron backend (megatron-core 0.16.1 - 0.19.x): Excitation for megatron-core MoE layers.

    from megatron.core.optimizer import get_megatron_optimizer
    import excitation_dist.megatron as exmeg

    optimizer = get_megatron_optimizer(opt_config, model_chunks)
    excitation = exmeg.attach(model_chunks, optimizer, {"strategy": "positivesum"})
    for step in range(steps):                    # megatron's schedule, as usual
        forward_backward_func(...)               # counts at every router, reduced once per step
        update_successful, *_ = optimizer.step() # expert updates scaled on the main params

Supported: SequentialMLP, TEGroupedMLP and legacy GroupedMLP experts; FP32Optimizer,
Float16OptimizerWithFloat16Params and DistributedOptimizer inside a ChainedOptimizer;
EP/TP(+SP)/CP/DP/PP (incl. virtual stages), gradient accumulation, activation
recompute, allgather/alltoall/flex dispatchers. On CPU (tests, laptops) apply
:mod:`excitation_dist.megatron.cpu_patches` first. Megatron-LM's training loop:
``python -m excitation_dist.recipe.pretrain_gpt`` (megatron-core 0.19.x).
"""

from excitation_dist._lazy import lazy_attributes

__all__ = ["attach", "attached", "detach", "rebuild_segments"]
# on first use (PEP 562): the command line reads cpu_patches' versions without torch or megatron-core
__getattr__, __dir__ = lazy_attributes(__name__, globals(), dict.fromkeys(__all__, "excitation_dist.megatron.backend"))
