"""torchtitan's ``OptimizersContainer`` with Excitation attached at build, and
Excitation's state inside the container's checkpoint state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.components.optimizer.utils import init_optim_state

from excitation_dist.config import as_config
from excitation_dist.fsdp2 import dcp_state
from excitation_dist.torchtitan.backend import attach, paused

__all__ = ["ExcitedOptimizersContainer", "EXCITATION_KEY"]

# The key of Excitation's state in the container's flat state dict (beside torchtitan's ``state.<fqn>.<name>`` and
# ``param_groups.<fqn>.<key>``; torchtitan's loader ignores keys it does not own). In a torchtitan DCP checkpoint:
# ``optimizer.excitation``.
EXCITATION_KEY = "excitation"


class ExcitedOptimizersContainer(OptimizersContainer):
    """``OptimizersContainer`` that attaches Excitation to the model parts it
    optimizes (:func:`excitation_dist.torchtitan.attach`) and saves and loads
    Excitation's state with the optimizer's (torchtitan's checkpointer stores
    the container as its ``optimizer`` state). ``excitation``: the last
    controller (metrics, multipliers); None on a pipeline stage without MoE."""

    @dataclass(kw_only=True, slots=True)
    class Config(OptimizersContainer.Config):
        excitation: dict[str, Any] = field(default_factory=dict)
        """Excitation settings (:class:`excitation_dist.ExcitationConfig` keys:
        strategy, gamma, floor, ceiling, utilization_ema, warmup_steps, ...)."""

        def __post_init__(self) -> None:
            as_config(self.excitation)  # refuse unknown keys and bad values when the config is made

    def __init__(self, config: Config, *, model_parts: list[nn.Module]) -> None:
        super().__init__(config, model_parts=model_parts)
        self.excitation = attach(model_parts, self, config.excitation)

    def _init_optim_states(self) -> None:
        """torchtitan's zero-lr step that creates a fresh optimizer's state: not an Excitation step."""
        with paused(self.excitation):
            for optim in self.optimizers:
                init_optim_state(optim)

    def state_dict(self) -> dict[str, Any]:
        self._init_optim_states()
        state = super().state_dict()
        if self.excitation is not None:
            state[EXCITATION_KEY] = dcp_state.pack(self.excitation.state_dict())
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop(EXCITATION_KEY, None)
        self._init_optim_states()
        super().load_state_dict(state_dict)
        if self.excitation is not None and saved is not None:
            self.excitation.load_state_dict(dcp_state.unpack(saved))
