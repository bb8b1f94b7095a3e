"""Observation models p(x|z) over flat images, given the decoder's per-pixel output.

Each likelihood is a small ``nn.Module`` (a learned Gaussian scale is a parameter) that turns the
decoder output into a Pyro distribution with one event of ``x_dim`` pixels, and into the mean
image used for reconstructions and sample grids. All are proper densities that Pyro's argument
validation accepts:

- ``bernoulli``: pixels in {0, 1} (binarized data); decoder output = logits.
- ``continuous-bernoulli``: intensities in [0, 1] (Loaiza-Ganem & Cunningham 2019), the
  Bernoulli form renormalized over the unit interval; decoder output = logits. Its mean is not
  ``sigmoid(logits)``, so the mean image comes from the distribution.
- ``gaussian``: intensities modelled as N(x_loc, x_scale²) per pixel with
  ``x_loc = sigmoid(decoder output)``; ``x_scale`` is fixed (``fixed``), one learned scalar
  (``shared``) or learned per pixel (``pixel``). Learned scales are
  ``X_SCALE_FLOOR + softplus(raw)``: pixels that are 0 in every image (Fashion-MNIST's border)
  would otherwise drive their scale to 0 and the likelihood to infinity.
- ``discretized-logistic``: 8-bit values k/255 (``--data.binarization none``), each a mixture of
  K logistics discretized to the 256 levels (:class:`DiscretizedLogisticMixture`; Salimans et
  al. 2017, PixelCNN++), a probability mass function; decoder output = ``params_per_value``
  planes of ``x_dim`` values: the K mixture logits (absent for K = 1), the K locations (through
  a sigmoid, as the Gaussian's ``x_loc``) and the K log-scales (floored at
  :data:`LOG_SCALE_MIN`, so that the scale never underflows).

The continuous densities (``continuous-bernoulli``, ``gaussian``) are densities of the data they
score: on 8-bit data they are proper likelihoods only of uniformly dequantized values
(k + u)/256 (``--data.binarization dequantize``), where E_u[log p((k + u)/256)] − log 256 is a
lower bound on the log probability of the level k (Theis et al. 2016).
"""

from __future__ import annotations

import math
from typing import Literal

import pyro.distributions as dist
import torch
from pyro.distributions import TorchDistribution
from torch import nn
from torch.distributions import Categorical, constraints
from torch.nn import functional as F

LikelihoodName = Literal["bernoulli", "continuous-bernoulli", "gaussian", "discretized-logistic"]
ScaleMode = Literal["fixed", "shared", "pixel"]
X_SCALE_FLOOR = 1e-3
BINARY_LIKELIHOODS = ("bernoulli",)  # the others score intensities in [0, 1]
LEVELS = 256
"""Levels of 8-bit data: the value k/255 stands for the byte k."""
LOG_SCALE_MIN = -10.0
"""Floor of a discretized logistic's log-scale: a scale of e^-10 ≈ 4.5e-5 is 1/87 of a bin, so
a component can still put all but ~e^-43 of its mass on one level, and exp(-log_scale) stays
finite in float32."""


def inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def params_per_value(name: str, mixtures: int = 1) -> int:
    """Decoder outputs per value of ``x`` for a likelihood: one for the Bernoulli, continuous
    Bernoulli and Gaussian (logits or x_loc); for a K-component discretized logistic 2 when
    K = 1 (location, log-scale), else 3K (K logits, K locations, K log-scales)."""
    if name != "discretized-logistic":
        return 1
    return 2 if mixtures == 1 else 3 * mixtures


# ----------------------------------------------------------------------------- 8-bit values


class _EightBitValues(constraints.Constraint):
    """The 256 values k/255, k = 0..255 (to float rounding: within 1e-3 of a level)."""

    is_discrete = True
    event_dim = 0

    def check(self, value: torch.Tensor) -> torch.Tensor:
        scaled = value * (LEVELS - 1)
        return (value >= 0) & (value <= 1) & ((scaled - scaled.round()).abs() <= 1e-3)

    def __repr__(self) -> str:
        return "EightBitValues()"


eight_bit_values = _EightBitValues()


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(a)) for a ≤ 0, accurate on both sides of −log 2 (Mächler 2012); a = 0
    gives log of the smallest positive float, not −inf, so gradients stay finite."""
    tiny = torch.finfo(a.dtype).tiny
    near_zero = a > -math.log(2)
    small = torch.log(torch.clamp(-torch.expm1(a), min=tiny))
    large = torch.log1p(-torch.exp(a.clamp(max=-math.log(2))))
    return torch.where(near_zero, small, large)


class DiscretizedLogisticMixture(TorchDistribution):
    """A mixture of K logistic distributions discretized to the 256 levels of 8-bit data, one
    per value: P(k) = Σ_j π_j [F_j(k/255 + h) − F_j(k/255 − h)], h = 1/510 the half-width of a
    bin, F_j the logistic CDF σ((y − loc_j)/scale_j), and the edge bins absorbing the tails
    (F(−h) is replaced by 0 for k = 0, F(1 + h) by 1 for k = 255). The 256 probabilities sum to
    1, so -log P(x) is a code length of the data (Salimans et al. 2017).

    Stable in the tails: the mass of a bin is σ(b) − σ(a) = σ(−a) − σ(−b), computed in log-space
    from log-sigmoids with whichever of the two forms has its arguments in the lower tail
    (``log σ(b) + log(1 − exp(log σ(a) − log σ(b)))``); the edge bins are single log-sigmoids.
    When the bin is narrow against the scale (width/scale below (24 ε)^(1/3), ε the dtype's
    machine epsilon) the difference of log-sigmoids would lose digits, and the mass is the
    midpoint rule, density at the bin centre times the width, whose relative error
    (width/scale)²/24 is then below the cancellation error it replaces.

    Batch shape ``loc.shape[:-1]``, event shape ``()``; the K components are the last dimension
    of the three parameters.

    :param logits: mixture logits log π_j (up to a constant), ``(..., K)``.
    :param loc: locations, ``(..., K)`` (any real; the likelihood keeps them in (0, 1)).
    :param log_scale: log-scales, ``(..., K)``.
    """

    arg_constraints = {
        "logits": constraints.real,
        "loc": constraints.real,
        "log_scale": constraints.real,
    }
    support = eight_bit_values
    has_rsample = False

    def __init__(self, logits: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor,
                 validate_args: bool | None = None):  # fmt: skip
        logits, loc, log_scale = torch.broadcast_tensors(logits, loc, log_scale)
        self.logits, self.loc, self.log_scale = logits, loc, log_scale
        super().__init__(loc.shape[:-1], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiscretizedLogisticMixture, _instance)
        batch_shape = torch.Size(batch_shape)
        shape = batch_shape + self.loc.shape[-1:]
        new.logits = self.logits.expand(shape)
        new.loc = self.loc.expand(shape)
        new.log_scale = self.log_scale.expand(shape)
        super(DiscretizedLogisticMixture, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def num_components(self) -> int:
        return self.loc.shape[-1]

    def component_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """log P_j(k) of each component at the levels of ``value``, ``(..., K)``."""
        level = (value * (LEVELS - 1)).round().clamp(0, LEVELS - 1).unsqueeze(-1)
        width = 1.0 / (LEVELS - 1)
        inv_scale = torch.exp(-self.log_scale)
        centre = (level * width - self.loc) * inv_scale  # standardized bin centre
        half = 0.5 * width * inv_scale
        lower, upper = centre - half, centre + half
        # interior bins: σ(upper) − σ(lower), mirrored to σ(−lower) − σ(−upper) above loc
        above = centre > 0
        big = torch.where(above, -lower, upper)
        small = torch.where(above, -upper, lower)
        log_big = F.logsigmoid(big)
        interior = log_big + log1mexp(F.logsigmoid(small) - log_big)
        # a bin narrow against the scale: density at the centre times the width
        eps = torch.finfo(centre.dtype).eps
        narrow = 2 * half < (24 * eps) ** (1 / 3)
        distance = centre.abs()
        log_density = -distance - 2 * F.softplus(-distance) - self.log_scale
        interior = torch.where(narrow, log_density + math.log(width), interior)
        first = F.logsigmoid(upper)  # k = 0: F(h), the lower tail included
        last = F.logsigmoid(-lower)  # k = 255: 1 − F(1 − h), the upper tail included
        return torch.where(level == 0, first, torch.where(level == LEVELS - 1, last, interior))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        log_p = self.component_log_prob(value)
        if self.num_components == 1:
            return log_p.squeeze(-1)
        return torch.logsumexp(torch.log_softmax(self.logits, dim=-1) + log_p, dim=-1)

    def sample(self, sample_shape=()) -> torch.Tensor:
        """A level k/255 per value: a component j ~ π, y ~ Logistic(loc_j, scale_j), rounded to
        the nearest level (the edge levels take the tails)."""
        sample_shape = torch.Size(sample_shape)
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            if self.num_components == 1:
                loc, log_scale = self.loc[..., 0], self.log_scale[..., 0]
                loc, log_scale = loc.expand(shape), log_scale.expand(shape)
            else:
                j = Categorical(logits=self.logits).sample(sample_shape).unsqueeze(-1)
                full = shape + self.loc.shape[-1:]
                loc = self.loc.expand(full).gather(-1, j).squeeze(-1)
                log_scale = self.log_scale.expand(full).gather(-1, j).squeeze(-1)
            finfo = torch.finfo(loc.dtype)
            u = torch.rand(shape, dtype=loc.dtype, device=loc.device)
            u = u.clamp(finfo.tiny, 1 - finfo.eps)
            y = loc + torch.exp(log_scale) * (torch.log(u) - torch.log1p(-u))
            return (y * (LEVELS - 1)).round().clamp(0, LEVELS - 1) / (LEVELS - 1)

    @property
    def mean(self) -> torch.Tensor:
        """E[x] = Σ_k (k/255) P(k) = (1/255) Σ_{k=1}^{255} P(x ≥ k/255), exactly: a sum over the
        255 inner bin edges e_k = (k − ½)/255 of Σ_j π_j σ((loc_j − e_k)/scale_j), taken in
        chunks of edges so that memory stays a small multiple of the parameters'."""
        probs = torch.softmax(self.logits, dim=-1).unsqueeze(-1)
        loc, inv_scale = self.loc.unsqueeze(-1), torch.exp(-self.log_scale).unsqueeze(-1)
        edges = (torch.arange(1, LEVELS, dtype=loc.dtype, device=loc.device) - 0.5) / (LEVELS - 1)
        chunk = max(1, min(LEVELS - 1, (1 << 24) // max(1, self.loc.numel())))
        total = loc.new_zeros(self.batch_shape)
        for part in edges.split(chunk):
            total = total + (probs * torch.sigmoid((loc - part) * inv_scale)).sum((-2, -1))
        return total / (LEVELS - 1)


class Likelihood(nn.Module):
    """p(x|z) for one image as a distribution with event shape ``(x_dim,)``.

    :param name: ``bernoulli``, ``continuous-bernoulli``, ``gaussian`` or
        ``discretized-logistic``.
    :param x_dim: values per image.
    :param x_scale: the Gaussian's fixed scale, or the initial value of a learned one.
    :param scale_mode: ``fixed``, ``shared`` (one learned scale) or ``pixel`` (one per pixel).
    :param mixtures: components K of the discretized logistic mixture.
    """

    def __init__(
        self,
        name: LikelihoodName = "bernoulli",
        x_dim: int = 784,
        x_scale: float = 0.1,
        scale_mode: ScaleMode = "fixed",
        mixtures: int = 1,
    ):
        super().__init__()
        self.name = name
        self.scale_mode = scale_mode
        self.mixtures = mixtures
        self.params_per_value = params_per_value(name, mixtures)
        if name == "gaussian" and scale_mode != "fixed":
            size = 1 if scale_mode == "shared" else x_dim
            raw = inverse_softplus(x_scale - X_SCALE_FLOOR)
            self.x_raw_scale = nn.Parameter(torch.full((size,), raw))
        else:
            self.register_buffer("fixed_x_scale", torch.tensor(float(x_scale)), persistent=False)

    def x_scale(self) -> torch.Tensor:
        """The Gaussian scale(s): a scalar or ``(x_dim,)``."""
        if hasattr(self, "x_raw_scale"):
            return X_SCALE_FLOOR + F.softplus(self.x_raw_scale)
        return self.fixed_x_scale

    def logistic_mixture(self, decoder_out: torch.Tensor) -> DiscretizedLogisticMixture:
        """The per-value discretized logistic mixture of a decoder output ``(..., P·x_dim)``:
        ``P = params_per_value`` planes of ``x_dim`` values (logits, locations, log-scales)."""
        planes = decoder_out.unflatten(-1, (self.params_per_value, -1)).movedim(-2, -1)
        k = self.mixtures
        if k == 1:
            x_loc_raw, x_log_scale = planes[..., :1], planes[..., 1:]
            logits = torch.zeros_like(x_loc_raw)
        else:
            logits, x_loc_raw, x_log_scale = planes.split(k, dim=-1)
        return DiscretizedLogisticMixture(
            logits, torch.sigmoid(x_loc_raw), x_log_scale.clamp(min=LOG_SCALE_MIN)
        )

    def forward(self, decoder_out: torch.Tensor) -> dist.TorchDistribution:
        """The distribution of the flat image given the decoder output (``params_per_value``
        values per value of the image)."""
        if self.name == "bernoulli":
            return dist.Bernoulli(logits=decoder_out).to_event(1)
        if self.name == "continuous-bernoulli":
            return dist.ContinuousBernoulli(logits=decoder_out).to_event(1)
        if self.name == "discretized-logistic":
            return self.logistic_mixture(decoder_out).to_event(1)
        x_loc = torch.sigmoid(decoder_out)
        return dist.Normal(x_loc, self.x_scale().expand_as(x_loc)).to_event(1)

    def mean(self, decoder_out: torch.Tensor) -> torch.Tensor:
        """E[x|z], the image drawn in sample grids and reconstructions."""
        if self.name == "continuous-bernoulli":
            return dist.ContinuousBernoulli(logits=decoder_out).mean
        if self.name == "discretized-logistic":
            return self.logistic_mixture(decoder_out).mean  # exact, over the 256 levels
        return torch.sigmoid(decoder_out)  # Bernoulli probabilities and Gaussian x_loc alike
