"""Critical values from a false-positive budget, and the Monte Carlo assertions that use them.

A Monte Carlo check can fail by chance. The suite allows :data:`BUDGET` (1e-3): the probability
that one full run of the ``stat`` tests fails somewhere although every estimator is right. By
Bonferroni, each of the :data:`COMPARISONS` scalar comparisons of the suite gets
``α = BUDGET / COMPARISONS``, and a comparison passes when its studentized mean
``(mean - expected) / (s/√n)`` stays within the critical value ``k`` of Student's t with ``n - 1``
degrees of freedom: :func:`k_two_sided` (upper α/2 quantile) for equalities, :func:`k_one_sided`
(upper α quantile) for inequalities. With ``s`` estimated from the draws, the normal quantile
would be too small for a few hundred draws (at n = 200 it would spend 1.6 α). A comparison is
one scalar: an assertion over a tensor of 13 expected values makes 13 comparisons.

Assumptions. The draws are independent and their mean is close to normal far into the tail
(t is exact for normal draws); the helpers refuse fewer than :data:`MIN_SAMPLES` draws, and tests
of skewed quantities average more of them. Inputs must be float64.

Honest counting. Each ``stat`` test declares ``@pytest.mark.stat(comparisons=N)``. ``conftest.py``
fails a test that makes a different number of comparisons than it declares, and fails the
collection of the whole suite when the declarations do not add up to :data:`COMPARISONS`, so
``k`` always belongs to the suite that runs. ``pytest --stat-seeds 0-199 -m stat`` reruns the
statistical tests once per seed and prints the observed rate of failing runs next to
:data:`BUDGET`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from scipy.stats import norm
from scipy.stats import t as student_t

BUDGET = 1e-3
"""Allowed probability of a false failure in one full run of the statistical tests."""
COMPARISONS = 426
"""Scalar comparisons made by all ``stat`` tests together (checked by ``conftest.py``)."""
ALPHA = BUDGET / COMPARISONS
"""False-positive probability allowed to one comparison (Bonferroni)."""
MIN_SAMPLES = 100


def k_two_sided(n: int) -> float:
    """Critical value of an equality test from ``n`` draws: P(|T| > k) = α, T ~ t(n - 1)."""
    return float(student_t.isf(ALPHA / 2, n - 1))


def k_one_sided(n: int) -> float:
    """Critical value of an inequality test from ``n`` draws: P(T > k) = α, T ~ t(n - 1)."""
    return float(student_t.isf(ALPHA, n - 1))


_made = 0  # comparisons made since the last reset_count(); read by conftest.py
_z_scores: list[float] = []  # studentized means of the two-sided comparisons since then


def reset_count() -> None:
    global _made
    _made = 0
    _z_scores.clear()


def comparisons_made() -> int:
    return _made


def z_scores() -> list[float]:
    """``(mean - expected) / (s/√n)`` of each two-sided comparison since :func:`reset_count`.

    Their spread calibrates the suite far better than its rare failures: across a seed sweep,
    about 4.6 % should exceed 2 in absolute value and 0.27 % should exceed 3. The comparisons of
    one test share draws (the 48 gradient components, say), so these fractions scatter more
    than binomially from sweep to sweep.
    """
    return list(_z_scores)


def _standard_error(samples: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    if samples.dtype != torch.float64:
        raise TypeError(f"statistical checks run in float64; got {samples.dtype}")
    n = samples.shape[dim]
    if n < MIN_SAMPLES:
        raise ValueError(
            f"{n} draws is too few for a normal critical value; use at least {MIN_SAMPLES}"
        )
    mean = samples.mean(dim)
    return mean, samples.std(dim) / math.sqrt(n), n


def _report(what: str, ok: torch.Tensor, mean, target, stderr, k: float, n: int) -> str:
    bad = (~ok).nonzero().tolist()
    first = tuple(bad[0]) if bad else ()
    z = (mean - target) / stderr
    return (
        f"{what}: {len(bad)} of {ok.numel()} comparisons outside {k:.2f} standard errors "
        f"(n = {n}); first at index {first}: mean {mean[first].item():.6g}, "
        f"expected {target[first].item():.6g}, s/√n {stderr[first].item():.3g}, "
        f"z {z[first].item():.2f}"
    )


def assert_mc_close(
    samples: torch.Tensor,
    expected: torch.Tensor | float,
    dim: int = 0,
    k: float | None = None,
    atol: float = 0.0,
    what: str = "Monte Carlo mean",
) -> None:
    """Assert ``|mean(samples) - expected| ≤ k · s/√n + atol`` along ``dim``, elementwise.

    :param samples: independent draws of an estimator, the draws along ``dim`` (float64).
    :param expected: the estimand; broadcast against the mean.
    :param dim: the sample axis.
    :param k: critical value; default :func:`k_two_sided` of the number of draws.
    :param atol: slack for floating-point round-off only (for estimands whose draws have
        variance zero); never a substitute for ``k``.
    :param what: the estimand, named in the failure message.
    """
    global _made
    mean, stderr, n = _standard_error(samples, dim)
    k = k_two_sided(n) if k is None else k
    target = torch.as_tensor(expected, dtype=mean.dtype).expand_as(mean)
    ok = (mean - target).abs() <= k * stderr + atol
    _made += ok.numel()
    _z_scores.extend(((mean - target) / stderr).flatten().tolist())
    assert bool(ok.all()), _report(what, ok, mean, target, stderr, k, n)


def assert_close_known_se(
    estimate: torch.Tensor,
    expected: torch.Tensor | float,
    standard_error: torch.Tensor | float,
    what: str = "estimate",
) -> None:
    """Assert ``|estimate - expected| ≤ k · SE`` elementwise, for an SE known from theory.

    For estimators whose sampling distribution is derived analytically (normal, with a standard
    error ``SE`` that does not have to be estimated from draws), the critical value is the normal
    quantile: ``k = Φ⁻¹(1 - α/2)``. One comparison per element.

    :param estimate: the estimator's value (float64).
    :param expected: the estimand; broadcast against ``estimate``.
    :param standard_error: the analytic standard error of ``estimate``.
    :param what: the estimand, named in the failure message.
    """
    global _made
    if estimate.dtype != torch.float64:
        raise TypeError(f"statistical checks run in float64; got {estimate.dtype}")
    k = float(norm.isf(ALPHA / 2))
    target = torch.as_tensor(expected, dtype=estimate.dtype).expand_as(estimate)
    stderr = torch.as_tensor(standard_error, dtype=estimate.dtype).expand_as(estimate)
    ok = (estimate - target).abs() <= k * stderr
    _made += ok.numel()
    assert bool(ok.all()), _report(what, ok, estimate, target, stderr, k, n=1)


def assert_mc_less_equal(
    lhs: torch.Tensor,
    rhs: torch.Tensor | float = 0.0,
    dim: int = 0,
    k: float | None = None,
    what: str = "E[lhs - rhs] <= 0",
) -> None:
    """One-sided test of ``E[lhs] ≤ E[rhs]`` from paired draws: ``mean(lhs - rhs) ≤ k · s/√n``.

    ``lhs`` and ``rhs`` should be computed from common random numbers (the same draws of z),
    so that the standard error ``s/√n`` of their difference is small; ``rhs`` may also be a
    constant (a known bound such as an exact ``log p(x)``). Fails only when the data show,
    at level α, that the inequality is violated.

    :param lhs: draws of the side that should be smaller (float64).
    :param rhs: paired draws of the side that should be larger, or a constant.
    :param dim: the sample axis.
    :param k: critical value; default :func:`k_one_sided` of the number of draws.
    :param what: the inequality, named in the failure message.
    """
    global _made
    difference = lhs - rhs
    mean, stderr, n = _standard_error(difference, dim)
    k = k_one_sided(n) if k is None else k
    ok = mean <= k * stderr
    _made += ok.numel()
    assert bool(ok.all()), _report(what, ok, mean, torch.zeros_like(mean), stderr, k, n)


def common_random_numbers(estimators: Sequence[Callable[[], torch.Tensor]], n: int) -> torch.Tensor:
    """``n`` rounds of paired draws: within a round every estimator sees the same random numbers.

    Each round takes a fresh seed from torch's global generator (seeded by the ``seed``
    fixture) and reseeds torch with it before calling each estimator, so estimators that sample
    z the same way get the same z, and rounds are independent of each other. Returns a tensor
    of shape ``(n, len(estimators), *value_shape)``, detached.

    :param estimators: functions of no arguments, each returning one draw (a tensor).
    :param n: number of rounds.
    """
    round_seeds = torch.randint(2**62, (n,)).tolist()
    rounds = []
    for round_seed in round_seeds:
        values = []
        for estimator in estimators:
            torch.manual_seed(round_seed)
            values.append(torch.as_tensor(estimator()).detach())
        rounds.append(torch.stack(values))
    return torch.stack(rounds)
