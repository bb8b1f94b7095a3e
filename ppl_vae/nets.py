"""Plain torch networks (no Pyro calls): the encoders and decoders the models are built from."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
}
MIN_SCALE = 1e-6  # keeps Gaussian scales strictly positive when softplus underflows


def mlp(sizes: Sequence[int], activation: str) -> nn.Sequential:
    """Linear layers ``sizes[0] → … → sizes[-1]`` with ``activation`` between them (not after)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        if i > 0:
            layers.append(ACTIVATIONS[activation]())
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


class GaussianHead(nn.Module):
    """Wraps a network whose last layer has ``2 · z_dim`` outputs into ``(z_loc, z_scale)``.

    ``z_scale = softplus(raw) + MIN_SCALE``: smooth, positive, and linear for large inputs.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_loc, z_raw_scale = self.net(x).chunk(2, dim=-1)
        return z_loc, F.softplus(z_raw_scale) + MIN_SCALE


def mlp_gaussian_encoder(
    x_dim: int, hidden: Sequence[int], z_dim: int, activation: str
) -> GaussianHead:
    """x ↦ (z_loc, z_scale) through an MLP with hidden sizes ``hidden``."""
    return GaussianHead(mlp([x_dim, *hidden, 2 * z_dim], activation))


def mlp_decoder(z_dim: int, hidden: Sequence[int], x_dim: int, activation: str) -> nn.Sequential:
    """z ↦ per-pixel parameters (logits or means) through an MLP mirroring the encoder."""
    return mlp([z_dim, *reversed(hidden), x_dim], activation)
