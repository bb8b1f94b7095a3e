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
"""

from __future__ import annotations

import math
from typing import Literal

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

LikelihoodName = Literal["bernoulli", "continuous-bernoulli", "gaussian"]
ScaleMode = Literal["fixed", "shared", "pixel"]
X_SCALE_FLOOR = 1e-3
BINARY_LIKELIHOODS = ("bernoulli",)  # the others score intensities in [0, 1]


def inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class Likelihood(nn.Module):
    """p(x|z) for one image as a distribution with event shape ``(x_dim,)``.

    :param name: ``bernoulli``, ``continuous-bernoulli`` or ``gaussian``.
    :param x_dim: pixels per image.
    :param x_scale: the Gaussian's fixed scale, or the initial value of a learned one.
    :param scale_mode: ``fixed``, ``shared`` (one learned scale) or ``pixel`` (one per pixel).
    """

    def __init__(
        self,
        name: LikelihoodName = "bernoulli",
        x_dim: int = 784,
        x_scale: float = 0.1,
        scale_mode: ScaleMode = "fixed",
    ):
        super().__init__()
        self.name = name
        self.scale_mode = scale_mode
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

    def forward(self, decoder_out: torch.Tensor) -> dist.TorchDistribution:
        """The distribution of the flat image given the decoder output (same shape)."""
        if self.name == "bernoulli":
            return dist.Bernoulli(logits=decoder_out).to_event(1)
        if self.name == "continuous-bernoulli":
            return dist.ContinuousBernoulli(logits=decoder_out).to_event(1)
        x_loc = torch.sigmoid(decoder_out)
        return dist.Normal(x_loc, self.x_scale().expand_as(x_loc)).to_event(1)

    def mean(self, decoder_out: torch.Tensor) -> torch.Tensor:
        """E[x|z], the image drawn in sample grids and reconstructions."""
        if self.name == "continuous-bernoulli":
            return dist.ContinuousBernoulli(logits=decoder_out).mean
        return torch.sigmoid(decoder_out)  # Bernoulli probabilities and Gaussian x_loc alike
