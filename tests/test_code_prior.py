"""The PixelCNN code prior: autoregressive masking, maximum likelihood by SVI, sampling."""

from __future__ import annotations

import math

import torch
from pyro import poutine

from ppl_vae.models.capabilities import AuxiliaryFit
from ppl_vae.models.code_prior import CodePrior, CodePriorConfig
from ppl_vae.train import fit_auxiliary

K, GRID = 8, (5, 5)


def test_logits_depend_only_on_earlier_positions(seed):
    """Changing the code at raster position i changes no logits at positions ≤ i."""
    prior = CodePrior(K, GRID, CodePriorConfig(channels=8, layers=3)).double()
    codes = torch.randint(K, (1, *GRID))
    base = prior.logits(codes)
    for i in range(GRID[0] * GRID[1]):
        changed = codes.clone()
        changed.view(-1)[i] = (changed.view(-1)[i] + 1) % K
        diff = (prior.logits(changed) - base).abs().sum(-1).view(-1)
        assert torch.all(diff[: i + 1] == 0), i
    # and position 0 depends on nothing: its logits are the same for any code map
    other = torch.randint(K, (1, *GRID))
    torch.testing.assert_close(prior.logits(other)[0, 0, 0], base[0, 0, 0])


def test_pyro_model_scores_the_codes(seed):
    prior = CodePrior(K, GRID, CodePriorConfig(channels=8, layers=1))
    codes = torch.randint(K, (4, *GRID))
    trace = poutine.trace(prior.model).get_trace(codes)
    trace.compute_log_prob()
    site = trace.nodes["code"]
    assert site["is_observed"] and site["log_prob"].shape == (4,)
    torch.testing.assert_close(site["log_prob"], prior.log_prob(codes))


def test_fit_learns_structure_below_the_uniform_rate(seed):
    """Code maps that copy their first code everywhere: after fitting, -log p(c) per position
    falls far below the uniform prior's log K (at best log K / positions)."""
    first = torch.randint(K, (400, 1, 1))
    codes = first.expand(400, *GRID).clone()
    config = CodePriorConfig(channels=16, layers=2, epochs=10, batch_size=50, lr=1e-2)
    prior = CodePrior(K, GRID, config)
    fitted = []
    aux = AuxiliaryFit(
        "code prior", prior, prior.model, prior.guide, data=lambda c: c, epochs=config.epochs,
        batch_size=config.batch_size, lr=config.lr, evaluate=prior.validation_metrics,
        done=lambda: fitted.append(True),
    )  # fmt: skip
    results = fit_auxiliary(aux, codes[:300], codes[300:])
    assert fitted == [True] and not prior.training
    assert results["code_prior_val_bits_per_position"] < 0.25 * math.log2(K)
    # the best possible: log K for the first code, nothing for the copies
    assert results["code_prior_val_nll"] < math.log(K) + 0.3
    assert results["code_prior_val_nll"] == prior.nll(codes[300:])
    samples = prior.sample(50)
    assert samples.shape == (50, *GRID) and samples.min() >= 0 and samples.max() < K
    # the samples repeat their first code everywhere, as the training maps do
    assert (samples == samples[:, :1, :1]).flatten(1).all(1).float().mean() > 0.9
