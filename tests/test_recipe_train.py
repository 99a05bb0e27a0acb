"""excitation-dist train end to end (backends torch and deepspeed, 2 CPU
processes): progress, metrics, checkpoints, a killed run that resumes exactly, and a
rank killed under ``--max-restarts`` whose restarted run finishes exactly."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from excitation_dist.recipe.metrics_log import read_metrics

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny_cpu_torch.yaml")
DEEPSPEED_CONFIG = str(ROOT / "configs" / "tiny_cpu.yaml")  # backend deepspeed, EP 2, ZeRO-1
# parallel.timeout_minutes: a rank killed under torchrun --max-restarts (below) leaves its peer in a collective for
# at most 2 minutes
COMMON = ["schedule.train_steps=30", "schedule.warmup_steps=5", "schedule.eval_interval=0", "logging.interval=1",
          "checkpoint.interval=10", "model.num_layers=2", "model.hidden_size=32", "model.moe.ffn_hidden_size=32",
          "model.seq_length=32", "parallel.timeout_minutes=2"]
CONFIGS = {"torch": CONFIG, "deepspeed": DEEPSPEED_CONFIG}


def _train(tmp, name, *extra, config=CONFIG, common=COMMON, **popen):
    args = [sys.executable, "-m", "excitation_dist.cli", "train", config, *common,
            f"checkpoint.dir={tmp / name / 'ckpt'}", f"logging.dir={tmp / name / 'log'}", *extra]
    return subprocess.Popen(args, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **popen)


# Test-only fault injection, installed through PYTHONPATH into the launcher, torchrun and every rank (the
# product has none): rank 0 calls CheckpointManager.publish after the barrier that follows every rank's
# save, so at that moment the staging directory holds the whole checkpoint except its COMPLETE marker.
# At step KILL_AT_STEP rank 0 records what the staging directory holds, then SIGKILLs the other ranks
# (torchrun starts each in a session of its own), the process group of its launcher (torchrun, which
# replaced `excitation-dist train`) and itself: a kill mid-save, at a known instant.
_KILL_IN_PUBLISH = """
import os
import signal

from excitation_dist.recipe import checkpoint as _checkpoint

_publish = _checkpoint.CheckpointManager.publish


def _children(parent):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == parent:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return found


def publish(self, step, metadata=None):
    if step == int(os.environ["EXCITATION_TEST_KILL_AT_STEP"]):
        staging = self.staging_dir(step)
        with open(os.environ["EXCITATION_TEST_KILL_RECORD"], "w") as f:
            f.write("\\n".join(sorted(str(p.relative_to(staging)) for p in staging.rglob("*"))))
        launcher = os.getppid()
        for pid in _children(launcher):
            if pid != os.getpid():
                os.kill(pid, signal.SIGKILL)
        os.killpg(os.getpgid(launcher), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    return _publish(self, step, metadata)


_checkpoint.CheckpointManager.publish = publish
"""


def hooked_env(hook: Path, sitecustomize: str, **env: str) -> dict[str, str]:
    """The environment of a run whose processes execute ``sitecustomize`` (written into ``hook``) at start."""
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(sitecustomize)
    path = os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONPATH": path, **env}


def _kill_in_save_env(tmp, step: int) -> dict[str, str]:
    return hooked_env(tmp / "kill_in_save", _KILL_IN_PUBLISH, EXCITATION_TEST_KILL_AT_STEP=str(step),
                      EXCITATION_TEST_KILL_RECORD=str(tmp / "kill_record"))


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "log") if "loss" in r}


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


_UNINTERRUPTED: dict[str, Path] = {}


def uninterrupted(tmp_path_factory, backend: str) -> Path:
    """The run directory of the uninterrupted 30-step run of ``backend`` (trained once per session: this
    module's resume and restart tests compare with it)."""
    if backend not in _UNINTERRUPTED:
        tmp = tmp_path_factory.mktemp(f"full_{backend}")
        full = _train(tmp, "full", config=CONFIGS[backend])
        out, _ = full.communicate(timeout=600)
        assert full.returncode == 0, out
        assert "step     30/30 | loss" in out and "tokens/s" in out and "ETA" in out
        _UNINTERRUPTED[backend] = tmp / "full"
    return _UNINTERRUPTED[backend]


def _assert_same_run(full: Path, resumed: Path) -> None:
    """Losses of every step and the final weights are bit-identical."""
    a, b = _losses(full), _losses(resumed)
    assert sorted(a) == list(range(1, 31)) and set(b) == set(a)
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]
    final_a = _final_weights(full / "ckpt/step_00000030")
    final_b = _final_weights(resumed / "ckpt/step_00000030")
    assert final_a.keys() == final_b.keys()
    for key, value in final_a.items():
        assert torch.equal(value, final_b[key]), key


@pytest.mark.parametrize("backend", ["torch", "deepspeed"])
def test_killed_mid_save_then_after_a_save_resumes_exactly(tmp_path, tmp_path_factory, backend):
    """SIGKILL of every process while the step-20 checkpoint is being saved (all ranks wrote their files, the
    COMPLETE marker and the latest pointer not yet): the step-20 staging directory is never loaded, the run
    resumes from step 10. That run is SIGKILLed (whole process group) once its step-20 checkpoint exists,
    resumes from step 20, and ends bit for bit on the uninterrupted run's losses and final weights."""
    if backend == "deepspeed":
        pytest.importorskip("deepspeed")
    config = CONFIGS[backend]
    full = uninterrupted(tmp_path_factory, backend)
    ckpt = tmp_path / "resumed" / "ckpt"

    broken = _train(tmp_path, "resumed", config=config, env=_kill_in_save_env(tmp_path, 20))
    out, _ = broken.communicate(timeout=600)
    assert broken.returncode == -signal.SIGKILL, out
    assert "saved" in out and "step_00000010" in out and "step_00000020" not in out
    written = (tmp_path / "kill_record").read_text().split()
    assert written and "COMPLETE" not in written  # every rank's files were there, unpublished
    staging = ckpt / ".staging-step_00000020"
    assert staging.is_dir() and not (staging / "COMPLETE").exists()
    assert sorted(str(p.relative_to(staging)) for p in staging.rglob("*")) == sorted(written)
    assert (ckpt / "latest").read_text().strip() == "step_00000010" and not (ckpt / "step_00000020").exists()

    killed = _train(tmp_path, "resumed", config=config)
    seen = []
    for line in killed.stdout:
        seen.append(line)
        if "saved" in line and "step_00000020" in line:
            os.killpg(killed.pid, signal.SIGKILL)
            break
    killed.wait(timeout=60)
    out2 = "".join(seen)
    assert killed.returncode != 0, out2
    assert f"resumed from {ckpt / 'step_00000010'} (step 10)" in out2 and ".staging" not in out2
    assert "step     11/30 | loss" in out2 and "step     10/30" not in out2
    assert not staging.exists() and (ckpt / "step_00000020" / "COMPLETE").is_file()  # cleared by the next save

    again = _train(tmp_path, "resumed", config=config)
    out3, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out3
    assert f"resumed from {ckpt / 'step_00000020'} (step 20)" in out3
    _assert_same_run(full, tmp_path / "resumed")


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


# Test-only probe, installed through PYTHONPATH into every process: each rank appends the global sample
# indices of every micro-batch it reads to EXCITATION_TEST_SAMPLES/rank<R>.txt.
_RECORD_SAMPLES = """
import os

from excitation_dist.recipe import data as _data

_batch = _data.TokenSource.train_batch


def train_batch(self, step, micro, rank):
    with open(os.path.join(os.environ["EXCITATION_TEST_SAMPLES"], f"rank{rank}.txt"), "a") as f:
        f.write(" ".join(map(str, self.train_indices(step, micro, rank))) + "\\n")
    return _batch(self, step, micro, rank)


_data.TokenSource.train_batch = train_batch
"""


def _record_samples_env(tmp) -> dict[str, str]:
    (tmp / "samples").mkdir(exist_ok=True)
    return hooked_env(tmp / "record_samples", _RECORD_SAMPLES, EXCITATION_TEST_SAMPLES=str(tmp / "samples"))


def _samples_read(tmp) -> list[int]:
    return sorted(int(i) for f in (tmp / "samples").glob("rank*.txt") for i in f.read_text().split())


def test_resume_with_excitation_turned_on_and_a_larger_global_batch(tmp_path):
    """4 steps of 16 samples with Excitation off, then resumed with it on and global batch 32 for steps 5-6.

    - Excitation: refused before launch with checkpoint.require_excitation_state=true (the checkpoint untouched);
      without it, said once, trains, and Excitation counts from step 0 (its state saved at step 6 says 2).
    - Data: the resumed run reads samples 64..191, exactly the ones an uninterrupted reader had not read yet
      (no sample skipped, none twice), as Megatron-LM's consumed_samples does; the checkpoint records the
      samples consumed."""
    env = _record_samples_env(tmp_path)
    common = [*COMMON, "schedule.warmup_steps=1", "checkpoint.interval=2"]
    off = _train(tmp_path, "run", "schedule.train_steps=4", "excitation.strategy=none", common=common, env=env)
    out, _ = off.communicate(timeout=600)
    assert off.returncode == 0, out
    assert _samples_read(tmp_path) == list(range(64))
    ckpt = tmp_path / "run" / "ckpt"
    snapshot = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file() and p.name != ".lock"}

    larger = ("schedule.train_steps=6", "schedule.global_batch_size=32")
    refused = _train(tmp_path, "run", *larger, "checkpoint.require_excitation_state=true", common=common, env=env)
    out, _ = refused.communicate(timeout=120)
    assert refused.returncode == 1 and "launching" not in out, out
    assert (f"checkpoint.require_excitation_state: {ckpt / 'step_00000004' / 'COMPLETE'} was written with "
            "Excitation off") in out
    assert {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file() and p.name != ".lock"} == snapshot

    on = _train(tmp_path, "run", *larger, common=common, env=env)
    out, _ = on.communicate(timeout=600)
    assert on.returncode == 0, out
    assert f"checkpoint {ckpt / 'step_00000004'} was written with Excitation off" in out
    assert "Excitation starts fresh (step 0, no EMA)" in out and "resumed from" in out
    assert "step      6/6 | loss" in out
    state = torch.load(ckpt / "step_00000006" / "state.pt", weights_only=False)
    assert state["excitation"]["step"] == 2 and state["excitation"]["config"]["strategy"] == "zerosum"
    assert _samples_read(tmp_path) == list(range(64 + 2 * 32))  # every sample once, none skipped
    record = json.loads((ckpt / "step_00000006" / "COMPLETE").read_text())
    assert record["data"]["consumed_samples"] == 4 * 16 + 2 * 32 and record["data"]["global_batch_size"] == 32


# ------------------------------------------------------------- a rank killed under --max-restarts
# ``torchrun --max-restarts 1`` with a rank SIGKILLed mid-run: the agent restarts
# every rank, they rendezvous afresh (a per-attempt namespace in torchrun's shared
# store, see ``recipe.loop.restart_safe_store``), resume from the latest complete
# checkpoint and finish; every logged loss equals the uninterrupted run's, bit for bit.
# Backends torch (under torchrun) and deepspeed (under ``excitation-dist train
# --max-restarts``), 2 CPU ranks, a tiny model; the uninterrupted runs are
# this module's (the same settings, trained once per session).


def _command(config: str, run: Path, restarts: int, launcher: str) -> list[str]:
    """torchrun itself (rank 0 holds the checkpoint lock), or ``excitation-dist train
    --max-restarts`` (which execs torchrun and holds the lock across restarts)."""
    train = [str(config), *COMMON, f"checkpoint.dir={run / 'ckpt'}", f"logging.dir={run / 'log'}"]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "--max-restarts", str(restarts), "-m", "excitation_dist.cli", "train", *train]
    return [sys.executable, "-m", "excitation_dist.cli", "train", "--max-restarts", str(restarts), *train]


def _every_loss(run: Path) -> dict[int, list[float]]:
    """Every loss line of metrics.jsonl as written, per step (not read_metrics, which keeps the latest record
    of a step: the restarted attempt drops the killed attempt's records of the steps it redoes, and any it
    left would be compared with the reference too)."""
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

    reference, restarted = _every_loss(full), _every_loss(tmp_path / "restarted")
    assert sorted(restarted) == sorted(reference) == list(range(1, 31))  # COMMON's schedule.train_steps
    mismatches = [(s, reference[s], v) for s, values in restarted.items() for v in values if v != reference[s][0]]
    assert not mismatches, mismatches
