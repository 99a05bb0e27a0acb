"""``torchrun --max-restarts 1`` with a rank SIGKILLed mid-run: the agent restarts
every rank, they rendezvous afresh (a per-attempt namespace in torchrun's shared
store, see ``recipe.loop.restart_safe_store``), resume from the latest complete
checkpoint and finish; every logged loss equals the uninterrupted run's, bit for bit.
Backends torch (under torchrun) and deepspeed (under ``excitation-dist train
--max-restarts``), 2 CPU ranks, a tiny model; the uninterrupted runs are
tests/test_recipe_train.py's (the same settings, trained once per session)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_recipe_train import COMMON, CONFIGS, uninterrupted

STEPS = 30  # COMMON's schedule.train_steps


def _command(config: str, run: Path, restarts: int, launcher: str) -> list[str]:
    """torchrun itself (rank 0 holds the checkpoint lock), or ``excitation-dist train
    --max-restarts`` (which execs torchrun and holds the lock across restarts)."""
    train = [str(config), *COMMON, f"checkpoint.dir={run / 'ckpt'}", f"logging.dir={run / 'log'}"]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "--max-restarts", str(restarts), "-m", "excitation_dist.cli", "train", *train]
    return [sys.executable, "-m", "excitation_dist.cli", "train", "--max-restarts", str(restarts), *train]


def _losses(run: Path) -> dict[int, list[float]]:
    """Every logged loss per step (a restarted run logs the steps after its checkpoint twice)."""
    out: dict[int, list[float]] = {}
    for line in (run / "log" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out.setdefault(record["step"], []).append(record["loss"])
    return out


def _rank_pid(agent: int, rank: int) -> int | None:
    for task in Path(f"/proc/{agent}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(child)
    return None


@pytest.mark.parametrize("backend, launcher", [("torch", "torchrun"), ("deepspeed", "excitation-dist")])
def test_killed_rank_is_restarted_and_the_run_finishes_exactly(tmp_path, tmp_path_factory, backend, launcher):
    if backend == "deepspeed":
        pytest.importorskip("deepspeed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = uninterrupted(tmp_path_factory, backend)  # `excitation-dist train`, which runs torchrun --max-restarts 0

    agent = subprocess.Popen(_command(CONFIGS[backend], tmp_path / "restarted", 1, launcher), cwd=tmp_path, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    seen, killed = [], None
    try:
        for line in agent.stdout:
            seen.append(line)
            if killed is None and line.startswith("saved") and "step_00000010" in line:
                killed = _rank_pid(agent.pid, 1)
                assert killed is not None, "".join(seen)
                os.kill(killed, signal.SIGKILL)
        assert agent.wait(timeout=600) == 0, "".join(seen)
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
    out = "".join(seen)
    assert killed is not None and "resumed from" in out, out
    resumed_at = int(out.split("resumed from", 1)[1].split("(step ", 1)[1].split(")", 1)[0])
    assert resumed_at >= 10

    reference, restarted = _losses(full), _losses(tmp_path / "restarted")
    assert sorted(restarted) == sorted(reference) == list(range(1, STEPS + 1))
    mismatches = [(s, reference[s], v) for s, values in restarted.items() for v in values if v != reference[s][0]]
    assert not mismatches, mismatches
