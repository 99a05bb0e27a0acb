"""excitation-dist: Excitation (arXiv 2602.21798) for distributed MoE training.

Public API:
- :class:`ExcitationConfig`: validated settings.
- :func:`multipliers`: counts [L, E] -> multipliers [L, E] (pure math).
- :class:`Excitation`: the framework-agnostic controller (counts, one
  all-reduce per step, update blending on owned expert slices).
- ``excitation_dist.torch.attach``: the plain PyTorch backend.
"""

from excitation_dist._lazy import lazy_attributes
from excitation_dist.config import STRATEGIES, ConfigError, ExcitationConfig

__version__ = "0.1.0"

# Imported on first use (PEP 562): torch is not needed to read or check a config, and the
# command line (``excitation-dist train``'s checks before it execs torchrun, ``--help``,
# ``--dry-run``) should not pay its import.
__getattr__, __dir__ = lazy_attributes(__name__, globals(), {
    "Excitation": "excitation_dist.core", "ExpertSegment": "excitation_dist.core",
    "multipliers": "excitation_dist.strategies"})

__all__ = ["ConfigError", "Excitation", "ExcitationConfig", "ExpertSegment", "STRATEGIES", "multipliers", "__version__"]
