"""The experiment commands run end to end at toy size and write what they promise."""

import csv

from excitation_dist.experiments import micro_moe


def test_micro_moe_writes_runs_summary_and_plot(tmp_path):
    assert micro_moe.main(["micro", "--out", str(tmp_path), "--seeds", "2", "--epochs", "1", "--batch-sizes", "256",
                           "--optimizers", "adam", "--width", "32", "--k", "4"]) == 0
    runs = list(csv.DictReader(open(tmp_path / "runs.csv")))
    assert len(runs) == 6 and {r["strategy"] for r in runs} == {"none", "zerosum", "positivesum"}
    summary = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert len(summary) == 3 and all(0.0 <= float(r["test_accuracy_mean"]) <= 1.0 for r in summary)
    assert (tmp_path / "micro_moe.png").read_bytes()[:4] == b"\x89PNG"


def test_topk_layer_counts_every_unit_as_an_expert():
    import torch

    from excitation_dist.torch import attach

    torch.manual_seed(0)
    model = micro_moe.MicroMoE(8, 3, depth=2, width=16, k=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ex = attach(model, opt, {"strategy": "zerosum"})
    x = torch.randn(10, 8)
    first = model.hidden[0].linear(x).topk(4, dim=-1).indices  # before the step changes the weights
    model(x).sum().backward()
    opt.step()
    assert ex.last_counts_LE.shape == (2, 16) and ex.last_counts_LE.sum(-1).tolist() == [40, 40]
    assert torch.equal(ex.last_counts_LE[0], torch.bincount(first.reshape(-1), minlength=16))
