"""What the image models share: the likelihood and network options of their configs, and the
observation site ``"x"`` built from a decoder and a :class:`~ppl_vae.likelihoods.Likelihood`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ppl_vae import nets
from ppl_vae.errors import ConfigError, check
from ppl_vae.likelihoods import (
    X_SCALE_FLOOR,
    Likelihood,
    LikelihoodName,
    ScaleMode,
    params_per_value,
)
from ppl_vae.models.base import LatentVariableModel, ModelConfig

Activation = Literal["relu", "softplus", "tanh", "gelu", "elu", "leaky_relu"]

DATA_MODES: dict[str, tuple[str, ...]] = {
    "bernoulli": ("dynamic", "static"),
    "continuous-bernoulli": ("dequantize", "none"),
    "gaussian": ("dequantize", "none"),
    "discretized-logistic": ("none",),
}
"""The ``--data.binarization`` modes whose inputs each likelihood is a density (or mass
function) for. The continuous densities accept ``none`` (intensities k/255, as before), but
only ``dequantize`` makes them likelihoods of the 8-bit data, with bits/dim (ppl_vae.metrics)."""
SCORES = {
    "bernoulli": "pixels in {0, 1}",
    "continuous-bernoulli": "intensities in [0, 1]",
    "gaussian": "real-valued intensities",
    "discretized-logistic": "the 256 8-bit values k/255",
}
GIVES = {
    "dynamic": "pixels in {0, 1}",
    "static": "pixels in {0, 1}",
    "none": "8-bit values k/255",
    "dequantize": "dequantized values (k + u)/256",
}


@dataclass(frozen=True)
class ImageConfig(ModelConfig):
    """Options of every model of flat images: the input size and the likelihood p(x|z)."""

    x_dim: int = 784
    """Number of values of a flattened input image (channels · height · width)."""
    channels: int = 1
    """Image channels (1: grayscale, 3: RGB); conv nets need x_dim = channels · side²."""
    activation: Activation = "softplus"
    """Nonlinearity between layers."""
    likelihood: LikelihoodName = "bernoulli"
    """p(x|z): bernoulli (binarized pixels), discretized-logistic (8-bit values,
    --data.binarization none), or continuous-bernoulli or gaussian (dequantized 8-bit values,
    --data.binarization dequantize, or intensities, none)."""
    x_scale: float = 0.1
    """Gaussian likelihood: the fixed pixel scale, or the initial value of a learned one."""
    x_scale_mode: ScaleMode = "fixed"
    """Gaussian likelihood: fixed scale, one learned (shared) scale, or one per pixel."""
    logistic_mixtures: int = 1
    """Discretized logistic likelihood: mixture components K per value; the decoder outputs
    2 parameters per value for K = 1 (location, log-scale), 3K otherwise."""

    def __post_init__(self) -> None:
        check(self.x_dim >= 1, "--model.x-dim", "a positive integer", self.x_dim)
        check(self.channels >= 1, "--model.channels", "a positive integer", self.channels)
        check(self.x_scale > 0, "--model.x-scale", "positive", self.x_scale)
        check(
            self.likelihood == "gaussian" or self.x_scale_mode == "fixed",
            "--model.x-scale-mode",
            f"fixed unless --model.likelihood is gaussian (it is {self.likelihood})",
            self.x_scale_mode,
        )
        check(
            self.logistic_mixtures >= 1,
            "--model.logistic-mixtures",
            "a positive integer",
            self.logistic_mixtures,
        )
        check(
            self.likelihood == "discretized-logistic" or self.logistic_mixtures == 1,
            "--model.logistic-mixtures",
            f"1 unless --model.likelihood is discretized-logistic (it is {self.likelihood})",
            self.logistic_mixtures,
        )
        if self.x_scale_mode != "fixed" and not self.x_scale > X_SCALE_FLOOR:
            raise ConfigError(
                f"--model.x-scale {self.x_scale:g}: a learned scale (--model.x-scale-mode "
                f"{self.x_scale_mode}) is {X_SCALE_FLOOR:g} + softplus(·), so it must start above "
                f"{X_SCALE_FLOOR:g}; pass a larger --model.x-scale, or --model.x-scale-mode fixed"
            )

    def check_data(self, binarization: str) -> None:
        """Each likelihood takes exactly the data modes it is a density for (:data:`DATA_MODES`)."""
        accepted = DATA_MODES[self.likelihood]
        if binarization in accepted:
            return
        others = [name for name, modes in DATA_MODES.items() if binarization in modes]
        raise ConfigError(
            f"--model.likelihood {self.likelihood} scores {SCORES[self.likelihood]}, but "
            f"--data.binarization {binarization} gives {GIVES.get(binarization, 'other values')}; "
            f"use --data.binarization {' or '.join(accepted)}, or --model.likelihood "
            f"{' or '.join(others)}"
        )

    @property
    def params_per_value(self) -> int:
        """Decoder outputs per value of x that the likelihood needs."""
        return params_per_value(self.likelihood, self.logistic_mixtures)

    def build_likelihood(self) -> Likelihood:
        return Likelihood(
            self.likelihood, self.x_dim, self.x_scale, self.x_scale_mode, self.logistic_mixtures
        )


@dataclass(frozen=True)
class NetworkConfig(ImageConfig):
    """Options of models with a vector latent: MLP or convolutional encoder and decoder."""

    arch: Literal["mlp", "conv"] = "mlp"
    """Encoder/decoder: mlp, or conv (strided convolutions / transposed convolutions)."""
    hidden: tuple[int, ...] = (512, 256)
    """Hidden layer sizes of the encoder MLP; the decoder mirrors them (--model.arch mlp)."""
    conv_channels: tuple[int, ...] = (32, 64)
    """Channels of the stride-2 conv layers; each halves the side (--model.arch conv)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(all(h >= 1 for h in self.hidden), "--model.hidden", "positive sizes", self.hidden)
        check_conv_shape(self)

    def encoder_net(self, out_dim: int) -> nn.Module:
        """x ↦ ``out_dim`` features with the configured architecture."""
        if self.arch == "conv":
            return nets.conv_encoder(
                self.x_dim, self.channels, self.conv_channels, out_dim, self.activation
            )
        return nets.mlp([self.x_dim, *self.hidden, out_dim], self.activation)

    def decoder_net(self, z_dim: int) -> nn.Module:
        """z ↦ the likelihood's parameters, :attr:`params_per_value` planes of ``x_dim`` values
        (as many channel groups of the image for conv), with the configured architecture."""
        per_value = self.params_per_value
        if self.arch == "conv":
            return nets.conv_decoder(
                z_dim, self.conv_channels, per_value * self.x_dim, per_value * self.channels,
                self.activation,
            )  # fmt: skip
        return nets.mlp_decoder(z_dim, self.hidden, per_value * self.x_dim, self.activation)


def check_conv_shape(cfg) -> None:
    """--model.x-dim must be channels · side² with side divisible by 2^len(conv_channels)."""
    check(
        len(cfg.conv_channels) >= 1 and all(c >= 1 for c in cfg.conv_channels),
        "--model.conv-channels",
        "one or more positive sizes",
        cfg.conv_channels,
    )
    if getattr(cfg, "arch", "conv") != "conv":
        return
    try:
        side = nets.image_side(cfg.x_dim, cfg.channels)
    except ValueError:
        side = 0
    factor = 2 ** len(cfg.conv_channels)
    check(
        side > 0 and side % factor == 0,
        "--model.x-dim",
        f"channels · side² with the side divisible by {factor} for "
        f"{len(cfg.conv_channels)} stride-2 conv layers (--model.channels {cfg.channels})",
        cfg.x_dim,
    )


def standard_normal(x: torch.Tensor, z_dim: int) -> dist.TorchDistribution:
    """N(0, I) over a vector z of ``z_dim``, batch-shaped like ``x``'s leading dimension (a
    prior p(z) for the ``"data"`` plate), in ``x``'s dtype and on its device."""
    standard = dist.Normal(x.new_zeros(()), x.new_ones(()))
    return standard.expand([x.shape[0], z_dim]).to_event(1)


class ImageModel(LatentVariableModel):
    """A latent variable model whose ``"x"`` site is ``likelihood(decoder(z))``.

    Subclasses build ``self.decoder`` and ``self.likelihood`` (from
    :meth:`ImageConfig.build_likelihood`).
    """

    decoder: nn.Module
    likelihood: Likelihood

    def observe(self, x: torch.Tensor, z: torch.Tensor) -> None:
        """The observation site ``"x"`` given z, inside the caller's ``"data"`` plate."""
        pyro.sample("x", self.likelihood(self.network(self.decoder, z)), obs=x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.likelihood.mean(self.decoder(z))
