"""How the suite is split between ``pytest -n`` workers (pytest-xdist; ``make test`` runs two).

Each test file is one unit of work (``--dist loadfile``): its module fixtures (the distributed matrices'
shared process groups, the Megatron recipe's uninterrupted run) run once, on one worker. Tests that compare
with one shared run live in its file (tests/test_recipe_train.py's restarts). Files are handed out longest
first (measured: each launches several multi-process training runs), so that the short ones fill in at the
end; without ``-n`` the same order applies, tests within a file unchanged.

Which tests share a process depends on that split, so each test leaves ``os.environ`` as it found it: an
in-process ``excitation-dist train`` sets variables for the ranks it would launch (the note that the
fast-path fallbacks were said, DeepSpeed's CPU accelerator), which a later test's launches must not inherit.
"""

from __future__ import annotations

import os

import pytest

LONGEST_FIRST = [
    "test_megatron_recipe_checkpoints.py", "test_megatron_lm_checkpoints.py", "test_recipe_train.py",
    "test_deepspeed_backend.py", "test_recipe_fsdp2.py", "test_megatron_0192.py", "test_megatron_backend.py",
    "test_torchtitan.py", "test_readme.py", "test_launch.py", "test_preflight.py", "test_deepspeed_autoep.py",
    "test_data.py", "test_fsdp2.py", "test_logging.py", "test_orphans.py", "test_experiments.py",
    "test_torch_distributed.py", "test_rank_exit.py", "test_cli.py",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept


@pytest.fixture(autouse=True)
def _environment_restored():
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)
