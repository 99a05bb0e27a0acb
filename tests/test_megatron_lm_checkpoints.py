"""Megatron-LM's own checkpoints (``pretrain_gpt``, torch_dist) carry Excitation's state.

Megatron-LM 0.19.2's loop over gloo on CPU, 2 ranks, EP 2, mock data:

- a run killed inside its iteration-4 save (after the shards were written, before
  Megatron's tracker file names them) resumes from iteration 2 and ends with the
  uninterrupted run's Excitation state (step, utilization EMA, last counts),
  bit-identical weights and bit-identical optimizer state (main parameters, Adam
  moments and step): the DistributedOptimizer on torch's own Adam (no Transformer
  Engine or apex), whose resume megatron-core breaks (no load template for a
  fresh optimizer, Adam's step reset to 0, then one step tensor shared by all
  parameters), see :mod:`excitation_dist.megatron.optimizer_state`;
- resuming with another Excitation strategy is refused before training;
- a checkpoint written without Excitation: ``--excitation-require-state`` refuses,
  without it Excitation starts fresh and says so; on a pipeline whose first stage holds
  only a dense layer (PP 2, EP 1), saved and resumed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from excitation_dist.testing import run_distributed
from tests.megatron_support import ENV
from tests.process_support import tag_runs
from tests.test_megatron_0192 import PRETRAIN_ARGS, megatron_0192  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_leftovers(monkeypatch):
    """A SIGKILLed rank's checkpoint-writer process dies with the test (tests/process_support.py)."""
    yield from tag_runs(monkeypatch)


def _set(argv: list[str], flag: str, value: str | None) -> list[str]:
    """``argv`` with ``flag`` set to ``value`` (None: removed; flags without a value: pass "")."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == flag:
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            continue
        out.append(a)
    if value is not None:
        out += [flag] + ([value] if value else [])
    return out


def _args(tmp, *, iters: int, save: str | None = None, load: str | None = None, excitation: str | None = "positivesum",
          extra: tuple[str, ...] = ()) -> list[str]:
    argv = _set(PRETRAIN_ARGS, "--train-iters", str(iters))
    argv = _set(argv, "--excitation-strategy", excitation)
    argv = _set(argv, "--excitation-gamma", "1.0" if excitation else None)
    if excitation:
        argv += ["--excitation-utilization-ema", "0.5"]
    # dropout off: on CPU Megatron-LM's resume does not restore the dropout RNG stream (its CUDA RNG tracker),
    # so even without Excitation a resumed run then differs from the uninterrupted one after the resume
    argv += ["--lr-decay-style", "constant", "--save-interval", "2", "--ckpt-format", "torch_dist",
             "--hidden-dropout", "0", "--attention-dropout", "0"]
    if save:
        argv += ["--save", str(tmp / save)]
    if load:
        argv += ["--load", str(tmp / load)]
    return argv + list(extra)


DRIVER = """
import os, sys
sys.path.insert(0, {megatron!r})
from excitation_dist.recipe import pretrain_gpt


def main():
    die_at = int(os.environ.get("DIE_IN_SAVE_AT", "0"))
    if die_at:
        pretrain_gpt.use_megatron_with_training_loop()
        from excitation_dist.megatron import cpu_patches

        cpu_patches.apply(training_loop=True)  # before megatron.core's first import, as main() does
        from megatron.core import dist_checkpointing

        save = dist_checkpointing.save

        def save_then_die(state_dict, checkpoint_dir, *a, **kw):
            result = save(state_dict, checkpoint_dir, *a, **kw)
            if str(checkpoint_dir).rstrip("/").endswith(f"iter_{{die_at:07d}}"):
                os._exit(9)  # the shards are written; Megatron has not yet pointed its tracker at them
            return result

        dist_checkpointing.save = save_then_die
    pretrain_gpt.main(sys.argv[1:], cpu=True)


if __name__ == "__main__":  # Megatron's checkpoint writer starts processes
    main()
"""


def _torchrun(tmp, megatron: str, argv: list[str], die_in_save_at: int = 0) -> subprocess.CompletedProcess:
    driver = tmp / "driver.py"
    driver.write_text(DRIVER.format(megatron=megatron))
    env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT), "DIE_IN_SAVE_AT": str(die_in_save_at)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(driver), *argv]
    log = tmp / f"torchrun-{len(list(tmp.glob('torchrun-*.log')))}.log"
    with open(log, "w") as out:  # a file, not a pipe: a killed rank's checkpoint-writer process may outlive it
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=600)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever the run left behind
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(cmd, proc.returncode, log.read_text(), "")


def _read(megatron_path: str, directory: str):
    """(Excitation state, every plain tensor, Adam steps) of a torch_dist checkpoint.

    The plain tensors are the model's weights and, with the DistributedOptimizer
    saved ``fully_reshardable``, its fp32 main parameters, ``exp_avg`` and
    ``exp_avg_sq`` per parameter (``optimizer.state.<kind>.<weight>``); the Adam
    steps: chained optimizer -> the ``step`` of each param group (where the
    DistributedOptimizer saves torch Adam's per-parameter step)."""
    sys.path.insert(0, megatron_path)
    from excitation_dist.recipe import pretrain_gpt

    pretrain_gpt.use_megatron_with_training_loop()
    from excitation_dist.megatron import cpu_patches

    cpu_patches.apply(training_loop=True)  # before megatron.core's first import
    from megatron.core import dist_checkpointing

    from excitation_dist.megatron import checkpointing

    tensors = dist_checkpointing.load_plain_tensors(directory)
    state = checkpointing.read_excitation_state(directory) or {"common": None, "layers": {}}
    layers = {n: None if row is None else row.tolist() for n, row in state["layers"].items()}
    optimizers = dist_checkpointing.load_common_state_dict(directory).get("optimizer") or {}
    steps = {i: [g.get("step") for g in o["optimizer"]["param_groups"]] for i, o in optimizers.items()
             if isinstance(o, dict) and isinstance(o.get("optimizer"), dict)}
    # plain values: tensors would travel back through shared memory the exiting worker takes with it
    return {**state, "layers": layers}, {k: v.tolist() for k, v in tensors.items() if hasattr(v, "tolist")}, steps


def _read_all(megatron_path: str, directories: list[str]):
    return [_read(megatron_path, d) for d in directories]


def _checkpoints(megatron: str, *directories):
    """:func:`_read` of each directory, in one process (Megatron-LM imported once)."""
    return run_distributed(_read_all, 1, megatron, [str(d) for d in directories], env=ENV, timeout=300)[0]


def test_megatron_lm_checkpoint_killed_in_save_resumes_excitation_exactly(megatron_0192, tmp_path):  # noqa: F811
    # the DistributedOptimizer; the killed run writes iteration 2 in Megatron-LM's default format (dp_reshardable:
    # buckets whose padding is uninitialized memory), the resumed and the uninterrupted run save per parameter
    # (fully_reshardable), so that every optimizer tensor can be compared bit for bit
    dist_opt = ("--use-distributed-optimizer",)
    per_param = dist_opt + ("--dist-ckpt-optim-fully-reshardable",)
    full = _torchrun(tmp_path, megatron_0192, _args(tmp_path, iters=4, save="full", extra=per_param))
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-5000:]

    broken = _torchrun(tmp_path, megatron_0192, _args(tmp_path, iters=4, save="b", extra=dist_opt), die_in_save_at=4)
    assert broken.returncode != 0
    assert (tmp_path / "b" / "iter_0000004").is_dir(), broken.stdout[-4000:]  # written, but never named by the tracker
    assert (tmp_path / "b" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"

    resumed = _torchrun(tmp_path, megatron_0192, _args(tmp_path, iters=4, save="b", load="b", extra=per_param))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert "Excitation resumed from" in resumed.stdout and "iter_0000002 at its step 2" in resumed.stdout

    (state_a, tensors_a, steps_a), (state_b, tensors_b, steps_b) = _checkpoints(
        megatron_0192, tmp_path / "full" / "iter_0000004", tmp_path / "b" / "iter_0000004")
    assert state_a["common"]["step"] == state_b["common"]["step"] == 4
    weights = [k for k in tensors_a if not k.startswith("optimizer")]
    assert tensors_a.keys() == tensors_b.keys() and any(".experts." in k for k in weights), sorted(tensors_a)
    for kind in ("param", "exp_avg", "exp_avg_sq"):  # every weight's main parameter and Adam moments
        assert all(f"optimizer.state.{kind}.{k}" in tensors_a for k in weights), (kind, sorted(tensors_a))
    for key, value in tensors_a.items():
        assert value == tensors_b[key], key  # bit-identical
    # Adam's step, 4 for every parameter of the dense and the expert optimizer (a load that reset it to 0 saves 2;
    # a step tensor shared by all parameters counts once per parameter per step: 28 and 16 here)
    assert len(steps_a) == 2 and all(step == 4 for groups in steps_a.values() for step in groups), steps_a
    assert steps_b == steps_a
    assert list(state_a["layers"]) == [1, 2]  # both MoE layers, by global layer number
    for n, row in state_a["layers"].items():
        assert row is not None and row == state_b["layers"][n], n

    other = _torchrun(tmp_path, megatron_0192,
                      _args(tmp_path, iters=4, save="b", load="b", excitation="zerosum", extra=dist_opt))
    assert other.returncode != 0
    assert "trained with Excitation strategy 'positivesum', this run asks for 'zerosum'" in other.stdout + other.stderr
    assert (tmp_path / "b" / "latest_checkpointed_iteration.txt").read_text().strip() == "4"  # nothing written


def test_megatron_lm_checkpoints_without_excitation_state_and_with_a_dense_first_pipeline_stage(
        megatron_0192, tmp_path):  # noqa: F811
    """PP 2 on 2 ranks (EP 1), stage 0 holds one dense layer, stage 1 two MoE layers: global rank 0 has no
    Excitation controller, so rank 1 (the first rank with MoE layers) writes Excitation's common state. When only
    global rank 0 wrote it, ``--save`` failed with ``CheckpointingException: Invalid access pattern:
    1 ShardedObject are missing``. One chain of a 6-iteration run (the LR schedule must match for each resume),
    each part stopped by ``--exit-interval``:

    1. iterations 1-2 without Excitation, saved at 2;
    2. resumed with Excitation and ``--excitation-require-state``: refused, nothing written;
    3. resumed with Excitation: it starts fresh and says so; saved at 4 (Excitation's step 2);
    4. resumed from 4 to 6: Excitation resumed (said by stage 1's first rank), saved at 6 (its step 4)."""

    def dense_first(argv: list[str]) -> list[str]:
        for flag, value in (("--num-layers", "3"), ("--expert-model-parallel-size", "1"),
                            ("--pipeline-model-parallel-size", "2"), ("--decoder-first-pipeline-num-layers", "1"),
                            ("--moe-layer-freq", "[0,1,1]")):
            argv = _set(argv, flag, value)
        return argv

    def run(*extra: str, excitation: str | None = "positivesum", load: str | None = "ckpt"):
        argv = dense_first(_args(tmp_path, iters=6, save="ckpt", load=load, excitation=excitation, extra=extra))
        return _torchrun(tmp_path, megatron_0192, argv)

    latest = tmp_path / "ckpt" / "latest_checkpointed_iteration.txt"
    base = run("--exit-interval", "2", excitation=None, load=None)
    assert base.returncode == 0, base.stdout[-5000:]
    assert latest.read_text().strip() == "2"

    refused = run("--excitation-require-state")
    assert refused.returncode != 0
    assert "holds no Excitation state and --excitation-require-state is set" in refused.stdout + refused.stderr
    assert latest.read_text().strip() == "2" and sorted(p.name for p in latest.parent.glob("iter_*")) == \
        ["iter_0000002"]

    fresh = run("--exit-interval", "4")
    assert fresh.returncode == 0, fresh.stdout[-5000:]
    assert "holds no Excitation state: Excitation starts fresh" in fresh.stdout
    assert latest.read_text().strip() == "4"

    resumed = run()
    # both checkpoints read in one process, after the resumed run (which leaves iteration 4's in place)
    iterations = ("iter_0000004", "iter_0000006") if resumed.returncode == 0 else ("iter_0000004",)
    (state, _, _), *after = _checkpoints(megatron_0192, *(tmp_path / "ckpt" / i for i in iterations))
    assert state["common"]["step"] == 2, state["common"]  # iterations 3 and 4 only
    assert state["common"]["config"]["strategy"] == "positivesum", state["common"]
    assert list(state["layers"]) == [2, 3] and all(row is not None for row in state["layers"].values()), state

    assert resumed.returncode == 0, resumed.stdout[-5000:]
    assert "Excitation resumed from" in resumed.stdout  # said by stage 1's first rank (global rank 0 has no MoE layer)
    assert latest.read_text().strip() == "6"
    [(state, _, _)] = after
    assert state["common"]["step"] == 4, state["common"]  # resumed at step 2 (starting fresh would save 2)
    assert list(state["layers"]) == [2, 3] and all(row is not None for row in state["layers"].values()), state
