"""Vector quantization: nearest codes, the straight-through gradient, which term moves what,
EMA convergence, usage statistics, revival, and the VQ-VAE's constant KL."""

from __future__ import annotations

import math

import pytest
import torch
from pyro import poutine
from stats import assert_close_known_se

from ppl_vae.config import ObjectiveConfig
from ppl_vae.inference.objectives import loss_module
from ppl_vae.models import build, default_config
from ppl_vae.quantizer import (
    Quantizer,
    codebook_loss,
    commitment_loss,
    nearest_code,
    perplexity,
    straight_through,
)


def test_nearest_code_matches_brute_force(seed):
    vectors = torch.randn(300, 8, dtype=torch.float64)
    codebook = torch.randn(40, 8, dtype=torch.float64)
    brute = (vectors[:, None, :] - codebook[None, :, :]).pow(2).sum(-1).argmin(1)
    assert torch.equal(nearest_code(vectors, codebook), brute)


def test_quantizer_returns_nearest_codebook_vectors(seed):
    quantizer = Quantizer(codebook_size=16, code_dim=3).double().eval()
    with torch.no_grad():
        quantizer.codebook.copy_(torch.randn(16, 3, dtype=torch.float64))
    z_e = torch.randn(4, 3, 5, 6, dtype=torch.float64)
    z_q, codes, _ = quantizer(z_e)
    assert codes.shape == (4, 5, 6)
    flat = z_e.movedim(1, -1).reshape(-1, 3)
    brute = (flat[:, None] - quantizer.codebook[None]).pow(2).sum(-1).argmin(1)
    assert torch.equal(codes.reshape(-1), brute)
    torch.testing.assert_close(z_q, quantizer.codebook[codes].movedim(-1, 1))


def test_straight_through_gradient_is_the_identity(seed):
    z_e = torch.randn(3, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    e_k = torch.randn(3, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    z_q = straight_through(z_e, e_k)
    torch.testing.assert_close(z_q, e_k)
    jacobian = torch.autograd.functional.jacobian(lambda z: straight_through(z, e_k), z_e)
    torch.testing.assert_close(jacobian.reshape(48, 48), torch.eye(48, dtype=torch.float64))
    z_q.sum().backward()
    assert e_k.grad is None or torch.all(e_k.grad == 0)


def grads_of(loss_fn, seed_value=0):
    """Gradients of ``loss_fn(z_e, e_k)`` w.r.t. a linear encoder's weight and the codebook."""
    torch.manual_seed(seed_value)
    encoder = torch.nn.Linear(6, 4).double()
    codebook = torch.nn.Parameter(torch.randn(10, 4, dtype=torch.float64))
    x = torch.randn(7, 6, dtype=torch.float64)
    z_e = encoder(x)
    e_k = codebook[nearest_code(z_e.detach(), codebook.detach())]
    loss_fn(z_e, e_k).sum().backward()
    return encoder.weight.grad, codebook.grad


def test_codebook_term_moves_codes_not_encoder():
    encoder_grad, codebook_grad = grads_of(codebook_loss)
    assert encoder_grad is None
    assert codebook_grad is not None and codebook_grad.abs().sum() > 0


def test_commitment_term_moves_encoder_not_codes():
    encoder_grad, codebook_grad = grads_of(commitment_loss)
    assert codebook_grad is None
    assert encoder_grad is not None and encoder_grad.abs().sum() > 0


def test_auxiliary_loss_is_per_datum(seed):
    quantizer = Quantizer(codebook_size=8, code_dim=2, beta=0.25).double().eval()
    z_e = torch.randn(5, 2, 3, 3, dtype=torch.float64)
    _, codes, aux = quantizer(z_e)
    e_k = quantizer.codebook[codes].movedim(-1, 1)
    expected = 1.25 * (z_e - e_k).pow(2).sum((1, 2, 3))
    torch.testing.assert_close(aux, expected)
    # a datum's term does not depend on the batch it comes in
    torch.testing.assert_close(quantizer(z_e[:2])[2], aux[:2])


@pytest.mark.stat(comparisons=8)
def test_ema_codes_converge_to_cluster_means(seed):
    """Estimand: each EMA code after T steps, against the mean of the cluster it owns.

    With batches of m points per cluster, noise σ and decay d, the EMA code is a weighted mean
    of the points with weights (1 − d) d^(T − t) per step (the start, 1 away with weight
    d^T ≈ 7e-3 against ≈ m, shifts it by ≈ 1e-4, 3% of an SE; the Laplace smoothing by less),
    so its standard error per coordinate is known: SE = σ √((1 − d) / ((1 + d) m)).
    Tolerance: k = Φ⁻¹(1 − α/2) standard errors from tests/stats.py on each of the
    8 coordinates (8 comparisons).
    """
    gen = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[5.0, 5.0], [-5.0, 5.0], [5.0, -5.0], [-5.0, -5.0]]).double()
    sigma, m, steps, decay = 0.5, 50, 500, 0.99
    quantizer = Quantizer(codebook_size=4, code_dim=2, ema=True, decay=decay).double().train()
    with torch.no_grad():  # each code starts nearest its own cluster, 1 away from its centre
        quantizer.codebook.copy_(centres + 1.0)
        quantizer.ema_code_sum.copy_(centres + 1.0)
        quantizer.initialized.fill_(True)
    for _ in range(steps):
        points = centres.repeat_interleave(m, 0) + sigma * torch.randn(4 * m, 2, generator=gen)
        quantizer(points.double()[:, :, None, None])  # a 1×1 grid per point
    standard_error = sigma * math.sqrt((1 - decay) / ((1 + decay) * m))
    assert_close_known_se(
        quantizer.codebook.detach(), centres, standard_error, what="EMA codes vs cluster means"
    )


def test_usage_statistics_and_revival(seed):
    quantizer = Quantizer(codebook_size=6, code_dim=2).double().train()
    points = torch.tensor([[0.0, 0.0], [10.0, 10.0]]).double().repeat(10, 1)[:, :, None, None]
    with torch.no_grad():
        quantizer(points)  # no_grad: no bookkeeping
    assert quantizer.epoch_counts.sum() == 0
    quantizer(points)  # seeds the codebook from these points, then counts
    stats = quantizer.take_epoch_stats()
    assert stats["perplexity"] <= 2.0 + 1e-9
    assert stats["codebook_usage"] == pytest.approx(2 / 6)
    with torch.no_grad():  # make four codes unreachable
        quantizer.codebook[2:] = 1000.0
    quantizer.window_counts.zero_()
    quantizer(points)
    revived = quantizer.revive_dead_codes()
    assert revived >= 4
    assert torch.all(quantizer.codebook.abs() < 100)  # re-seeded from encoder outputs


def test_perplexity_of_uniform_and_single_code():
    assert perplexity(torch.full((16,), 3.0)) == pytest.approx(16)
    assert perplexity(torch.tensor([0.0, 7.0, 0.0])) == pytest.approx(1.0)


def test_kl_is_positions_times_log_k(seed):
    """In the VQ-VAE's traces log p(z) − log q(z|x) = −positions · log K for every image."""
    model = build(default_config("vqvae", codebook_size=32))
    x = torch.bernoulli(torch.full((3, 784), 0.4))
    guide_trace = poutine.trace(model.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(x)
    for trace in (guide_trace, model_trace):
        trace.compute_log_prob()
    kl = guide_trace.nodes["z"]["log_prob"] - model_trace.nodes["z"]["log_prob"]
    positions = 7 * 7  # 28 → 14 → 7 after two stride-2 convs
    torch.testing.assert_close(kl, torch.full((3,), positions * math.log(32)))
    assert model.config.kl_constant == pytest.approx(positions * math.log(32))


def test_vq_loss_is_reconstruction_plus_constant_plus_auxiliary(seed):
    """Eval mode: loss = Σ [−log p(x|z_q)] + B · positions · log K (the -ELBO, exactly); training
    mode adds the per-datum auxiliary loss through the guide factor, with a + sign."""
    model = build(default_config("vqvae", codebook_size=32))
    x = torch.bernoulli(torch.full((3, 784), 0.4))
    loss_fn = loss_module(model, ObjectiveConfig())
    model.eval()
    z_e = model.encoder(x)
    z_q, _, aux = model.quantizer(z_e)
    recon_nll = -model.likelihood(model.decoder(z_q)).log_prob(x).sum()
    expected = recon_nll + 3 * model.config.kl_constant
    torch.testing.assert_close(loss_fn(x), expected)
    model.train()
    model.quantizer.initialized.fill_(True)  # keep the codebook as it is for this comparison
    torch.testing.assert_close(loss_fn(x), expected + aux.sum())
