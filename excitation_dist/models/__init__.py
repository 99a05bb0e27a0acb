"""Reference MoE models used by the tests and the CPU demo."""

from excitation_dist.models.moe import TopKMoE
from excitation_dist.models.transformer import TinyMoEConfig, TinyMoETransformer, lm_loss

__all__ = ["TopKMoE", "TinyMoEConfig", "TinyMoETransformer", "lm_loss"]
