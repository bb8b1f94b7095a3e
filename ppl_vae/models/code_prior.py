"""A learned prior over VQ-VAE code maps: a small gated PixelCNN (van den Oord et al. 2016).

p(c) = Π_i Categorical(c_i | logits = pixelcnn(c_<i)) over the h×w grid in raster order. The
masked convolutions make the logits at position i depend on positions before i only: the first
layer (mask "A") hides the centre, later layers (mask "B") may see it, since their centre
already carries only earlier positions. As a Pyro program the code map is one observed
``Categorical(...).to_event(2)`` site ``"code"`` in a ``"data"`` plate and the guide is empty
(no latent variables), so SVI on the pair is maximum likelihood. The VQ-VAE hands the pair to
the training loop as an auxiliary fit (:class:`~ppl_vae.models.capabilities.AuxiliaryFit`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ppl_vae.errors import check


@dataclass(frozen=True)
class CodePriorConfig:
    channels: int = 64
    """Feature channels of the PixelCNN over code maps."""
    layers: int = 4
    """Gated masked-conv layers after the first masked conv."""
    epochs: int = 10
    """Passes over the training codes, fitted after the VQ-VAE (0: keep the uniform prior)."""
    batch_size: int = 128
    """Code maps per step."""
    lr: float = 1e-3
    """Adam learning rate."""

    def __post_init__(self) -> None:
        check(self.channels >= 1, "--model.code-prior.channels", ">= 1", self.channels)
        check(self.layers >= 0, "--model.code-prior.layers", ">= 0", self.layers)
        check(self.epochs >= 0, "--model.code-prior.epochs", ">= 0", self.epochs)
        check(self.batch_size >= 1, "--model.code-prior.batch-size", ">= 1", self.batch_size)
        check(self.lr > 0, "--model.code-prior.lr", "positive", self.lr)


class MaskedConv2d(nn.Conv2d):
    """A same-padded convolution that sees only earlier raster positions (and, for mask "B",
    the centre)."""

    def __init__(self, mask_type: str, n_in: int, n_out: int, kernel_size: int):
        super().__init__(n_in, n_out, kernel_size, padding=kernel_size // 2)
        mask = torch.ones_like(self.weight)
        centre = kernel_size // 2
        mask[:, :, centre, centre + (mask_type == "B") :] = 0
        mask[:, :, centre + 1 :, :] = 0
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight * self.mask, self.bias)


class GatedBlock(nn.Module):
    """Residual gated activation tanh(a) ⊙ sigmoid(b) of a mask-"B" convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = MaskedConv2d("B", channels, 2 * channels, 3)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a, b = self.conv(h).chunk(2, dim=1)
        return h + self.out(torch.tanh(a) * torch.sigmoid(b))


class CodePrior(nn.Module):
    """p(c) = Π_i Categorical(c_i | logits = PixelCNN(c_<i)) over an h×w map of K codes.

    :param codebook_size: K.
    :param grid: (h, w).
    :param CodePriorConfig config: sizes and the fitting schedule.
    """

    def __init__(self, codebook_size: int, grid: tuple[int, int], config: CodePriorConfig):
        super().__init__()
        self.codebook_size, self.grid, self.config = codebook_size, tuple(grid), config
        c = config.channels
        self.embed = nn.Embedding(codebook_size, c)
        self.first = MaskedConv2d("A", c, c, 5)
        self.blocks = nn.Sequential(*[GatedBlock(c) for _ in range(config.layers)])
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(c, codebook_size, 1))

    def logits(self, codes: torch.Tensor) -> torch.Tensor:
        """Code maps ``(B, h, w)`` → logits ``(B, h, w, K)``; position i sees positions < i."""
        h = self.first(self.embed(codes).movedim(-1, 1))
        return self.head(self.blocks(h)).movedim(1, -1)

    def model(self, codes: torch.Tensor) -> None:
        pyro.module("code_prior", self)
        with pyro.plate("data", codes.shape[0]):
            pyro.sample("code", dist.Categorical(logits=self.logits(codes)).to_event(2), obs=codes)

    def guide(self, codes: torch.Tensor) -> None:
        """No latent variables: SVI with this guide maximizes the likelihood."""

    def log_prob(self, codes: torch.Tensor) -> torch.Tensor:
        """log p(c) per code map, ``(B,)``, in nats."""
        return dist.Categorical(logits=self.logits(codes)).log_prob(codes).flatten(1).sum(1)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """``n`` code maps drawn position by position in raster order, ``(n, h, w)``."""
        h, w = self.grid
        device = self.embed.weight.device
        codes = torch.zeros(n, h, w, dtype=torch.long, device=device)
        for i in range(h):
            for j in range(w):
                logits = self.logits(codes)[:, i, j]
                codes[:, i, j] = dist.Categorical(logits=logits).sample()
        return codes

    def validation_metrics(self, codes: torch.Tensor) -> dict[str, float]:
        """The validation -log p(c) in nats per map and in bits per code position."""
        nll = self.nll(codes)
        return {
            "code_prior_val_nll": nll,
            "code_prior_val_bits_per_position": nll / (math.prod(self.grid) * math.log(2)),
        }

    @torch.no_grad()
    def nll(self, codes: torch.Tensor, batch_size: int = 500) -> float:
        """Mean -log p(c) over ``codes`` in nats per code map."""
        total = sum(
            -self.log_prob(codes[i : i + batch_size]).sum().item()
            for i in range(0, codes.shape[0], batch_size)
        )
        return total / codes.shape[0]
