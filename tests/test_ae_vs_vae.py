"""Why decoding z ~ N(0, I) works for a VAE and not for an autoencoder, measured on real data.

Three models with the same networks are trained for the same few steps on the same Fashion-MNIST
images: a VAE, the MAP-regularized AE (N(0, I) prior, point-mass guide) and the plain AE (no
prior). The VAE's KL term pulls its aggregate posterior towards N(0, I); nothing does that for
an autoencoder's codes, so N(0, I) draws land where its decoder was never trained.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch

from ppl_vae import data
from ppl_vae.config import ObjectiveConfig
from ppl_vae.evaluate import aggregate_posterior_gap, log_likelihood
from ppl_vae.models import AEConfig, VAEConfig, build
from ppl_vae.objectives import loss_module

NET = {"z_dim": 16, "hidden": (256,)}
STEPS, BATCH, N_TRAIN = 300, 100, 3000


def trained(config, train: torch.Tensor):
    pyro.set_rng_seed(0)
    model = build(config)
    loss_fn = loss_module(model, ObjectiveConfig())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        x = train[torch.randint(train.shape[0], (BATCH,), generator=order)]
        (loss_fn(x) / BATCH).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval()


@pytest.mark.slow
@pytest.mark.stat
def test_autoencoder_prior_samples_are_off_the_data(fashion):
    """Estimands: (1) KL(moment-matched aggregate of z ~ q(z|x) over 1000 test images ||
    N(0, I)) per model — deterministic given the seeds, compared with wide margins; (2) the mean
    importance-sampled log p(x) (k = 20) under the VAE of 200 images drawn from each model with
    z ~ N(0, I): the plain AE's must be lower than the VAE's own by more than k = 4.3 standard
    errors of the difference (independent samples, SE = √(s₁²/n + s₂²/n))."""
    train = data.to_input(fashion.train.fixed_binary[:N_TRAIN], "static")
    test = data.eval_inputs(fashion.test, "static")[:1000]
    vae = trained(VAEConfig(**NET), train)
    map_ae = trained(AEConfig(**NET), train)
    plain_ae = trained(AEConfig(prior=False, **NET), train)

    gap = {name: aggregate_posterior_gap(m, test)["aggregate_kl_to_prior"]
           for name, m in (("vae", vae), ("map", map_ae), ("plain", plain_ae))}  # fmt: skip
    assert gap["plain"] > 10 * gap["vae"], gap
    assert gap["map"] > gap["vae"], gap

    torch.manual_seed(0)
    scores = {}
    for name, m in (("vae", vae), ("plain", plain_ae)):
        images = torch.bernoulli(m.sample(200))
        scores[name] = log_likelihood(vae, images, k=20)
    diff = scores["vae"].mean() - scores["plain"].mean()
    se = math.sqrt(sum(s.var().item() / s.numel() for s in scores.values()))
    assert diff > 4.3 * se, (diff, se)
