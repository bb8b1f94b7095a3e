"""The tolerance tools themselves: critical values, pass/fail behaviour, counting, seeds."""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import stats
import torch
from conftest import binomial_upper_bound, parse_seeds
from scipy.stats import t as student_t


def test_critical_values_spend_the_budget():
    """P(|T| > k) = α two-sided, P(T > k) = α one-sided, α = BUDGET / COMPARISONS; T ~ t(n - 1)
    tends to the normal, so k decreases with n towards the normal quantile."""
    assert stats.ALPHA * stats.COMPARISONS == pytest.approx(stats.BUDGET)
    for n in (100, 1000):
        assert 2 * student_t.sf(stats.k_two_sided(n), n - 1) == pytest.approx(stats.ALPHA)
        assert student_t.sf(stats.k_one_sided(n), n - 1) == pytest.approx(stats.ALPHA)
    normal_two_sided = NormalDist().inv_cdf(1 - stats.ALPHA / 2)
    assert stats.k_two_sided(100) > stats.k_two_sided(1000) > normal_two_sided
    assert stats.k_two_sided(10**7) == pytest.approx(normal_two_sided, rel=1e-5)


def test_assert_mc_close_passes_and_fails_where_it_should():
    draws = torch.linspace(-1, 1, 101, dtype=torch.float64)  # mean 0, s/√n ≈ 0.058
    stderr = draws.std().item() / math.sqrt(101)
    before = stats.comparisons_made()
    stats.assert_mc_close(draws, 0.0)
    stats.assert_mc_close(draws, 0.99 * stats.k_two_sided(101) * stderr)
    with pytest.raises(AssertionError, match="outside"):
        stats.assert_mc_close(draws, 1.01 * stats.k_two_sided(101) * stderr)
    with pytest.raises(AssertionError, match="1 of 2"):
        stats.assert_mc_close(torch.stack([draws, draws + 1], 1), torch.zeros(2))
    assert stats.comparisons_made() - before == 5


def test_assert_mc_less_equal_is_one_sided():
    difference = torch.linspace(-1, 1, 101, dtype=torch.float64)
    stderr = difference.std().item() / math.sqrt(101)
    stats.assert_mc_less_equal(difference - 100.0)
    stats.assert_mc_less_equal(difference + 0.99 * stats.k_one_sided(101) * stderr)
    with pytest.raises(AssertionError, match="outside"):
        stats.assert_mc_less_equal(difference + 1.01 * stats.k_one_sided(101) * stderr)
    with pytest.raises(AssertionError):
        stats.assert_mc_less_equal(difference, -1.0)  # E[lhs] = 0 > -1 = rhs


def test_inputs_are_checked():
    with pytest.raises(TypeError, match="float64"):
        stats.assert_mc_close(torch.zeros(200), 0.0)
    with pytest.raises(ValueError, match="at least"):
        stats.assert_mc_close(torch.zeros(10, dtype=torch.float64), 0.0)


def test_common_random_numbers_pairs_within_rounds_only(seed):
    draws = stats.common_random_numbers([lambda: torch.randn(3), lambda: torch.randn(3)], 4)
    assert draws.shape == (4, 2, 3)
    torch.testing.assert_close(draws[:, 0], draws[:, 1], rtol=0, atol=0)
    assert len({tuple(row.tolist()) for row in draws[:, 0]}) == 4


def test_seed_ranges_and_bounds():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("7") == [7]
    assert parse_seeds("0-1,5") == [0, 1, 5]
    with pytest.raises(pytest.UsageError):
        parse_seeds("0-3,2")
    assert binomial_upper_bound(0, 100) == pytest.approx(1 - 0.05 ** (1 / 100), rel=1e-6)
