"""Synthetic raw outputs of the experiments, for the page and plan tests."""


def heldout_runs(lrs=(0.001, 0.0022, 0.0046, 0.01), select=(0, 6), report=(1, 2, 3, 4, 5)):
    """A synthetic held-out GPT-MoE sweep (one balancing setting, baseline and ZeroSum) over ``lrs`` (default: the
    grid of ``catalog.LM_HELDOUT``): the validation loss prefers lr 0.0022 for the baseline and 0.001 for ZeroSum; the test loss is 0.3 above the validation loss,
    ZeroSum's 0.05 below the baseline's on every report seed."""
    runs, curves = [], []
    best = {"none": 0.0022, "zerosum": 0.001}
    for m in ("none", "zerosum"):
        for lr in lrs:
            for k in select:
                runs.append((m, lr, k, "sweep", 1.7 if lr == best[m] else 1.8))
        for k in report:
            runs.append((m, best[m], k, "confirm", 1.70 + 0.01 * k - (0.05 if m == "zerosum" else 0)))
    rows = []
    for i, (m, lr, k, stage, val) in enumerate(runs):
        h = f"h{i}"
        rows.append({"steps": 1500, "aux": 0.01, "expert_bias": 0, "strategy": m, "lr": lr, "seed": k, "split": "96,2,2",
                     "hash": h, "stage": stage, "val_loss": val, "test_loss": val + 0.3, "overload_last10pct": 1.3,
                     "dead_experts_last10pct": 0.0, "entropy_last10pct": 0.99})
        curves += [{"hash": h, "step": step, "train_loss": "", "val_loss": val + (1500 - step) * 1e-6}
                   for step in (1250, 1375, 1500)]
    return rows, curves

