"""Smoke test of the overhead benchmarks' harness (benchmarks/overhead_table.py),
the optimizer-alone benchmark and the GPU check's CPU fallback, at tiny sizes
in one process (a few seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(autouse=True)
def _benchmarks_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))


def test_memory_probes_see_a_transient_allocation():
    import overhead_table as ot

    def step():
        x = torch.ones(4 * 2**20)  # 16 MiB, touched
        del x

    assert ot.profiled_step(step)[0] >= 16 * 2**20
    rss = ot.rss_extra_bytes(step)
    assert rss is None or rss >= 8 * 2**20


def test_optimizer_alone_rows(capsys):
    import core_overhead
    import overhead_table as ot

    rows = core_overhead._optimizer_alone(4096, 4, repeats=5, pairs=1, warmup=1)
    by = {r["variant"]: r for r in rows}
    assert set(by) == {f"{u}-{s}" for u, s in ot.VARIANTS}
    for name, r in by.items():
        assert len(r["round_ratios"]) == 5 and r["min"] <= r["median"] <= r["max"]
        assert r["path"] == name.split("-")[0]
        assert r["added_collectives"] == 0 and r["count_reduces"] == 0
    assert by["folded-zerosum"]["added_syncs"] == 0 and by["folded-positivesum"]["added_syncs"] == 0
    assert by["blend-zerosum"]["opt_alloc_extra"] > 0  # the snapshot, seen by the allocator
    ot.print_table("smoke", rows)
    assert "folded-zerosum" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU fallback only")
def test_gpu_check_without_gpu_exits_3_and_says_it_checked_nothing(capsys, tmp_path):
    import gpu_check

    assert gpu_check.main(["--out", str(tmp_path / "gpu_check.md")]) == 3
    assert "gpu_check: NOT RUN: no GPU" in capsys.readouterr().err
    assert not (tmp_path / "gpu_check.md").exists()
