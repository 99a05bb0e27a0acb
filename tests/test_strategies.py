"""Excitation multipliers as the paper and ../shared/EXCITATION.md define them."""

import math
import random

import pytest
import torch

from excitation_dist import STRATEGIES, multipliers
from excitation_dist.strategies import shape_multipliers


def test_paper_figure_1_zerosum_gamma_1():
    phi = multipliers(torch.tensor([[0.75, 0.25]]), "zerosum", gamma=1.0)
    assert phi.tolist() == [[1.5, 0.5]]
    # counts instead of fractions give the same multipliers (ZeroSum is scale-invariant)
    assert multipliers(torch.tensor([[300, 100]]), "zerosum", gamma=1.0).tolist() == [[1.5, 0.5]]


def test_zerosum_averages_one_and_zero_count_expert_gets_zero():
    counts = torch.tensor([[5, 0, 3, 2], [1, 1, 1, 7]])
    for gamma in (0.5, 1.0, 2.0):
        phi = multipliers(counts, "zerosum", gamma)
        assert torch.allclose(phi.mean(-1), torch.ones(2, dtype=torch.float64), atol=1e-12)
        assert phi[0, 1] == 0.0


def test_all_zero_layer_gives_one_for_every_strategy():
    counts = torch.tensor([[0, 0, 0], [4, 0, 2]])
    for strategy in STRATEGIES:
        phi = multipliers(counts, strategy, 1.5, generator=torch.Generator().manual_seed(0))
        assert not torch.isnan(phi).any(), strategy
        assert phi[0].tolist() == [1.0, 1.0, 1.0], strategy


def test_gamma_zero_turns_zerosum_and_positivesum_off():
    counts = torch.tensor([[9, 0, 1, 2]])
    for strategy in ("zerosum", "positivesum", "expdiff", "inverted", "global"):
        assert multipliers(counts, strategy, 0.0).tolist() == [[1.0] * 4], strategy


def test_positivesum_is_max_one_zerosum():
    counts = torch.tensor([[6, 3, 1, 0]])
    zs, ps = multipliers(counts, "zerosum", 1.0), multipliers(counts, "positivesum", 1.0)
    assert (ps >= 1).all()
    assert torch.equal(ps, zs.clamp_min(1.0))


def test_expdiff_formula():
    counts = torch.tensor([[6.0, 3.0, 1.0, 0.0]])
    u = counts / counts.sum()
    expected = torch.exp(2.0 * (u / u.mean() - 1.0)).to(torch.float64)
    assert torch.allclose(multipliers(counts, "expdiff", 2.0), expected, atol=1e-12)
    # uniform utilization leaves every expert at 1
    assert torch.allclose(multipliers(torch.ones(1, 4), "expdiff", 3.0), torch.ones(1, 4, dtype=torch.float64))


def test_inverted_swaps_two_experts_and_rewards_the_rare_one():
    assert multipliers(torch.tensor([[0.75, 0.25]]), "inverted", 1.0).tolist() == [[0.5, 1.5]]
    phi = multipliers(torch.tensor([[10, 5, 1]]), "inverted", 1.0)
    assert phi[0, 2] == phi.max() and phi[0, 0] == phi.min()
    assert math.isclose(phi.mean().item(), 1.0)


def test_random_permutes_the_zerosum_values():
    counts = torch.tensor([[10, 5, 1, 0, 4]])
    zs = multipliers(counts, "zerosum", 1.0)
    seen = set()
    for seed in range(20):
        phi = multipliers(counts, "random", 1.0, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(phi.sort().values, zs.sort().values)
        seen.add(tuple(phi[0].tolist()))
    assert len(seen) > 5  # really not tied to utilization
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(multipliers(counts, "random", 1.0, g1), multipliers(counts, "random", 1.0, g2))


def test_global_is_one_layer_wide_scale():
    phi = multipliers(torch.tensor([[0.75, 0.25]]), "global", 1.0)
    assert phi.tolist() == [[1.25, 1.25]]  # 0.75 * 1.5 + 0.25 * 0.5
    assert multipliers(torch.ones(1, 8), "global", 1.0).tolist() == [[1.0] * 8]


def test_none_is_all_ones():
    assert multipliers(torch.tensor([[1, 2, 3]]), "none").tolist() == [[1.0, 1.0, 1.0]]


def test_one_dimensional_counts():
    assert multipliers(torch.tensor([3, 1]), "zerosum").tolist() == [1.5, 0.5]


@pytest.mark.parametrize("bad", [torch.tensor([[1.0, -1.0]]), torch.tensor([[float("nan"), 1.0]]), torch.zeros(2, 0)])
def test_bad_counts_are_rejected(bad):
    with pytest.raises(ValueError):
        multipliers(bad, "zerosum")


def test_bad_strategy_and_gamma_are_rejected():
    with pytest.raises(ValueError, match="zerosum"):
        multipliers(torch.ones(1, 2), "zero-sum")
    with pytest.raises(ValueError, match="gamma"):
        multipliers(torch.ones(1, 2), "zerosum", gamma=-1.0)


# ------------------------------------------------------- independent reference
def _reference(counts, strategy, gamma):
    """Plain-Python implementation straight from the definitions."""
    out = []
    for row in counts:
        total = sum(row)
        n = len(row)
        if total == 0:
            out.append([1.0] * n)
            continue
        u = [c / total for c in row]

        def zs(v):
            p = [x**gamma if not (x == 0 and gamma == 0) else 1.0 for x in v]
            m = sum(p) / n
            return [x / m for x in p]

        if strategy == "zerosum":
            out.append(zs(u))
        elif strategy == "positivesum":
            out.append([max(1.0, x) for x in zs(u)])
        elif strategy == "expdiff":
            out.append([math.exp(gamma * (x * n - 1.0)) for x in u])
        elif strategy == "inverted":
            hi, lo = max(u), min(u)
            out.append(zs([hi + lo - x for x in u]))
        elif strategy == "global":
            z = zs(u)
            out.append([sum(a * b for a, b in zip(u, z))] * n)
    return out


@pytest.mark.parametrize("strategy", ["zerosum", "positivesum", "expdiff", "inverted", "global"])
def test_agrees_with_independent_implementation_on_random_inputs(strategy):
    rng = random.Random(1234)
    for _ in range(200):
        layers, experts = rng.randint(1, 4), rng.randint(1, 16)
        counts = [[rng.choice([0, 0, rng.randint(0, 5), rng.randint(0, 1000)]) for _ in range(experts)] for _ in range(layers)]
        gamma = rng.choice([0.0, 0.5, 1.0, 1.7, 3.0])
        got = multipliers(torch.tensor(counts), strategy, gamma).tolist()
        want = _reference(counts, strategy, gamma)
        for g_row, w_row in zip(got, want):
            for g, w in zip(g_row, w_row):
                assert math.isclose(g, w, rel_tol=1e-9, abs_tol=1e-12), (strategy, counts, gamma)


def test_shape_multipliers_options():
    phi = torch.tensor([[2.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    assert shape_multipliers(phi).tolist() == phi.tolist()
    assert shape_multipliers(phi, floor=0.25, ceiling=1.5).tolist() == [[1.5, 0.25, 1.0, 1.0]]
    assert shape_multipliers(phi, warmup_fraction=0.5).tolist() == [[1.5, 0.5, 1.0, 1.0]]
    assert shape_multipliers(phi, warmup_fraction=0.0).tolist() == [[1.0] * 4]
    renorm = shape_multipliers(phi, renormalize_energy=True)
    assert math.isclose(renorm.pow(2).mean().item(), 1.0)
