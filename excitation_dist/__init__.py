"""excitation-dist: Excitation (arXiv 2602.21798) for distributed MoE training.

Public API:
- :class:`ExcitationConfig`: validated settings.
- :func:`multipliers`: counts [L, E] -> multipliers [L, E] (pure math).
- :class:`Excitation`: the framework-agnostic controller (counts, one
  all-reduce per step, update blending on owned expert slices).
- ``excitation_dist.torch.attach``: the plain PyTorch backend.
"""

from excitation_dist.config import ConfigError, ExcitationConfig
from excitation_dist.core import Excitation, ExpertSegment
from excitation_dist.strategies import STRATEGIES, multipliers

__version__ = "0.1.0"

__all__ = ["ConfigError", "Excitation", "ExcitationConfig", "ExpertSegment", "STRATEGIES", "multipliers", "__version__"]
