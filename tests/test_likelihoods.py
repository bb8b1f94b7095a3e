"""Each likelihood's log_prob against a hand computation, in float64; for 8-bit data the
discretized logistic (a mass function over the 256 levels), the dequantization bound of the
continuous densities, bits/dim, training and the data-mode checks."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO

from ppl_vae import data, metrics, nets
from ppl_vae.config import DataConfig, RunConfig, from_dict, to_dict
from ppl_vae.errors import ConfigError
from ppl_vae.likelihoods import (
    LOG_SCALE_MIN,
    X_SCALE_FLOOR,
    DiscretizedLogisticMixture,
    Likelihood,
    inverse_softplus,
    params_per_value,
)
from ppl_vae.models import VAE, VAEConfig, build, default_config
from ppl_vae.models.common import DATA_MODES

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


# ----------------------------------------------------------------------------- 8-bit data


LEVELS_01 = torch.arange(256, dtype=torch.float64) / 255  # the 256 values k/255


def random_mixtures(n: int, k: int, dtype: torch.dtype, seed: int = 0):
    """Parameters ``(n, k)`` of n mixtures: typical ones, and extremes of location (far outside
    [0, 1], on a bin edge) and of scale (the floor, e^8)."""
    gen = torch.Generator().manual_seed(seed)
    logits = 4 * torch.randn(n, k, generator=gen, dtype=torch.float64)
    loc = torch.rand(n, k, generator=gen, dtype=torch.float64)
    loc[: n // 4] = 40 * torch.randn(n // 4, k, generator=gen, dtype=torch.float64)
    loc[n // 4 : n // 4 + 2] = 0.5 / 255  # exactly on the edge between levels 0 and 1
    lo, hi = LOG_SCALE_MIN, 8.0
    log_scale = lo + (hi - lo) * torch.rand(n, k, generator=gen, dtype=torch.float64)
    log_scale[::5], log_scale[1::7] = lo, hi
    return logits.to(dtype), loc.to(dtype), log_scale.to(dtype)


def every_level(d: DiscretizedLogisticMixture, dtype=torch.float64) -> torch.Tensor:
    """log P(k) for k = 0..255, ``(256, *batch_shape)``."""
    values = LEVELS_01.to(dtype).reshape(256, *(1,) * len(d.batch_shape))
    return d.log_prob(values.expand(256, *d.batch_shape))


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["f64", "f32"]
)
def test_discretized_logistic_probabilities_sum_to_one(k, dtype, tol):
    """Σ_k P(k) over the 256 levels is 1 to float tolerance for every parameter, extremes
    included (200 mixtures), with finite log-probabilities and gradients everywhere."""
    logits, loc, log_scale = (p.requires_grad_() for p in random_mixtures(200, k, dtype))
    log_p = every_level(DiscretizedLogisticMixture(logits, loc, log_scale), dtype)
    assert torch.isfinite(log_p).all()
    total = torch.logsumexp(log_p.double(), dim=0)
    torch.testing.assert_close(total, torch.zeros_like(total), rtol=0, atol=tol)
    log_p.sum().backward()
    used = (loc, log_scale) if k == 1 else (logits, loc, log_scale)  # one component: no weights
    assert all(torch.isfinite(p.grad).all() for p in used)


def logistic_cdf_probabilities(logits, loc, log_scale) -> torch.Tensor:
    """P(k) = Σ_j π_j (F_j(k/255 + 1/510) − F_j(k/255 − 1/510)), F(−∞) = 0 and F(∞) = 1 at the
    edge levels, straight from the logistic CDF in float64: ``(256, n)``."""
    edges = (torch.arange(257, dtype=torch.float64) - 0.5) / 255
    edges[0], edges[-1] = -math.inf, math.inf
    cdf = torch.sigmoid((edges[:, None, None] - loc) / log_scale.exp())  # (257, n, k)
    weights = torch.softmax(logits, dim=-1)
    return ((cdf[1:] - cdf[:-1]) * weights).sum(-1)


def test_discretized_logistic_log_prob_against_the_cdf():
    """Where the direct CDF differences are accurate in float64 (probabilities above 1e-8,
    absolute error ~1e-16), log P(k) agrees with them to 1e-7 for 100 mixtures of 3."""
    logits, loc, log_scale = random_mixtures(100, 3, torch.float64, seed=1)
    loc = loc.clamp(-0.5, 1.5)
    log_scale = log_scale.clamp(-7, 3)
    expected = logistic_cdf_probabilities(logits, loc, log_scale)
    got = every_level(DiscretizedLogisticMixture(logits, loc, log_scale))
    accurate = expected > 1e-8
    assert accurate.float().mean() > 0.3  # the comparison covers many levels
    torch.testing.assert_close(got[accurate], expected[accurate].log(), rtol=0, atol=1e-7)


def test_discretized_logistic_tails_against_high_precision():
    """Far in the tails (locations up to ±40, scales from the floor to e^8) against the CDF in
    50-digit arithmetic: relative error of log P below 1e-10 (float64) and 3e-5 (float32)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    logits, loc, log_scale = random_mixtures(24, 2, torch.float64, seed=2)
    levels = [0, 1, 2, 77, 128, 253, 254, 255]

    def log_p(i: int, level: int) -> float:
        lse = [mpmath.mpf(float(v)) for v in logits[i]]
        norm = sum(mpmath.exp(v) for v in lse)
        total = mpmath.mpf(0)
        for j in range(2):
            mu, s = mpmath.mpf(float(loc[i, j])), mpmath.exp(mpmath.mpf(float(log_scale[i, j])))
            lo = (mpmath.mpf(level) - mpmath.mpf(0.5)) / 255 if level > 0 else -mpmath.inf
            hi = (mpmath.mpf(level) + mpmath.mpf(0.5)) / 255 if level < 255 else mpmath.inf
            # the bin's mass from whichever CDF (F or 1 − F) is small there, so that 50 digits
            # hold every digit of the difference
            if mpmath.mpf(level) / 255 > mu:
                mass = 1 / (1 + mpmath.exp((lo - mu) / s)) - 1 / (1 + mpmath.exp((hi - mu) / s))
            else:
                mass = 1 / (1 + mpmath.exp(-(hi - mu) / s)) - 1 / (1 + mpmath.exp(-(lo - mu) / s))
            total += mpmath.exp(lse[j]) / norm * mass
        return float(mpmath.log(total))

    expected = torch.tensor([[log_p(i, k) for i in range(24)] for k in levels], dtype=torch.float64)
    for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 3e-5)):
        d = DiscretizedLogisticMixture(logits.to(dtype), loc.to(dtype), log_scale.to(dtype))
        values = (torch.tensor(levels, dtype=torch.float64) / 255).to(dtype)
        got = d.log_prob(values[:, None].expand(len(levels), 24)).double()
        error = (got - expected).abs() / expected.abs().clamp(min=1)
        assert error.max() < rtol, (dtype, error.max().item())


def test_discretized_logistic_mean_and_samples():
    """The mean is Σ_k (k/255) P(k) exactly; samples are levels k/255; a component narrow
    against a bin samples its location's level."""
    logits, loc, log_scale = random_mixtures(50, 3, torch.float64, seed=3)
    d = DiscretizedLogisticMixture(logits, loc, log_scale)
    expected = (every_level(d).exp() * LEVELS_01[:, None]).sum(0)
    torch.testing.assert_close(d.mean, expected, rtol=0, atol=1e-12)
    draws = d.sample((7,))
    assert draws.shape == (7, 50) and d.support.check(draws).all()
    levels = torch.tensor([0, 26, 128, 230, 255], dtype=torch.float64) / 255
    loc = torch.tensor([-3.0, 26 / 255, 128 / 255, 230 / 255, 4.0], dtype=torch.float64)
    peaked = DiscretizedLogisticMixture(
        torch.zeros(5, 1, dtype=torch.float64), loc[:, None],
        torch.full((5, 1), LOG_SCALE_MIN, dtype=torch.float64),
    )  # fmt: skip
    torch.testing.assert_close(peaked.sample((2,)), levels.expand(2, 5), rtol=0, atol=1e-15)


@pytest.mark.parametrize("k", [1, 3])
def test_discretized_logistic_likelihood_reads_the_decoder_planes(k):
    """The decoder output is params_per_value planes of x_dim values: (logits,) locations
    through a sigmoid, log-scales floored; event shape (x_dim,), log_prob the sum over
    values of the per-value mixtures, mean in [0, 1]."""
    likelihood = Likelihood("discretized-logistic", X_DIM, mixtures=k).double()
    planes = likelihood.params_per_value
    assert planes == (2 if k == 1 else 3 * k) == params_per_value("discretized-logistic", k)
    out = torch.randn(4, planes * X_DIM, dtype=torch.float64)
    out[0, -1] = -50.0  # a log-scale below the floor
    per_plane = out.reshape(4, planes, X_DIM)
    logits = per_plane[:, :k] if k > 1 else torch.zeros(4, 1, X_DIM, dtype=torch.float64)
    loc, log_scale = per_plane[:, -2 * k : -k], per_plane[:, -k:]
    d = likelihood(out)
    assert d.event_shape == (X_DIM,) and d.batch_shape == (4,)
    x = torch.randint(0, 256, (4, X_DIM)).double() / 255
    direct = DiscretizedLogisticMixture(
        logits.transpose(1, 2), torch.sigmoid(loc).transpose(1, 2),
        log_scale.clamp(min=LOG_SCALE_MIN).transpose(1, 2),
    )  # fmt: skip
    torch.testing.assert_close(d.log_prob(x), direct.log_prob(x).sum(-1))
    mean = likelihood.mean(out)
    torch.testing.assert_close(mean, direct.mean)
    assert mean.shape == (4, X_DIM) and mean.min() >= 0 and mean.max() <= 1


def test_pyro_validation_accepts_the_discretized_logistic():
    """With validation on (every test): 8-bit values are in the support, a dequantized or
    out-of-range value is refused, so is a NaN parameter; expand keeps the parameters and the
    validation setting; a model with it at "x" traces and scores."""
    likelihood = Likelihood("discretized-logistic", X_DIM, mixtures=2)
    out = torch.randn(3, 6 * X_DIM)
    d = likelihood(out)
    x = torch.randint(0, 256, (3, X_DIM)).float() / 255
    assert d.log_prob(x).shape == (3,) and d.support.is_discrete
    for bad in ((torch.randint(0, 256, (3, X_DIM)) + 0.5) / 256, x + 1):
        with pytest.raises(ValueError, match="support"):
            d.log_prob(bad)
    with pytest.raises(ValueError, match="loc"):
        DiscretizedLogisticMixture(torch.zeros(2, 1), torch.tensor([[0.5], [math.nan]]),
                                   torch.zeros(2, 1))  # fmt: skip
    wide = d.base_dist.expand((5, 3, X_DIM))
    assert wide.batch_shape == (5, 3, X_DIM) and wide._validate_args
    torch.testing.assert_close(wide.log_prob(x)[2], d.base_dist.log_prob(x))

    def model():
        with pyro.plate("data", 3):
            pyro.sample("x", likelihood(out), obs=x)

    trace = poutine.trace(model).get_trace()
    trace.compute_log_prob()
    torch.testing.assert_close(trace.nodes["x"]["log_prob"], d.log_prob(x))


# ----------------------------------------------------------------------------- dequantization


def per_bin_quadrature(nodes: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss–Legendre nodes u in (0, 1) and weights (summing to 1) for ∫_0^1 · du."""
    u, w = np.polynomial.legendre.leggauss(nodes)
    return torch.from_numpy((u + 1) / 2), torch.from_numpy(w / 2)


@pytest.mark.parametrize(
    ("name", "decoder_value", "x_scale"),
    [
        ("continuous-bernoulli", -3.0, 0.1),
        ("continuous-bernoulli", 0.0, 0.1),
        ("continuous-bernoulli", 2.5, 0.1),
        ("gaussian", 0.3, 0.2),
        ("gaussian", -2.0, 0.05),
        ("gaussian", 4.0, 0.02),
    ],
)
def test_dequantized_densities_bound_the_byte_probabilities(name, decoder_value, x_scale):
    """For a density p on [0, 1) of y = (k + u)/256 and P(k) = ∫_0^1 p((k + u)/256) du / 256
    (its mass on bin k, by 20-point Gauss–Legendre quadrature per bin, exact to ~1e-13 here):
    the 256 masses add up to ∫_0^1 p = 1 for the continuous Bernoulli and to the Normal's mass
    on [0, 1] (≤ 1: the rest is outside) for the Gaussian, and the dequantization bound
    E_u[log p((k + u)/256)] − log 256 ≤ log P(k) holds for every byte k."""
    from scipy.stats import norm

    likelihood = Likelihood(name, 1, x_scale=x_scale).double()
    x_scale = float(likelihood.x_scale())  # the scale the likelihood holds (a float32 buffer)
    d = likelihood(torch.full((1,), decoder_value, dtype=torch.float64)).base_dist
    u, w = per_bin_quadrature()
    k = torch.arange(256, dtype=torch.float64)[:, None]
    log_p = d.log_prob(((k + u) / 256).unsqueeze(-1)).squeeze(-1)  # (256, nodes)
    log_mass = torch.logsumexp(log_p + w.log(), dim=-1) - math.log(256)  # log P(k)
    if name == "gaussian":
        x_loc = 1 / (1 + math.exp(-decoder_value))
        inside = norm.cdf((1 - x_loc) / x_scale) - norm.cdf(-x_loc / x_scale)
        assert inside <= 1
    else:
        inside = 1.0
    total = log_mass.exp().sum()
    torch.testing.assert_close(total, torch.tensor(inside, dtype=torch.float64), rtol=1e-10,
                               atol=1e-12)  # fmt: skip
    bound = (log_p * w).sum(-1) - math.log(256)
    assert (bound <= log_mass + 1e-9 * log_mass.abs().clamp(min=1)).all()


def test_dequantized_inputs():
    """to_input "dequantize": (k + u)/256 with u in [0, 1), so floor(256 x) = k; fresh draws per
    call; eval_inputs gives one fixed draw, the same on every call."""
    images = torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8)
    x = data.to_input(images, "dequantize")
    assert x.shape == (3, 16) and x.dtype == torch.float32
    assert torch.equal((x * 256).floor().to(torch.uint8), images.reshape(3, 16))
    assert not torch.equal(x, data.to_input(images, "dequantize"))
    split = data.Split(images, torch.zeros(3, dtype=torch.long))
    fixed = data.eval_inputs(split, "dequantize")
    assert torch.equal(fixed, data.eval_inputs(split, "dequantize"))
    assert torch.equal((fixed * 256).floor().to(torch.uint8), images.reshape(3, 16))


# ----------------------------------------------------------------------------- bits/dim


def test_bits_per_dim_basis():
    """A mass function needs no correction; a density on dequantized values gets + ln 256 per
    dimension; a density on anything else gets no bits/dim, and says so."""
    def facts(discrete: bool, name: str) -> metrics.ProgramFacts:
        return metrics.ProgramFacts(False, False, True, True, name, discrete)

    assert metrics.bits_per_dim_basis(facts(True, "Bernoulli"), "dynamic")[0] == 0.0
    offset, basis = metrics.bits_per_dim_basis(facts(True, "DiscretizedLogisticMixture"), "none")
    assert offset == 0.0 and "DiscretizedLogisticMixture" in basis and "no correction" in basis
    offset, basis = metrics.bits_per_dim_basis(facts(False, "Normal"), "dequantize")
    assert offset == math.log(256) and "ln 256" in basis and "upper bound" in basis
    offset, basis = metrics.bits_per_dim_basis(facts(False, "ContinuousBernoulli"), "none")
    assert offset is None and "no bits/dim" in basis and "--data.binarization dequantize" in basis


def constant_vae(likelihood: str, x_dim: int) -> VAE:
    """A VAE whose decoder outputs 0 whatever z and whose guide is N(0, I), the prior: every
    importance weight is p(x|z) p(z)/q(z|x) = p(x | decoder = 0), so -log p(x) is exact."""
    model = VAE(VAEConfig(z_dim=2, hidden=(4,), x_dim=x_dim, likelihood=likelihood)).double()
    with torch.no_grad():
        model.decoder[-1].weight.zero_(), model.decoder[-1].bias.zero_()
        last = model.encoder.net[-1]
        last.weight.zero_()
        last.bias[:2], last.bias[2:] = 0.0, inverse_softplus(1.0 - nets.MIN_SCALE)
    return model.eval()


def test_bits_per_dim_on_hand_computable_cases():
    """With the decoder at 0: a Bernoulli(½) codes a binary pixel in 1 bit; a continuous
    Bernoulli with logits 0 is the uniform density on [0, 1], so dequantized 8-bit values take
    (0 + ln 256)/ln 2 = 8 bits; a logistic at ½ of scale 1 gives -Σ log₂ P(k)/D with P from the
    CDF; on undequantized intensities a density gets no bits/dim but a note."""
    cfg = metrics.EvalConfig(k=3, batch_size=4)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 12), generator=gen, dtype=torch.uint8)
    binary = torch.bernoulli(torch.full((6, 12), 0.5, dtype=torch.float64), generator=gen)
    results = metrics.evaluate_model(constant_vae("bernoulli", 12), binary, cfg,
                                     data_mode="static")  # fmt: skip
    assert results["bits_per_dim"] == pytest.approx(1.0, abs=1e-9)
    assert "bits per binary pixel" in results["bits_per_dim_basis"]
    dequantized = data.to_input(images, "dequantize").double()
    results = metrics.evaluate_model(constant_vae("continuous-bernoulli", 12), dequantized, cfg,
                                     data_mode="dequantize")  # fmt: skip
    assert results["nll_is"] == pytest.approx(0.0, abs=1e-9)
    assert results["bits_per_dim"] == pytest.approx(8.0, abs=1e-9)
    assert any("ln 256" in note for note in results["notes"])
    levels = data.to_input(images, "none").double()
    results = metrics.evaluate_model(constant_vae("discretized-logistic", 12), levels, cfg,
                                     data_mode="none")  # fmt: skip
    p = logistic_cdf_probabilities(torch.zeros(1, 1), torch.full((1, 1), 0.5), torch.zeros(1, 1))
    expected = -p[images.reshape(-1).long(), 0].log().sum().item() / (6 * 12 * math.log(2))
    assert results["bits_per_dim"] == pytest.approx(expected, rel=1e-9)
    results = metrics.evaluate_model(constant_vae("gaussian", 12), levels, cfg, data_mode="none")
    assert "bits_per_dim" not in results and "nll_is" in results
    assert any("no bits/dim" in note for note in results["notes"])


# ----------------------------------------------------------------------------- training, config


def synthetic_8bit(n: int = 32, channels: int = 3, side: int = 8, seed: int = 0) -> torch.Tensor:
    """Smooth colour ramps with byte noise: ``(n, channels, side, side)`` uint8."""
    gen = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-2, 2, side)
    slope = torch.randn(n, channels, 1, 1, generator=gen)
    offset = torch.randn(n, channels, 1, 1, generator=gen)
    intensity = torch.sigmoid(slope * ramp[None, None, :, None] + offset)
    noise = torch.randint(-6, 7, (n, channels, side, side), generator=gen)
    return ((255 * intensity).round() + noise).clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize(
    ("likelihood", "mode", "extra"),
    [
        ("discretized-logistic", "none", {}),
        ("discretized-logistic", "none", {"logistic_mixtures": 3}),
        ("gaussian", "dequantize", {"x_scale_mode": "shared"}),
        ("continuous-bernoulli", "dequantize", {}),
    ],
)
def test_a_vae_trains_on_8bit_data(likelihood, mode, extra, seed, single_thread):
    """60 SVI steps (pyro.infer.SVI, Trace_ELBO, Adam 1e-2, validation on at every step) on 32
    synthetic 8-bit colour images of D = 192 values: every loss finite, and the mean -ELBO of
    the last 10 steps at least 0.1 nats per value below that of the first 10 (observed: 0.97
    and 1.2 for the discretized logistic with K = 1 and 3, 2.6 Gaussian, 0.27 continuous
    Bernoulli)."""
    cfg = VAEConfig(x_dim=3 * 8 * 8, channels=3, hidden=(64,), z_dim=4, likelihood=likelihood,
                    **extra)  # fmt: skip
    RunConfig(model=cfg, data=DataConfig(binarization=mode))  # an accepted combination
    model = VAE(cfg)
    images = synthetic_8bit()
    svi = SVI(model.model, model.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    losses = [svi.step(data.to_input(images, mode)) / images.shape[0] for _ in range(60)]
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 0.1 * cfg.x_dim, (first, last)


MODES = ("dynamic", "static", "none", "dequantize")


@pytest.mark.parametrize("likelihood", sorted(DATA_MODES))
@pytest.mark.parametrize("mode", MODES)
def test_each_likelihood_takes_exactly_its_data_modes(likelihood, mode):
    """Bernoulli: binarized pixels; discretized logistic: the 8-bit values; the continuous
    densities: dequantized values or intensities. Any other pairing is a one-line ConfigError
    naming both flags."""
    accepted = {
        "bernoulli": {"dynamic", "static"},
        "discretized-logistic": {"none"},
        "gaussian": {"none", "dequantize"},
        "continuous-bernoulli": {"none", "dequantize"},
    }[likelihood]
    model = VAEConfig(likelihood=likelihood)
    if mode in accepted:
        RunConfig(model=model, data=DataConfig(binarization=mode))
        return
    with pytest.raises(ConfigError) as err:
        RunConfig(model=model, data=DataConfig(binarization=mode))
    message = str(err.value)
    assert "\n" not in message
    assert f"--model.likelihood {likelihood}" in message
    assert f"--data.binarization {mode}" in message


@pytest.mark.parametrize(
    "overrides",
    [
        {"likelihood": "discretized-logistic", "logistic_mixtures": 0},
        {"likelihood": "bernoulli", "logistic_mixtures": 2},
    ],
)
def test_logistic_mixtures_is_checked(overrides):
    with pytest.raises(ConfigError, match="--model.logistic-mixtures") as err:
        VAEConfig(**overrides)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("k", [1, 4])
def test_the_decoder_outputs_the_likelihoods_parameters(k):
    """MLP and conv decoders (and the VQ-VAE's) output params_per_value · x_dim values; the
    other likelihoods keep one per value, with the state_dict keys and shapes they had, and a
    config saved without the new field loads as before."""
    for arch in ("mlp", "conv"):
        cfg = VAEConfig(likelihood="discretized-logistic", logistic_mixtures=k, arch=arch)
        out = VAE(cfg).decoder(torch.randn(2, cfg.z_dim))
        assert out.shape == (2, cfg.params_per_value * 784)
    vq = default_config("vqvae", likelihood="discretized-logistic", logistic_mixtures=k)
    assert build(vq).decoder(build(vq).encode(torch.rand(2, 784))).shape == (
        2, vq.params_per_value * 784
    )  # fmt: skip
    old = to_dict(VAEConfig())  # a config.json written before --model.logistic-mixtures
    del old["logistic_mixtures"]
    assert from_dict(VAEConfig, old) == VAEConfig()
    for name in ("bernoulli", "gaussian", "continuous-bernoulli"):
        shapes = {key: v.shape for key, v in VAE(VAEConfig(likelihood=name)).state_dict().items()}
        assert shapes == {key: v.shape for key, v in VAE(VAEConfig()).state_dict().items()}
        assert shapes["decoder.4.weight"] == (784, 512)
