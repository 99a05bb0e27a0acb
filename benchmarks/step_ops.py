"""Operations dispatched inside ``optimizer.step()`` with and without Excitation, against L x E.

The cost a GPU pays per step on the host is one kernel launch per operation (about
10-20 us each); it does not show in CPU step times. This counts, with a
``TorchDispatchMode`` (:mod:`excitation_dist.testing.dispatch`), every aten op the
base optimizer's step dispatches, with Excitation's hooks (folded or blend path,
ZeroSum on uneven counts) and without, and the kernels a GPU would launch for
them (torch's foreach fast-path rules applied).

Layouts, as a GPU run holds the expert weights the optimizer steps:
- ``per-expert``: one tensor per (layer, expert, weight): Megatron's
  DistributedOptimizer over TEGroupedMLP ``weight0..N`` or SequentialMLP,
  deepspeed.moe experts without ZeRO flattening, one module per expert;
- ``flat``: the same elements in one flat fp32 partition (ZeRO-1/2), experts back to back.
Base optimizer: torch AdamW single-tensor (``foreach=False``), ``foreach=True``
(torch's default on CUDA), ``fused=True``.

    python benchmarks/step_ops.py                 # the table (seconds)
    python benchmarks/step_ops.py --out results/step_ops.md
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GRID = [(2, 4), (4, 8), (8, 16), (24, 32)]  # (MoE layers L, experts E)
WEIGHTS = 2  # weights per expert (fc1, fc2)
ROWS, COLS = 4, 8  # a tiny expert weight: the count does not depend on its size
BASES = {"single": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def _setup(layout: str, layers: int, experts: int, base: str, update: str | None, *, rows: int = ROWS,
           cols: int = COLS, device: str = "cpu", make_optimizer=None):
    """(prepare: gradients and this step's counts, the base optimizer, the Excitation or None).
    ``make_optimizer(params)`` replaces torch AdamW with ``BASES[base]`` (gpu_check: other fused optimizers)."""
    import torch

    from excitation_dist import Excitation, ExpertSegment

    ROWS, COLS = rows, cols  # noqa: N806 (the expert weight's shape)
    numel = ROWS * COLS
    if layout == "per-expert":
        tensors = [torch.nn.Parameter(torch.randn(ROWS, COLS, device=device))
                   for _ in range(layers * experts * WEIGHTS)]
        segments = [ExpertSegment(t, 0, numel, i // (experts * WEIGHTS), (i // WEIGHTS) % experts)
                    for i, t in enumerate(tensors)]
    else:
        flat = torch.nn.Parameter(torch.randn(layers * experts * WEIGHTS * numel, device=device))
        tensors = [flat]
        per_layer = experts * WEIGHTS * numel  # layer l: weight w of every expert, experts back to back
        segments = [ExpertSegment(flat, l * per_layer + (w * experts + e) * numel,
                                  l * per_layer + (w * experts + e + 1) * numel, l, e)
                    for l in range(layers) for w in range(WEIGHTS) for e in range(experts)]
    dense = torch.nn.Parameter(torch.randn(ROWS, COLS, device=device))
    if make_optimizer is not None:
        opt = make_optimizer(tensors + [dense])
    else:
        opt = torch.optim.AdamW(tensors + [dense], lr=1e-3, weight_decay=0.1, **BASES[base])
    ex = None
    if update is not None:
        ex = Excitation({"strategy": "zerosum", "update": update}, layers, experts, reduce=False, device=device)
        ex.set_segments(segments)
        ex.hook_optimizer(opt)
    counts = torch.arange(1, experts + 1, device=device).repeat(layers, 1)  # uneven: every phi != 1

    def prepare(grads: bool = True):  # the backward (new gradients) and the forward's counting
        for t in tensors + [dense] if grads else ():
            t.grad = torch.randn_like(t)
        if ex is not None:
            for layer in range(layers):
                ex.record(layer, counts[layer])

    return prepare, opt, ex


def count(layout: str, layers: int, experts: int, base: str, update: str | None, make_optimizer=None):
    """(ops, GPU launches) dispatched inside one optimizer step (after one warm-up step)."""
    from excitation_dist.testing.dispatch import count_dispatches

    prepare, opt, ex = _setup(layout, layers, experts, base, update, make_optimizer=make_optimizer)
    prepare()
    opt.step()  # lazy state initialization happens in the first step
    prepare()
    with count_dispatches() as counts:
        opt.step()
    path = "none" if ex is None else ex.update_path
    return counts.ops, counts.gpu_launches, path


def table() -> str:
    lines = ["| layout | base AdamW | L x E | path | ops | + ops | GPU launches | + launches |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for layout in ("per-expert", "flat"):
        for base in BASES:
            for layers, experts in GRID:
                ops0, launches0, _ = count(layout, layers, experts, base, None)
                lines.append(f"| {layout} | {base} | {layers} x {experts} | none | {ops0} | | {launches0} | |")
                for update in ("auto", "blend"):
                    ops, launches, path = count(layout, layers, experts, base, update)
                    if update == "blend" and path == "blend" and lines[-1].split(" | ")[3] == "blend":
                        continue  # auto already took the blend path
                    lines.append(f"| {layout} | {base} | {layers} x {experts} | {path} | {ops} | {ops - ops0:+d} "
                                 f"| {launches} | {launches - launches0:+d} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the blend path's one log line per optimizer
    import torch

    header = (f"Operations dispatched inside one AdamW optimizer step (torch {torch.__version__}, CPU count; "
              f"GPU launches estimated with torch's foreach fast-path rules), {WEIGHTS} weights per expert, "
              "ZeroSum on uneven counts. `python benchmarks/step_ops.py`.\n\n")
    text = header + table()
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
