"""The library's analytic KL(N(z_loc, diag z_scale²) ‖ N(0, I)) against Monte Carlo and torch."""

from __future__ import annotations

import itertools

import pyro.distributions as dist
import pytest
import torch
from stats import assert_mc_close

from ppl_vae.inference.kl import kl_standard_normal

LOCS = (0.0, 3.0)
SCALES = (1e-3, 0.5, 2.0, 1e2)
DIMS = (1, 16, 256)

pytestmark = pytest.mark.usefixtures("single_thread")


def log_ratio_draws(z_loc: torch.Tensor, z_scale: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` draws of log q(z) - log p(z), z ~ q = N(z_loc, diag z_scale²), p = N(0, I).

    Summed over the last (latent) dimension; the mean of the draws is the Monte Carlo KL.
    """
    guide = dist.Normal(z_loc, z_scale).to_event(1)
    prior = dist.Normal(torch.zeros_like(z_loc), torch.ones_like(z_scale)).to_event(1)
    z = guide.sample((n,))
    return guide.log_prob(z) - prior.log_prob(z)


def log_ratio_variance(z_loc: torch.Tensor, z_scale: torch.Tensor) -> torch.Tensor:
    """Var_q[log q(z) - log p(z)] in closed form.

    Per coordinate, with z = z_loc + z_scale·ε, the log ratio is a constant plus
    ``((z_scale² - 1) ε² + 2 z_loc z_scale ε) / 2``; Var ε² = 2 and Cov(ε², ε) = 0 give
    ``(z_scale² - 1)² / 2 + z_loc² z_scale²``, summed over independent coordinates.
    """
    return (0.5 * (z_scale.square() - 1).square() + z_loc.square() * z_scale.square()).sum(-1)


def test_kl_standard_normal_matches_torch():
    """Per dimension, equal to torch's registered KL(Normal ‖ Normal), scales 1e-3 … 1e2."""
    gen = torch.Generator().manual_seed(1)
    z_loc = 5 * torch.randn(7, 256, generator=gen, dtype=torch.float64)
    z_scale = torch.logspace(-3, 2, 256, dtype=torch.float64)[torch.randperm(256, generator=gen)]
    expected = torch.distributions.kl_divergence(
        dist.Normal(z_loc, z_scale), dist.Normal(torch.zeros_like(z_loc), 1.0)
    )
    kl = kl_standard_normal(z_loc, z_scale)
    assert kl.shape == (7, 256)
    torch.testing.assert_close(kl, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        kl_standard_normal(torch.zeros(3), torch.ones(3)), torch.zeros(3), rtol=0, atol=0
    )


@pytest.mark.stat(comparisons=1)
@pytest.mark.parametrize(
    "loc, scale, dim", list(itertools.product(LOCS, SCALES, DIMS)), ids=lambda v: f"{v:g}"
)
def test_kl_equals_monte_carlo(seed, loc, scale, dim):
    """Estimand: KL(q ‖ p) = E_q[log q(z) - log p(z)], q = N(z_loc, diag z_scale²), p = N(0, I).

    The mean of ``n`` draws of the log ratio must equal ``kl_standard_normal(...).sum()`` within
    k = k_two_sided(n) standard errors. The draws are chi-square-like (skewed), so ``n · dim`` is
    at least 200,000 (and n at least 2,000) to keep the sample mean close to normal at the tail.
    """
    z_loc = torch.full((dim,), loc, dtype=torch.float64)
    z_scale = torch.full((dim,), scale, dtype=torch.float64)
    draws = log_ratio_draws(z_loc, z_scale, n=max(2_000, 200_000 // dim))
    assert_mc_close(draws, kl_standard_normal(z_loc, z_scale).sum(), what="E_q[log q - log p]")


@pytest.mark.stat(comparisons=3)
def test_kl_monte_carlo_variance_shrinks_as_one_over_n(seed):
    """Estimand: n · E[(KL̂_n - KL)²] = Var_q[log q - log p] for n = 1, 4, 16 (so Var KL̂_n ∝ 1/n).

    KL̂_n is the mean of n draws of the log ratio; with the exact KL and the closed-form
    single-draw variance (:func:`log_ratio_variance`) nothing is estimated but the left side.
    10,000 replicates per n, k = k_two_sided(10,000). Draws that were not independent (a shared
    ε, say) would leave n · Var KL̂_n growing with n and fail.
    """
    gen = torch.Generator().manual_seed(2)
    z_loc = torch.randn(16, generator=gen, dtype=torch.float64)
    z_scale = torch.linspace(0.3, 1.5, 16, dtype=torch.float64)
    kl = kl_standard_normal(z_loc, z_scale).sum()
    single_draw_variance = log_ratio_variance(z_loc, z_scale)
    replicates = 10_000
    for n in (1, 4, 16):
        kl_hat = log_ratio_draws(z_loc, z_scale, replicates * n).reshape(replicates, n).mean(1)
        assert_mc_close(
            n * (kl_hat - kl).square(), single_draw_variance, what=f"n · Var of the {n}-draw mean"
        )
