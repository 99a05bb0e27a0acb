"""Every table on results/README.md (and the host-sync table of results/overhead/README.md) is regenerated from
the committed raw outputs by ``excitation_dist.experiments.page`` and must equal the page (no training)."""

from pathlib import Path

import pytest

from excitation_dist.experiments import page
from tests.synthetic_results import heldout_runs

RESULTS = Path(__file__).resolve().parents[1] / "results"


@pytest.fixture(scope="module")
def tables():
    return page.all_tables(RESULTS)


def test_every_generated_table_is_on_its_page_and_matches(tables):
    for name, (path, body) in tables.items():
        on_page = page.page_blocks(path.read_text())
        assert name in on_page, f"{path.name}: no block for table {name}"
        assert on_page[name] == body, f"{path.name}: table {name} differs from its data (run `page write`)"


def test_the_page_has_no_table_block_without_a_generator(tables):
    for path in {p for p, _ in tables.values()}:
        assert set(page.page_blocks(path.read_text())) <= set(tables)


def test_one_holm_family_over_every_comparison_and_one_rule_for_both_directions():
    exps = page.load_all(RESULTS)
    comps = page.comparisons(exps)
    same_lr = [c for c in comps if c["kind"] != "best-vs-best"]
    assert len(comps) == len(same_lr) + sum(m != "none" and (s, "none") in e.cells
                                            for k, e in exps.items() if k != "lm_earlier" for s, m in e.cells)
    for c in comps:
        assert c["verdict"] in ("better", "worse", "no difference detected", "unconverged, no verdict")
        if c["verdict"] in ("better", "worse"):
            assert c["converged"] and c["p_holm"] < 0.05
        if not c["converged"]:
            assert c["verdict"] == "unconverged, no verdict"
        assert c["p_holm"] >= c["p_t"] and c["p_flip"] >= 2 / 2 ** c["n"] - 1e-12


def test_overhead_sync_table_shows_both_the_max_over_ranks_and_rank_0():
    rows = {(r["size"], r["variant"]): r for r in page.parse_overhead(RESULTS / "overhead" / "deepspeed_overhead.txt")}
    r = rows[("large", "blend-positivesum")]
    assert (r["syncs"], r["rank0"]) == (122, 111)
    rows = {(r["size"], r["variant"]): r for r in page.parse_overhead(RESULTS / "overhead" / "megatron_overhead.txt")}
    assert (rows[("medium", "blend-positivesum")]["syncs"], rows[("medium", "blend-positivesum")]["rank0"]) == (62, 57)


def test_micro_moe_lrs_are_chosen_on_seeds_5_to_7_where_they_ran_and_reported_on_seeds_0_to_4():
    exps = page.load_all(RESULTS)
    for key in ("micro", "long", "depth"):
        e = exps[key]
        for (s, m), c in e.cells.items():
            assert set(c.report) <= {0, 1, 2, 3, 4}, (key, s, m)
            assert c.chosen_on == ("5-7" if e.split[s] else "0-4"), (key, s, m)
            assert e.same_cells[(s, m)].chosen_on == "0-4"
    # the sensitivity analysis is the same family of comparisons, chosen the other way
    comps, same = page.comparisons(exps), page.comparisons(exps, same_seeds=True)
    assert [(c["exp"], c["setting"], c["method"]) for c in comps] == [(c["exp"], c["setting"], c["method"])
                                                                       for c in same]


def test_the_held_out_gpt_moe_becomes_section_3_once_complete_and_the_earlier_sweep_its_sensitivity_table(tmp_path):
    from excitation_dist.experiments import stats

    for d in RESULTS.iterdir():
        if d.is_dir() and d.name != "lm_heldout":
            (tmp_path / d.name).symlink_to(d)
    (tmp_path / "lm_heldout").mkdir()
    rows, curves = heldout_runs()
    stats.write_csv(tmp_path / "lm_heldout" / "curves.csv", curves)
    stats.write_csv(tmp_path / "lm_heldout" / "runs.csv", rows[:-1])  # one report run short: not yet
    exps = page.load_all(tmp_path)
    assert "lm_earlier" not in exps and exps["lm"].select == (0,) and exps["lm"].extra_metric == "val_loss"

    stats.write_csv(tmp_path / "lm_heldout" / "runs.csv", rows)
    exps = page.load_all(tmp_path)
    lm = exps["lm"]
    assert "lm_earlier" in exps and lm.select == (0, 6) and lm.extra_metric == "test_loss"
    base, zs = lm.cells[("aux loss 0.01", "none")], lm.cells[("aux loss 0.01", "zerosum")]
    assert (base.lr, zs.lr, zs.chosen_on) == (0.0022, 0.001, "0,6")
    assert zs.report[3] == pytest.approx(1.73 - 0.05 + 0.3) and zs.val_final[3] == pytest.approx(1.73 - 0.05)
    comps = [c for c in page.comparisons(exps) if c["exp"] == "lm"]
    assert [(c["kind"], c["method"]) for c in comps] == [("best-vs-best", "zerosum")]
    assert comps[0]["diff"] == pytest.approx(-0.05)
    tables = page.all_tables(tmp_path)
    assert "| test loss, nats/byte [95% CI] |" in tables["lm-verdicts"][1]
    earlier = tables["lm-earlier"][1]
    assert "| aux loss 0.01 | zerosum | 0.001 / 0.0022 | -0.050 [-0.050, -0.050] |" in earlier
    assert "chosen on seeds 0,6" in earlier and "chosen on seed(s) 0 " in earlier
    assert "lm-same-lr" not in tables  # the baseline has no runs at ZeroSum's lr: no same-lr check to show

    # a refined point half run (one selection seed of two) leaves the sweep complete and the choice where it was
    extra = {**rows[0], "lr": 0.0017, "seed": 0, "hash": "refined", "val_loss": 1.0}
    stats.write_csv(tmp_path / "lm_heldout" / "runs.csv", rows + [extra])
    exps = page.load_all(tmp_path)
    assert "lm_earlier" in exps and exps["lm"].cells[("aux loss 0.01", "none")].lr == 0.0022


def test_a_longer_rerun_is_on_the_page_only_once_its_whole_grid_has_run(tmp_path):
    from excitation_dist.experiments import catalog, stats

    for d in RESULTS.iterdir():
        if d.is_dir() and d.name != "structural_confusion_long":
            (tmp_path / d.name).symlink_to(d)
    rows = stats.read_csv(RESULTS / "structural_confusion_long" / "runs.csv")
    exp = catalog.BY_KEY["depth_long"]
    assert catalog.missing(RESULTS, exp) == 0 and "depth_long" in page.load_all(RESULTS)
    (tmp_path / exp.dir).mkdir()
    stats.write_csv(tmp_path / exp.dir / "runs.csv", rows[1:])  # one run of the grid missing
    stats.write_csv(tmp_path / exp.dir / "curves.csv", [])
    assert catalog.missing(tmp_path, exp) == 1
    assert "depth_long" not in page.load_all(tmp_path) and "depth_long" not in {c["exp"] for c in page.comparisons(
        page.load_all(tmp_path))}
