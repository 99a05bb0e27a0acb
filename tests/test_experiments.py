"""The experiment commands run end to end at toy size, write what they promise,
reuse cached runs only by config hash, and word verdicts from the intervals."""

import csv
import math

import pytest

from excitation_dist.experiments import lm_sweep, micro_moe, stats


def _rows(path):
    return list(csv.DictReader(open(path)))


def test_micro_moe_sweep_best_vs_best_tables_plots_and_cache(tmp_path):
    argv = ["micro", "--out", str(tmp_path), "--seeds", "2", "--epochs", "1", "--settings", "adam:256",
            "--strategies", "none,zerosum,global", "--lrs", "0.001,0.01", "--width", "32", "--k", "4"]
    assert micro_moe.main(argv) == 0
    runs = _rows(tmp_path / "runs.csv")
    assert len(runs) == 3 * 2 * 2 and {r["strategy"] for r in runs} == {"none", "zerosum", "global"}
    assert all(0.0 <= float(r["test_accuracy"]) <= 1.0 and 0.0 <= float(r["val_accuracy"]) <= 1.0 for r in runs)
    assert len(_rows(tmp_path / "curves.csv")) == len(runs)  # one epoch each
    best = _rows(tmp_path / "best.csv")
    assert [b["strategy"] for b in best] == ["none", "zerosum", "global"]
    for b in best:  # the chosen lr is the one with the best mean validation accuracy
        val = {lr: sum(float(r["val_accuracy"]) for r in runs if r["strategy"] == b["strategy"] and
                       float(r["lr"]) == lr) for lr in (0.001, 0.01)}
        assert val[float(b["best_lr"])] == max(val.values())
    assert 0 < float(best[1]["p_t"]) <= 1 and float(best[1]["p_sign_flip"]) >= 0.25  # n = 2: sign-flip p >= 2/4
    assert "minus baseline" in (tmp_path / "tables.md").read_text()
    for png in ("lr_sweep.png", "best_vs_best.png", "training_curves.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    # same grid again: everything comes from the cache; a new seed runs only that seed's cells
    assert micro_moe.main(argv) == 0
    assert "0 run" in (tmp_path / "last_invocation.txt").read_text()
    assert micro_moe.main(argv[:3] + ["--seed-list", "7"] + argv[5:]) == 0
    assert "6 run" in (tmp_path / "last_invocation.txt").read_text()
    assert len(_rows(tmp_path / "runs.csv")) == 18


def test_structural_confusion_grid_uses_depths_and_no_residuals(tmp_path):
    assert micro_moe.main(["depth", "--out", str(tmp_path), "--seeds", "1", "--epochs", "1", "--depths", "2,3",
                           "--strategies", "none", "--lrs", "0.1", "--width", "16", "--k", "3"]) == 0
    runs = _rows(tmp_path / "runs.csv")
    assert sorted(int(r["depth"]) for r in runs) == [2, 3] and {r["batch_size"] for r in runs} == {"128"}


def test_routing_metrics_count_dead_units_and_overload():
    import torch

    torch.manual_seed(0)
    model = micro_moe.MicroMoE(8, 3, depth=1, width=6, k=2)
    with torch.no_grad():  # units 0 and 1 always win, the rest never do
        model.hidden[0].linear.weight.zero_()
        model.hidden[0].linear.bias.copy_(torch.tensor([5.0, 4.0, 0, 0, 0, 0]))
    dead, overload = micro_moe.routing_metrics(model, torch.randn(10, 8))
    assert dead == 4 and overload == pytest.approx(3.0)  # 10 samples on each of 2 units; mean 20/6


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


def test_confidence_intervals_and_verdicts():
    m, lo, hi = stats.mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and hi - m == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-5)  # t(0.975, 2)
    base = {0: 0.5, 1: 0.6, 2: 0.7}
    assert stats.paired({0: 0.6, 1: 0.71, 2: 0.79}, base)["verdict"] == "better"
    assert stats.paired({0: 0.4, 1: 0.49, 2: 0.61}, base)["verdict"] == "worse"
    assert stats.paired({0: 0.6, 1: 0.5, 2: 0.72}, base)["verdict"] == "no difference detected"
    assert stats.paired({0: 0.4, 1: 0.49, 2: 0.61}, base, higher_is_better=False)["verdict"] == "better"
    assert stats.paired({5: 1.0}, base)["n"] == 0  # only shared seeds pair


def test_lm_sweep_report_chooses_lr_on_selection_seeds_and_pairs_report_seeds(tmp_path):
    rows = []
    for strategy, best in (("none", 0.003), ("zerosum", 0.01)):
        for lr in (0.001, 0.003, 0.01):
            rows.append({"hash": f"{strategy}{lr}s0", "stage": "sweep", "aux": 0.01, "strategy": strategy, "lr": lr,
                         "seed": 0, "val_loss": 2.0 if lr == best else 2.5})
        for seed in (1, 2, 3):
            rows.append({"hash": f"{strategy}{seed}", "stage": "confirm", "aux": 0.01, "strategy": strategy,
                         "lr": best, "seed": seed, "val_loss": 2.0 + 0.01 * seed - (0.1 if strategy == "zerosum" else 0)})
    for r in rows:
        r.update(overload_last10pct=1.5, dead_experts_last10pct=0.0, entropy_last10pct=0.9)
    argv = ["--out", str(tmp_path), "--report-only", "--select-seeds", "0", "--report-seeds", "1,2,3",
            "--strategies", "none,zerosum", "--aux-coefs", "0.01", "--lrs", "0.001,0.003,0.01"]

    def reported() -> dict:
        stats.write_csv(tmp_path / "runs.csv", rows)
        assert lm_sweep.main(argv) == 0
        best = {b["strategy"]: b for b in _rows(tmp_path / "best.csv")}
        assert float(best["none"]["best_lr"]) == 0.003 and float(best["zerosum"]["best_lr"]) == 0.01
        return best

    best = reported()
    assert float(best["zerosum"]["diff_vs_baseline"]) == pytest.approx(-0.1)
    assert float(best["zerosum"]["p_t"]) == 0.0 and float(best["zerosum"]["p_sign_flip"]) == pytest.approx(2 / 8)
    assert (tmp_path / "best_vs_best.png").read_bytes()[:4] == b"\x89PNG"
    assert "| validation loss, nats/byte" in (tmp_path / "tables.md").read_text()  # no test split: validation

    for r in rows:  # every run with a test split: the report quotes the test loss, the choice still the validation's
        r["test_loss"] = r["val_loss"] + (0.5 if r["strategy"] == "none" else 0.2)
    assert float(reported()["zerosum"]["diff_vs_baseline"]) == pytest.approx(-0.4)
    assert "| test loss, nats/byte" in (tmp_path / "tables.md").read_text()


def test_lm_sweep_balancing_settings_parse_and_name():
    assert lm_sweep.parse_balancing("aux:0.01") == (0.01, False)
    assert lm_sweep.parse_balancing("bias") == (0.0, True)
    assert lm_sweep.parse_balancing("bias+aux:0.001") == (0.001, True)
    with pytest.raises(Exception, match="unknown load-balancing setting"):
        lm_sweep.parse_balancing("aux=0.01")
    assert lm_sweep.setting_name("0.0", "1") == "aux-free bias"
    assert lm_sweep.setting_name("0.01", "0") == "aux loss 0.01"
    assert lm_sweep.setting_name(0.01, True) == "aux-free bias + aux loss 0.01"


def test_lm_sweep_trains_through_the_recipe_and_reuses_runs_by_config_hash(tmp_path):
    argv = ["--out", str(tmp_path), "--steps", "24", "--eval-steps", "2", "--lrs", "0.003", "--strategies", "zerosum",
            "--balancing", "bias", "--select-seeds", "0", "--report-seeds", "1", "--jobs", "2", "--split", "90,5,5"]
    assert lm_sweep.main(argv) == 0
    runs = _rows(tmp_path / "runs.csv")
    assert sorted((r["stage"], r["seed"], r["expert_bias"]) for r in runs) == [("confirm", "1", "1"), ("sweep", "0", "1")]
    assert all(math.isfinite(float(r["val_loss"])) and float(r["overload_last10pct"]) >= 1 for r in runs)
    # the split's test share: every run's loss on the test tokens after the last step, beside the validation loss
    assert all(r["split"] == "90,5,5" and math.isfinite(float(r["test_loss"])) and r["test_loss"] != r["val_loss"]
               for r in runs)
    assert "| test loss, nats/byte" in (tmp_path / "tables.md").read_text()
    assert (tmp_path / "last_invocation.txt").read_text().startswith("2 runs trained, 0 reused")
    assert lm_sweep.main(argv) == 0  # the same cells again: nothing retrains
    assert (tmp_path / "last_invocation.txt").read_text().startswith("0 runs trained, 2 reused")
    assert "| aux-free bias | zerosum |" in (tmp_path / "tables.md").read_text()


def test_sign_flip_p_exact_against_hand_counts():
    assert stats.sign_flip_p([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2 / 32)  # only all-+ and all-- reach 15
    # signed sums of {1, 2, 3}: 6, 0, 2, -4, 4, -2, 0, -6; |s| >= |1 - 2 + 3| = 2 for 6 of the 8
    assert stats.sign_flip_p([1.0, -2.0, 3.0]) == pytest.approx(6 / 8)
    assert stats.sign_flip_p([0.0, 0.0]) == 1.0
    assert stats.min_sign_flip_p(5) == pytest.approx(0.0625)


def test_paired_t_p_against_the_closed_form_for_two_degrees_of_freedom():
    # diffs 1, 2, 3: mean 2, sd 1, t = 2 * sqrt(3); df 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2))
    t = 2 * math.sqrt(3)
    assert stats.paired_t_p([1.0, 2.0, 3.0]) == pytest.approx(2 * (0.5 - t / (2 * math.sqrt(2 + t * t))), rel=1e-9)
    assert stats.paired_t_p([1.0, 1.0, 1.0]) == 0.0 and stats.paired_t_p([0.0, 0.0]) == 1.0


def test_holm_step_down_by_hand():
    # sorted 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> monotone 0.06)
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    out = stats.holm([0.01, float("nan")])
    assert out[0] == pytest.approx(0.01) and math.isnan(out[1])  # NaN does not count in m


def test_rule_verdict_is_the_same_for_both_directions_and_requires_convergence():
    assert stats.rule_verdict(+1.0, 0.01) == "better" and stats.rule_verdict(-1.0, 0.01) == "worse"
    assert stats.rule_verdict(-1.0, 0.01, higher_is_better=False) == "better"
    assert stats.rule_verdict(+1.0, 0.05) == "no difference detected"
    assert stats.rule_verdict(-1.0, 0.001, converged=False) == "unconverged, no verdict"


def test_convergence_criterion_and_speed_on_synthetic_curves():
    from excitation_dist.experiments import page

    flat = {s: [(x, 0.9 + 0.01 * s) for x in range(1, 11)] for s in range(3)}
    rising = {s: [(x, 0.05 * x + 0.01 * s) for x in range(1, 11)] for s in range(3)}
    mk = lambda curves: page.Cell("t", "s", "m", 0.1, False, {}, {s: c[-1][1] for s, c in curves.items()},  # noqa: E731
                                  curves, 10, True)
    assert page.convergence(mk(flat))["converged"]
    r = page.convergence(mk(rising))
    assert not r["converged"] and r["status"] == "still improving" and r["change"] == pytest.approx(0.05 * 2)
    steps, n = page.speed_of(mk(rising), 0.3)
    assert n == 3 and steps == [6, 6, 6]  # 0.05 x + 0.01 s >= 0.3 first at x = 6 for s = 0, 1, 2


def test_plan_lists_commands_with_estimates():
    from excitation_dist.experiments import plan

    items = plan.plan(plan.ROOT / "results")
    assert any("--steps 6000" in it["cmd"] for it in items)
    lm = [it for it in items if ".lm_sweep " in it["cmd"]]
    assert lm and all("--split 96,2,2" in it["cmd"] and "--select-seeds 0,6 " in it["cmd"] for it in lm)
    assert all(it["cpu_h"] >= 0 and it["runs"] > 0 for it in items)
    micro = [it for it in items if ".micro_moe " in it["cmd"]]
    assert micro and all("--seed-list 5,6,7" in it["cmd"] if it["group"].startswith("3") else
                         "--seed-list 0,1,2,3,4,5,6,7" in it["cmd"] for it in micro)
    assert plan.refine(0.1, 1.0) == [0.22, 0.46]


def test_plan_counts_the_held_out_gpt_moe_runs_by_the_hash_lm_sweep_gives_them(tmp_path):
    import argparse

    from excitation_dist.experiments import lm_sweep, plan, stats

    spec = {**plan.LM_HELDOUT, "balancing": ["bias"], "strategies": ["none", "zerosum"], "lrs": [0.001, 0.0022]}
    assert plan.lm_missing(tmp_path, spec) == 2 * 2 * 2 + 2 * 5  # nothing run: 8 sweep runs, 5 report seeds x 2
    args = argparse.Namespace(config=str(plan.ROOT / "configs" / "tiny_cpu_torch.yaml"), steps=1500, gamma=1.0,
                              procs=1, eval_steps=32, overrides=[], evals=12, split="96,2,2")
    done = [lm_sweep.run_config(args, (0.0, True), "none", 0.001, 0, "sweep"),
            lm_sweep.run_config(args, (0.0, True), "zerosum", 0.0022, 6, "sweep"),
            lm_sweep.run_config(args, (0.0, True), "none", 0.0022, 3, "confirm")]
    (tmp_path / "lm_heldout").mkdir()
    stats.write_csv(tmp_path / "lm_heldout" / "runs.csv", done)
    assert plan.lm_missing(tmp_path, spec) == 18 - 3
    assert "--split 96,2,2" in plan.lm_command(spec) and "--evals 12" in plan.lm_command(spec)


def test_plan_refines_the_held_out_gpt_moe_grid_and_lists_its_same_lr_check_once_the_sweep_is_complete(tmp_path):
    from excitation_dist.experiments import plan, stats
    from tests.synthetic_results import heldout_runs

    spec = {**plan.LM_HELDOUT, "balancing": ["aux:0.01"], "strategies": ["none", "zerosum"], "lrs": [0.001, 0.0022]}
    rows, curves = heldout_runs(lrs=(0.001, 0.0022))
    (tmp_path / "lm_heldout").mkdir()
    stats.write_csv(tmp_path / "lm_heldout" / "curves.csv", curves)
    stats.write_csv(tmp_path / "lm_heldout" / "runs.csv", rows[:-1])
    assert plan.lm_followups(tmp_path, spec) == []  # a report run short: the choice is not final yet
    stats.write_csv(tmp_path / "lm_heldout" / "runs.csv", rows)
    got = {(g, why): (one, n) for g, why, one, n in plan.lm_followups(tmp_path, spec)}
    # both seeds agree (SD 0) and the chosen point beats its neighbour by 0.1: two points between them; and on
    # this 2-point grid each choice is also an end: one point beyond it at the grid's spacing
    assert {why: one["lrs"] for (g, why), (one, n) in got.items() if g == "2 refined grid"} == {
        "lm_heldout: aux loss 0.01 none": [0.0013, 0.0017, 0.0048],
        "lm_heldout: aux loss 0.01 zerosum": [0.00045, 0.0013, 0.0017]}
    same = [(one, n) for (g, why), (one, n) in got.items() if g == "6 controls"]
    assert len(same) == 1 and same[0][0]["report_at"] == [0.001] and same[0][0]["strategies"] == ["none"]
    assert "--report-at 0.001 " in plan.lm_command(same[0][0])
    assert same[0][1] == 5  # the baseline at ZeroSum's lr 0.001 on the 5 report seeds
    untuned = [(one, n) for (g, why), (one, n) in got.items() if g == "5 speed"]
    assert len(untuned) == 1 and untuned[0][0]["report_at"] == [0.0022] and untuned[0][0]["strategies"] == ["zerosum"]
    assert untuned[0][1] == 5  # ZeroSum at the baseline's lr 0.0022 on the 5 report seeds


def test_lm_sweep_confirms_the_best_over_the_whole_grid_and_report_at_trains_only_the_report_seeds(tmp_path,
                                                                                                    monkeypatch):
    """A command adding refined points confirms the cell's best over every lr in runs.csv (not the best of its own
    points); --report-at trains the report seeds at the given lrs and no selection run."""
    trained = []

    def fake_train(args, cfg):  # validation loss lowest at lr 0.01, whatever the command's grid
        trained.append((cfg["lr"], cfg["seed"], cfg["stage"]))
        loss = 2.0 + abs(math.log10(cfg["lr"]) + 2)
        row = {**cfg, "val_loss": loss, "test_loss": loss, "overload_last10pct": 1.0,
               "dead_experts_last10pct": 0.0, "entropy_last10pct": 1.0, "seconds": 0.0}
        return row, [{"hash": cfg["hash"], "step": 10, "train_loss": loss, "val_loss": loss}]

    monkeypatch.setattr(lm_sweep, "_train", fake_train)
    monkeypatch.setattr(lm_sweep, "report", lambda args: None)
    common = ["--out", str(tmp_path), "--strategies", "none", "--balancing", "aux:0.01", "--select-seeds", "0,6",
              "--report-seeds", "1,2"]
    assert lm_sweep.main(common + ["--lrs", "0.001,0.01"]) == 0
    assert sorted(trained) == sorted([(0.001, 0, "sweep"), (0.001, 6, "sweep"), (0.01, 0, "sweep"),
                                      (0.01, 6, "sweep"), (0.01, 1, "confirm"), (0.01, 2, "confirm")])
    trained.clear()
    assert lm_sweep.main(common + ["--lrs", "0.0022,0.0046"]) == 0  # refined points, both worse than 0.01
    assert sorted(trained) == sorted([(0.0022, 0, "sweep"), (0.0022, 6, "sweep"), (0.0046, 0, "sweep"),
                                      (0.0046, 6, "sweep")])  # 0.01 stays chosen: its report runs are reused
    trained.clear()
    assert lm_sweep.main(common + ["--report-at", "0.0022"]) == 0
    assert sorted(trained) == [(0.0022, 1, "confirm"), (0.0022, 2, "confirm")]


def test_refinements_between_distinguishable_neighbours_and_beyond_an_end_of_the_grid():
    from excitation_dist.experiments import plan

    flat = {0.1: [0.5, 0.6], 0.22: [0.55, 0.56], 0.46: [0.5, 0.6]}  # within the seed spread: nothing inside
    assert plan.refinements(flat, 0.22) == []
    sharp = {0.1: [0.2, 0.21], 0.22: [0.9, 0.91], 0.46: [0.5, 0.51]}
    assert plan.refinements(sharp, 0.22) == [0.13, 0.17, 0.28, 0.36]
    assert plan.refinements(flat, 0.1) == [0.045]  # an end: one point beyond, however flat
    assert plan.refinements(sharp, 0.46) == [0.28, 0.36, 0.96]


def _synthetic_runs(select_lr=0.1, report_lr=0.01, skip=()):
    """Two methods on a 2-point grid: the report seeds 0-4 prefer ``report_lr`` on validation, the selection
    seeds 5-7 prefer ``select_lr``; test accuracy is 0.5 + seed / 100 (+0.1 for zerosum at 0.1)."""
    rows = []
    for m in ("none", "zerosum"):
        for lr in (0.01, 0.1):
            for seed in range(8):
                if (m, lr, seed) in skip:
                    continue
                good = (select_lr if seed >= 5 else report_lr) == lr
                rows.append({"experiment": "micro", "setting": "sgd batch 512", "optimizer": "sgd", "batch_size": 512,
                             "depth": 4, "strategy": m, "lr": lr, "seed": seed, "epochs": 30,
                             "hash": f"{m}{lr}{seed}", "diverged": 0, "val_accuracy": 0.9 if good else 0.5,
                             "test_accuracy": 0.5 + seed / 100 + (0.1 if m == "zerosum" and lr == 0.1 else 0),
                             "dead_units": 1.0, "overload": 2.0})
    return rows


def test_lr_chosen_on_the_selection_seeds_and_reported_on_seeds_0_to_4(tmp_path):
    from excitation_dist.experiments import page

    stats.write_csv(tmp_path / "runs.csv", _synthetic_runs())
    e = page.load_micro("micro", tmp_path)
    assert e.split["sgd batch 512"]
    c, base = e.cells[("sgd batch 512", "zerosum")], e.cells[("sgd batch 512", "none")]
    assert (c.lr, base.lr) == (0.1, 0.1) and c.chosen_on == "5-7"
    assert sorted(c.report) == [0, 1, 2, 3, 4]  # the selection seeds are not reported
    assert page.paired_full(c.report, base.report)["diff"] == pytest.approx(0.1)
    same = e.same_cells[("sgd batch 512", "zerosum")]  # the sensitivity analysis: seeds 0-4 choose
    assert same.lr == 0.01 and same.chosen_on == "0-4" and sorted(same.report) == [0, 1, 2, 3, 4]
    # one selection run missing on the grid: the setting falls back to choosing on seeds 0-4, and says so
    stats.write_csv(tmp_path / "runs.csv", _synthetic_runs(skip={("none", 0.01, 6)}))
    e = page.load_micro("micro", tmp_path)
    assert not e.split["sgd batch 512"] and e.cells[("sgd batch 512", "zerosum")].lr == 0.01
    assert e.cells[("sgd batch 512", "zerosum")].chosen_on == "0-4"


def test_split_choice_and_the_plan_of_missing_selection_runs(tmp_path):
    from excitation_dist.experiments import plan

    rows = _synthetic_runs(skip={("zerosum", 0.1, 7)})
    by = {m: [r for r in rows if r["strategy"] == m] for m in ("none", "zerosum")}
    assert not stats.selection_covers(by)
    split, chosen = stats.split_choice(by, "val_accuracy")
    assert not split and chosen["zerosum"] == (0.01, True)
    by["zerosum"] = [r for r in _synthetic_runs() if r["strategy"] == "zerosum"]
    assert stats.split_choice(by, "val_accuracy") == (True, {"none": (0.1, True), "zerosum": (0.1, True)})
    assert stats.seeds_label((5, 6, 7)) == "5-7" and stats.seeds_label((0, 6, 7)) == "0,6,7"
    (tmp_path / "micro_moe").mkdir()
    stats.write_csv(tmp_path / "micro_moe" / "runs.csv", rows)
    assert plan.selection_gaps(tmp_path) == [("micro_moe", "sgd batch 512", ["zerosum"], [0.1], 1)]
    assert plan.missing_runs(tmp_path, "micro_moe", ["sgd batch 512"], 30, ["none", "zerosum"], [0.1], [7, 8]) == 3


def test_training_curves_leave_diverged_seeds_out_of_the_mean_and_mark_where_they_stopped(tmp_path, monkeypatch):
    from excitation_dist.experiments import plots

    drawn = {}
    monkeypatch.setattr(plots, "_finish", lambda fig, *a, **k: drawn.update(fig=fig))
    runs = {0: [2.0, 1.0, 0.5], 1: [2.0, 1.0, 0.7], 2: [2.0, 1e14]}  # seed 2 diverged in its second epoch
    rows = [{"setting": "sgd:512", "strategy": "none", "seed": seed, "epoch": epoch, "loss": loss,
             "diverged": int(seed == 2)} for seed, losses in runs.items() for epoch, loss in enumerate(losses, 1)]
    plots.curves_plot(tmp_path / "curves.png", rows, ["sgd:512"], ["none"], x_key="epoch",
                      panels=[("loss", "loss", 1, None, True)])
    ax = drawn["fig"].axes[0]
    mean, mark = ax.get_lines()
    assert mean.get_xdata().tolist() == [1, 2, 3] and mean.get_ydata().tolist() == pytest.approx([2.0, 1.0, 0.6])
    assert mark.get_xdata().tolist() == [2] and mark.get_ydata().tolist() == [1.0] and mark.get_marker() == "x"
    assert any("1 of 3 seeds diverged" in t.get_text() for t in ax.texts)
