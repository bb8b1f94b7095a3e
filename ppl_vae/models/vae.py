"""The variational autoencoder as a Pyro model/guide pair (Kingma & Welling 2014)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import pyro
import pyro.distributions as dist
import torch

from ppl_vae import nets
from ppl_vae.errors import check
from ppl_vae.models.base import LatentVariableModel, ModelConfig


@dataclass(frozen=True)
class VAEConfig(ModelConfig):
    kind: ClassVar[str] = "vae"

    z_dim: int = 32
    """Dimension of the latent z."""
    hidden: tuple[int, ...] = (512, 256)
    """Hidden layer sizes of the encoder MLP; the decoder mirrors them."""
    activation: Literal["relu", "softplus", "tanh", "gelu", "elu", "leaky_relu"] = "softplus"
    """Nonlinearity between layers."""
    x_dim: int = 784
    """Number of pixels of a flattened input image."""

    def __post_init__(self) -> None:
        check(self.z_dim >= 1, "--model.z-dim", "a positive integer", self.z_dim)
        check(all(h >= 1 for h in self.hidden), "--model.hidden", "positive sizes", self.hidden)
        check(self.x_dim >= 1, "--model.x-dim", "a positive integer", self.x_dim)


class VAE(LatentVariableModel):
    """p(z) = N(0, I); p(x|z) = Bernoulli(logits = decoder(z)); q(z|x) = N(encoder(x)).

    The decoder and encoder are registered with :func:`pyro.module` inside ``model`` and
    ``guide``, so the pair trains both through the module interface
    (``Trace_ELBO()(vae.model, vae.guide)`` with a torch optimizer over ``vae.parameters()``)
    and through :class:`pyro.infer.SVI` with a Pyro optimizer.

    :param VAEConfig config: sizes and nonlinearity of the networks.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = nets.mlp_gaussian_encoder(
            config.x_dim, config.hidden, config.z_dim, config.activation
        )
        self.decoder = nets.mlp_decoder(
            config.z_dim, config.hidden, config.x_dim, config.activation
        )

    def model(self, x: torch.Tensor) -> None:
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            prior = dist.Normal(x.new_zeros(()), x.new_ones(())).expand([self.config.z_dim])
            z = pyro.sample("z", prior.to_event(1))
            x_logits = self.decoder(z)
            pyro.sample("x", dist.Bernoulli(logits=x_logits).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            z_loc, z_scale = self.encoder(x)
            pyro.sample("z", dist.Normal(z_loc, z_scale).to_event(1))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(z))

    def prior_sample(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.config.z_dim, device=self.device)
