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


# ----------------------------------------------------------------------------- convolutional nets
#
# Images arrive flat, ``(..., C·H·W)``, as every model's ``x`` is; the conv nets reshape to
# ``(N, C, H, W)`` with all leading dimensions folded into N (particle plates add some) and
# unfold them again on the way out. Each stride-2 layer halves the side: 28 → 14 → 7 for
# Fashion-MNIST, 32 → 16 → 8 for 32×32 RGB.


def image_side(x_dim: int, channels: int) -> int:
    """The side H = W of a square image of ``channels`` channels with ``x_dim`` values in all."""
    side = round((x_dim / channels) ** 0.5)
    if channels * side * side != x_dim:
        raise ValueError(f"x_dim {x_dim} is not channels · side² for {channels} channel(s)")
    return side


def conv_trunk(channels: int, conv_channels: Sequence[int], activation: str) -> nn.Sequential:
    """Stride-2 4×4 convolutions ``channels → conv_channels[0] → …``, activation after each."""
    layers: list[nn.Module] = []
    for n_in, n_out in zip([channels, *conv_channels[:-1]], conv_channels, strict=True):
        layers += [nn.Conv2d(n_in, n_out, 4, stride=2, padding=1), ACTIVATIONS[activation]()]
    return nn.Sequential(*layers)


def deconv_trunk(conv_channels: Sequence[int], channels: int, activation: str) -> nn.Sequential:
    """Stride-2 4×4 transposed convolutions mirroring :func:`conv_trunk` (no final activation)."""
    sizes = [*reversed(conv_channels), channels]
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        if i > 0:
            layers.append(ACTIVATIONS[activation]())
        layers.append(nn.ConvTranspose2d(n_in, n_out, 4, stride=2, padding=1))
    return nn.Sequential(*layers)


class ImageIn(nn.Module):
    """Flat images ``(..., C·H·W)`` → ``net`` on ``(N, C, H, W)`` → leading dims restored."""

    def __init__(self, net: nn.Module, image_shape: tuple[int, int, int]):
        super().__init__()
        self.net = net
        self.image_shape = image_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        out = self.net(x.reshape(-1, *self.image_shape))
        return out.reshape(*lead, *out.shape[1:])


class ImageOut(nn.Module):
    """``net`` applied to ``(N, *in_shape)`` inputs → flat per-pixel outputs ``(..., C·H·W)``."""

    def __init__(self, net: nn.Module, in_dims: int):
        super().__init__()
        self.net = net
        self.in_dims = in_dims  # trailing dimensions of one input (1: a vector, 3: a grid)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[: z.dim() - self.in_dims]
        out = self.net(z.reshape(-1, *z.shape[z.dim() - self.in_dims :]))
        return out.reshape(*lead, -1)


def conv_encoder(
    x_dim: int, channels: int, conv_channels: Sequence[int], out_dim: int, activation: str
) -> ImageIn:
    """Flat image ↦ ``out_dim`` features: strided convolutions, then one linear layer."""
    side = image_side(x_dim, channels)
    final_side = side // 2 ** len(conv_channels)
    net = nn.Sequential(
        conv_trunk(channels, conv_channels, activation),
        nn.Flatten(),
        nn.Linear(conv_channels[-1] * final_side**2, out_dim),
    )
    return ImageIn(net, (channels, side, side))


def conv_gaussian_encoder(
    x_dim: int, channels: int, conv_channels: Sequence[int], z_dim: int, activation: str
) -> GaussianHead:
    """Flat image ↦ (z_loc, z_scale) through strided convolutions."""
    return GaussianHead(conv_encoder(x_dim, channels, conv_channels, 2 * z_dim, activation))


def conv_decoder(
    z_dim: int, conv_channels: Sequence[int], x_dim: int, channels: int, activation: str
) -> ImageOut:
    """z ↦ flat per-pixel parameters: a linear layer to a small grid, then transposed convs."""
    side = image_side(x_dim, channels)
    factor = 2 ** len(conv_channels)
    if side % factor:
        raise ValueError(f"image side {side} is not divisible by 2^{len(conv_channels)}")
    first_side = side // factor
    net = nn.Sequential(
        nn.Linear(z_dim, conv_channels[-1] * first_side**2),
        ACTIVATIONS[activation](),
        nn.Unflatten(1, (conv_channels[-1], first_side, first_side)),
        deconv_trunk(conv_channels, channels, activation),
    )
    return ImageOut(net, in_dims=1)
