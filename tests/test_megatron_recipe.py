"""``excitation-dist train`` with ``backend: megatron`` (megatron-core 0.16.1, 2 CPU
processes, EP 2, DistributedOptimizer): progress, validation, checkpoints, and a
killed run that resumes to exactly the weights of the uninterrupted run."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

from tests.process_support import tag_runs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny_cpu.yaml")
COMMON = ["backend=megatron", "schedule.train_steps=6", "schedule.warmup_steps=1", "schedule.eval_interval=3",
          "logging.interval=1", "checkpoint.interval=3", "model.hidden_size=32", "model.moe.ffn_hidden_size=32",
          "model.seq_length=32", "parallel.expert_parallel=2", "parallel.distributed_optimizer=true"]


@pytest.fixture(autouse=True)
def _no_leftovers(monkeypatch):
    """A SIGKILLed rank's checkpoint-writer process dies with the test (tests/process_support.py)."""
    yield from tag_runs(monkeypatch)


def _train(tmp: Path, name: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "excitation_dist.cli", "train", CONFIG, *COMMON,
            f"checkpoint.dir={tmp / name / 'ckpt'}", f"logging.dir={tmp / name / 'log'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1"}
    return subprocess.Popen(args, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=env)


def _read(directory: str) -> dict:
    from excitation_dist.megatron import cpu_patches

    cpu_patches.apply()
    from megatron.core import dist_checkpointing

    from excitation_dist.megatron import checkpointing

    assert checkpointing.read_excitation_state(directory)["common"]["step"] == 6
    return {k: v.tolist() for k, v in dist_checkpointing.load_plain_tensors(directory).items() if hasattr(v, "tolist")}


def _read_all(directories: list[str]) -> list[dict]:
    return [_read(d) for d in directories]


def _weights(*step_dirs: Path) -> list[dict]:
    """Every tensor of each torch_dist checkpoint (model and optimizer), read on one rank (one process)."""
    from excitation_dist.testing import run_distributed

    out = run_distributed(_read_all, 1, [str(d) for d in step_dirs],
                          env={"OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1"}, timeout=300)[0]
    for step_dir, tensors in zip(step_dirs, out):
        assert any(k.startswith("decoder.") for k in tensors), f"no model tensors under {step_dir}"
    return out


def test_megatron_recipe_trains_and_resumes_exactly(tmp_path):
    full = _train(tmp_path, "full")
    out, _ = full.communicate(timeout=400)
    assert full.returncode == 0, out
    assert "backend megatron" in out and "step      6/6 | loss" in out and "validation loss" in out, out

    broken = _train(tmp_path, "resumed")
    seen = []
    for line in broken.stdout:
        seen.append(line)
        if "saved" in line and "step_00000003" in line:
            os.killpg(broken.pid, signal.SIGKILL)
            break
    broken.wait(timeout=60)
    assert broken.returncode != 0, "".join(seen)
    again = _train(tmp_path, "resumed")
    out2, _ = again.communicate(timeout=400)
    assert again.returncode == 0, out2
    assert "resumed from" in out2

    a, b = _weights(tmp_path / "full" / "ckpt" / "step_00000006", tmp_path / "resumed" / "ckpt" / "step_00000006")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key], key  # bit-identical
