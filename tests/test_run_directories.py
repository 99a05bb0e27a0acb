"""A run directory after kills, resumes and reruns: no stale temporary files, one
record per step in metrics.jsonl, a second fresh run into a used logging.dir refused."""

import json

import pytest

from excitation_dist.config import ConfigError
from excitation_dist.recipe.checkpoint import CheckpointManager
from excitation_dist.recipe.config import load_run_config
from excitation_dist.recipe.metrics_log import MetricsLogger, read_metrics
from excitation_dist.recipe.preflight import check_logging_dir_unused
from tests.test_recipe_config import CONFIGS


def test_a_kill_between_rename_and_latest_leaves_no_temporary_file_after_the_next_save(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.prepare(1)
    manager.publish(1)
    (tmp_path / ".latest.tmp4242").write_text("step_00000002\n")  # killed inside _write_atomic
    manager.remove_leftovers()  # what the next run does at start (and prepare() before each save)
    assert not list(tmp_path.glob(".latest.tmp*"))
    assert manager.latest() == tmp_path / "step_00000001"


def _records(path):
    return [json.loads(line)["step"] for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_a_resumed_run_replaces_the_records_of_the_steps_it_redoes(tmp_path):
    first = MetricsLogger(tmp_path, tensorboard=False, start_step=0)
    for step in range(1, 8):  # killed after logging step 7; its last checkpoint is step 5
        first.log(step, {"loss": float(step)})
    first.close()
    resumed = MetricsLogger(tmp_path, tensorboard=False, start_step=5)
    assert resumed.dropped == 2
    for step in range(6, 9):
        resumed.log(step, {"loss": 10.0 + step})
    resumed.close()
    assert _records(tmp_path) == [1, 2, 3, 4, 5, 6, 7, 8]  # fails before: 6 and 7 twice
    assert [r["loss"] for r in read_metrics(tmp_path)][5:] == [16.0, 17.0, 18.0]


def test_a_second_fresh_run_into_a_used_logging_dir_is_refused(tmp_path):
    cfg = load_run_config(CONFIGS / "tiny_cpu.yaml", [f"logging.dir={tmp_path / 'logs'}", "checkpoint.dir=null"])
    check_logging_dir_unused(cfg)  # empty: fine
    logger = MetricsLogger(cfg.logging.dir, tensorboard=False, start_step=0)
    logger.log(1, {"loss": 1.0})
    logger.close()
    with pytest.raises(ConfigError, match=r"logging.dir: .*metrics.jsonl already holds the metrics of a run "
                                          r"\(steps 1-1\).*checkpoint.dir is not set"):
        check_logging_dir_unused(cfg)
    # with a checkpoint to resume, the run continues its own metrics
    ckpt = CheckpointManager(tmp_path / "ckpt")
    ckpt.prepare(1)
    ckpt.publish(1)
    cfg = load_run_config(CONFIGS / "tiny_cpu.yaml", [f"logging.dir={tmp_path / 'logs'}",
                                                      f"checkpoint.dir={tmp_path / 'ckpt'}"])
    check_logging_dir_unused(cfg)
