"""torchtitan adapter: Excitation for torchtitan's MoE models, enabled by configuration.

One line of a torchtitan job's command line (or config function)::

    --override.imports 'excitation_dist.torchtitan.excitation={"strategy": "zerosum", "gamma": 1.0}'

turns the job's optimizer config into :class:`ExcitedOptimizersContainer`
(torchtitan's ``OptimizersContainer`` plus an ``excitation`` field), which at
build attaches Excitation to the model parts it optimizes: each MoE layer's
``TokenChoiceTopKRouter`` output is counted once per token and step (activation
recompute not counted again), the ``[L, E]`` counts are all-reduced once per
optimizer step over the ranks that see different tokens, and each routed
expert's update is scaled inside the inner ``torch.optim`` steps, on the
DTensor shards that FSDP2 / HSDP / expert parallel give the rank. Excitation's
state rides in the optimizer's checkpoint state (``optimizer.excitation``).
torchtitan's load-balancing bias update is left as it is: it keeps its own
``tokens_per_expert_E`` buffer, which Excitation neither reads nor resets.

Without the trainer: :func:`attach` (model parts after ``parallelize``, and the
``OptimizersContainer`` or any ``torch.optim`` optimizer over them).
"""

from __future__ import annotations

from typing import Any

from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.config.override import derive, override

from excitation_dist.torchtitan.backend import attach, detach, paused
from excitation_dist.torchtitan.compat import CHECKED_RANGE, check_version
from excitation_dist.torchtitan.optimizer import EXCITATION_KEY, ExcitedOptimizersContainer

__all__ = ["attach", "detach", "paused", "excitation", "ExcitedOptimizersContainer", "EXCITATION_KEY",
           "CHECKED_RANGE", "check_version"]


@override(target=OptimizersContainer.Config, description="Excitation: utilization-scaled expert updates")
def excitation(config: OptimizersContainer.Config, **settings: Any) -> ExcitedOptimizersContainer.Config:
    """torchtitan override (``--override.imports excitation_dist.torchtitan.excitation``):
    the job's optimizer config, unchanged, with Excitation enabled; ``settings``
    (the JSON object after ``=``) are :class:`excitation_dist.ExcitationConfig` keys."""
    check_version()
    return derive(config, ExcitedOptimizersContainer.Config, excitation=dict(settings))
