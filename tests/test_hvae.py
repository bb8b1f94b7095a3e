"""The two-stochastic-layer VAE (``hvae``) and the estimators on guides with several latent
sites.

Ground truth is :class:`LinearTwoLayer`, the two-layer linear-Gaussian model written here:
p(z2) p(z|z2) p(x|z) all linear-Gaussian, so log p(x) is exact, and its two-site guide
q(z|x) q(z2|z) (affine means, constant full covariances) contains the exact posterior. Values
are per batch (sums over its three observations) unless a test says otherwise.
"""

from __future__ import annotations

import json
import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from stats import assert_mc_close, assert_mc_less_equal, common_random_numbers
from torch import nn
from torch.distributions import constraints, transform_to
from torch.nn import functional as F

from ppl_vae import data, diagnostics, metrics, nets, runs
from ppl_vae.cli import main, parse_train
from ppl_vae.config import PRESETS, DataConfig, ObjectiveConfig, RunConfig, TrainConfig
from ppl_vae.errors import ConfigError
from ppl_vae.inference import weights
from ppl_vae.inference.gradients import gradient_statistics, parameter_groups
from ppl_vae.inference.objectives import loss_module
from ppl_vae.metrics import log_likelihood
from ppl_vae.models import build
from ppl_vae.models.base import LatentVariableModel
from ppl_vae.models.capabilities import ExplicitPrior, GaussianGuide
from ppl_vae.models.hvae import HVAE, HVAEConfig
from ppl_vae.train import fit

pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------- the linear model


class _AffineGaussian(nn.Module):
    """u ↦ (A u + c, L): an affine mean and one lower-triangular scale shared by every u."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)
        self.scale_tril_unconstrained = nn.Parameter(torch.zeros(n_out, n_out))

    @property
    def scale_tril(self) -> torch.Tensor:
        return transform_to(constraints.lower_cholesky)(self.scale_tril_unconstrained)

    def distribution(self, u: torch.Tensor) -> dist.MultivariateNormal:
        return dist.MultivariateNormal(self.linear(u), scale_tril=self.scale_tril)

    @torch.no_grad()
    def set(self, weight, bias, scale_tril) -> None:
        self.linear.weight.copy_(weight)
        self.linear.bias.copy_(bias)
        unconstrained = transform_to(constraints.lower_cholesky).inv(scale_tril)
        self.scale_tril_unconstrained.copy_(unconstrained)


class _LinearGenerative(nn.Module):
    """W1, b1, σ1 of p(x|z) and W2, b2, σ2 of p(z|z2) (σ stored as logs)."""

    def __init__(self, x_dim: int, z_dim: int, z2_dim: int, gen: torch.Generator):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(x_dim, z_dim, generator=gen))
        self.b1 = nn.Parameter(torch.randn(x_dim, generator=gen))
        self.log_sigma1 = nn.Parameter(torch.tensor(math.log(0.7)))
        self.w2 = nn.Parameter(torch.randn(z_dim, z2_dim, generator=gen))
        self.b2 = nn.Parameter(torch.randn(z_dim, generator=gen))
        self.log_sigma2 = nn.Parameter(torch.tensor(math.log(0.8)))


class LinearTwoLayer(LatentVariableModel):
    """p(z2) = N(0, I); p(z|z2) = N(W2 z2 + b2, σ2² I); p(x|z) = N(W1 z + b1, σ1² I);
    q(z|x) = N(A1 x + c1, L1 L1ᵀ); q(z2|z) = N(A2 z + c2, L2 L2ᵀ).

    The sites and plate of :class:`~ppl_vae.models.hvae.HVAE` (``"z"`` the lower layer,
    ``"z2"`` the top one, sampled top-down by the model and bottom-up by the guide). Exact:
    p(x) = N(W1 b2 + b1, W1 (W2 W2ᵀ + σ2² I) W1ᵀ + σ1² I), and p(z, z2|x) = p(z|x) p(z2|z)
    (x and z2 are independent given z), both Gaussians with affine means and constant
    covariances, so the guide's family contains it.
    """

    def __init__(self, x_dim: int = 4, z_dim: int = 3, z2_dim: int = 2, seed: int = 2027):
        super().__init__()
        self.dims = (x_dim, z_dim, z2_dim)
        self.p = _LinearGenerative(x_dim, z_dim, z2_dim, torch.Generator().manual_seed(seed))
        self.q_z = _AffineGaussian(x_dim, z_dim)
        self.q_z2 = _AffineGaussian(z_dim, z2_dim)

    def model(self, x: torch.Tensor) -> None:
        pyro.module("p", self.p)
        p = self.p
        with pyro.plate("data", x.shape[0]):
            standard = dist.Normal(x.new_zeros(()), x.new_ones(()))
            z2 = pyro.sample("z2", standard.expand([x.shape[0], self.dims[2]]).to_event(1))
            z = pyro.sample("z", dist.Normal(z2 @ p.w2.T + p.b2, p.log_sigma2.exp()).to_event(1))
            x_loc = z @ p.w1.T + p.b1
            pyro.sample("x", dist.Normal(x_loc, p.log_sigma1.exp()).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("q_z", self.q_z)
        pyro.module("q_z2", self.q_z2)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.q_z.distribution(x))
            pyro.sample("z2", self.q_z2.distribution(z))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_z.linear(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.p.w1.T + self.p.b1

    def prior_sample(self, n: int) -> torch.Tensor:
        p = self.p
        z2 = torch.randn(n, self.dims[2], dtype=p.w2.dtype)
        noise = torch.randn(n, self.dims[1], dtype=p.w2.dtype)
        return z2 @ p.w2.T + p.b2 + p.log_sigma2.exp() * noise

    # ------------------------------------------------------------------ closed forms

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x), one value per row of ``x``."""
        p = self.p
        eye1, eye = (torch.eye(n, dtype=x.dtype) for n in self.dims[1::-1])
        z_cov = p.w2 @ p.w2.T + p.log_sigma2.exp() ** 2 * eye1
        cov = p.w1 @ z_cov @ p.w1.T + p.log_sigma1.exp() ** 2 * eye
        return dist.MultivariateNormal(p.w1 @ p.b2 + p.b1, cov).log_prob(x)

    @torch.no_grad()
    def set_guide_to_posterior(self) -> None:
        """q(z|x) = p(z|x) and q(z2|z) = p(z2|z), by Gaussian conditioning: for a prior
        N(m, P⁻¹) and an observation y = W u + b + N(0, σ² I), the posterior of u has precision
        P + WᵀW/σ² and mean Σ (P m + Wᵀ (y − b)/σ²)."""
        p = self.p
        x_var, z_var = p.log_sigma1.exp() ** 2, p.log_sigma2.exp() ** 2
        eye1, eye2 = (torch.eye(n, dtype=p.w1.dtype) for n in self.dims[1:])
        prior_precision = torch.linalg.inv(p.w2 @ p.w2.T + z_var * eye1)  # p(z) = N(b2, ·)
        cov = torch.linalg.inv(prior_precision + p.w1.T @ p.w1 / x_var)
        z_from_x = cov @ p.w1.T / x_var
        self.q_z.set(z_from_x, cov @ prior_precision @ p.b2 - z_from_x @ p.b1,
                     torch.linalg.cholesky(cov))  # fmt: skip
        cov2 = torch.linalg.inv(eye2 + p.w2.T @ p.w2 / z_var)
        z2_from_z = cov2 @ p.w2.T / z_var
        self.q_z2.set(z2_from_z, -z2_from_z @ p.b2, torch.linalg.cholesky(cov2))

    @torch.no_grad()
    def perturb_guide(self, shift: float, scale: float) -> None:
        """The exact posterior with both means shifted by ``shift`` in every coordinate and
        both scales multiplied by ``scale``."""
        self.set_guide_to_posterior()
        for q in (self.q_z, self.q_z2):
            q.set(q.linear.weight, q.linear.bias + shift, q.scale_tril * scale)


def linear_two_layer() -> tuple[LinearTwoLayer, torch.Tensor]:
    """The fixed model in float64, its guide the exact posterior, and three observations drawn
    from it."""
    model = LinearTwoLayer().double()
    model.set_guide_to_posterior()
    gen = torch.Generator().manual_seed(7)
    p = model.p
    with torch.no_grad():
        z2 = torch.randn(3, 2, generator=gen, dtype=torch.float64)
        z = z2 @ p.w2.T + p.b2 + 0.8 * torch.randn(3, 3, generator=gen, dtype=torch.float64)
        x = z @ p.w1.T + p.b1 + 0.7 * torch.randn(3, 4, generator=gen, dtype=torch.float64)
    return model, x


def small_hvae(**overrides) -> HVAE:
    """A small two-layer VAE in float64 (784 → 16 → z of 4 → 8 → z2 of 2)."""
    cfg = {"z_dim": 4, "z2_dim": 2, "hidden": (16,), "hidden2": (8,), **overrides}
    return HVAE(HVAEConfig(**cfg)).double()


def binary_images(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, 784), 0.3, dtype=torch.float64), generator=gen)


def gaussian(loc_and_scale) -> torch.distributions.Normal:
    return torch.distributions.Normal(*loc_and_scale)


def head(net, u):
    """A GaussianHead's (loc, scale) computed from its raw network by hand."""
    loc, raw = net.net(u).chunk(2, dim=-1)
    return loc, F.softplus(raw) + nets.MIN_SCALE


# ----------------------------------------------------------------------------- the programs


@pytest.mark.parametrize("validate", [True, False], ids=["traced", "lean"])
def test_hvae_log_weights_match_a_hand_computation(validate, seed):
    """log p(x, z, z2) − log q(z, z2|x) of the library's weights (through Pyro's traces, and
    the lean fused path) at the guide's draws equals the densities written out by hand from
    the networks, with torch.distributions: log N(z2; 0, I) + log N(z; top_decoder(z2)) +
    log Bernoulli(x; decoder(z)) − log N(z; encoder(x)) − log N(z2; top_encoder(z))."""
    model, x = small_hvae(), binary_images(5)
    with torch.no_grad(), pyro.validation_enabled(validate):
        drawn = weights.weighted_draws(model.model, model.guide, x, 3)
    z, z2 = drawn.values["z"], drawn.values["z2"]
    assert z.shape == (3, 5, 4) and z2.shape == (3, 5, 2) and drawn.log_w.shape == (3, 5)
    with torch.no_grad():
        logits = model.decoder(z)
        log_p = (
            torch.distributions.Normal(0.0, 1.0).log_prob(z2).sum(-1)
            + gaussian(head(model.top_decoder, z2)).log_prob(z).sum(-1)
            + (x * logits - F.softplus(logits)).sum(-1)
        )
        log_q = (
            gaussian(head(model.encoder, x)).log_prob(z).sum(-1)
            + gaussian(head(model.top_encoder, z)).log_prob(z2).sum(-1)
        )
    torch.testing.assert_close(drawn.log_w, log_p - log_q, rtol=1e-10, atol=1e-10)


def test_hvae_draws_each_layer_from_its_conditional(seed):
    """The guide draws z from q(z|x) and z2 from q(z2|z) at that z; the model's z site is
    p(z|z2) at the guide's z2; prior samples decode ancestral draws."""
    model, x = small_hvae(), binary_images(4)
    guide_trace = poutine.trace(model.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(x)
    z = guide_trace.nodes["z"]["value"]
    z2 = guide_trace.nodes["z2"]["value"]
    q_z2 = guide_trace.nodes["z2"]["fn"].base_dist
    torch.testing.assert_close(q_z2.loc, head(model.top_encoder, z)[0])
    p_z = model_trace.nodes["z"]["fn"].base_dist
    torch.testing.assert_close(p_z.loc, head(model.top_decoder, z2)[0])
    assert model_trace.nodes["z"]["value"] is z
    torch.testing.assert_close(model.encode(x), head(model.encoder, x)[0])
    assert model.prior_sample(6).shape == (6, 4) and model.sample(6).shape == (6, 784)
    assert not isinstance(model, GaussianGuide) and not isinstance(model, ExplicitPrior)


def test_linear_two_layer_log_weights_and_exact_posterior():
    """The test model's programs against the hand-written Gaussians (multivariate normals in
    closed form); and at the exact posterior log w = log p(x) for every draw, which checks the
    posterior formulas and the marginal against each other (each derived independently)."""
    model, x = linear_two_layer()
    p = model.p
    model.perturb_guide(0.5, 2.0)
    with torch.no_grad():
        drawn = weights.weighted_draws(model.model, model.guide, x, 7)
        z, z2 = drawn.values["z"], drawn.values["z2"]
        mvn = torch.distributions.MultivariateNormal
        eye1, eye = torch.eye(3, dtype=x.dtype), torch.eye(4, dtype=x.dtype)
        log_p = (
            mvn(torch.zeros(2, dtype=x.dtype), torch.eye(2, dtype=x.dtype)).log_prob(z2)
            + mvn(z2 @ p.w2.T + p.b2, p.log_sigma2.exp() ** 2 * eye1).log_prob(z)
            + mvn(z @ p.w1.T + p.b1, p.log_sigma1.exp() ** 2 * eye).log_prob(x)
        )
        q1, q2 = model.q_z, model.q_z2
        log_q = mvn(q1.linear(x), scale_tril=q1.scale_tril).log_prob(z) + mvn(
            q2.linear(z), scale_tril=q2.scale_tril
        ).log_prob(z2)
    torch.testing.assert_close(drawn.log_w, log_p - log_q, rtol=1e-10, atol=1e-10)
    model.set_guide_to_posterior()
    with torch.no_grad():
        log_w = weights.log_weights(model.model, model.guide, x, 50)
    torch.testing.assert_close(log_w, model.log_marginal(x).expand(50, 3), rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- exact checks


ESTIMATORS = [("trace", {}), ("tracegraph", {}), ("iwae", {}), ("renyi", {"alpha": 0.5}),
              ("stl", {}), ("dreg", {})]  # fmt: skip


@pytest.mark.parametrize(("name", "fields"), ESTIMATORS, ids=[n for n, _ in ESTIMATORS])
def test_at_the_exact_posterior_every_estimator_is_log_px(name, fields, seed):
    """With q(z, z2|x) the exact posterior, log w = log p(x) for every draw: every objective's
    value is Σ log p(x) with zero variance, and the path-derivative encoder gradients (STL,
    DReG) are exactly zero, which they are only if ∂ log w/∂z follows z into q(z2|z)'s
    parameters and the gradient along z2's draw is not weighted twice (the one-site form,
    hooks on each draw and each site's distribution detached, leaves largest entries of 1.3
    for DReG and 1.8 for STL here, K = 5)."""
    model, x = linear_two_layer()
    loss = loss_module(model, ObjectiveConfig(name, 5, **fields))(x)
    torch.testing.assert_close(-loss.detach(), model.log_marginal(x).sum().detach(),
                               rtol=0, atol=1e-9)  # fmt: skip
    if name in ("stl", "dreg"):
        encoder = list(model.q_z.parameters()) + list(model.q_z2.parameters())
        for grad in torch.autograd.grad(loss, encoder):
            torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-9)


def test_stl_and_dreg_keep_the_values_with_two_sites(seed):
    """On the same draws STL is the ELBO and DReG the IWAE bound, to rounding."""
    model, x = linear_two_layer()
    model.perturb_guide(0.5, 2.0)
    for name, base in (("stl", "trace"), ("dreg", "iwae")):
        values = []
        for objective in (name, base):
            torch.manual_seed(seed)
            values.append(loss_module(model, ObjectiveConfig(objective, 6))(x).detach())
        torch.testing.assert_close(values[0], values[1], rtol=1e-12, atol=1e-10)


def test_meanfield_is_refused_for_a_hierarchical_guide(seed):
    """TraceMeanField_ELBO's analytic KL per site is wrong for q(z|x) q(z2|z) under a top-down
    model: refused in one line that names the objectives that work (Pyro itself only warns)."""
    for model, x in (linear_two_layer(), (small_hvae(), binary_images(3))):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no Pyro warning first
            with pytest.raises(ConfigError, match="order z2, z .* order z, z2.*--objective trace"):
                loss_module(model, ObjectiveConfig("meanfield", 2))(x)


def test_importance_sampling_and_psis_are_exact_at_the_posterior():
    """Evaluation's log p(x) is the exact one with zero variance at the exact posterior, and
    PSIS finds constant weights (k̂ = −inf)."""
    model, x = linear_two_layer()
    estimate = log_likelihood(model, x, k=20, batch_size=2, particle_chunk=7)
    torch.testing.assert_close(estimate, model.log_marginal(x).detach(), rtol=0, atol=1e-10)
    khat, log_px = diagnostics.psis(diagnostics.importance_weights(model, x, 30, batch_size=2))
    assert torch.isneginf(khat).all()
    torch.testing.assert_close(log_px, model.log_marginal(x).detach(), rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- statistical

GRADIENT_DRAWS = 400
ENCODER_PARAMETERS = 36  # q(z|x): A1 3×4, c1 3, L1 3×3; q(z2|z): A2 2×3, c2 2, L2 2×2


def encoder_gradient_draws(model, x, name: str, num_particles: int, seed: int) -> torch.Tensor:
    """``(GRADIENT_DRAWS, 36)`` encoder gradient draws of the batch loss from ``seed``."""
    torch.manual_seed(seed)
    loss_fn = loss_module(model, ObjectiveConfig(name, num_particles))
    encoder = {"encoder": parameter_groups(model, x)["encoder"]}
    draws = gradient_statistics(loss_fn, (x,), encoder, GRADIENT_DRAWS)["encoder"].draws
    assert draws.shape == (GRADIENT_DRAWS, ENCODER_PARAMETERS)
    return draws


@pytest.mark.stat(comparisons=ENCODER_PARAMETERS)
def test_dreg_encoder_gradient_is_the_iwae_gradient_with_two_sites(seed):
    """Estimand: E[∇_φ DReG − ∇_φ IWAE] per encoder parameter (36), paired draws (the same z
    and z2), equal to 0: the plain reparameterized IWAE gradient is the brute-force unbiased
    estimate of ∇_φ IWAE_K, so DReG's several-site form is unbiased for it too. K = 3,
    400 draws, k = stats.k_two_sided(400). The 4 unused Cholesky entries have gradient 0 in
    every draw. Guide: the exact posterior shifted by 1.5 with scale 0.8 (weights far from
    uniform: the per-site hooks of the one-site form were off by |z| ≈ 5.4 at 1,000 draws)."""
    model, x = linear_two_layer()
    model.perturb_guide(1.5, 0.8)
    difference = encoder_gradient_draws(model, x, "dreg", 3, seed) - encoder_gradient_draws(
        model, x, "iwae", 3, seed
    )
    assert_mc_close(difference, 0.0, atol=1e-10, what="DReG - IWAE encoder gradient")


@pytest.mark.stat(comparisons=ENCODER_PARAMETERS)
def test_stl_encoder_gradient_is_the_elbo_gradient_with_two_sites(seed):
    """Estimand: E[∇_φ STL − ∇_φ Trace_ELBO] per encoder parameter (36), paired draws, equal
    to 0 (the reparameterized ELBO gradient is unbiased, the score term STL drops has
    expectation 0); 3 particles, 400 draws, k = stats.k_two_sided(400). Guide: shifted by 0.5,
    scale 2."""
    model, x = linear_two_layer()
    model.perturb_guide(0.5, 2.0)
    difference = encoder_gradient_draws(model, x, "stl", 3, seed) - encoder_gradient_draws(
        model, x, "trace", 3, seed
    )
    assert_mc_close(difference, 0.0, atol=1e-10, what="STL - ELBO encoder gradient")


@pytest.mark.stat(comparisons=3)
def test_importance_sampled_px_is_unbiased_with_two_sites(seed):
    """Estimand: E[p̂_K(x_b) / p(x_b)] = 1 for each of the 3 observations, p̂_K = exp of
    evaluation's importance-sampled log p(x) (metrics.log_likelihood) with K = 10 draws from
    q(z|x) q(z2|z); 400 draws, k = stats.k_two_sided(400). Guide: shifted by 0.3, scale 1.5
    (broader than the posterior, so the ratio has a finite variance)."""
    model, x = linear_two_layer()
    model.perturb_guide(0.3, 1.5)
    log_px = model.log_marginal(x).detach()
    seeds = torch.randint(2**31, (400,)).tolist()
    ratios = torch.stack([
        (log_likelihood(model, x, k=10, batch_size=3, particle_chunk=10, seed=s) - log_px).exp()
        for s in seeds
    ])  # fmt: skip
    assert_mc_close(ratios, 1.0, what="E[p_hat(x) / p(x)]")


@pytest.mark.stat(comparisons=3)
def test_elbo_iwae_and_log_px_are_ordered_with_two_sites(seed):
    """Estimands: E[ELBO − IWAE_5], E[IWAE_5 − IWAE_50] (paired draws) and E[IWAE_50] −
    log p(x), per batch, each ≤ 0; one-sided, k = stats.k_one_sided(200). Guide: shifted by
    0.5, scale 2."""
    model, x = linear_two_layer()
    model.perturb_guide(0.5, 2.0)
    bounds = [loss_module(model, ObjectiveConfig("iwae", k)) for k in (1, 5, 50)]
    with torch.no_grad():
        draws = common_random_numbers([lambda f=f: -f(x) for f in bounds], n=200)
    assert_mc_less_equal(draws[:, 0], draws[:, 1], what="ELBO <= IWAE_5")
    assert_mc_less_equal(draws[:, 1], draws[:, 2], what="IWAE_5 <= IWAE_50")
    assert_mc_less_equal(draws[:, 2], model.log_marginal(x).sum().detach(),
                         what="IWAE_50 <= log p(x)")  # fmt: skip


# ----------------------------------------------------------------------------- what applies


def test_the_metric_table_leaves_out_what_needs_one_gaussian_z(seed):
    """The -ELBO (Trace_ELBO), importance sampling, reconstruction at z = encode(x) and the
    active units of the first layer apply; the analytic-KL ELBO (not mean-field), the KL per
    dimension (no Gaussian q(z|x) over the whole latent, no explicit p(z)) and the aggregate
    posterior against N(0, I) (p(z) is not N(0, I)) are absent, as are the point-mass and
    codebook metrics."""
    model = small_hvae().float().eval()
    x = binary_images(20).float()
    assert metrics.applicable(model, x) == [
        "elbo", "importance sampling", "reconstruction", "active units"
    ]  # fmt: skip
    facts = metrics.ProgramFacts.of(model, x[:2])
    assert not facts.mean_field and not facts.standard_prior and facts.mean_code
    results = metrics.evaluate_model(model, x, metrics.EvalConfig(k=8, batch_size=10))
    for absent in ("neg_elbo_meanfield", "kl_sum", "aggregate_kl_to_prior", "neg_log_joint"):
        assert absent not in results
    assert all(math.isfinite(results[key]) for key in ("neg_elbo", "nll_is", "recon_nll"))
    assert len(results["posterior_mean_variance"]) == 4  # the units of z, the first layer


@pytest.mark.parametrize("name", ["trace", "tracegraph", "iwae", "renyi", "stl", "dreg"])
def test_every_objective_that_applies_trains_both_layers(name, seed):
    """Each objective of the table (meanfield aside, refused above) gives a finite loss whose
    gradient reaches all four networks."""
    model, x = small_hvae(), binary_images(6)
    loss = loss_module(model, ObjectiveConfig(name, 3))(x)
    assert math.isfinite(loss.item())
    for net in (model.encoder, model.top_encoder, model.top_decoder, model.decoder):
        grads = torch.autograd.grad(loss, list(net.parameters()), retain_graph=True)
        assert all(g.isfinite().all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_bf16_reaches_every_network(seed):
    """mixed_precision: every network runs through LatentVariableModel.network, so under bf16
    autocast all four run in bfloat16 and hand float32 on: the loss stays float32 and within
    bf16 rounding of the fp32 loss on the same draws."""
    model, x = small_hvae().float(), binary_images(6).float()
    seen = []
    hooks = [net.register_forward_hook(lambda m, i, o: seen.append(o[0].dtype if
             isinstance(o, tuple) else o.dtype))
             for net in (model.encoder.net, model.top_encoder.net, model.top_decoder.net,
                         model.decoder)]  # fmt: skip
    losses = []
    for autocast in (None, torch.bfloat16):
        model.autocast = autocast
        torch.manual_seed(seed)
        losses.append(loss_module(model, ObjectiveConfig())(x))
    for hook in hooks:
        hook.remove()
    assert seen == [torch.float32] * 4 + [torch.bfloat16] * 4
    assert losses[1].dtype == torch.float32
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=0)


# ----------------------------------------------------------------------------- training


def test_training_on_fashion_mnist_lowers_the_neg_elbo(tmp_path, fashion):
    """300 SVI steps (5 epochs of 6,000 real images, batch 100, Adam 1e-3) of a small hvae
    (784-256-32 to z, 32-64-16 to z2) lower the validation -ELBO (10,000 images) by more than
    200 nats/image below the untrained model's (observed: 554.7 → 273.5), and the training
    -ELBO of the last epoch is below the first's by more than 50 (observed: 386.8 → 272.8)."""
    cfg = RunConfig(
        name="hvae", runs_dir=tmp_path,
        model=HVAEConfig(z_dim=32, z2_dim=16, hidden=(256,), hidden2=(64,)),
        data=DataConfig(train_subset=6000),
        train=TrainConfig(epochs=5, batch_size=100, device="cpu", progress=False),
    )  # fmt: skip
    run_dir = fit(cfg, dataset=fashion)
    torch.manual_seed(cfg.train.seed)
    before = metrics.neg_elbo(build(cfg.model), data.eval_inputs(fashion.val, "dynamic"),
                              ObjectiveConfig())  # fmt: skip
    rows = runs.read_metrics(run_dir)
    assert len(rows) == 5 and runs.load_checkpoint(run_dir)["step"] == 300
    assert rows[-1]["val_neg_elbo"] < before - 200, (before, rows[-1])
    assert rows[-1]["train_neg_elbo"] < rows[0]["train_neg_elbo"] - 50


# ----------------------------------------------------------------------------- the CLI

TINY = ["--train.epochs", "1", "--train.batch-size", "32", "--eval.k", "4", "--no-train.progress"]
SMALL = ["--model.z-dim", "4", "--model.z2-dim", "2", "--model.hidden", "16",
         "--model.hidden2", "8"]  # fmt: skip


def test_cli_trains_evaluates_diagnoses_and_samples_it(fake_data_dir, tmp_path, capsys):
    """`ppl-vae train hvae` (here with DReG) writes a run folder whose eval.json has what
    applies and lacks what does not; evaluate, diagnose (k̂, NUTS over both layers, the gaps
    with q*(z|x) free per image and q(z2|z) as trained),
    sample and report work from the folder alone."""
    argv = ["train", "hvae", "--data.data-dir", str(fake_data_dir), "--runs-dir", str(tmp_path),
            "--name", "h", "--objective", "dreg", "--objective.num-particles", "3",
            *SMALL, *TINY]  # fmt: skip
    assert main(argv) == 0
    run_dir = tmp_path / "h"
    cfg = runs.read_config(run_dir)
    assert isinstance(cfg.model, HVAEConfig) and (cfg.model.z_dim, cfg.model.z2_dim) == (4, 2)
    assert main(["evaluate", str(run_dir), "--k", "6"]) == 0
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["k"] == 6 and all(math.isfinite(ev[k]) for k in ("neg_elbo", "nll_is", "recon_nll"))
    assert {"kl_sum", "neg_elbo_meanfield", "aggregate_kl_to_prior"}.isdisjoint(ev)
    assert "dimensions sorted by the variance of encode(x)" in (run_dir / "report.md").read_text()
    capsys.readouterr()
    argv = ["diagnose", str(run_dir), "--images", "4", "--k", "50", "--gap-images", "2",
            "--nuts-images", "1", "--nuts-warmup", "5", "--nuts-samples", "5"]  # fmt: skip
    assert main(argv) == 0
    assert "note: the gaps are left out" not in capsys.readouterr().out
    diag = json.loads((run_dir / "diagnostics.json").read_text())
    assert math.isfinite(diag["khat_mean"]) and diag["gap_images"] == 2
    assert diag["gap_local_family"] == "encoder-outputs"
    assert all(math.isfinite(diag[k]) for k in ("amortization_gap", "approximation_gap"))
    assert (run_dir / diagnostics.POSTERIORS_NC["local"]).exists()
    assert diag["nuts_latent_sites"] == {"z": 4, "z2": 2} and "nuts_r_hat_max" in diag
    nuts = diagnostics._arviz().from_netcdf(str(run_dir / diagnostics.POSTERIORS_NC["nuts"]))
    assert nuts.posterior.sizes["z_dim"] == 6  # z and z2, joined
    out = tmp_path / "s.png"
    assert main(["sample", str(run_dir), "-n", "4", "-o", str(out)]) == 0
    assert out.stat().st_size > 0


def test_cli_meanfield_is_refused_before_anything_is_written(fake_data_dir, tmp_path, capsys):
    """The refusal of meanfield reaches the command line as one line and exit code 2, and
    leaves no run folder behind."""
    runs_dir = tmp_path / "runs"
    argv = ["train", "hvae", "--data.data-dir", str(fake_data_dir), "--runs-dir", str(runs_dir),
            "--objective", "meanfield", *SMALL, *TINY]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--objective trace" in err
    assert not runs_dir.exists() or list(runs_dir.iterdir()) == []


def test_the_burda_2l_preset_trains_an_hvae(fake_data_dir, tmp_path, capsys):
    """`--preset burda-2l` (no KIND) is Burda et al.'s two-layer model with burda-1l's
    schedule; `ppl-vae train hvae --help` lists the second layer's options."""
    cfg, _, _ = parse_train(["--preset", "burda-2l"])
    assert isinstance(cfg.model, HVAEConfig) and cfg.train == PRESETS["burda-1l"].train
    m = cfg.model
    assert (m.z_dim, m.z2_dim, m.hidden, m.hidden2, m.activation) == (
        100, 50, (200, 200), (100, 100), "tanh"
    )  # fmt: skip
    argv = ["train", "--preset", "burda-2l", "--data.data-dir", str(fake_data_dir),
            "--runs-dir", str(tmp_path), "--name", "b", "--train.epochs", "1", "--eval.k", "2",
            "--no-train.progress"]  # fmt: skip
    assert main(argv) == 0
    assert runs.read_config(tmp_path / "b").model == m
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(["train", "hvae", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--model.z2-dim" in out and "--model.hidden2" in out
