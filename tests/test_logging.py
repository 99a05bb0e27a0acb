"""Logging: Excitation's statistics summarized over layers on every logged step, the per-layer
detail (11 statistics per layer and the [L, E] matrices) every ``logging.layer_interval``
steps, to TensorBoard, metrics.jsonl and Weights & Biases. W&B runs offline here with the
real ``wandb`` package (the test extra installs it), and its run file is read back; the
Megatron-LM entry writes through Megatron-LM's own TensorBoard and W&B writers."""

import json
import sys
from pathlib import Path

import pytest
import torch

from excitation_dist import Excitation, ExpertSegment
from excitation_dist.config import ConfigError
from excitation_dist.metrics import flat_metrics, summary_metrics
from excitation_dist.recipe.config import load_run_config
from excitation_dist.recipe.metrics_log import (WANDB_RUN_ID_FILE, MetricsLogger, excitation_record,
                                                is_layer_detail, read_metrics)
from excitation_dist.testing import run_distributed
from tests.megatron_support import ENV
from tests.test_megatron_0192 import ITERS, PRETRAIN_ARGS, megatron_0192  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]
STATS = {"tokens", "utilization_min", "utilization_max", "utilization_std", "overload_factor", "dead_experts",
         "entropy", "gini_simpson", "multiplier_min", "multiplier_max", "multiplier_mean"}
COUNTS = [[[3, 1], [4, 0]], [[2, 2], [1, 3]], [[0, 4], [2, 2]], [[1, 1], [3, 1]]]  # [step][layer][expert]


def _excitation(L=2, E=2, numel=3):
    """A zerosum controller over SGD on one tensor per layer, stepped with given counts."""
    params = [torch.nn.Parameter(torch.zeros(E * numel, dtype=torch.float64)) for _ in range(L)]
    opt = torch.optim.SGD(params, lr=1.0)
    ex = Excitation({"strategy": "zerosum"}, L, E, reduce=False)
    ex.set_segments(ExpertSegment(params[l], e * numel, (e + 1) * numel, l, e) for l in range(L) for e in range(E))
    ex.hook_optimizer(opt)

    def step(counts_LE):
        for layer, row in enumerate(counts_LE):
            ex.record(layer, torch.tensor(row))
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()

    return ex, step


def test_summaries_reduce_each_statistic_over_layers():
    counts_LE, phi_LE = torch.tensor([[3, 1], [4, 0]]), torch.tensor([[1.5, 0.5], [2.0, 0.0]])
    summary = summary_metrics(counts_LE, phi_LE)
    assert set(summary) == {f"excitation/{s}" for s in STATS}
    assert summary["excitation/overload_factor"] == 2.0  # the worse layer: 4 of 4 tokens on one of 2 experts
    assert summary["excitation/utilization_max"] == 2.0 and summary["excitation/utilization_min"] == 0.0
    assert summary["excitation/dead_experts"] == 1.0 and summary["excitation/tokens"] == 8.0
    assert summary["excitation/multiplier_min"] == 0.0 and summary["excitation/multiplier_max"] == 2.0
    assert summary["excitation/multiplier_mean"] == 1.0
    assert summary["excitation/gini_simpson"] == ((1 - 0.75**2 - 0.25**2) + 0.0) / 2
    full = flat_metrics(counts_LE, phi_LE)
    assert {k: v for k, v in full.items() if "/layer_" not in k} == summary
    assert len(full) == len(STATS) * 3  # two layers and the summary

    ex, step = _excitation()
    step(COUNTS[0])
    brief = ex.metrics(per_layer=False)
    assert not any(is_layer_detail(k) for k in brief)
    assert brief == {k: v for k, v in ex.metrics().items() if not is_layer_detail(k)}
    assert brief["excitation/step"] == 1.0 and "excitation/snapshot_bytes" in brief


def test_summaries_every_logged_step_layers_every_layer_interval(tmp_path):
    ex, step = _excitation()
    logger = MetricsLogger(tmp_path, layer_interval=2)
    for i, counts_LE in enumerate(COUNTS, start=1):
        step(counts_LE)
        # the detail is dropped on the other steps whether or not the caller computed it
        record = excitation_record(ex, per_layer=i < 3 or logger.layers_due(i))
        logger.log(i, {"loss": 1.0 / i, **record})
    logger.close()

    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(f"excitation/{s}" in r for r in records for s in STATS)
    assert [r["step"] for r in records if "utilization_LE" in r] == [2, 4]
    assert [r["step"] for r in records if "excitation/layer_01/entropy" in r] == [2, 4]
    assert records[1]["utilization_LE"] == [[1.0, 1.0], [0.5, 1.5]]  # load / ideal load of COUNTS[1]
    assert records[0]["excitation/overload_factor"] == 2.0 and records[2]["excitation/dead_experts"] == 1.0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path)).Reload()
    steps = {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert steps["loss"] == steps["excitation/entropy"] == [1, 2, 3, 4]
    assert steps["excitation/layer_00/overload_factor"] == [2, 4]
    assert len(steps) == 1 + len(STATS) + 2 + len(STATS) * 2  # loss, summaries, step, snapshot bytes, 2 layers


def test_logging_keys_say_what_is_wrong(monkeypatch):
    config = str(ROOT / "configs" / "tiny_cpu_torch.yaml")
    cfg = load_run_config(config, ["logging.interval=5", "logging.layer_interval=50"])
    assert cfg.logging.layer_interval == 50 and cfg.logging.wandb.project is None
    assert load_run_config(config).logging.layer_interval is None  # every logged step
    assert load_run_config(str(ROOT / "configs" / "olmoe-1b-7b" / "megatron-8gpu.yaml")).logging.layer_interval == 100
    with pytest.raises(ConfigError, match=r"logging.layer_interval: must be a multiple of logging.interval=5"):
        load_run_config(config, ["logging.interval=5", "logging.layer_interval=12"])
    with pytest.raises(ConfigError, match=r"logging.interval: must be >= 1"):
        load_run_config(config, ["logging.interval=0"])
    with pytest.raises(ConfigError, match=r"logging.wandb.mode: must be one of 'online', 'offline'"):
        load_run_config(config, ["logging.wandb.project=p", "logging.wandb.mode=cloud"])

    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"logging.wandb.project: is set, but the wandb package is not installed: "
                                          r"pip install 'excitation-dist\[wandb\]'"):
        load_run_config(config, ["logging.wandb.project=p"])


def _wandb_records(run_file: Path):
    """The records of an offline W&B run file (``run-<id>.wandb``): a 7-byte header, then
    LevelDB-log chunks (4-byte checksum, 2-byte length, 1-byte type: 1 whole, 2 first,
    3 middle, 4 last) in 32 KiB blocks, each record one of wandb's protobuf ``Record``s."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", run_file
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _wandb_run(log_dir: Path):
    """(run id, config, {step: row}) of the one offline run under ``log_dir/wandb``."""
    (run_file,) = (log_dir / "wandb").glob("offline-run-*/run-*.wandb")
    rows, config, run_id = {}, {}, None
    for record in _wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            config = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.run.config.update}
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows[record.history.step.num] = {k: v for k, v in row.items() if not k.startswith("_")}
    return run_id, config, rows


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": tmp_path / "wandb-config",
                        "WANDB_CACHE_DIR": tmp_path / "wandb-cache", "WANDB_DATA_DIR": tmp_path / "wandb-data"}.items():
        monkeypatch.setenv(name, str(value))


def test_wandb_writer_beside_tensorboard_offline(tmp_path, wandb_offline):
    log_dir = tmp_path / "run"
    cfg = load_run_config(str(ROOT / "configs" / "tiny_cpu_torch.yaml"), [
        f"logging.dir={log_dir}", "logging.interval=1", "logging.layer_interval=2", "name=wandb-test",
        "logging.wandb.project=excitation-dist-test", "logging.wandb.mode=offline"])
    assert MetricsLogger.from_config(cfg, rank=1)._writers == []  # other ranks: no writer, no W&B run
    assert not (log_dir / "wandb").exists()

    ex, step = _excitation()
    logger = MetricsLogger.from_config(cfg, rank=0)
    for i, counts_LE in enumerate(COUNTS, start=1):
        step(counts_LE)
        logger.log(i, {"loss": 1.0 / i, **excitation_record(ex, per_layer=logger.layers_due(i))})
    logger.close()
    import wandb

    wandb.teardown()  # the run file is written by wandb's service process: let it finish
    run_id, config, rows = _wandb_run(log_dir)
    assert (log_dir / WANDB_RUN_ID_FILE).read_text().strip() == run_id
    assert config["name"] == "wandb-test" and config["excitation"]["strategy"] == "zerosum"  # the whole run config
    records = {r["step"]: r for r in read_metrics(log_dir)}
    assert sorted(rows) == [1, 2, 3, 4]
    for i, row in rows.items():  # every scalar of metrics.jsonl, no matrix
        assert row == {k: v for k, v in records[i].items() if k not in ("step", "utilization_LE", "multipliers_LE")}
    assert [i for i, row in rows.items() if "excitation/layer_01/multiplier_max" in row] == [2, 4]
    assert rows[1]["excitation/overload_factor"] == 2.0 and rows[3]["loss"] == pytest.approx(1 / 3)
    assert list(log_dir.glob("events.out.tfevents.*"))  # TensorBoard too

    restarted = MetricsLogger.from_config(cfg, rank=0)  # a restart continues the same W&B run
    assert restarted._writers[-1].run.id == run_id
    restarted.close()


def _pretrain(megatron_path: str, argv: list[str]) -> int:
    sys.path.insert(0, megatron_path)
    from excitation_dist.recipe import pretrain_gpt

    pretrain_gpt.main(argv, cpu=True)
    return pretrain_gpt.excitation().step


def test_megatron_entry_logs_through_megatrons_own_writers(megatron_0192, tmp_path):
    """``pretrain_gpt`` (Megatron-LM's loop, megatron-core 0.19.2, 2 ranks, 3 iterations, log
    interval 1): Excitation's summaries every iteration, per layer every 2nd, in the TensorBoard
    writer and the W&B run Megatron-LM opened itself (``--wandb-project``; offline here)."""
    argv = PRETRAIN_ARGS + ["--tensorboard-dir", str(tmp_path / "tb"), "--wandb-project", "excitation-dist-test",
                            "--wandb-exp-name", "pretrain", "--wandb-save-dir", str(tmp_path / "wb"),
                            "--excitation-log-layer-interval", "2"]
    env = {**ENV, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
           "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "WANDB_DATA_DIR": str(tmp_path / "wandb-data")}
    assert run_distributed(_pretrain, 2, megatron_0192, argv, env=env, timeout=400) == [ITERS, ITERS]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    steps = {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert steps["excitation/overload_factor"] == steps["excitation/multiplier_max"] == [1, 2, 3]
    assert steps["excitation/layer_01/entropy"] == [2]

    _, _, rows = _wandb_run(tmp_path / "wb")
    assert [i for i, row in sorted(rows.items()) if "excitation/overload_factor" in row] == [1, 2, 3]
    assert [i for i, row in sorted(rows.items()) if "excitation/layer_00/entropy" in row] == [2]
    assert rows[2]["excitation/overload_factor"] == pytest.approx(events.Scalars("excitation/overload_factor")[1].value)
    assert any("loss" in key for key in rows[2])  # the same run as Megatron-LM's own scalars


def test_recipe_train_logs_per_layer_every_layer_interval_to_tensorboard_and_wandb(tmp_path, wandb_offline):
    """``excitation-dist train`` (torch backend, 2 CPU ranks, 6 steps): summaries every step,
    per-layer detail every 3rd, in metrics.jsonl, TensorBoard and an offline W&B run."""
    import subprocess

    log_dir = tmp_path / "log"
    proc = subprocess.run([sys.executable, "-m", "excitation_dist.cli", "train", str(ROOT / "configs" / "tiny_cpu_torch.yaml"),
                           "schedule.train_steps=6", "schedule.warmup_steps=1", "schedule.eval_interval=0",
                           "logging.interval=1", "logging.layer_interval=3", "model.num_layers=2", "model.hidden_size=32",
                           "model.moe.ffn_hidden_size=32", "model.seq_length=32", f"logging.dir={log_dir}",
                           "logging.wandb.project=excitation-dist-test", "logging.wandb.mode=offline", "name=recipe"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = read_metrics(log_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "utilization_LE" in r] == [3, 6]
    _, config, rows = _wandb_run(log_dir)
    assert config["name"] == "recipe" and sorted(rows) == [1, 2, 3, 4, 5, 6]
    assert [i for i, row in rows.items() if "excitation/layer_01/entropy" in row] == [3, 6]
    assert all(row["loss"] == records[i - 1]["loss"] for i, row in rows.items())
