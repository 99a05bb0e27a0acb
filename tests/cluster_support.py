"""Real cluster pieces on one machine, for the launch tests.

- :class:`LocalSlurm`: munged + slurmctld + slurmd from Debian's slurm-wlm, one
  node (this machine), configured in a temporary directory.
- :class:`NetnsPair`: two network namespaces joined by a veth pair, each one a
  "node" with its own address, for a real two-node torchrun rendezvous.

Both need root and the Debian packages (``.ci/run`` installs them); tests skip
with the reason when they are missing.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol")


def slurm_missing() -> str | None:
    if os.geteuid() != 0:
        return "a local SLURM needs root"
    missing = [b for b in SLURM_BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    return f"SLURM binaries missing: {', '.join(missing)} (apt-get install slurm-wlm munge)" if missing else None


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class LocalSlurm:
    """A one-node SLURM cluster. Use as a context manager; ``env`` holds SLURM_CONF."""

    def __init__(self, workdir: Path, cpus: int | None = None) -> None:
        self.dir = Path(workdir)
        self.host = socket.gethostname().split(".")[0]
        self.cpus = cpus or os.cpu_count() or 2
        self.conf = self.dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._procs: list[subprocess.Popen] = []

    def _write_conf(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=excitation-test",
                    f"SlurmctldHost={self.host}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    "MpiDefault=none",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "ReturnToService=2",
                    "SlurmctldPort=16817",
                    "SlurmdPort=16818",
                    f"StateSaveLocation={self.dir / 'state'}",
                    f"SlurmdSpoolDir={self.dir / 'spool'}",
                    f"SlurmctldPidFile={self.dir / 'slurmctld.pid'}",
                    f"SlurmdPidFile={self.dir / 'slurmd.pid'}",
                    f"SlurmctldLogFile={self.dir / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={self.dir / 'log' / 'slurmd.log'}",
                    "SchedulerType=sched/builtin",
                    f"NodeName={self.host} CPUs={self.cpus} RealMemory={mem_mb} State=UNKNOWN",
                    f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
                    "",
                ]
            )
        )

    def _start_munge(self) -> None:
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True)
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
            Path(d).mkdir(parents=True, exist_ok=True)
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
            subprocess.run([_sbin("munged"), "--force"], check=True, capture_output=True)

    def __enter__(self) -> "LocalSlurm":
        self._write_conf()
        self._start_munge()
        for daemon in ("slurmctld", "slurmd"):
            self._procs.append(
                subprocess.Popen([_sbin(daemon), "-D", "-f", str(self.conf)], env=self.env,
                                 stdout=subprocess.DEVNULL, stderr=open(self.dir / "log" / f"{daemon}.stderr", "w"))
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip() in ("idle", "mixed"):
                return self
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise RuntimeError(f"local SLURM did not come up; logs in {self.dir / 'log'}")

    def sbatch(self, *args: str, cwd: Path) -> str:
        out = subprocess.run(["sbatch", "--parsable", *args], env=self.env, cwd=cwd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed: {out.stderr}")
        return out.stdout.strip().split(";")[0]

    def wait(self, job_id: str, timeout: float = 600) -> dict[str, str]:
        """Wait until the job leaves the queue; return its scontrol fields."""
        deadline = time.monotonic() + timeout
        fields: dict[str, str] = {}
        while time.monotonic() < deadline:
            out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=self.env, capture_output=True, text=True)
            fields = dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)
            if fields.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return fields
            time.sleep(1.0)
        subprocess.run(["scancel", job_id], env=self.env)
        raise TimeoutError(f"job {job_id} still {fields.get('JobState')} after {timeout:.0f} s")

    def __exit__(self, *exc) -> None:
        for p in self._procs:
            p.terminate()
        for p in self._procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


class NetnsPair:
    """Two network namespaces ``{prefix}a`` / ``{prefix}b`` joined by a veth pair
    with addresses ``10.231.{subnet}.1`` and ``.2``: two hosts on one machine."""

    def __init__(self, prefix: str = "excn", subnet: int = 7) -> None:
        self.names = (f"{prefix}a", f"{prefix}b")
        self.addrs = (f"10.231.{subnet}.1", f"10.231.{subnet}.2")

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    def __enter__(self) -> "NetnsPair":
        a, b = self.names
        self.__exit__()
        # `ip netns exec` bind-mounts /etc/netns/NAME/*: give each "host" name resolution that
        # answers at once (no unreachable DNS server behind reverse look-ups).
        hosts = "127.0.0.1 localhost\n" + "".join(f"{addr} {ns}\n" for addr, ns in zip(self.addrs, self.names))
        hostname = socket.gethostname()  # shared by both namespaces: map it to each one's own address
        for ns, addr in zip(self.names, self.addrs):
            etc = Path("/etc/netns", ns)
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts + f"{addr} {hostname}\n")
            (etc / "resolv.conf").write_text("")
        self._ip("netns", "add", a)
        self._ip("netns", "add", b)
        self._ip("link", "add", f"{a}0", "type", "veth", "peer", "name", f"{b}0")
        for ns, dev, addr in ((a, f"{a}0", self.addrs[0]), (b, f"{b}0", self.addrs[1])):
            self._ip("link", "set", dev, "netns", ns)
            self._ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            self._ip("-n", ns, "link", "set", dev, "up")
            self._ip("-n", ns, "link", "set", "lo", "up")
        return self

    def popen(self, index: int, cmd: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.names[index], *cmd], **kwargs)

    def __exit__(self, *exc) -> None:
        for ns in self.names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(Path("/etc/netns", ns), ignore_errors=True)
