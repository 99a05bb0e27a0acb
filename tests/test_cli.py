"""The console script as a user runs it."""

import subprocess
import sys


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "excitation_dist.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_demo_prints_the_side_by_side_table():
    proc = _cli("demo", "--steps", "4", "--log-every", "2")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "strategy=zerosum" in out and "loss base" in out and "phi max" in out
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit() and "|" in line]
    assert [int(r.split("|")[0]) for r in rows] == [1, 2, 4]
    phi_max = [float(r.split()[-1]) for r in rows]
    assert max(phi_max) > 1.0  # the excited run really scales updates
    assert "validation loss: baseline" in out


def test_demo_rejects_bad_arguments_with_a_clear_message():
    proc = _cli("demo", "--gamma", "-1")
    assert proc.returncode != 0 and "excitation.gamma: must be >= 0" in proc.stderr
    proc = _cli("demo", "--strategy", "bogus")
    assert proc.returncode != 0 and "invalid choice" in proc.stderr


def test_help_lists_subcommands():
    proc = _cli("--help")
    assert proc.returncode == 0 and "demo" in proc.stdout
