"""Evaluation additions and diagnostics against the linear-Gaussian model, where the posterior,
log p(x) and every ELBO are exact: importance-sampled log p(x), PSIS k̂, the local q* and the
gaps, active units, KL per dimension; then the figures and the new CLI commands.
"""

from __future__ import annotations

import json
import math

import numpy
import pytest
import torch
from PIL import Image
from pyro.distributions import Normal
from stats import assert_mc_close
from test_linear import perturb_guide
from torch.distributions import MultivariateNormal, kl_divergence

from ppl_vae import diagnostics, plots
from ppl_vae.inference.weights import log_weights
from ppl_vae.metrics import active_units, kl_per_dimension, log_likelihood
from ppl_vae.models.linear import LinearGaussian, LinearGaussianConfig
from tests.conftest import run_cli

pytestmark = pytest.mark.usefixtures("single_thread")


def diagonal_posterior(model: LinearGaussian) -> None:
    """Give W orthogonal columns (scales 2, 1, 0.5), so that p(z|x) has a diagonal covariance
    σ² (WᵀW + σ² I)⁻¹ and the local diagonal Gaussian q* can be exact; guide set to it."""
    gen = torch.Generator().manual_seed(7)
    z_dim, x_dim = model.config.z_dim, model.config.x_dim
    q, _ = torch.linalg.qr(torch.randn(x_dim, z_dim, generator=gen, dtype=torch.float64))
    scales = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    with torch.no_grad():
        model.decoder.linear.weight.copy_(q * scales)
    model.set_guide_to_posterior()


# ----------------------------------------------------------------------------- log p(x) and k-hat


@pytest.mark.stat(comparisons=4)
def test_importance_sampled_likelihood_is_unbiased_for_p_x(linear_gaussian, seed):
    """Estimand: E[p̂(x) / p(x)] = 1 for the importance-sampled estimate p̂(x) =
    exp(log_likelihood) with k = 100 draws from a broad guide (the exact posterior's mean,
    scale ×2), for each of the 4 observations; n = 400 independent replicates,
    k = k_two_sided(400). (The log of p̂ is biased low; p̂ itself is unbiased.)
    """
    model, x = linear_gaussian
    perturb_guide(model, 0.0, 2.0)
    replicates = 400
    log_px = model.log_marginal(x).detach()
    estimate = log_likelihood(model, x.repeat(replicates, 1), k=100, particle_chunk=30)
    ratio = (estimate.reshape(replicates, 4) - log_px).exp()
    assert_mc_close(ratio, 1.0, what="E[p_hat(x) / p(x)]")


def test_khat_of_exact_broad_and_narrow_proposals(linear_gaussian, seed):
    """PSIS k̂ with 10,000 draws per observation, seeded.

    With a proposal s times the posterior's scale, the weights' tail is Pareto with shape
    k = 1 − s² (bounded weights for s > 1). Exact proposal (s = 1): constant weights, no tail:
    k̂ = −inf and the PSIS and plain estimates equal log p(x). s = 2: k = −3, so k̂ < 0.5.
    s = 0.25: k = 0.94, so k̂ > 0.7 (Yao et al.'s threshold), with a margin of 0.24.
    """
    model, x = linear_gaussian
    log_px = model.log_marginal(x).detach()
    with torch.no_grad():
        khat, psis_px = diagnostics.psis(log_weights(model.model, model.guide, x, 10_000))
    assert (khat == -math.inf).all()
    torch.testing.assert_close(psis_px, log_px, rtol=0, atol=1e-8)
    for scale, good in ((2.0, True), (0.25, False)):
        perturb_guide(model, 0.0, scale)
        with torch.no_grad():
            khat, _ = diagnostics.psis(log_weights(model.model, model.guide, x, 10_000))
        assert ((khat < 0.5) if good else (khat > 0.7)).all(), (scale, khat)
    summary = diagnostics.khat_summary(khat)
    assert summary["khat_share_bad"] == 1.0 and sum(summary["khat_histogram"]["counts"]) == 4


# ----------------------------------------------------------------------------- local q* and gaps

GAPS = diagnostics.DiagnoseConfig(local_steps=300, local_particles=16, elbo_particles=1000, k=1000)


def closed_form_kl(model: LinearGaussian, local, x: torch.Tensor) -> torch.Tensor:
    """KL(q*(z|x) ‖ p(z|x)) per observation, exactly."""
    q_star = MultivariateNormal(local.z_loc, scale_tril=torch.diag_embed(local.z_scale))
    return kl_divergence(q_star, model.exact_posterior(x)).detach()


def test_local_guide_reaches_the_exact_posterior(linear_gaussian, seed):
    """From a perturbed amortized guide (mean +0.5, scale ×2), 300 SVI steps on q* per
    observation, the decoder frozen, reach KL(q* ‖ p(z|x)) < 0.005 nats (exact KL), i.e.
    ELBO(q*) = log p(x) − KL within 0.005; the model's parameters are untouched."""
    model, x = linear_gaussian
    diagonal_posterior(model)
    perturb_guide(model, 0.5, 2.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    local = diagnostics.fit_local_guide(model, x, GAPS)
    kl = closed_form_kl(model, local, x)
    assert (kl < 0.005).all(), kl
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    assert all(param.grad is None for param in model.parameters())


@pytest.mark.stat(comparisons=4)
def test_reported_elbo_of_q_star_is_its_closed_form(linear_gaussian, seed):
    """Estimand: ELBO(q*) = log p(x) − KL(q* ‖ p(z|x)) (closed form) of a fitted local guide,
    from n = 1000 draws of log p(x, z) − log q*(z|x) per observation (the log weights of q*,
    as :func:`inference_gaps` reports it), 4 comparisons, k = k_two_sided(1000)."""
    model, x = linear_gaussian
    diagonal_posterior(model)
    perturb_guide(model, 0.5, 2.0)
    local = diagnostics.fit_local_guide(model, x, GAPS)
    expected = model.log_marginal(x).detach() - closed_form_kl(model, local, x)
    with torch.no_grad():
        draws = log_weights(model.model, local, x, 1000)
    assert_mc_close(draws.detach(), expected, what="E_q*[log w] = ELBO(q*)")


def test_both_local_families_agree_on_a_gaussian_guide(seed):
    """For a Gaussian guide the guide with its encoder's outputs free per image (the local q*
    of flow guides and two stochastic layers) is the family of the diagonal-Gaussian q*,
    parameterized through the encoder's head (softplus) instead of log σ: from an untrained
    VAE both fits reach the same ELBO(q*), within 0.01 nats per image, by 300 steps, each
    0.5 nats or more above ELBO(q). ELBOs from 4000 draws each."""
    import pyro

    from ppl_vae.models import VAE, VAEConfig

    torch.manual_seed(0)
    model = VAE(VAEConfig(x_dim=12, hidden=(8,), z_dim=3)).double().eval()
    x = torch.bernoulli(torch.rand(6, 12, generator=torch.Generator().manual_seed(1))).double()
    cfg = diagnostics.DiagnoseConfig(local_steps=300, local_particles=16)
    elbos = {}
    for family in ("gaussian", "encoder-outputs", None):
        guide = model.guide
        if family is not None:
            guide = diagnostics.fit_local_guide(model, x, cfg, family=family)
        pyro.set_rng_seed(seed)
        with torch.no_grad():
            elbos[family] = log_weights(model.model, guide, x, 4000).mean(0)
    assert (elbos["gaussian"] - elbos["encoder-outputs"]).abs().max() < 0.01
    assert (elbos["encoder-outputs"] - elbos[None]).min() > 0.5


def test_gaps_of_the_exact_guide_vanish(linear_gaussian, seed):
    """With q(z|x) = p(z|x) (diagonal here): ELBO(q) = log p(x) exactly; q* starts there and
    moves only by the noise of its SVI steps (Adam steps have the size of the learning rate
    even at the optimum, hence the decay), so half the mixture proposal is exact and the
    other half nearly so: the importance-sampled log p(x), and both gaps, are within 0.005
    nats of their exact values (log p(x) and 0). The Monte Carlo error of ELBO(q*) with 1000
    draws is far smaller (its log weights vary by less than 0.05 nats)."""
    model, x = linear_gaussian
    diagonal_posterior(model)
    gaps, _ = diagnostics.inference_gaps(model, x, GAPS)
    log_px = model.log_marginal(x).detach().mean().item()
    assert gaps["elbo_q"] == pytest.approx(log_px, abs=1e-8)
    assert gaps["log_px_is"] == pytest.approx(log_px, abs=0.005)
    assert abs(gaps["amortization_gap"]) < 0.005 and abs(gaps["approximation_gap"]) < 0.005
    assert abs(gaps["inference_gap"]) < 0.005


def test_gaps_refused_for_point_mass_guides():
    from ppl_vae.errors import ConfigError
    from ppl_vae.models import AE, AEConfig

    model = AE(AEConfig(z_dim=2, hidden=(8,)))
    with pytest.raises(ConfigError, match="point mass"):
        diagnostics.check_density_guide(model, torch.zeros(3, 784))


# ----------------------------------------------------------------------------- active units, KL


def test_active_units_of_a_constructed_encoder():
    """Posterior means A x with x ~ N(0, I): Var(z_i) = ‖A_i‖². Rows with ‖A_i‖² = 1, 0.02
    (active, above 0.01) and 0.005, 0 (inactive): 2 active units. With 20,000 inputs the
    sample variances are within 3% of ‖A_i‖² (sd √(2/n) relative), far from the threshold."""
    model = LinearGaussian(LinearGaussianConfig(z_dim=4, x_dim=6)).double()
    squared_norms = torch.tensor([1.0, 0.02, 0.005, 0.0], dtype=torch.float64)
    with torch.no_grad():
        rows = torch.zeros(4, 6, dtype=torch.float64)
        rows[torch.arange(4), torch.arange(4)] = squared_norms.sqrt()
        model.encoder.linear.weight.copy_(rows)
        model.encoder.linear.bias.fill_(3.0)  # a constant offset changes nothing
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20_000, 6, generator=gen, dtype=torch.float64)
    result = active_units(model, x, batch_size=4096)
    assert result["active_units"] == 2
    torch.testing.assert_close(
        torch.tensor(result["posterior_mean_variance"], dtype=torch.float64),
        squared_norms,
        rtol=0.05,
        atol=1e-12,
    )


class _Factorized:
    """posterior(x) = N([x, 0], 1), prior(x) = N(prior_loc, prior_scale²), per dimension."""

    def __init__(self, prior_loc: float = 0.0, prior_scale: float = 1.0):
        self.prior_loc, self.prior_scale = prior_loc, prior_scale

    def posterior(self, batch):
        z_loc = torch.cat([batch, torch.zeros_like(batch)], 1)
        return Normal(z_loc, torch.ones_like(z_loc)).to_event(1)

    def prior(self, batch):
        loc = torch.full((batch.shape[0], 2), self.prior_loc)
        return Normal(loc, torch.full_like(loc, self.prior_scale)).to_event(1)


def test_kl_per_dimension_is_the_analytic_kl():
    """KL(N(m, s²) ‖ N(0, 1)) = (s² + m² − 1)/2 − log s per coordinate, averaged over inputs:
    dimension 0 has m = x, s = 1 (mean KL E[x²]/2), dimension 1 is the prior (KL 0). Against
    N(1, 2²) each coordinate's KL is log 2 + (1 + (m − 1)²)/8 − 1/2."""
    x = torch.tensor([[1.0], [-2.0], [3.0]])
    result = kl_per_dimension(_Factorized(), x, batch_size=2)
    assert result["kl_per_dim"] == pytest.approx([(1 + 4 + 9) / 6, 0.0])
    assert result["kl_sum"] == pytest.approx(14 / 6)
    shifted = kl_per_dimension(_Factorized(1.0, 2.0), x, batch_size=2)["kl_per_dim"]
    expected = [
        sum(math.log(2) + (1 + (m - 1) ** 2) / 8 - 0.5 for m in (1.0, -2.0, 3.0)) / 3,
        math.log(2) + (1 + 1) / 8 - 0.5,
    ]
    assert shifted == pytest.approx(expected)


# ----------------------------------------------------------------------------- figures


def test_slerp_endpoints_and_great_circle():
    a = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [4.0, 0.0]])  # orthogonal pair; parallel pair (linear)
    path = plots.slerp(a, b, torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(path[0], a)
    torch.testing.assert_close(path[2], b)
    torch.testing.assert_close(path[1, 0], torch.tensor([1.0, 1.0]) / math.sqrt(2))
    torch.testing.assert_close(path[1, 1], torch.tensor([3.0, 0.0]))


def _not_blank(path) -> Image.Image:
    image = Image.open(path).convert("L")
    values = torch.from_numpy(numpy.asarray(image, dtype=numpy.float32))
    assert values.std() > 5, f"{path} looks blank"
    return image


@pytest.fixture
def tiny_vae():
    from ppl_vae.models import VAE, VAEConfig

    torch.manual_seed(0)
    return VAE(VAEConfig(z_dim=2, hidden=(16,))).eval()


def test_latent_figures_have_their_sizes_and_content(tiny_vae, tmp_path):
    """Grid figures: 28-pixel images with 2-pixel padding (30 per cell, +2)."""
    shape = (1, 28, 28)
    x = torch.bernoulli(torch.full((6, 784), 0.3), generator=torch.Generator().manual_seed(0))
    path = plots.interpolations_figure(tiny_vae, x[:3], x[3:], tmp_path / "i.png", shape, steps=8)
    assert _not_blank(path).size == (10 * 30 + 2, 6 * 30 + 2)  # 2 rows (linear, slerp) per pair
    path = plots.traversals_figure(tiny_vae, x, [1, 0], tmp_path / "t.png", shape, steps=7)
    assert _not_blank(path).size == (7 * 30 + 2, 2 * 30 + 2)
    path = plots.manifold_figure(tiny_vae, tmp_path / "m.png", shape, n=5)
    assert Image.open(path).size == (5 * 30 + 2, 5 * 30 + 2)
    path = plots.latent_map_figure(tiny_vae, x, torch.arange(6), tmp_path / "l.png")
    assert _not_blank(path).size == (500, 450)
    path = plots.khat_figure(torch.tensor([0.1, 0.4, 0.8, 0.9]), tmp_path / "k.png")
    assert _not_blank(path).size == (500, 320)


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from tests.conftest import write_fake_idx

    root = tmp_path_factory.mktemp("diag")
    idx = write_fake_idx(root / "idx")
    result = run_cli(
        "train", "vae", "--name", "vae", "--runs-dir", str(root), "--data.data-dir", str(idx),
        "--model.z-dim", "2", "--model.hidden", "16", "--train.epochs", "1",
        "--train.device", "cpu", "--eval.k", "4",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return root / "vae", idx


def test_cli_evaluate_diagnose_report(tiny_run):
    run_dir, _ = tiny_run
    result = run_cli(
        "evaluate", str(run_dir), "--k", "8", "--images", "20", "--reference-vae", str(run_dir)
    )
    assert result.returncode == 0, result.stderr
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["images"] == 20 and ev["k"] == 8 and len(ev["kl_per_dim"]) == 2
    assert "active units" in result.stdout and "reference VAE" in result.stdout
    result = run_cli(
        "diagnose", str(run_dir), "--images", "10", "--k", "20", "--gap-images", "2",
        "--local-steps", "3", "--elbo-particles", "10", "--nuts-images", "1",
        "--nuts-warmup", "5", "--nuts-samples", "5", "--device", "cpu",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    diag = json.loads((run_dir / "diagnostics.json").read_text())
    assert 0 <= diag["khat_share_bad"] <= 1 and "amortization_gap" in diag
    for name in ("importance.nc", *diagnostics.POSTERIORS_NC.values(), "khat.png"):
        assert (run_dir / name).stat().st_size > 0, name
    result = run_cli("report", str(run_dir), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    page = (run_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 8 and 'src="http' not in page
    assert "Diagnostics of the guide" in page and "Latent units" in page
    for name in (plots.INTERPOLATIONS, plots.TRAVERSALS, plots.LATENT_MAP, plots.MANIFOLD):
        assert f"]({name})" in (run_dir / "report.md").read_text()


def test_cli_diagnose_refuses_a_point_mass_guide(tiny_run, tmp_path):
    _, idx = tiny_run
    result = run_cli(
        "train", "ae", "--name", "ae", "--runs-dir", str(tmp_path), "--data.data-dir", str(idx),
        "--model.z-dim", "2", "--model.hidden", "16", "--train.epochs", "1",
        "--train.device", "cpu",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    result = run_cli("diagnose", str(tmp_path / "ae"), "--device", "cpu")
    assert result.returncode == 2 and "point mass" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
