"""Atomic checkpoints: a save killed mid-way never loads as valid."""

import os
import signal
import subprocess
import sys

import pytest

from excitation_dist.recipe.checkpoint import CheckpointManager


def _save(mgr, step, payload):
    staging = mgr.prepare(step)
    (staging / "model.pt").write_text(payload)
    return mgr.publish(step, {"note": payload})


def test_publish_latest_and_prune(tmp_path):
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    assert mgr.latest() is None
    for step in (10, 20, 30):
        _save(mgr, step, f"weights-{step}")
    assert mgr.latest().name == "step_00000030"
    assert [p.name for p in mgr.complete_checkpoints()] == ["step_00000020", "step_00000030"]
    assert mgr.step_of(mgr.latest()) == 30
    assert (mgr.latest() / "model.pt").read_text() == "weights-30"


def test_kill_during_save_leaves_previous_checkpoint_latest(tmp_path):
    root = tmp_path / "ckpt"
    mgr = CheckpointManager(root)
    _save(mgr, 10, "good")
    # a real process killed with SIGKILL while it writes step 20
    code = (
        "import sys, time\n"
        "from excitation_dist.recipe.checkpoint import CheckpointManager\n"
        f"mgr = CheckpointManager({str(root)!r})\n"
        "staging = mgr.prepare(20)\n"
        "(staging / 'model.pt').write_text('half')\n"
        "print('writing', flush=True)\n"
        "time.sleep(60)\n"
        "mgr.publish(20)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert mgr.latest().name == "step_00000010"
    assert (mgr.latest() / "model.pt").read_text() == "good"
    assert [p.name for p in mgr.complete_checkpoints()] == ["step_00000010"]
    # the next save cleans the leftover staging directory
    _save(mgr, 30, "next")
    assert not list(root.glob(".staging-*")) and mgr.latest().name == "step_00000030"


def test_latest_pointer_to_incomplete_dir_is_ignored(tmp_path):
    mgr = CheckpointManager(tmp_path)
    _save(mgr, 1, "a")
    (tmp_path / "step_00000002").mkdir()  # no COMPLETE marker
    (tmp_path / "latest").write_text("step_00000002\n")
    assert mgr.latest().name == "step_00000001"
    with pytest.raises(FileNotFoundError, match="prepare"):
        mgr.publish(5)


def test_complete_record_holds_what_a_resume_must_agree_with(tmp_path):
    from excitation_dist.recipe.checkpoint import holds_excitation_state, read_metadata, resume_metadata
    from excitation_dist.recipe.config import load_run_config

    config = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny_cpu.yaml")
    cfg = load_run_config(config, ["model.moe.num_experts=4", "parallel.zero_stage=2"])
    mgr = CheckpointManager(tmp_path)
    mgr.prepare(10)
    path = mgr.publish(10, resume_metadata(cfg, excitation_state=True))
    meta = read_metadata(path)
    assert meta["step"] == 10 and meta["resume_metadata"] == 1 and meta["backend"] == "deepspeed"
    assert meta["model"]["moe"]["num_experts"] == 4 and meta["model"]["hidden_size"] == 64
    assert meta["excitation"]["strategy"] == "zerosum" and meta["excitation_state"] is True
    assert meta["parallel"] == {"world_size": 2, "data_parallel": 2, "tensor_parallel": 1, "pipeline_parallel": 1,
                                "context_parallel": 1, "expert_parallel": 2, "expert_tensor_parallel": 1,
                                "zero_stage": 2}
    assert meta["precision"] == "fp32" and holds_excitation_state(meta) is True

    off = resume_metadata(load_run_config(config, ["excitation.strategy=none"]), excitation_state=True)
    assert off["excitation"] is None and holds_excitation_state(off) is False
    assert holds_excitation_state({"step": 3, "world_size": 2}) is None  # written before the records


def test_complete_record_holds_the_data_position_when_given(tmp_path):
    from excitation_dist.recipe.checkpoint import read_metadata, resume_metadata
    from excitation_dist.recipe.config import load_run_config
    from excitation_dist.recipe.data import TrainPosition, data_record

    config = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny_cpu_torch.yaml")
    cfg = load_run_config(config, ["schedule.global_batch_size=32", "seed=7"])
    resumed = TrainPosition(step=4, consumed=64, num_samples=64 + 196 * 32)  # 4 steps of 16, then 32 per step
    mgr = CheckpointManager(tmp_path)
    mgr.prepare(10)
    meta = read_metadata(mgr.publish(10, resume_metadata(cfg, excitation_state=True,
                                                         data=data_record(cfg, resumed, 10, plan=None))))
    assert meta["data"] == {"consumed_samples": 64 + 6 * 32, "seed": 7, "data.path": "embedded",
                            "data.split": "98,2,0", "model.seq_length": 64, "num_samples": 64 + 196 * 32,
                            "epochs": None, "global_batch_size": 32, "train_steps": 200}
    assert "data" not in resume_metadata(cfg, excitation_state=True)  # a resume then reads from step x batch
