"""A run owns its checkpoint directory, and its ranks die with their launcher.

``excitation-dist train`` (2 CPU ranks, backend torch) is started; while it
trains, a second run on the same checkpoint directory is refused (dry run and
real launch) with the holder's host and pid; then the launcher alone is
SIGKILLed and its ranks must be gone within a few seconds, which frees the
directory.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from excitation_dist.recipe.run_lock import locked_by
from tests.process_support import free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny_cpu_torch.yaml")
LONG = ["schedule.train_steps=100000", "schedule.warmup_steps=1", "schedule.eval_interval=0", "logging.interval=1",
        "checkpoint.interval=100000", "model.hidden_size=32", "model.moe.ffn_hidden_size=32", "model.seq_length=32"]


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has exited


def _gone(pids: list[int], seconds: float) -> bool:
    """Whether every process of ``pids`` has exited within ``seconds``."""
    deadline = time.monotonic() + seconds
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(_alive(p) for p in pids)


def _kill(*pids: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _until_training(proc: subprocess.Popen) -> None:
    """Read ``proc``'s output until its first training step is logged; it must still run."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step ") and "| loss" in line:
            break
    assert proc.poll() is None, "".join(seen[-40:])


def _train(tmp: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "excitation_dist.cli", "train", CONFIG, *LONG,
            f"checkpoint.dir={tmp / 'ckpt'}", f"logging.dir={tmp / 'log'}", *extra]


def test_second_run_refused_and_workers_die_with_the_launcher(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers: list[int] = []
    launcher = subprocess.Popen(_train(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True, env=env)
    try:
        _until_training(launcher)
        holder = f"pid {launcher.pid} on host {socket.gethostname()}"

        for extra in (["--dry-run"], []):
            second = subprocess.run(_train(tmp_path, *extra), cwd=tmp_path, capture_output=True, text=True,
                                    timeout=120, env=env)
            assert second.returncode != 0 and "launching" not in second.stdout, second.stdout + second.stderr
            assert f"checkpoint.dir: {tmp_path / 'ckpt'} is in use by another run, {holder}" in second.stderr
            assert "Traceback" not in second.stderr

        workers += _children(launcher.pid)  # torchrun's agent is the launcher (exec'd in place)
        assert len(workers) == 2 and all(_alive(w) for w in workers), workers
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=10)
        assert _gone(workers, seconds=5), "ranks outlived their launcher"
        assert locked_by(tmp_path / "ckpt") is None
    finally:  # torchrun starts each rank in its own session: clean up by pid
        _kill(launcher.pid, *workers)
        launcher.stdout.close()


def _descendants(pid: int) -> list[int]:
    out = []
    for child in _children(pid):
        out += [child, *_descendants(child)]
    return out


def test_ranks_and_the_deepspeed_launch_process_exit_when_the_deepspeed_command_is_killed(tmp_path):
    """`deepspeed --num_gpus 2 --module excitation_dist.cli train ...` SIGKILLed alone: DeepSpeed's
    per-node launch process is reparented and would keep both ranks training; the ranks watch it
    and exit, and then the launch process does."""
    pytest.importorskip("deepspeed")
    deepspeed = Path(sys.executable).parent / "deepspeed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    command = [str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "excitation_dist.cli", "train",
               str(ROOT / "configs" / "tiny_cpu.yaml"), *LONG, f"checkpoint.dir={tmp_path / 'ckpt'}",
               f"logging.dir={tmp_path / 'log'}"]
    runner = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True, env=env)
    family: list[int] = []
    try:
        _until_training(runner)
        family = _descendants(runner.pid)  # the launch process and its two ranks
        assert len(family) >= 3 and all(_alive(p) for p in family), family
        os.kill(runner.pid, signal.SIGKILL)
        runner.wait(timeout=10)
        assert _gone(family, seconds=15), "the launch process or a rank outlived the deepspeed command"
    finally:
        _kill(runner.pid, *family)
        runner.stdout.close()
