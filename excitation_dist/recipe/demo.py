"""The embedded default job: a tiny MoE LM on CPU, baseline and Excitation side by side.

Both runs start from the same weights, see the same batches (each rank its own
share) and use DDP over gloo; the baseline carries a ``strategy: none``
controller so its expert utilization is measured the same way.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from excitation_dist.config import ExcitationConfig
from excitation_dist.data import byte_batches, embedded_corpus_bytes
from excitation_dist.models import GPTMoE, GPTMoEConfig
from excitation_dist.recipe.metrics_log import MetricsLogger, excitation_record
from excitation_dist.testing import run_distributed


@dataclasses.dataclass
class DemoConfig:
    steps: int = 300
    log_every: int = 50
    batch_size: int = 8  # sequences per rank
    lr: float = 3e-3
    seed: int = 0
    log_dir: str | None = None  # metrics.jsonl + TensorBoard per run: LOG_DIR/baseline, LOG_DIR/excited
    model: GPTMoEConfig = dataclasses.field(default_factory=GPTMoEConfig)
    excitation: ExcitationConfig = dataclasses.field(default_factory=ExcitationConfig)


def _summary(metrics: dict[str, float]) -> dict[str, float]:
    return {k.split("/")[-1]: v for k, v in metrics.items() if k.count("/") == 1}


def _worker(cfg: DemoConfig) -> dict[str, Any] | None:
    from excitation_dist.torch import attach

    rank, world = dist.get_rank(), dist.get_world_size()
    corpus = torch.frombuffer(bytearray(embedded_corpus_bytes(2_000_000)), dtype=torch.uint8)
    split = int(corpus.numel() * 0.95)
    train, val = corpus[:split], corpus[split:]

    runs = {}
    for name, exc in (("baseline", ExcitationConfig(strategy="none")), ("excited", cfg.excitation)):
        torch.manual_seed(cfg.seed)
        model = GPTMoE(cfg.model)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.AdamW(ddp.parameters(), lr=cfg.lr, weight_decay=0.01)
        runs[name] = (model, ddp, opt, attach(ddp, opt, exc))

    loggers = {name: MetricsLogger(Path(cfg.log_dir) / name, rank, run_info={
        "name": name, "strategy": excitation.config.strategy, "gamma": excitation.config.gamma, "seed": cfg.seed},
        start_step=0)  # the demo always runs from scratch: a rerun replaces its records
        for name, (*_, excitation) in runs.items()} if cfg.log_dir else {}
    rows = []
    t0 = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        batch = byte_batches(train, cfg.batch_size, cfg.model.seq_len, step, rank, cfg.seed)
        row: dict[str, Any] = {"step": step}
        for name, (model, ddp, opt, excitation) in runs.items():
            ddp.train()
            ddp(batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            lm = model.last_losses["ce"].clone()
            dist.all_reduce(lm)
            row[name] = (lm.item() / world, _summary(excitation.metrics()))
            if name in loggers:
                loggers[name].log(step, {"loss": row[name][0], "lr": cfg.lr, **excitation_record(excitation)})
        if step == 1 or step % cfg.log_every == 0 or step == cfg.steps:
            rows.append(row)
    elapsed = time.perf_counter() - t0

    val_losses = {}
    for name, (model, ddp, _, _) in runs.items():
        model.eval()
        with torch.no_grad():
            losses = [model.lm_losses(byte_batches(val, cfg.batch_size, cfg.model.seq_len, i, rank, 12345))[1]
                      for i in range(8)]
        v = torch.stack(losses).mean()
        dist.all_reduce(v)
        val_losses[name] = v.item() / world
        if name in loggers:
            loggers[name].log(cfg.steps, {"val_loss": val_losses[name]})
            loggers[name].close()
    if rank != 0:
        return None
    return {"rows": rows, "val": val_losses, "seconds": elapsed, "world": world}


def format_table(result: dict[str, Any], exc: ExcitationConfig) -> str:
    lines = [
        f"Tiny MoE LM on the embedded corpus, {result['world']} CPU processes (DDP, gloo); "
        f"Excitation: strategy={exc.strategy}, gamma={exc.gamma}",
        "",
        f"{'step':>5} | {'loss base':>9} {'loss exc':>9} | {'overload base':>13} {'overload exc':>12} | "
        f"{'dead b/e':>8} | {'entropy b/e':>11} | {'phi min':>7} {'phi max':>7}",
        "-" * 104,
    ]
    for row in result["rows"]:
        (lb, mb), (le, me) = row["baseline"], row["excited"]
        lines.append(
            f"{row['step']:>5} | {lb:>9.4f} {le:>9.4f} | {mb['overload_factor']:>13.3f} {me['overload_factor']:>12.3f} | "
            f"{int(mb['dead_experts']):>3}/{int(me['dead_experts']):<4} | {mb['entropy']:>5.3f}/{me['entropy']:<5.3f} | "
            f"{me['multiplier_min']:>7.3f} {me['multiplier_max']:>7.3f}"
        )
    val = result["val"]
    lines += [
        "-" * 104,
        f"validation loss: baseline {val['baseline']:.4f}, excited {val['excited']:.4f}  "
        f"({result['seconds']:.1f} s of training for both runs)",
        "overload = max expert load / mean load (1 = balanced); entropy of utilization / log(E); "
        "phi = Excitation multipliers (1 = unchanged update)",
    ]
    return "\n".join(lines)


def run_demo(cfg: DemoConfig, nproc: int = 2) -> dict[str, Any]:
    result = run_distributed(_worker, nproc, cfg, timeout=3600)[0]
    print(format_table(result, cfg.excitation), flush=True)
    return result
