"""The GPT-MoE language model of the recipe (torch and DeepSpeed backends) and
the reference plain-PyTorch MoE layer it routes with on the torch backend."""

from excitation_dist.models.gpt_moe import GPTMoE, GPTMoEConfig
from excitation_dist.models.moe import TopKMoE

__all__ = ["GPTMoE", "GPTMoEConfig", "TopKMoE"]
