"""The objectives of ``--objective``: their values by seed replay, their bounds on the
linear-Gaussian model, their errors, and training through the CLI.

Values are per batch (sums over the four observations of the ``linear_gaussian`` fixture).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from stats import assert_mc_less_equal, common_random_numbers
from test_linear import PERTURBED, perturb_guide

from ppl_vae.cli import main
from ppl_vae.config import ObjectiveConfig
from ppl_vae.errors import ConfigError
from ppl_vae.inference.estimators import ImportanceWeightedELBO
from ppl_vae.inference.gradients import log_mean_exp_pooled
from ppl_vae.inference.objectives import loss_module, make_elbo
from ppl_vae.inference.weights import log_mean_exp, log_weights

pytestmark = pytest.mark.usefixtures("single_thread")

NAMES = ["trace", "meanfield", "tracegraph", "renyi", "iwae", "stl", "dreg"]


def value(model, x, name: str, num_particles: int, seed: int, **fields) -> torch.Tensor:
    """The objective's value (the bound, not the loss) on the draws of ``seed``."""
    loss_fn = loss_module(model, ObjectiveConfig(name, num_particles, **fields))
    torch.manual_seed(seed)
    return -loss_fn(x)


def gradients(model, loss: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(model.parameters()), allow_unused=False))


# ----------------------------------------------------------------------------- exact checks


@pytest.mark.parametrize("name", NAMES)
def test_every_objective_is_a_module_and_an_svi_loss(linear_gaussian, name):
    model, x = linear_gaussian
    perturb_guide(model, *PERTURBED)
    loss = loss_module(model, ObjectiveConfig(name, 3))(x)
    assert loss.shape == () and math.isfinite(loss.item())
    assert all(g.isfinite().all() for g in gradients(model, loss))
    elbo = make_elbo(ObjectiveConfig(name, 3))
    svi = pyro.infer.SVI(model.model, model.guide, pyro.optim.Adam({"lr": 1e-3}), elbo)
    assert math.isfinite(svi.step(x))


def test_iwae_with_one_particle_is_the_elbo(linear_gaussian):
    model, x = linear_gaussian
    perturb_guide(model, *PERTURBED)
    elbo = value(model, x, "trace", 1, seed=5)
    for name in ("iwae", "renyi", "stl", "dreg"):
        torch.testing.assert_close(value(model, x, name, 1, seed=5), elbo, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.5, -1.0])
def test_renyi_equals_pyros_renyi_elbo_per_datapoint(linear_gaussian, alpha):
    """Pyro's RenyiELBO keeps the shared "data" plate: same value and gradient as ours."""
    model, x = linear_gaussian
    perturb_guide(model, *PERTURBED)
    pyro_elbo = pyro.infer.RenyiELBO(
        alpha=alpha, num_particles=7, vectorize_particles=True, max_plate_nesting=1
    )
    torch.manual_seed(3)
    pyro_loss = pyro_elbo.loss_and_grads(model.model, model.guide, x)
    pyro_grads = [p.grad.clone() for p in model.parameters()]
    ours = ImportanceWeightedELBO(7, alpha)(model.model, model.guide)
    torch.manual_seed(3)
    loss = ours(x)
    torch.testing.assert_close(loss.item(), pyro_loss, rtol=1e-12, atol=1e-10)
    for grad, pyro_grad in zip(gradients(model, loss), pyro_grads, strict=True):
        torch.testing.assert_close(grad, pyro_grad, rtol=1e-10, atol=1e-10)


def test_iwae_log_mean_exps_per_datapoint_not_over_the_batch(linear_gaussian):
    """Σ_b log mean_k w_kb is the library's bound; the pooled log mean_k Π_b w_kb is lower."""
    model, x = linear_gaussian
    perturb_guide(model, *PERTURBED)
    torch.manual_seed(11)
    log_w = log_weights(model.model, model.guide, x, 50).detach()
    assert log_w.shape == (50, 4)
    per_datapoint = log_mean_exp(log_w).sum()
    pooled = log_mean_exp_pooled(log_w)
    assert per_datapoint - pooled > 1.0  # the per-datapoint bound is far tighter here
    iwae = value(model, x, "iwae", 50, seed=11).detach()
    torch.testing.assert_close(iwae, per_datapoint, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("name", "base"), [("stl", "trace"), ("dreg", "iwae")])
def test_stl_and_dreg_change_gradients_not_values(linear_gaussian, name, base):
    model, x = linear_gaussian
    perturb_guide(model, *PERTURBED)
    ours, theirs = value(model, x, name, 6, seed=2), value(model, x, base, 6, seed=2)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-11)
    encoder_ours = gradients(model, ours)[-3]  # an encoder parameter: differs
    encoder_theirs = gradients(model, theirs)[-3]
    assert not torch.allclose(encoder_ours, encoder_theirs)


@pytest.mark.parametrize("name", ["stl", "dreg"])
def test_stl_and_dreg_encoder_gradients_vanish_at_the_exact_posterior(linear_gaussian, name):
    """With q = p(z|x), log w = log p(x) for every z: the path derivative is exactly zero."""
    model, x = linear_gaussian
    loss = loss_module(model, ObjectiveConfig(name, 5))(x)
    grads = torch.autograd.grad(loss, list(model.encoder.parameters()))
    for grad in grads:
        torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-9)


def test_config_errors_name_the_flag():
    with pytest.raises(ConfigError, match="--objective.alpha"):
        ObjectiveConfig("renyi", 5, alpha=1.0)
    with pytest.raises(ConfigError, match="alpha"):
        ImportanceWeightedELBO(5, alpha=0.5, dreg=True)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(0.5 * x.new_ones(())))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(torch.sigmoid(x)))

    for name in ("iwae", "stl", "dreg"):
        loss_fn = make_elbo(ObjectiveConfig(name, 2))(model, guide)
        with pytest.raises(ConfigError, match="not reparameterizable.*tracegraph"):
            loss_fn(torch.zeros(3))


def test_cli_trains_a_vae_with_iwae(fake_data_dir, tmp_path, capsys):
    argv = ["train", "vae", "--data.data-dir", str(fake_data_dir), "--runs-dir", str(tmp_path),
            "--name", "iwae", "--objective", "iwae", "--objective.num-particles", "5",
            "--model.z-dim", "4", "--model.hidden", "32", "--train.epochs", "1",
            "--train.batch-size", "32", "--eval.k", "4", "--no-train.progress"]  # fmt: skip
    assert main(argv) == 0
    assert '"name": "iwae"' in (tmp_path / "iwae" / "config.json").read_text()


# ----------------------------------------------------------------------------- statistical


@pytest.mark.stat(comparisons=3)
def test_iwae_is_monotone_in_k_and_below_log_marginal(linear_gaussian, seed):
    """Estimands: E[ELBO_1 - IWAE_5], E[IWAE_5 - IWAE_50] (paired: the first five of the 50
    particles are the five of IWAE_5) and E[IWAE_50] - log p(x), each ≤ 0; one-sided,
    k = stats.k_one_sided(200). Guide: the posterior shifted by 0.5 with double scale."""
    model, x = linear_gaussian
    perturb_guide(model, *PERTURBED)
    bounds = [loss_module(model, ObjectiveConfig("iwae", k)) for k in (1, 5, 50)]
    draws = common_random_numbers([lambda f=f: -f(x) for f in bounds], n=200)
    assert_mc_less_equal(draws[:, 0], draws[:, 1], what="ELBO <= IWAE_5")
    assert_mc_less_equal(draws[:, 1], draws[:, 2], what="IWAE_5 <= IWAE_50")
    log_marginal = model.log_marginal(x).sum().detach()
    assert_mc_less_equal(draws[:, 2], log_marginal, what="IWAE_50 <= log p(x)")
