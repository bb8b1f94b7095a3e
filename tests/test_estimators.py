"""Gradient measurements: the summaries of :class:`GradientStatistics`, and the gradient
estimators of the objectives against the closed-form ELBO gradient of the linear-Gaussian model.

The ``linear_gaussian`` fixture has x_dim 5 and z_dim 3: 21 decoder parameters (W, b, log σ)
and 27 encoder parameters (A, c and the 3×3 unconstrained Cholesky factor, whose 3 upper
entries are unused and always have gradient 0), 48 in all.
"""

from __future__ import annotations

import pytest
import torch
from stats import assert_mc_close, assert_mc_less_equal
from test_linear import NEAR, PERTURBED, perturb_guide

from ppl_vae.config import ObjectiveConfig
from ppl_vae.inference.gradients import GradientStatistics, gradient_statistics, parameter_groups
from ppl_vae.inference.objectives import loss_module

pytestmark = pytest.mark.usefixtures("single_thread")

DRAWS = 200
PARAMETERS = 48


def draws_of(model, x, name: str, num_particles: int, seed: int) -> torch.Tensor:
    """``(DRAWS, 48)`` gradient draws of the batch loss, decoder then encoder, from ``seed``."""
    torch.manual_seed(seed)
    loss_fn = loss_module(model, ObjectiveConfig(name, num_particles))
    stats = gradient_statistics(loss_fn, (x,), parameter_groups(model, x), DRAWS)
    return torch.cat([stats["decoder"].draws, stats["encoder"].draws], dim=1)


def exact_gradient(model, x) -> torch.Tensor:
    """∇ of -ELBO (closed form), decoder then encoder, flattened like :func:`draws_of`."""
    groups = parameter_groups(model, x)
    params = groups["decoder"] + groups["encoder"]
    grads = torch.autograd.grad(-model.elbo(x).sum(), params)
    return torch.cat([g.reshape(-1) for g in grads])


def test_summaries_by_hand():
    draws = torch.tensor([[1.0, 2.0, 0.0], [3.0, 2.0, 0.0], [2.0, -4.0, 0.0]])
    stats = GradientStatistics(draws)
    torch.testing.assert_close(stats.mean, torch.tensor([2.0, 0.0, 0.0]))
    torch.testing.assert_close(stats.variance, torch.tensor([1.0, 12.0, 0.0]))
    assert stats.mean_snr == pytest.approx((2.0 + 0.0) / 2)  # the constant third one is left out
    assert stats.total_variance == pytest.approx(13.0)


def test_groups_split_the_parameters(linear_gaussian):
    model, x = linear_gaussian
    groups = parameter_groups(model, x)
    assert sum(p.numel() for p in groups["encoder"]) == 27
    assert sum(p.numel() for p in groups["decoder"]) == 21
    stats = gradient_statistics(
        loss_module(model, ObjectiveConfig("trace", 2)), (x,), groups, num_draws=3
    )
    assert stats["encoder"].draws.shape == (3, 27) and stats["decoder"].draws.shape == (3, 21)
    assert all(p.grad is None for p in model.parameters())  # .grad untouched


@pytest.mark.stat(comparisons=3 * PARAMETERS)
def test_elbo_gradients_match_the_closed_form(linear_gaussian, seed):
    """Estimand: E[∇(-ELBO estimate)] per parameter (48), for trace, meanfield and stl with 10
    particles, equal to the closed-form ∇(-ELBO); k = stats.k_two_sided(200). The 3 unused
    Cholesky entries have gradient 0 in every draw. Guide: shifted by 0.5, double scale."""
    model, x = linear_gaussian
    perturb_guide(model, *PERTURBED)
    expected = exact_gradient(model, x)
    for name in ("trace", "meanfield", "stl"):
        assert_mc_close(
            draws_of(model, x, name, 10, seed), expected, atol=1e-10, what=f"{name} gradient"
        )


@pytest.mark.stat(comparisons=PARAMETERS)
def test_dreg_and_iwae_estimate_the_same_gradient(linear_gaussian, seed):
    """Estimand: E[∇_dreg - ∇_iwae] per parameter (48), paired draws (same z), equal to 0;
    K = 10; k = stats.k_two_sided(200). Guide: shifted by 0.5, double scale."""
    model, x = linear_gaussian
    perturb_guide(model, *PERTURBED)
    difference = draws_of(model, x, "dreg", 10, seed) - draws_of(model, x, "iwae", 10, seed)
    assert_mc_close(difference, 0.0, atol=1e-10, what="DReG - IWAE gradient")


@pytest.mark.stat(comparisons=2)
def test_stl_and_dreg_reduce_encoder_variance_near_the_optimum(linear_gaussian, seed):
    """Estimands: tr Cov of the encoder gradient, each draw the unbiased two-draw estimate
    ‖g₁ - g₂‖²/2. Claims, one-sided with k = stats.k_one_sided(100): tr Cov(STL) ≤ tr Cov(trace)
    / 10 (one particle) and tr Cov(DReG) ≤ tr Cov(IWAE) / 10 (K = 10). Guide: the posterior
    shifted by 0.1 with scale 1.1."""
    model, x = linear_gaussian
    perturb_guide(model, *NEAR)
    encoder = {"encoder": parameter_groups(model, x)["encoder"]}

    def two_draw_variances(name: str, num_particles: int) -> torch.Tensor:
        torch.manual_seed(seed)
        loss_fn = loss_module(model, ObjectiveConfig(name, num_particles))
        draws = gradient_statistics(loss_fn, (x,), encoder, 2 * 100)["encoder"].draws
        return (draws[0::2] - draws[1::2]).square().sum(1) / 2

    assert_mc_less_equal(
        two_draw_variances("stl", 1), two_draw_variances("trace", 1) / 10, what="STL variance"
    )
    assert_mc_less_equal(
        two_draw_variances("dreg", 10), two_draw_variances("iwae", 10) / 10, what="DReG variance"
    )
