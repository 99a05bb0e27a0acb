"""The GPT-MoE language model of the recipe (torch and DeepSpeed backends) and
the reference plain-PyTorch MoE layer it routes with on the torch backend.

:class:`GPTMoEConfig` imports without torch (:mod:`.config`); the modules are imported on first use."""

from excitation_dist._lazy import lazy_attributes
from excitation_dist.models.config import GPTMoEConfig

__getattr__, __dir__ = lazy_attributes(__name__, globals(), {
    "GPTMoE": "excitation_dist.models.gpt_moe", "TopKMoE": "excitation_dist.models.moe"})

__all__ = ["GPTMoE", "GPTMoEConfig", "TopKMoE"]
