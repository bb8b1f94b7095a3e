"""The deterministic autoencoder as a Pyro model/guide pair with a point-mass guide.

With q(z|x) = Delta(encoder(x)) the "ELBO" is log p(x | z = encoder(x)) + log p(z) (a point
mass has log density 0 at its atom, with respect to counting measure): with the N(0, I) prior
SVI is MAP estimation of z per image, jointly with the decoder (a MAP-regularized autoencoder);
with the prior switched off (an improper flat prior, log density 0) it is the plain
reconstruction autoencoder. Neither is a bound on log p(x), and nothing makes the codes of the
data fill N(0, I): :func:`ppl_vae.metrics.aggregate_posterior_gap` measures how far they are.
The plain AE's codes spread far wider than N(0, I), so decoded N(0, I) draws are near-blank
images; the MAP AE's codes shrink towards 0 (the prior is a penalty, not a target), so N(0, I)
draws mostly lie outside the region its decoder was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from ppl_vae.errors import check
from ppl_vae.models.capabilities import DEFAULT_SAMPLES_CAPTION
from ppl_vae.models.common import ImageModel, NetworkConfig, standard_normal


@dataclass(frozen=True)
class AEConfig(NetworkConfig):
    kind: ClassVar[str] = "ae"

    z_dim: int = 32
    """Dimension of the code z."""
    prior: bool = True
    """N(0, I) prior on z (MAP-regularized AE); --no-model.prior: plain reconstruction AE."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.z_dim >= 1, "--model.z-dim", "a positive integer", self.z_dim)


class AE(ImageModel):
    """p(z) = N(0, I) or flat; p(x|z) = likelihood(decoder(z)); q(z|x) = Delta(encoder(x)).

    Capabilities: :class:`~ppl_vae.models.capabilities.ExplicitPrior` (``prior``) and
    :class:`~ppl_vae.models.capabilities.SampleCaption`.

    :param AEConfig config: networks, likelihood and whether the N(0, I) prior is on.
    """

    recordable = True
    mixed_precision = True

    def __init__(self, config: AEConfig):
        super().__init__()
        self.config = config
        self.encoder = config.encoder_net(config.z_dim)
        self.decoder = config.decoder_net(config.z_dim)
        self.likelihood = config.build_likelihood()

    def prior(self, x: torch.Tensor) -> dist.TorchDistribution:
        """p(z): N(0, I), or with ``prior=False`` a flat improper density (log density 0, never
        sampled from: SVI replays the guide's z)."""
        if self.config.prior:
            return standard_normal(x, self.config.z_dim)
        return dist.ImproperUniform(constraints.real, (x.shape[0],), (self.config.z_dim,))

    def model(self, x: torch.Tensor) -> None:
        pyro.module("decoder", self.decoder)
        pyro.module("likelihood", self.likelihood)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.prior(x))
            self.observe(x, z)

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Delta(self.network(self.encoder, x), event_dim=1))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def prior_sample(self, n: int) -> torch.Tensor:
        """z ~ N(0, I): the MAP AE's prior; the plain AE has none, and this is the reference
        distribution its samples are drawn from for comparison."""
        return torch.randn(n, self.config.z_dim, device=self.device)

    def samples_caption(self) -> str:
        if self.config.prior:
            return DEFAULT_SAMPLES_CAPTION
        return "Decoded z ~ N(0, I) (mean of p(x|z)): the plain AE has no prior; for comparison"
