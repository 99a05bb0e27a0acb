"""The training recipe: run configuration, metrics, checkpoints, launch."""

from excitation_dist.recipe.config import RunConfig, load_run_config

__all__ = ["RunConfig", "load_run_config"]
