"""The estimators of the library against the linear-Gaussian model, where everything is exact.

The ``linear_gaussian`` fixture (conftest.py) is a fixed model with x_dim 5 and z_dim 3, four
observations, and the guide set to the exact posterior; :func:`perturb_guide` moves the guide
away from it. All values are per batch: sums over the four observations.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro import poutine
from stats import (
    assert_mc_close,
    assert_mc_less_equal,
    common_random_numbers,
)
from torch.distributions import constraints, kl_divergence, transform_to

from ppl_vae.config import ObjectiveConfig
from ppl_vae.inference.objectives import loss_module
from ppl_vae.inference.weights import log_mean_exp, log_weights
from ppl_vae.metrics import log_likelihood
from ppl_vae.models import REGISTRY
from ppl_vae.models.linear import LinearGaussian, LinearGaussianConfig

pytestmark = pytest.mark.usefixtures("single_thread")

PERTURBED = (0.5, 2.0)  # guide mean shifted by 0.5 in every coordinate, its scale doubled
NEAR = (0.1, 1.1)  # a guide close to the exact posterior
BROAD = (0.0, 3.0)  # the posterior's mean, three times its scale


@torch.no_grad()
def perturb_guide(model: LinearGaussian, loc_shift: float, scale_factor: float) -> None:
    """Set the guide to the exact posterior with its mean shifted and its ``L`` scaled."""
    model.set_guide_to_posterior()
    model.encoder.linear.bias.add_(loc_shift)
    scaled = model.encoder.z_scale_tril * scale_factor
    model.encoder.z_scale_tril_unconstrained.copy_(
        transform_to(constraints.lower_cholesky).inv(scaled)
    )


PARTICLES = 10  # vectorized particles per Monte Carlo draw


def elbo_draw(model: LinearGaussian, x: torch.Tensor, name: str):
    """A function drawing one estimate of the batch ELBO with Pyro's ``name`` ELBO.

    One draw averages :data:`PARTICLES` vectorized particles: the estimand (the ELBO) is the
    same as for one particle, the draws are closer to normal, and the loop is shorter.
    """
    loss_fn = loss_module(model, ObjectiveConfig(name, PARTICLES))

    @torch.no_grad()
    def draw() -> torch.Tensor:
        return -loss_fn(x)

    return draw


# ----------------------------------------------------------------------------- exact checks


def test_registered_and_runs_under_svi(linear_gaussian):
    _, x = linear_gaussian
    assert REGISTRY["linear"] == (LinearGaussianConfig, LinearGaussian)
    model = LinearGaussian(LinearGaussianConfig(z_dim=2, x_dim=5))
    svi = pyro.infer.SVI(
        model.model, model.guide, pyro.optim.Adam({"lr": 0.01}), pyro.infer.Trace_ELBO()
    )
    assert math.isfinite(svi.step(x.float()))
    assert model.sample(3).shape == (3, 5)
    assert model.reconstruct(x.float()).shape == (4, 5)


def test_posterior_is_gaussian_conditioning(linear_gaussian):
    """p(z|x) against conditioning the joint Gaussian of (z, x) by brute force."""
    model, x = linear_gaussian
    weight, bias = model.decoder.linear.weight, model.decoder.linear.bias
    x_cov = model.marginal().covariance_matrix
    loc = (weight.T @ torch.linalg.solve(x_cov, (x - bias).T)).T
    cov = torch.eye(3, dtype=x.dtype) - weight.T @ torch.linalg.solve(x_cov, weight)
    posterior = model.exact_posterior(x)
    torch.testing.assert_close(posterior.loc, loc, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(posterior.covariance_matrix.expand(4, 3, 3), cov.expand(4, 3, 3))


def test_bayes_rule_with_the_pyro_model(linear_gaussian, seed):
    """log p(x) = log p(x, z) - log p(z|x) for any z, with log p(x, z) from the Pyro model."""
    model, x = linear_gaussian
    z = 3 * torch.randn(4, 3, dtype=x.dtype)
    trace = poutine.trace(poutine.condition(model.model, data={"z": z})).get_trace(x)
    log_joint = trace.log_prob_sum()
    log_joint_per_datum = sum(
        site["fn"].log_prob(site["value"])
        for site in trace.nodes.values()
        if site["type"] == "sample"
    )
    torch.testing.assert_close(log_joint_per_datum.sum(), log_joint)
    torch.testing.assert_close(
        log_joint_per_datum - model.exact_posterior(x).log_prob(z),
        model.log_marginal(x),
        rtol=1e-10,
        atol=1e-10,
    )


def test_closed_form_elbo(linear_gaussian):
    """ELBO = log p(x) - KL(q ‖ p(z|x)): equal at the exact posterior, below it elsewhere."""
    model, x = linear_gaussian
    torch.testing.assert_close(model.elbo(x), model.log_marginal(x), rtol=0, atol=1e-10)
    perturb_guide(model, *PERTURBED)
    z_loc, z_scale_tril = model.encoder(x)
    guide = torch.distributions.MultivariateNormal(z_loc, scale_tril=z_scale_tril)
    gap = kl_divergence(guide, model.exact_posterior(x))
    torch.testing.assert_close(model.elbo(x), model.log_marginal(x) - gap, rtol=1e-10, atol=1e-10)
    assert (gap > 0.1).all()


def test_meanfield_elbo_uses_the_analytic_kl(linear_gaussian):
    """TraceMeanField_ELBO falls back to a Monte Carlo KL when none is registered; check that
    KL(guide site ‖ prior site) is registered for the sites as they appear under a particle
    plate, and that it equals the closed form."""
    model, x = linear_gaussian
    perturb_guide(model, *PERTURBED)

    def particles(fn):
        def wrapped(*args):
            with pyro.plate("particles", 7, dim=-2):
                return fn(*args)

        return wrapped

    guide_trace = poutine.trace(particles(model.guide)).get_trace(x)
    model_trace = poutine.trace(poutine.replay(particles(model.model), guide_trace)).get_trace(x)
    kl = kl_divergence(guide_trace.nodes["z"]["fn"], model_trace.nodes["z"]["fn"])
    assert kl.shape == (7, 4)
    torch.testing.assert_close(kl, model.kl_to_prior(x).expand(7, 4), rtol=1e-10, atol=1e-10)


def test_exact_posterior_every_estimator_is_exact(linear_gaussian, seed):
    """With q = p(z|x), log p(x, z) - log q(z|x) = log p(x) for every z: Trace_ELBO (single and
    vectorized particles), the log weights and the importance-sampled log p(x) (with chunks
    merged) equal the exact log p(x) to 1e-8 on every draw."""
    model, x = linear_gaussian
    log_px = model.log_marginal(x).detach()
    with torch.no_grad():
        for particles in (1, 8):
            loss_fn = loss_module(model, ObjectiveConfig("trace", particles))
            draws = torch.stack([-loss_fn(x) for _ in range(5)])
            torch.testing.assert_close(draws, log_px.sum().expand(5), rtol=0, atol=1e-8)
        torch.testing.assert_close(
            log_weights(model.model, model.guide, x, 50), log_px.expand(50, 4), rtol=0, atol=1e-8
        )
        for k, chunk in ((1, 1), (250, 100)):
            estimate = log_likelihood(model, x, k=k, particle_chunk=chunk)
            torch.testing.assert_close(estimate, log_px, rtol=0, atol=1e-8)


def test_log_likelihood_replays_log_weights(linear_gaussian, seed):
    """The evaluation's estimate is log_mean_exp of log_weights, draw for draw (same RNG state)."""
    model, x = linear_gaussian
    perturb_guide(model, *PERTURBED)
    state = torch.get_rng_state()
    estimate = log_likelihood(model, x, k=64, particle_chunk=64)
    torch.set_rng_state(state)
    with torch.no_grad():
        log_w = log_weights(model.model, model.guide, x, 64)
    torch.testing.assert_close(estimate, log_mean_exp(log_w), rtol=0, atol=0)


# ----------------------------------------------------------------------------- Monte Carlo checks


@pytest.mark.stat(comparisons=1)
def test_meanfield_at_exact_posterior_is_unbiased(linear_gaussian, seed):
    """Estimand: E[TraceMeanField_ELBO draw] = log p(x) when q = p(z|x); n = 200 draws,
    k = k_two_sided(200).

    Unlike Trace_ELBO, the mean-field estimate log p(x|z) - KL(q ‖ p(z)) is not constant in z
    even at the exact posterior (only log p(x|z) + log p(z) - log q(z) is), so here it is exact
    in expectation only, and its draws do vary.
    """
    model, x = linear_gaussian
    draws = common_random_numbers([elbo_draw(model, x, "meanfield")], 200)[:, 0]
    assert draws.std() > 0.1
    assert_mc_close(draws, model.log_marginal(x).sum().detach(), what="E[meanfield ELBO]")


@pytest.mark.stat(comparisons=4)
def test_perturbed_guide_trace_and_meanfield(linear_gaussian, seed):
    """Estimands, for a perturbed guide (mean +0.5, scale ×2), from n = 300 paired draws of
    Trace_ELBO (t) and TraceMeanField_ELBO (m) sharing z (10 particles each):

    - E[t] = ELBO and E[m] = ELBO (closed form), k = k_two_sided(300);
    - E[t - m] = 0 (the paired version, much tighter), k = k_two_sided(300);
    - E[t] ≤ log p(x), one-sided, k = k_one_sided(300).
    """
    model, x = linear_gaussian
    perturb_guide(model, *PERTURBED)
    elbo = model.elbo(x).sum().detach()
    log_px = model.log_marginal(x).sum().detach()
    assert elbo < log_px - 1
    draws = common_random_numbers(
        [elbo_draw(model, x, "trace"), elbo_draw(model, x, "meanfield")], 300
    )
    trace, meanfield = draws[:, 0], draws[:, 1]
    assert_mc_close(trace, elbo, what="E[Trace_ELBO]")
    assert_mc_close(meanfield, elbo, what="E[TraceMeanField_ELBO]")
    assert_mc_close(trace - meanfield, 0.0, what="E[Trace_ELBO - TraceMeanField_ELBO]")
    assert_mc_less_equal(trace, log_px, what="E[Trace_ELBO] <= log p(x)")


@pytest.mark.stat(comparisons=2)
def test_meanfield_variance_depends_on_the_guide(linear_gaussian, seed):
    """Estimands: Var[m] - Var[t] for Trace_ELBO (t) and TraceMeanField_ELBO (m) draws, written
    as E[(m - ELBO)² - (t - ELBO)²] with the exact ELBO; n = 200 pairs sharing z (each draw
    averages 10 particles, which divides both variances by 10); one-sided, k = k_one_sided(200).

    - a broad guide (exact mean, scale ×3): Var[m] ≤ Var[t], the analytic KL removes the noise
      of log q - log p (at this guide Var[t] ≈ 385 and Var[m] ≈ 235 per particle);
    - near the exact posterior (mean +0.1, scale ×1.1): Var[t] ≤ Var[m]. The analytic KL is not
      always better: at q = p(z|x) the trace estimate is constant while log p(x|z) is not.
    """
    model, x = linear_gaussian
    for (loc_shift, scale_factor), meanfield_smaller in ((BROAD, True), (NEAR, False)):
        perturb_guide(model, loc_shift, scale_factor)
        elbo = model.elbo(x).sum().detach()
        draws = common_random_numbers(
            [elbo_draw(model, x, "trace"), elbo_draw(model, x, "meanfield")], 200
        )
        trace_sq, meanfield_sq = (draws[:, 0] - elbo).square(), (draws[:, 1] - elbo).square()
        if meanfield_smaller:
            assert_mc_less_equal(meanfield_sq, trace_sq, what="Var[meanfield] <= Var[trace]")
        else:
            assert_mc_less_equal(trace_sq, meanfield_sq, what="Var[trace] <= Var[meanfield]")


@pytest.mark.stat(comparisons=6)
def test_importance_sampling_between_elbo_and_log_px(linear_gaussian, seed):
    """Estimands: E[IS_K], the importance-sampled log p(x) with K draws from the perturbed guide
    (mean +0.5, scale ×2), for K = 1, 4, 16, 64, 256; IS_1 is the ELBO estimate. From 1000
    replicates, each with 256 log weights shared by all K (IS_K uses the first K):

    - E[IS_K] ≤ E[IS_4K] for each step of the chain (4 paired one-sided tests);
    - E[IS_256] ≤ log p(x) (one-sided);
    - it approaches log p(x): E[log p(x) - IS_256] ≤ E[log p(x) - IS_1] / 100 (paired one-sided).

    All with k = k_one_sided(1000). By Jensen, IS_K ≥ the mean of its K log weights on every
    replicate, which is checked exactly.
    """
    model, x = linear_gaussian
    perturb_guide(model, *PERTURBED)
    log_px = model.log_marginal(x).sum().detach()
    replicates, sizes = 1000, (1, 4, 16, 64, 256)
    with torch.no_grad():
        log_w = log_weights(model.model, model.guide, x.repeat(replicates, 1), sizes[-1])
    log_w = log_w.reshape(sizes[-1], replicates, 4)
    estimates = {k: log_mean_exp(log_w[:k]).sum(-1) for k in sizes}
    for k in sizes:
        assert (estimates[k] >= log_w[:k].mean(0).sum(-1) - 1e-9).all()
    for small, large in zip(sizes[:-1], sizes[1:], strict=True):
        assert_mc_less_equal(
            estimates[small], estimates[large], what=f"E[IS_{small}] <= E[IS_{large}]"
        )
    assert_mc_less_equal(estimates[256], log_px, what="E[IS_256] <= log p(x)")
    assert_mc_less_equal(
        log_px - estimates[256],
        (log_px - estimates[1]) / 100,
        what="gap(IS_256) <= gap(ELBO) / 100",
    )


def guide_parameters(model: LinearGaussian) -> list[torch.Tensor]:
    return [
        model.encoder.linear.weight,
        model.encoder.linear.bias,
        model.encoder.z_scale_tril_unconstrained,
    ]


def flat_gradient(grads: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate gradients of :func:`guide_parameters`, keeping the used (lower) part of L."""
    weight, bias, scale_tril = grads
    rows, cols = torch.tril_indices(*scale_tril.shape)
    return torch.cat([weight.flatten(), bias, scale_tril[rows, cols]])


@pytest.mark.stat(comparisons=48)
def test_reparameterized_gradient_is_unbiased(linear_gaussian, seed):
    """Estimand: the gradient of the ELBO w.r.t. the guide's A (15), c (3) and L (6 used
    entries) for the perturbed guide; the mean of n = 200 gradients (10 particles each) of
    Trace_ELBO and of TraceMeanField_ELBO (sharing z) must match the exact gradient, the
    autograd gradient of the closed-form ELBO :meth:`LinearGaussian.elbo` (no sampling).
    2 × 24 comparisons, k = k_two_sided(200). A detached sample, a dropped path through L or a
    sign error would show up here.
    """
    model, x = linear_gaussian
    perturb_guide(model, *PERTURBED)
    params = guide_parameters(model)
    exact = flat_gradient(torch.autograd.grad(model.elbo(x).sum(), params))

    def gradient_draw(name):
        loss_fn = loss_module(model, ObjectiveConfig(name, PARTICLES))
        return lambda: -flat_gradient(torch.autograd.grad(loss_fn(x), params))

    draws = common_random_numbers([gradient_draw("trace"), gradient_draw("meanfield")], 200)
    assert_mc_close(draws[:, 0], exact, what="E[∇ Trace_ELBO]")
    assert_mc_close(draws[:, 1], exact, what="E[∇ TraceMeanField_ELBO]")
