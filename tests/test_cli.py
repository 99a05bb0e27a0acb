"""The console script as a user runs it."""

import subprocess
import sys

import pytest


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "excitation_dist.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_demo_prints_the_side_by_side_table_and_report_plots_its_logs(tmp_path):
    proc = _cli("demo", "--steps", "4", "--log-every", "2", "--log-dir", str(tmp_path / "runs"))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "strategy=zerosum" in out and "loss base" in out and "phi max" in out
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit() and "|" in line]
    assert [int(r.split("|")[0]) for r in rows] == [1, 2, 4]
    phi_max = [float(r.split()[-1]) for r in rows]
    assert max(phi_max) > 1.0  # the excited run really scales updates
    assert "validation loss: baseline" in out

    from excitation_dist.recipe.metrics_log import read_metrics

    records = read_metrics(tmp_path / "runs" / "excited")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert len(records[0]["utilization_LE"]) == 2 and len(records[0]["utilization_LE"][0]) == 8
    assert "val_loss" in records[-1] and "excitation/layer_01/overload_factor" in records[0]
    assert list((tmp_path / "runs" / "excited").glob("events.out.tfevents.*"))

    proc = _cli("report", str(tmp_path / "runs" / "baseline"), str(tmp_path / "runs" / "excited"),
                "--out", str(tmp_path / "report"))
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert names == ["loss.png", "multipliers.png", "utilization.png", "utilization_baseline.png",
                     "utilization_excited.png"]
    for png in (tmp_path / "report").iterdir():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    proc = _cli("report", str(tmp_path / "nowhere"))
    assert proc.returncode != 0 and "metrics.jsonl not found" in proc.stderr


def test_demo_rejects_bad_arguments_with_a_clear_message():
    proc = _cli("demo", "--gamma", "-1")
    assert proc.returncode != 0 and "excitation.gamma: must be >= 0" in proc.stderr
    proc = _cli("demo", "--strategy", "bogus")
    assert proc.returncode != 0 and "invalid choice" in proc.stderr


def test_help_lists_subcommands():
    proc = _cli("--help")
    assert proc.returncode == 0 and "demo" in proc.stdout


def test_report_labels_runs_by_strategy_and_gamma_on_one_colour_scale(tmp_path):
    from excitation_dist.recipe.metrics_log import MetricsLogger
    from excitation_dist.recipe.report import make_report, run_labels

    runs = {"a": ("zerosum", 1.0, 6.0), "b": ("positivesum", 0.5, 3.0), "c": ("none", 1.0, 1.0),
            "d": ("zerosum", 1.0, 2.0)}
    for name, (strategy, gamma, peak) in runs.items():
        logger = MetricsLogger(tmp_path / name, tensorboard=False, run_info={"strategy": strategy, "gamma": gamma})
        for step in (1, 2):
            logger.log(step, {"loss": 1.0 / step, "utilization_LE": [[peak, 2.0 - peak / 4, 0.0, 0.0]]})
        logger.close()
    dirs = [tmp_path / n for n in runs]
    assert run_labels(dirs) == ["zerosum, gamma 1 [a]", "positivesum, gamma 0.5", "baseline (no Excitation)",
                                "zerosum, gamma 1 [d]"]

    import matplotlib.image

    make_report(dirs, tmp_path / "report")
    import matplotlib.pyplot as plt
    import numpy as np

    # Pixels in the colour of the top of the scale: run a's expert 0 (load 6.0) fills a band of the heatmap with it;
    # run b's expert 0 (load 3.0) must not (with a scale per run it would), only the colour bar's top has it.
    top = np.asarray(plt.get_cmap("magma")(1.0)[:3])
    def top_coloured(name):
        img = matplotlib.image.imread(tmp_path / "report" / f"utilization_{name}.png")[..., :3]
        return int((np.abs(img - top).max(-1) < 0.06).sum())
    assert top_coloured("a") > 10 * top_coloured("b")


def test_report_names_runs_apart_by_their_parents(tmp_path):
    from excitation_dist.recipe.report import run_names

    assert run_names([tmp_path / "a" / "log", tmp_path / "b" / "log"]) == ["a-log", "b-log"]
    assert run_names([tmp_path / "zerosum", tmp_path / "baseline"]) == ["zerosum", "baseline"]
    with pytest.raises(ValueError, match="twice"):
        run_names([tmp_path / "x", tmp_path / "x"])


def test_help_texts_name_every_backend_and_tokenizer_kind():
    from excitation_dist.cli import build_parser

    top = build_parser().format_help()
    assert "torch, deepspeed or megatron" in top
    assert "tokenizer.json" in top and "sentencepiece" in top
