"""The VAE with two stochastic layers (Burda, Grosse & Salakhutdinov 2015, sec. 5):
p(z2) p(z|z2) p(x|z) with the inference network q(z|x) q(z2|z), every conditional a diagonal
Gaussian (the likelihood aside).

The sites are the library's: ``"z"`` is the first stochastic layer (z₁ in the paper, the one
``p(x|·)`` conditions on), so ``encode``, ``decode``, ``prior_sample`` and the reconstruction
metrics refer to it as they do for the one-layer VAE, and ``"z2"`` is the top layer, under the
same ``"data"`` plate. Both programs sample the layers in their own order (the model top-down,
the guide bottom-up), so the guide is not mean-field over the model's sites: TraceMeanField's
analytic KL at ``"z"`` would integrate z out of a q(z|x) whose draw the z2 it conditions on
depends on. ``--objective meanfield`` is refused for it, and the analytic-KL metrics are
absent (:mod:`ppl_vae.metrics`). Every estimator built on the per-datum weights (IWAE, Rényi,
STL, DReG, importance-sampled log p(x), PSIS k̂) applies as it is; STL and DReG use their
several-site form (:class:`~ppl_vae.inference.estimators.ImportanceWeightedELBO`).

The model has neither capability of the one-layer VAE: p(z) = ∫ p(z|z2) p(z2) dz2 is no
distribution to hand out (:class:`~ppl_vae.models.capabilities.ExplicitPrior`), and the joint
q(z, z2|x) is not Gaussian (:class:`~ppl_vae.models.capabilities.GaussianGuide`), so the KL per
dimension is absent; the inference gaps take their local q* with the encoder's outputs free
per image and q(z2|z) as trained (:class:`~ppl_vae.diagnostics.LocalEncoderOutputs`).

Burda et al.'s architecture is the default (and the ``burda-2l`` preset): stochastic layers of
100 and 50 units, deterministic layers 200-200 between x and z and 100-100 between z and z2,
tanh. Their Gaussians take exp of a log-variance; here, as in the one-layer VAE, the scale is
softplus(·) + 10⁻⁶ (:class:`~ppl_vae.nets.GaussianHead`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pyro
import pyro.distributions as dist
import torch

from ppl_vae import nets
from ppl_vae.errors import check
from ppl_vae.models.common import Activation, ImageModel, NetworkConfig, standard_normal


@dataclass(frozen=True)
class HVAEConfig(NetworkConfig):
    kind: ClassVar[str] = "hvae"

    activation: Activation = "tanh"
    """Nonlinearity between layers, in every network."""
    hidden: tuple[int, ...] = (200, 200)
    """Hidden layer sizes of the MLP between x and z (q(z|x); p(x|z) mirrors them)."""
    z_dim: int = 100
    """Dimension of the first stochastic layer z (the one p(x|z) conditions on)."""
    z2_dim: int = 50
    """Dimension of the top stochastic layer z2, p(z2) = N(0, I)."""
    hidden2: tuple[int, ...] = (100, 100)
    """Hidden layer sizes of the MLP between z and z2 (q(z2|z); p(z|z2) mirrors them)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.z_dim >= 1, "--model.z-dim", "a positive integer", self.z_dim)
        check(self.z2_dim >= 1, "--model.z2-dim", "a positive integer", self.z2_dim)
        check(all(h >= 1 for h in self.hidden2), "--model.hidden2", "positive sizes",
              self.hidden2)  # fmt: skip


class HVAE(ImageModel):
    """p(z2) = N(0, I); p(z|z2) = N(top_decoder(z2)); p(x|z) = likelihood(decoder(z));
    q(z|x) = N(encoder(x)); q(z2|z) = N(top_encoder(z)).

    The two-stochastic-layer VAE of Burda et al. (2015). The guide's z2 is drawn given the
    guide's own draw of z, and the model scores z under p(z|z2) at the guide's z2, so
    log w = log p(z2) + log p(z|z2) + log p(x|z) − log q(z|x) − log q(z2|z).

    :param HVAEConfig config: the networks of both layers and the likelihood.
    """

    recordable = True
    mixed_precision = True

    def __init__(self, config: HVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = nets.GaussianHead(config.encoder_net(2 * config.z_dim))
        self.top_encoder = nets.mlp_gaussian_encoder(
            config.z_dim, config.hidden2, config.z2_dim, config.activation
        )
        self.top_decoder = nets.mlp_gaussian_encoder(
            config.z2_dim, tuple(reversed(config.hidden2)), config.z_dim, config.activation
        )
        self.decoder = config.decoder_net(config.z_dim)
        self.likelihood = config.build_likelihood()

    # The conditionals, named after what they are: `prior` and `posterior` would claim the
    # capabilities of a one-layer model (ExplicitPrior, GaussianGuide), which this one lacks.

    def z_given_z2(self, z2: torch.Tensor) -> dist.TorchDistribution:
        """p(z|z2) = N(top_decoder(z2))."""
        z_loc, z_scale = self.network(self.top_decoder, z2)
        return dist.Normal(z_loc, z_scale).to_event(1)

    def z_given_x(self, x: torch.Tensor) -> dist.TorchDistribution:
        """q(z|x) = N(encoder(x))."""
        z_loc, z_scale = self.network(self.encoder, x)
        return dist.Normal(z_loc, z_scale).to_event(1)

    def z2_given_z(self, z: torch.Tensor) -> dist.TorchDistribution:
        """q(z2|z) = N(top_encoder(z))."""
        z2_loc, z2_scale = self.network(self.top_encoder, z)
        return dist.Normal(z2_loc, z2_scale).to_event(1)

    def model(self, x: torch.Tensor) -> None:
        pyro.module("top_decoder", self.top_decoder)
        pyro.module("decoder", self.decoder)
        pyro.module("likelihood", self.likelihood)
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", standard_normal(x, self.config.z2_dim))
            z = pyro.sample("z", self.z_given_z2(z2))
            self.observe(x, z)

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("encoder", self.encoder)
        pyro.module("top_encoder", self.top_encoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.z_given_x(x))
            pyro.sample("z2", self.z2_given_z(z))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of q(z|x), the first layer's code."""
        return self.encoder(x)[0]

    def prior_sample(self, n: int) -> torch.Tensor:
        """Ancestral draws z ~ p(z|z2), z2 ~ N(0, I): z from its marginal p(z)."""
        weight = next(self.top_decoder.parameters())
        z2 = torch.randn(n, self.config.z2_dim, dtype=weight.dtype, device=weight.device)
        z_loc, z_scale = self.top_decoder(z2)
        return z_loc + z_scale * torch.randn_like(z_loc)
