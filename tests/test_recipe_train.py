"""excitation-dist train end to end (backends torch and deepspeed, 2 CPU
processes): progress, metrics, checkpoints, and a killed run that resumes exactly."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny_cpu_torch.yaml")
DEEPSPEED_CONFIG = str(ROOT / "configs" / "tiny_cpu.yaml")  # backend deepspeed, EP 2, ZeRO-1
COMMON = ["schedule.train_steps=30", "schedule.warmup_steps=5", "schedule.eval_interval=0", "logging.interval=1",
          "checkpoint.interval=10", "model.num_layers=2", "model.hidden_size=32", "model.moe.ffn_hidden_size=32",
          "model.seq_length=32"]


def _train(tmp, name, *extra, config=CONFIG, **popen):
    args = [sys.executable, "-m", "excitation_dist.cli", "train", config, *COMMON,
            f"checkpoint.dir={tmp / name / 'ckpt'}", f"logging.dir={tmp / name / 'log'}", *extra]
    return subprocess.Popen(args, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **popen)


def _losses(run_dir):
    out = {}
    for line in (run_dir / "log" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def _final_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the model state in a checkpoint directory (torch: state.pt;
    deepspeed: the engine's model-state files, experts included)."""
    out = {}
    if (step_dir / "state.pt").is_file():
        state = torch.load(step_dir / "state.pt", weights_only=False)
        assert state["excitation"]["step"] == 30
        return dict(state["model"])
    files = sorted(step_dir.rglob("*model_states.pt"))
    assert files, f"no model states under {step_dir}"
    for f in files:
        state = torch.load(f, weights_only=False)
        if "excitation_dist" in state:
            assert state["excitation_dist"]["step"] == 30
        module = state.get("module", state)  # expert files hold the expert's state dict itself
        for key, value in module.items():
            out[f"{f.name}:{key}"] = value
    return out


@pytest.mark.parametrize("backend", ["torch", "deepspeed"])
def test_killed_run_resumes_exactly(tmp_path, backend):
    if backend == "deepspeed":
        pytest.importorskip("deepspeed")
    config = CONFIG if backend == "torch" else DEEPSPEED_CONFIG
    full = _train(tmp_path, "full", config=config)
    out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, out
    assert "step     30/30 | loss" in out and "tokens/s" in out and "ETA" in out

    # the same run, killed (SIGKILL, whole process group) once its step-10 checkpoint exists
    broken = _train(tmp_path, "resumed", config=config)
    seen = []
    for line in broken.stdout:
        seen.append(line)
        if "saved" in line and "step_00000010" in line:
            os.killpg(broken.pid, signal.SIGKILL)
            break
    broken.wait(timeout=60)
    assert broken.returncode != 0, "".join(seen)
    again = _train(tmp_path, "resumed", config=config)
    out2, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out2
    assert "resumed from" in out2

    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert sorted(a) == list(range(1, 31)) and set(b) == set(a)
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]
    final_a = _final_weights(tmp_path / "full/ckpt/step_00000030")
    final_b = _final_weights(tmp_path / "resumed/ckpt/step_00000030")
    assert final_a.keys() == final_b.keys()
    for key, value in final_a.items():
        assert torch.equal(value, final_b[key]), key


def test_bad_config_fails_before_any_process_starts(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "excitation_dist.cli", "train", CONFIG, "model.moe.top_k=99"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "model.moe.top_k: must be in [1, num_experts=8]" in proc.stderr
    assert "launching" not in proc.stdout
    mla = ["model.attention=mla", "model.kv_lora_rank=16", "model.qk_rope_head_dim=8"]
    proc = subprocess.run([sys.executable, "-m", "excitation_dist.cli", "train", CONFIG, *mla],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "model.attention: multi-head latent attention (mla) is not built by backend torch" \
        in proc.stderr


def test_launcher_and_config_must_agree(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "3", "RANK": "0"}
    proc = subprocess.run([sys.executable, "-m", "excitation_dist.cli", "train", CONFIG], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "started 3 processes but the config asks for" in proc.stderr
