"""Helpers for testing distributed code on CPU."""

from excitation_dist.testing.collectives import count_collectives
from excitation_dist.testing.distributed import DistributedTestError, run_distributed

__all__ = ["DistributedTestError", "count_collectives", "run_distributed"]
