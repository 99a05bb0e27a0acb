"""excitation-dist train with ``backend: fsdp2`` end to end (CPU, gloo): a 2-rank run trains, logs and writes
torch.distributed.checkpoint (DCP) checkpoints; a run killed while saving resumes bit for bit; a checkpoint
saved on 4 ranks resumes on 2 (DCP reshards) with the state equal after load."""

import json
import shutil
import signal
from pathlib import Path

import pytest
import torch

from tests.test_recipe_train import _kill_in_save_env, _losses, _train, hooked_env

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny_cpu_fsdp2.yaml")
STEPS = 12
COMMON = [f"schedule.train_steps={STEPS}", "schedule.warmup_steps=2", "schedule.eval_interval=0",
          "logging.interval=1", "checkpoint.interval=6", "model.num_layers=2", "model.hidden_size=32",
          "model.moe.ffn_hidden_size=32", "model.seq_length=32"]
FOUR_RANKS = ["parallel.gpus_per_node=4", "schedule.micro_batch_size=4"]  # global batch 16 = 4 ranks x 4


def _run(tmp, name, *extra, env=None, timeout=300):
    proc = _train(tmp, name, *extra, config=CONFIG, common=COMMON, **({"env": env} if env else {}))
    out, _ = proc.communicate(timeout=timeout)
    return proc, out


def _dcp_state(step_dir: Path, tmp: Path) -> dict:
    """A DCP checkpoint as one plain (unsharded) state dict, read in this process without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{step_dir.parent.parent.name}_{step_dir.name}.pt"
    dcp_to_torch_save(step_dir, out)
    state = torch.load(out, weights_only=False)
    state["excitation"].seek(0)  # Excitation's state: one bytes item
    state["excitation"] = torch.load(state["excitation"], weights_only=False)
    return state


def _tensors(tree, prefix=""):
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_tensors(value, f"{prefix}/{key}"))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for i, value in enumerate(tree):
            out.update(_tensors(value, f"{prefix}/{i}"))
        return out
    return {}


def _assert_equal_states(a: dict, b: dict) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta and ta.keys() == tb.keys(), sorted(set(ta) ^ set(tb))
    for key, value in ta.items():
        assert torch.equal(value, tb[key]), key


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """The uninterrupted 2-rank run (trained once for this module)."""
    tmp = tmp_path_factory.mktemp("fsdp2_full")
    proc, out = _run(tmp, "full")
    assert proc.returncode == 0, out
    return tmp / "full"


def test_two_ranks_train_log_and_write_dcp_checkpoints(full_run, tmp_path):
    metrics = [json.loads(line) for line in (full_run / "log" / "metrics.jsonl").read_text().splitlines()]
    losses = _losses(full_run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 0.5  # it learns
    last = [r for r in metrics if r.get("step") == STEPS and "loss" in r][-1]
    assert last["tokens_per_s"] > 0 and last["grad_norm"] > 0 and last["excitation/step"] == STEPS
    assert last["excitation/multiplier_mean"] == pytest.approx(1.0) and "multipliers_LE" in last  # ZeroSum
    ckpt = full_run / "ckpt" / f"step_{STEPS:08d}"
    names = {p.name for p in ckpt.iterdir()}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "COMPLETE"} <= names  # one shard file per rank
    record = json.loads((ckpt / "COMPLETE").read_text())
    assert record["backend"] == "fsdp2" and record["excitation_state"] is True and record["world_size"] == 2
    state = _dcp_state(ckpt, tmp_path)
    assert state["excitation"]["step"] == STEPS and state["excitation"]["shape"] == [2, 8]
    assert state["excitation"]["saved_at_step"] == STEPS
    experts = state["model"]["blocks.0.ffn.experts.w_in_EDF"]
    assert experts.shape == (8, 32, 32)  # whole (unsharded) tensors in the checkpoint's global view
    assert state["optimizer"]["state"]["blocks.0.ffn.experts.w_in_EDF"]["exp_avg"].shape == experts.shape


def test_killed_mid_save_resumes_exactly(full_run, tmp_path):
    """SIGKILL of every process while the step-12 checkpoint is being published (every rank wrote its DCP
    files): the staging directory is never loaded, the run resumes from step 6 and matches the uninterrupted
    run bit for bit (losses of every step, final model, optimizer and Excitation state)."""
    ckpt = tmp_path / "resumed" / "ckpt"
    broken, out = _run(tmp_path, "resumed", env=_kill_in_save_env(tmp_path, STEPS))
    assert broken.returncode == -signal.SIGKILL, out
    written = (tmp_path / "kill_record").read_text().split()
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= set(written) and "COMPLETE" not in written
    assert (ckpt / "latest").read_text().strip() == "step_00000006"

    again, out2 = _run(tmp_path, "resumed")
    assert again.returncode == 0, out2
    assert f"resumed from {ckpt / 'step_00000006'} (step 6)" in out2 and "step      7/12 | loss" in out2
    a, b = _losses(full_run), _losses(tmp_path / "resumed")
    assert set(a) == set(b) and all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]
    _assert_equal_states(_dcp_state(full_run / "ckpt" / "step_00000012", tmp_path),
                         _dcp_state(ckpt / "step_00000012", tmp_path))


# Test-only probe, installed through PYTHONPATH into every rank: after each save and load, every rank gathers the
# whole (unsharded) model and optimizer state and rank 0 writes it with Excitation's state to
# EXCITATION_TEST_STATE/{save_<step>|load}_<world>.pt.
_DUMP_STATE = """
import os

import torch
import torch.distributed as dist

from excitation_dist.recipe.backends import fsdp2 as _fsdp2


def _dump(backend, name):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model, optimizer = get_state_dict(backend.model, backend.optimizer, options=options)
    if dist.get_rank() == 0:
        path = os.path.join(os.environ["EXCITATION_TEST_STATE"], f"{name}_{dist.get_world_size()}.pt")
        torch.save({"model": model, "optimizer": optimizer, "excitation": backend.excitation.state_dict()}, path)


_save, _load = _fsdp2.FSDP2Backend.save, _fsdp2.FSDP2Backend.load


def save(self, directory, step):
    _save(self, directory, step)
    _dump(self, f"save_{step}")


def load(self, directory):
    _load(self, directory)
    _dump(self, "load")


_fsdp2.FSDP2Backend.save, _fsdp2.FSDP2Backend.load = save, load
"""


def _dump_state_env(tmp) -> dict[str, str]:
    (tmp / "states").mkdir(exist_ok=True)
    return hooked_env(tmp / "dump_state", _DUMP_STATE, EXCITATION_TEST_STATE=str(tmp / "states"))


def test_checkpoint_saved_on_four_ranks_resumes_on_two(full_run, tmp_path):
    """4 ranks train 12 steps; their step-6 checkpoint, resumed on 2 ranks (with gradient accumulation 2): the
    whole model, optimizer and Excitation state after the load equal what the 4 ranks saved, and the losses of
    steps 7-12 are close to the uninterrupted 2-rank run's (same samples, another summation order)."""
    env = _dump_state_env(tmp_path)
    four, out = _run(tmp_path, "four", *FOUR_RANKS, env=env)
    assert four.returncode == 0, out
    step6 = tmp_path / "four" / "ckpt" / "step_00000006"
    assert {p.name for p in step6.glob("__*.distcp")} == {f"__{r}_0.distcp" for r in range(4)}

    ckpt = tmp_path / "two" / "ckpt"
    ckpt.mkdir(parents=True)
    shutil.copytree(step6, ckpt / "step_00000006")
    (ckpt / "latest").write_text("step_00000006\n")
    two, out2 = _run(tmp_path, "two", "schedule.micro_batch_size=4", env=env)
    assert two.returncode == 0, out2
    assert "was written by 4 ranks, this run has 2: fine for backend fsdp2" in out2
    assert f"resumed from {ckpt / 'step_00000006'} (step 6)" in out2

    saved = torch.load(tmp_path / "states" / "save_6_4.pt", weights_only=False)
    loaded = torch.load(tmp_path / "states" / "load_2.pt", weights_only=False)
    _assert_equal_states(saved, loaded)
    assert saved["excitation"]["step"] == loaded["excitation"]["step"] == 6

    full, four_losses, resumed = _losses(full_run), _losses(tmp_path / "four"), _losses(tmp_path / "two")
    assert sorted(resumed) == list(range(7, STEPS + 1))
    # the resumed run reads the 4-sample micro-batches the 4 ranks read (per-micro-batch load-balancing loss):
    # it continues the 4-rank run, up to the summation order of the gradients
    for step in resumed:
        assert resumed[step] == pytest.approx(four_losses[step], abs=1e-4), step
    for step in range(1, STEPS + 1):  # 2 ranks of 8 samples: the same samples, another load-balancing loss
        assert four_losses[step] == pytest.approx(full[step], abs=2e-2), step


def test_expert_parallel_two_ranks_computes_the_data_parallel_run(full_run, tmp_path):
    """parallel.expert_parallel=2: each rank holds half the experts and tokens go all-to-all to them. The same
    samples per rank and the same initial weights as the data-parallel run, so the same losses up to the
    summation order of the gradients; its step-6 checkpoint (experts Shard(0) over ep) resumes without expert
    parallelism (DCP reshards) and continues the same run."""
    proc, out = _run(tmp_path, "ep", "parallel.expert_parallel=2")
    assert proc.returncode == 0, out
    ep, dp = _losses(tmp_path / "ep"), _losses(full_run)
    assert sorted(ep) == sorted(dp) == list(range(1, STEPS + 1))
    for step in dp:
        assert ep[step] == pytest.approx(dp[step], abs=1e-4), step

    ckpt = tmp_path / "resumed" / "ckpt"
    ckpt.mkdir(parents=True)
    shutil.copytree(tmp_path / "ep" / "ckpt" / "step_00000006", ckpt / "step_00000006")
    (ckpt / "latest").write_text("step_00000006\n")
    proc, out = _run(tmp_path, "resumed")
    assert proc.returncode == 0, out
    assert f"resumed from {ckpt / 'step_00000006'} (step 6)" in out
    resumed = _losses(tmp_path / "resumed")
    assert sorted(resumed) == list(range(7, STEPS + 1))
    for step in resumed:
        assert resumed[step] == pytest.approx(dp[step], abs=1e-4), step
    from excitation_dist.recipe.config import load_run_config

    cfg = load_run_config(CONFIG, ["parallel.expert_parallel=2"])
    assert cfg.backend == "fsdp2" and cfg.parallel.world_size == 2 and cfg.device == "cpu"
