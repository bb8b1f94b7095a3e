"""Each likelihood's log_prob against a hand computation, in float64."""

from __future__ import annotations

import math

import pytest
import torch

from ppl_vae.likelihoods import X_SCALE_FLOOR, Likelihood

X_DIM = 5


@pytest.fixture
def decoder_out() -> torch.Tensor:
    return torch.tensor([[-2.0, -0.5, 0.0, 0.7, 3.0], [1.0, -1.0, 0.2, -3.0, 0.01]]).double()


def test_bernoulli(decoder_out):
    x = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0, 0.0]]).double()
    p = 1 / (1 + torch.exp(-decoder_out))
    expected = (x * p.log() + (1 - x) * (1 - p).log()).sum(1)
    got = Likelihood("bernoulli", X_DIM)(decoder_out).log_prob(x)
    torch.testing.assert_close(got, expected)


def test_continuous_bernoulli(decoder_out):
    """log p(x) = x log λ + (1 − x) log(1 − λ) + log C(λ), C(λ) = 2 artanh(1 − 2λ) / (1 − 2λ)
    (C(1/2) = 2); every λ here is away from 1/2, where torch switches to a Taylor series."""
    decoder_out = decoder_out.clone()
    decoder_out[0, 2] = 1.5  # λ = 1/2 would need the limit
    decoder_out[1, 4] = -1.5
    x = torch.tensor([[0.1, 0.9, 0.5, 0.0, 1.0], [0.3, 0.65, 0.2, 0.99, 0.5]]).double()
    lam = torch.sigmoid(decoder_out)
    log_norm = torch.log(2 * torch.atanh(1 - 2 * lam) / (1 - 2 * lam))
    expected = (x * lam.log() + (1 - x) * (1 - lam).log() + log_norm).sum(1)
    likelihood = Likelihood("continuous-bernoulli", X_DIM)
    torch.testing.assert_close(likelihood(decoder_out).log_prob(x), expected)
    # its mean is λ/(2λ − 1) + 1/(2 artanh(1 − 2λ)), not λ
    mean = lam / (2 * lam - 1) + 1 / (2 * torch.atanh(1 - 2 * lam))
    torch.testing.assert_close(likelihood.mean(decoder_out), mean)


def gaussian_log_prob(x, x_loc, x_scale):
    return (
        -0.5 * ((x - x_loc) / x_scale) ** 2 - torch.log(x_scale) - 0.5 * math.log(2 * math.pi)
    ).sum(-1)


@pytest.mark.parametrize("mode", ["fixed", "shared", "pixel"])
def test_gaussian(decoder_out, mode):
    x = torch.tensor([[0.1, 0.9, 0.5, 0.0, 1.0], [0.3, 0.65, 0.2, 0.99, 0.5]]).double()
    likelihood = Likelihood("gaussian", X_DIM, x_scale=0.2, scale_mode=mode).double()
    if mode == "fixed":
        x_scale = torch.tensor(0.2).double()
    else:
        assert likelihood.x_scale().detach().double() == pytest.approx(0.2, rel=1e-6)
        raw = torch.linspace(-2, 1, likelihood.x_raw_scale.numel()).double()
        with torch.no_grad():
            likelihood.x_raw_scale.copy_(raw)
        x_scale = X_SCALE_FLOOR + torch.log1p(torch.exp(raw))
    x_loc = 1 / (1 + torch.exp(-decoder_out))
    expected = gaussian_log_prob(x, x_loc, x_scale.expand_as(x_loc))
    torch.testing.assert_close(likelihood(decoder_out).log_prob(x), expected)
    torch.testing.assert_close(likelihood.mean(decoder_out), x_loc)


@pytest.mark.parametrize("mode", ["shared", "pixel"])
def test_learned_scale_is_trained(decoder_out, mode):
    likelihood = Likelihood("gaussian", X_DIM, x_scale=0.2, scale_mode=mode).double()
    x = torch.full((2, X_DIM), 0.5).double()
    likelihood(decoder_out).log_prob(x).sum().backward()
    assert likelihood.x_raw_scale.grad is not None
    assert likelihood.x_raw_scale.shape == ((1,) if mode == "shared" else (X_DIM,))
    assert torch.all(likelihood.x_raw_scale.grad != 0)


def test_validation_rejects_intensities_under_bernoulli(decoder_out):
    """Pyro's validation (on in every test) refuses values outside the support."""
    with pytest.raises(ValueError, match="support"):
        Likelihood("bernoulli", X_DIM)(decoder_out).log_prob(torch.full((2, X_DIM), 0.5))
