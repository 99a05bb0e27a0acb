"""The launch scripts, run for real: sbatch on a local one-node SLURM, and
torchrun's c10d rendezvous between two network-namespace "nodes"."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.cluster_support import LocalSlurm, NetnsPair, slurm_missing
from tests.process_support import free_port

ROOT = Path(__file__).resolve().parents[1]
TINY = ["schedule.train_steps=6", "schedule.warmup_steps=2", "schedule.eval_interval=0", "logging.interval=2", "model.hidden_size=32",
        "model.moe.ffn_hidden_size=32", "model.seq_length=32"]


def _env():
    venv_bin = str(Path(sys.executable).parent)
    # one rendezvous port per call, free now: another test's run may hold the default 29500 (pytest -n)
    return {**os.environ, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1",
            "MASTER_PORT": str(free_port())}


@pytest.mark.skipif(slurm_missing() is not None, reason=str(slurm_missing()))
def test_sbatch_script_trains_the_tiny_config(tmp_path):
    with LocalSlurm(tmp_path / "slurm") as slurm:
        slurm.env.update(_env())
        job = slurm.sbatch("--nodes", "1", str(ROOT / "launch/slurm/train.sbatch"),
                           str(ROOT / "configs/tiny_cpu_torch.yaml"), *TINY, f"logging.dir={tmp_path / 'log'}",
                           cwd=tmp_path)
        fields = slurm.wait(job, timeout=600)
    log = (tmp_path / f"slurm-excitation-{job}.out").read_text()
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", log
    assert f"job {job}: 1 nodes x 2 processes, rendezvous" in log
    assert "step      6/6 | loss" in log
    assert (tmp_path / "log" / "metrics.jsonl").is_file()


@pytest.mark.skipif(slurm_missing() is not None, reason=str(slurm_missing()))
def test_deepspeed_sbatch_script_trains_the_default_config(tmp_path):
    """launch/slurm/deepspeed.sbatch: hostfile from the allocation, the DeepSpeed launcher, backend deepspeed."""
    pytest.importorskip("deepspeed")
    with LocalSlurm(tmp_path / "slurm") as slurm:
        slurm.env.update(_env())
        job = slurm.sbatch("--nodes", "1", str(ROOT / "launch/slurm/deepspeed.sbatch"),
                           str(ROOT / "configs/tiny_cpu.yaml"), *TINY, f"logging.dir={tmp_path / 'log'}", cwd=tmp_path)
        fields = slurm.wait(job, timeout=600)
    log = (tmp_path / f"slurm-excitation-ds-{job}.out").read_text()
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", log
    assert f"job {job}: 1 nodes x 2 processes (deepspeed launcher)" in log
    assert "backend deepspeed" in log and "step      6/6 | loss" in log
    assert not list(tmp_path.glob("hostfile-*"))


def _outputs(procs, timeout: float) -> list[str]:
    """Every process's output, read side by side; one still running after ``timeout`` seconds
    is killed, so a hang shows what each node printed, not only the first one's."""
    outs = [""] * len(procs)

    def read(i: int) -> None:
        try:
            outs[i] = procs[i].communicate(timeout=timeout)[0]
        except subprocess.TimeoutExpired:
            procs[i].kill()
            outs[i] = procs[i].communicate()[0] + f"\n[killed after {timeout:.0f} s]"

    readers = [threading.Thread(target=read, args=(i,)) for i in range(len(procs))]
    for r in readers:
        r.start()
    for r in readers:
        r.join()
    return outs


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_two_node_torchrun_rendezvous_between_namespaces(tmp_path):
    """launch/torchrun_multinode.sh on two hosts with their own addresses: 2 nodes x 1 process."""
    overrides = [*TINY, "parallel.nodes=2", "parallel.gpus_per_node=1", "schedule.global_batch_size=16",
                 f"logging.dir={tmp_path / 'log'}"]
    with NetnsPair() as net:
        procs, common = [], _env()  # one MASTER_PORT for both nodes
        for i in range(2):
            env = {**common, "MASTER_ADDR": net.addrs[0], "NNODES": "2", "RUN_ID": "netns-test",
                   "GLOO_SOCKET_IFNAME": f"{net.names[i]}0", "LOCAL_ADDR": net.addrs[i]}
            procs.append(net.popen(i, [str(ROOT / "launch/torchrun_multinode.sh"),
                                       str(ROOT / "configs/tiny_cpu_torch.yaml"), *overrides],
                                   env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs = _outputs(procs, timeout=300)
    assert [p.returncode for p in procs] == [0, 0], "\n=== next node ===\n".join(outs)
    both = "\n".join(outs)
    assert "2 node(s) x 1 = 2 ranks" in both and "step      6/6 | loss" in both
