"""Every table on results/README.md (and the host-sync table of results/overhead/README.md) is regenerated from
the committed raw outputs by ``excitation_dist.experiments.page`` and must equal the page (no training)."""

from pathlib import Path

import pytest

from excitation_dist.experiments import page

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
    assert len(comps) == 43
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
