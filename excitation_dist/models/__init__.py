"""The GPT-MoE language model of the recipe (torch and DeepSpeed backends) and
the reference plain-PyTorch MoE layer it routes with on the torch backend.

:class:`GPTMoEConfig` imports without torch (:mod:`.config`); the modules are imported on first use."""

from excitation_dist.models.config import GPTMoEConfig

_LAZY = {"GPTMoE": "excitation_dist.models.gpt_moe", "TopKMoE": "excitation_dist.models.moe"}

__all__ = ["GPTMoE", "GPTMoEConfig", "TopKMoE"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'excitation_dist.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
