"""The same checks through a real VAE: a small one, trained briefly on real Fashion-MNIST."""

from __future__ import annotations

import pyro
import pytest
import torch
from conftest import one_torch_thread
from pyro import poutine
from stats import assert_mc_close, assert_mc_less_equal
from torch.distributions import kl_divergence

from ppl_vae import data
from ppl_vae.config import ObjectiveConfig
from ppl_vae.distributed import stream_seed
from ppl_vae.inference.kl import kl_standard_normal
from ppl_vae.inference.objectives import loss_module
from ppl_vae.inference.weights import log_mean_exp, log_weights
from ppl_vae.metrics import log_likelihood
from ppl_vae.models import VAE, VAEConfig

pytestmark = pytest.mark.usefixtures("single_thread")

TRAIN_IMAGES, BATCH, EPOCHS = 2000, 100, 3


@pytest.fixture(scope="module")
def trained_vae(fashion) -> VAE:
    """A 784-128-8 VAE trained with Trace_ELBO for 3 epochs (60 steps) on 2,000 dynamically
    binarized training images, then cast to float64. Training has its own fixed seed, so the
    ``seed`` of a test (and a ``--stat-seeds`` sweep) moves only the Monte Carlo draws."""
    pyro.set_rng_seed(0)
    model = VAE(VAEConfig(z_dim=8, hidden=(128,)))
    loss_fn = loss_module(model, ObjectiveConfig("trace"))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.Generator().manual_seed(0)
    with one_torch_thread():
        for _ in range(EPOCHS):
            for images in data.batches(fashion.train.images[:TRAIN_IMAGES], BATCH, order):
                x = data.to_input(images, "dynamic")
                (loss_fn(x) / x.shape[0]).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return model.double().eval()


@pytest.fixture(scope="module")
def test_images(fashion) -> torch.Tensor:
    """The first 200 test images with the evaluation's fixed binarization, float64."""
    return data.eval_inputs(fashion.test, "dynamic")[:200].double()


@pytest.mark.stat(comparisons=4)
def test_vae_monte_carlo_kl_matches_analytic(trained_vae, test_images, seed):
    """Estimand: Σ_b KL(q(z|x_b) ‖ p(z)) over a real batch of 50 test images, for 4 batches;
    the mean of n = 2000 draws of Σ_b [log q(z_b|x_b) - log p(z_b)], with q the trained guide
    and p the model's prior site, must equal the library's ``kl_standard_normal`` summed;
    k = k_two_sided(2000). The KL that TraceMeanField_ELBO takes from the same two sites must equal
    ``kl_standard_normal`` exactly (per image).
    """
    for x in data.batches(test_images, 50):
        with torch.no_grad():
            with pyro.plate("particles", 2000, dim=-2):
                particles = poutine.trace(trained_vae.guide).get_trace(x).nodes["z"]
            guide_fn = poutine.trace(trained_vae.guide).get_trace(x).nodes["z"]["fn"]
            prior_fn = poutine.trace(trained_vae.model).get_trace(x).nodes["z"]["fn"]
            z_loc, z_scale = trained_vae.encoder(x)
        z = particles["value"]
        assert z.shape == (2000, 50, 8)
        draws = (particles["fn"].log_prob(z) - prior_fn.log_prob(z)).sum(-1)
        kl = kl_standard_normal(z_loc, z_scale).sum(-1)
        torch.testing.assert_close(kl_divergence(guide_fn, prior_fn), kl, rtol=1e-12, atol=1e-12)
        assert_mc_close(draws, kl.sum(), what="E_q[log q(z|x) - log p(z)] over the batch")


@pytest.mark.stat(comparisons=1)
def test_vae_importance_sampling_above_elbo(trained_vae, test_images, seed):
    """Estimand: E[ELBO draw] - E[IS_32] over 8 real test images (summed), where IS_32 is the
    evaluation's importance-sampled log p(x) with 32 draws and the ELBO draw is the single-draw
    log weight of the first of those draws (common random numbers); n = 128 replicates,
    one-sided (≤ 0), k = k_one_sided(128). The replay of the evaluation's draws is checked to
    float rounding (the evaluation's fused densities differ from the traced ones in the last bits).
    """
    replicates, k, rows = 128, 32, 256
    x = test_images[:8].repeat(replicates, 1)
    estimate = log_likelihood(trained_vae, x, k=k, batch_size=rows, particle_chunk=k, seed=seed)
    columns = []
    with torch.no_grad():
        for b, xb in enumerate(data.batches(x, rows)):  # the evaluation's stream of batch b
            torch.manual_seed(stream_seed(seed, b))
            columns.append(log_weights(trained_vae.model, trained_vae.guide, xb, k))
    log_w = torch.cat(columns, dim=1)
    torch.testing.assert_close(estimate, log_mean_exp(log_w), rtol=1e-12, atol=1e-9)
    importance_sampled = estimate.reshape(replicates, 8).sum(-1)
    elbo = log_w[0].reshape(replicates, 8).sum(-1)
    assert_mc_less_equal(elbo, importance_sampled, what="E[ELBO] <= E[IS_32 log p(x)]")
