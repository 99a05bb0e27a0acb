"""``excitation-dist train`` with ``backend: megatron`` (megatron-core 0.16.1, 2 CPU
processes, EP 2, DistributedOptimizer): progress, validation, and megatron-core
``dist_checkpointing`` (torch_dist) checkpoints. A run killed inside a save, then
killed again after a later save, resumes to the uninterrupted run's losses and
exactly its weights and optimizer state; a checkpoint written on 2 ranks resumes
on 1 rank (EP 1) and on 4 ranks (EP 4); a layout that cannot load is refused;
with megatron-core's overlapped parameter all-gather a checkpoint holds the
weights of the step it was written after, and resumes bit-exactly."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

from excitation_dist.testing import run_distributed  # noqa: E402
from excitation_dist.recipe.metrics_log import read_metrics  # noqa: E402
from excitation_dist.recipe.run_lock import LOCK_FILE  # noqa: E402
from tests.megatron_support import ENV  # noqa: E402
from tests.process_support import tag_runs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny_cpu.yaml")
COMMON = ["backend=megatron", "schedule.train_steps=6", "schedule.warmup_steps=1", "schedule.eval_interval=0",
          "logging.interval=1", "checkpoint.interval=2", "checkpoint.keep_last=3", "model.hidden_size=32",
          "model.moe.ffn_hidden_size=32", "model.seq_length=32", "parallel.expert_parallel=2",
          "parallel.distributed_optimizer=true", "excitation.utilization_ema=0.5"]


@pytest.fixture(autouse=True)
def _no_leftovers(monkeypatch):
    """A SIGKILLed rank's checkpoint-writer process dies with the test (tests/process_support.py)."""
    yield from tag_runs(monkeypatch)


KILL_IN_PUBLISH = """
import os, signal
from excitation_dist.recipe import checkpoint

_publish = checkpoint.CheckpointManager.publish


def publish(self, step, *a, **kw):
    if step == int(os.environ["KILL_IN_PUBLISH_AT"]):  # every rank wrote its shards; nothing is published
        os.killpg(os.getpgrp(), signal.SIGKILL)
    return _publish(self, step, *a, **kw)


checkpoint.CheckpointManager.publish = publish
"""

# megatron-core's overlapped parameter all-gather (DDP overlap_param_gather with the DistributedOptimizer), which
# the recipe turns on only on GPU (excitation_dist.recipe.fast_paths); it runs over gloo on CPU too
FORCE_OVERLAP_PARAM_GATHER = """
import dataclasses
from excitation_dist.recipe import fast_paths
from excitation_dist.recipe.backends import megatron

_resolve, _init = fast_paths.resolve, megatron.MegatronBackend.__init__


def resolve(cfg, env=None):
    fast = _resolve(cfg, env)
    if not fast.distributed_optimizer:
        return fast
    return dataclasses.replace(fast, overlap_param_gather=True,
                               fallbacks=[f for f in fast.fallbacks if f[0] != "overlap_param_gather"])


def init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    print(f"test hook: overlap_param_gather={self.model.ddp_config.overlap_param_gather}", flush=True)


fast_paths.resolve = resolve
megatron.MegatronBackend.__init__ = init
"""


def _train(tmp: Path, name: str, *extra: str, env: dict | None = None,
           kill_once_saved: str | None = None) -> subprocess.CompletedProcess:
    """Run the recipe to its end, or SIGKILL its whole process group once it says it saved
    the checkpoint ``kill_once_saved`` (a directory name such as ``step_00000004``)."""
    args = [sys.executable, "-m", "excitation_dist.cli", "train", CONFIG, *COMMON,
            f"checkpoint.dir={tmp / name / 'ckpt'}", f"logging.dir={tmp / name / 'log'}", *extra]
    log = tmp / f"{name}.log"
    start = log.stat().st_size if log.exists() else 0
    with open(log, "a") as out:  # a file, not a pipe: a killed rank's checkpoint writer may outlive it
        proc = subprocess.Popen(args, cwd=tmp, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **ENV, **(env or {})})
        try:
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline:
                if kill_once_saved and any("saved" in line and kill_once_saved in line
                                           for line in log.read_text()[start:].splitlines()):
                    break
                time.sleep(0.1)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever the run left behind, or the kill asked for
            except ProcessLookupError:
                pass
            proc.wait()
    return subprocess.CompletedProcess(args, proc.returncode, log.read_text()[start:], "")


def _hooked(tmp: Path, sitecustomize: str, **env: str) -> dict:
    """The environment of a run whose processes execute ``sitecustomize`` at start."""
    hook = tmp / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(sitecustomize)
    return {"PYTHONPATH": os.pathsep.join([str(hook), str(ROOT), os.environ.get("PYTHONPATH", "")]), **env}


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "log") if "loss" in r}


def _from(tmp: Path, source: Path, name: str) -> None:
    """A run directory whose only checkpoint is ``source``."""
    root = tmp / name / "ckpt"
    root.mkdir(parents=True)
    shutil.copytree(source, root / source.name)
    (root / "latest").write_text(source.name + "\n")


def _read(directory: str):
    from excitation_dist.megatron import cpu_patches

    cpu_patches.apply()
    from excitation_dist.megatron import checkpointing

    state = checkpointing.read_excitation_state(directory)
    return {"step": state["common"]["step"],
            "layers": {n: None if row is None else row.tolist() for n, row in state["layers"].items()}}


def _read_all(directories: list[str]) -> list[dict]:
    return [_read(d) for d in directories]


def _excitation(*directories: Path) -> list[dict]:
    """Excitation's state in each checkpoint directory, read in one process (megatron-core imported once)."""
    return run_distributed(_read_all, 1, [str(d) for d in directories], env=ENV, timeout=300)[0]


def _plain_tensors(directory: str) -> dict:
    """Every plain tensor of a torch_dist checkpoint (megatron-core's reader, in a worker process)."""
    from excitation_dist.megatron import cpu_patches

    cpu_patches.apply()
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_plain_tensors(directory)


def _stale(directory: str) -> tuple[list[str], list[str]]:
    """(every model tensor, those that differ from the optimizer's main parameter
    cast to the model's dtype) in a checkpoint of the megatron backend."""
    import torch

    tensors = _plain_tensors(directory)
    model = sorted(k for k, v in tensors.items() if torch.is_tensor(v) and not k.startswith("optimizer."))
    main = {k: tensors[f"optimizer.state.param.{k}"] for k in model}  # fully_reshardable: keyed like the model
    return model, [k for k in model if not torch.equal(tensors[k], main[k].to(tensors[k].dtype))]


VALIDATION = ("schedule.eval_interval=3",)  # the uninterrupted run and the killed-twice run that resumes to it


def _read_state_and_tensors(directories: list[str]) -> list:
    """(Excitation state, every plain tensor as lists: weights, the optimizer's main parameters and Adam moments)."""
    return [(_read(d), {k: v.tolist() for k, v in _plain_tensors(d).items() if hasattr(v, "tolist")})
            for d in directories]


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> Path:
    """The directory of the uninterrupted 6-step run (trained once for the tests that compare with it)."""
    tmp = tmp_path_factory.mktemp("megatron_full")
    run = _train(tmp, "full", *VALIDATION)
    assert run.returncode == 0, run.stdout[-5000:]
    assert "backend megatron" in run.stdout and "step      6/6 | loss" in run.stdout, run.stdout[-5000:]
    assert "step      3 | validation loss" in run.stdout and "step      6 | validation loss" in run.stdout
    return tmp / "full"


def test_megatron_checkpoint_resumes_on_1_and_4_ranks(full, tmp_path):
    step4 = full / "ckpt" / "step_00000004"
    assert (step4 / "metadata.json").is_file() and not list(step4.glob("rank*.pt"))  # torch_dist, not pickles
    a = _losses(full)

    _from(tmp_path, step4, "one")  # 1 rank: EP 1, two micro-batches of 8 per step
    one = _train(tmp_path, "one", "parallel.gpus_per_node=1", "parallel.expert_parallel=1")
    assert one.returncode == 0, one.stdout[-5000:]
    assert "resumed from" in one.stdout and "(step 4)" in one.stdout
    assert "written on another layout" in one.stdout and "not restored" in one.stdout  # per-rank RNG: one line

    _from(tmp_path, step4, "four")  # 4 ranks: EP 4, one micro-batch of 4 per rank
    four = _train(tmp_path, "four", "parallel.gpus_per_node=4", "parallel.expert_parallel=4",
                  "schedule.micro_batch_size=4")
    assert four.returncode == 0, four.stdout[-5000:]

    b, c = _losses(tmp_path / "one"), _losses(tmp_path / "four")
    assert set(b) == set(c) == {5, 6}
    # step 5's loss is the forward of the loaded weights: only the order of float sums differs
    assert b[5] == pytest.approx(a[5], rel=1e-5, abs=0) and c[5] == pytest.approx(a[5], rel=1e-5, abs=0), (a, b, c)
    # step 6 follows one update on the new layout: megatron-core computes the aux loss (coef 0.01) per micro-batch
    # and rank, over another set of tokens per expert-parallel group, so the update moves slightly (measured: 8e-4
    # relative); a restarted optimizer or Excitation (fresh Adam moments, phi from a fresh EMA) moves it far more
    assert b[6] == pytest.approx(a[6], rel=2e-3, abs=0) and c[6] == pytest.approx(a[6], rel=2e-3, abs=0), (a, b, c)

    full6, *resumed_states = _excitation(*(run / "ckpt" / "step_00000006" for run in (full, tmp_path / "one",
                                                                                      tmp_path / "four")))
    for name, resumed in zip(("one", "four"), resumed_states):
        assert resumed["step"] == full6["step"] == 6, name  # Excitation's step carried over
        assert resumed["layers"].keys() == full6["layers"].keys() == {1, 2}
        for n, row in full6["layers"].items():  # its utilization EMA too (a fresh one would start at 1/E)
            assert row is not None and resumed["layers"][n] == pytest.approx(row, rel=1e-3, abs=1e-6), (name, n)

    # a layout whose optimizer state cannot load: refused before training, nothing written
    _from(tmp_path, step4, "refused")
    refused = _train(tmp_path, "refused", "parallel.distributed_optimizer=false")
    assert refused.returncode != 0
    assert ("cannot resume from checkpoint" in refused.stdout
            and "parallel.distributed_optimizer was True when it was written, this run has False" in refused.stdout
            and "Resume with the settings that wrote it" in refused.stdout), refused.stdout[-5000:]
    assert "step      5/6" not in refused.stdout
    written = sorted(p.name for p in (tmp_path / "refused" / "ckpt").iterdir() if p.name != LOCK_FILE)
    assert written == ["latest", "step_00000004"]  # the launcher's lock file aside


def test_megatron_killed_inside_a_save_then_after_a_save_resumes_exactly(full, tmp_path):
    # killed inside the step-4 save: every rank wrote its shards, nothing is published
    broken = _train(tmp_path, "resumed", *VALIDATION, env=_hooked(tmp_path, KILL_IN_PUBLISH, KILL_IN_PUBLISH_AT="4"))
    assert broken.returncode != 0
    root = tmp_path / "resumed" / "ckpt"
    assert (root / ".staging-step_00000004" / "metadata.json").is_file()  # written, never published
    assert (root / "latest").read_text().strip() == "step_00000002"

    # resumed from step 2, killed (SIGKILL, whole process group) once it saved step 4
    killed = _train(tmp_path, "resumed", *VALIDATION, kill_once_saved="step_00000004")
    assert killed.returncode != 0 and "step_00000002 (step 2)" in killed.stdout, killed.stdout[-5000:]
    assert "not restored" not in killed.stdout  # same layout: every rank's RNG state restored
    assert (root / "latest").read_text().strip() == "step_00000004"

    again = _train(tmp_path, "resumed", *VALIDATION)
    assert again.returncode == 0, again.stdout[-5000:]
    assert "resumed from" in again.stdout and "step_00000004 (step 4)" in again.stdout
    a, b = _losses(full), _losses(tmp_path / "resumed")
    assert sorted(a) == list(range(1, 7)) and set(b) == set(a)
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]  # bit-exact

    # the last checkpoints hold the same Excitation state, weights and optimizer state, bit for bit
    (state_a, tensors_a), (state_b, tensors_b) = run_distributed(
        _read_state_and_tensors, 1, [str(run / "ckpt" / "step_00000006") for run in (full, tmp_path / "resumed")],
        env=ENV, timeout=300)[0]
    assert state_a == state_b and state_a["step"] == 6
    assert tensors_a.keys() == tensors_b.keys() and any(k.startswith("decoder.") for k in tensors_a)
    assert any(k.startswith("optimizer.state.exp_avg.") for k in tensors_a), sorted(tensors_a)
    for key, value in tensors_a.items():
        assert value == tensors_b[key], key


def test_megatron_resumes_a_checkpoint_without_excitation_state_with_excitation_fresh(tmp_path):
    """A checkpoint written with Excitation off loads into a run with Excitation on:
    model and optimizer resume, Excitation starts at step 0 (the loop's note says so).
    One rank (EP 1): whether the checkpoint holds Excitation's sharded state is decided
    the same way on every rank."""
    one = ("parallel.gpus_per_node=1", "parallel.expert_parallel=1")
    off = _train(tmp_path, "run", *one, "excitation.strategy=none", "schedule.train_steps=2")
    assert off.returncode == 0, off.stdout[-5000:]
    on = _train(tmp_path, "run", *one, "schedule.train_steps=4")
    assert on.returncode == 0, on.stdout[-5000:]
    assert "resumed from" in on.stdout and "step_00000002 (step 2)" in on.stdout
    assert "Excitation starts fresh" in on.stdout
    [state] = _excitation(tmp_path / "run" / "ckpt" / "step_00000004")
    assert state["step"] == 2  # counted from the resume, not from the run's start
    assert all(row is not None for row in state["layers"].values())


def test_megatron_checkpoint_under_overlap_param_gather_holds_the_stepped_weights(tmp_path):
    """With megatron-core's overlapped parameter all-gather, each data-parallel rank
    holds after ``optimizer.step()`` the updated values of its own shard only,
    until the next forward's pre-hooks gather the rest. A save (no evaluation
    forward before it: evaluation off) must sync them first: its weights equal the
    optimizer's main parameters of that step (bf16 copies; the DistributedOptimizer
    splits the dense parameters between the 2 data-parallel ranks), and a resume
    continues bit-exactly (its first forward would otherwise run on weights one
    step old)."""
    env = _hooked(tmp_path, FORCE_OVERLAP_PARAM_GATHER)
    settings = ("precision=bf16", "schedule.train_steps=4")
    full = _train(tmp_path, "full", *settings, env=env)
    assert full.returncode == 0, full.stdout[-5000:]
    assert "test hook: overlap_param_gather=True" in full.stdout, full.stdout[-5000:]
    step2 = tmp_path / "full" / "ckpt" / "step_00000002"
    model, stale = run_distributed(_stale, 1, str(step2), env=ENV, timeout=300)[0]
    assert any(k.startswith("embedding.") for k in model) and any(".experts." in k for k in model), model
    assert stale == [], f"saved one step stale: {stale}"

    _from(tmp_path, step2, "resumed")
    resumed = _train(tmp_path, "resumed", *settings, env=env)
    assert resumed.returncode == 0, resumed.stdout[-5000:]
    assert "resumed from" in resumed.stdout and "step_00000002 (step 2" in resumed.stdout, resumed.stdout[-5000:]
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert sorted(b) == [3, 4] and all(b[s] == a[s] for s in b), (a, b)  # bit-exact
