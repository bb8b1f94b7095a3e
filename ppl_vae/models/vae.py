"""The variational autoencoder as a Pyro model/guide pair (Kingma & Welling 2014), with the
β-VAE weight (Higgins et al. 2017) and a linear KL warm-up (Sønderby et al. 2016) on ``"z"``,
and p(z) the standard normal or a learned prior (``--model.prior``, :mod:`.priors`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

from ppl_vae import nets
from ppl_vae.errors import check
from ppl_vae.models import priors
from ppl_vae.models.common import ImageModel, NetworkConfig, standard_normal
from ppl_vae.models.priors import PriorName

PRIOR_COMPONENTS = 10


@dataclass(frozen=True)
class VAEConfig(NetworkConfig):
    kind: ClassVar[str] = "vae"

    z_dim: int = 32
    """Dimension of the latent z."""
    beta: float = 1.0
    """Weight of the "z" site (KL term) in the training objective: β-VAE for β ≠ 1."""
    warmup_steps: int = 0
    """Linear KL warm-up over this many SVI steps (0: none); the weight ramps up to beta."""
    warmup_start: float = 0.01
    """Warm-up weight at step 0, as a fraction of beta; must be above 0."""
    prior: PriorName = "standard"
    """p(z): standard (N(0, I)); mog (a learned mixture of --model.prior-components diagonal
    Gaussians, the component marginalized); vamp (VampPrior: the guide's q(z|u_k) at
    --model.prior-components learned pseudo-inputs u_k, Tomczak & Welling 2018)."""
    prior_components: int = PRIOR_COMPONENTS
    """Components K of --model.prior mog, pseudo-inputs K of --model.prior vamp."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.z_dim >= 1, "--model.z-dim", "a positive integer", self.z_dim)
        check(self.beta > 0, "--model.beta", "positive", self.beta)
        check(self.warmup_steps >= 0, "--model.warmup-steps", ">= 0", self.warmup_steps)
        check(0 < self.warmup_start <= 1, "--model.warmup-start", "in (0, 1]", self.warmup_start)
        check(self.prior_components >= 1, "--model.prior-components", "a positive integer",
              self.prior_components)  # fmt: skip
        check(
            self.prior != "standard" or self.prior_components == PRIOR_COMPONENTS,
            "--model.prior-components",
            f"{PRIOR_COMPONENTS}, its unused default, unless --model.prior is mog or vamp",
            self.prior_components,
        )

    def kl_weight(self, step: int) -> float:
        """β · min(1, start + (1 − start) · step / warmup_steps): the "z" site's scale."""
        if self.warmup_steps == 0:
            return self.beta
        ramp = self.warmup_start + (1 - self.warmup_start) * step / self.warmup_steps
        return self.beta * min(1.0, ramp)


class VAEBase(ImageModel):
    """The generative half of the VAEs: p(z) (N(0, I), or the learned prior of
    ``--model.prior``), p(x|z) = likelihood(decoder(z)), and the weight of the ``"z"`` site
    (β, warm-up) in model and guide. A subclass builds ``encoder``, ``decoder``,
    ``likelihood``, ``learned_prior`` (:func:`.priors.build`) and ``train_kl_weight``, and gives
    q(z|x): ``guide`` and ``encode``.
    """

    config: VAEConfig
    learned_prior: torch.nn.Module | None

    @property
    def kl_weight(self) -> float:
        return self.train_kl_weight if self.training else 1.0

    def on_train_step(self, step: int) -> None:
        # The weight, not the step, is what the programs read: it stops changing when the
        # warm-up ends, so a recorded training loss (ppl_vae.inference.recording) replays again.
        self.train_kl_weight = self.config.kl_weight(step)

    def epoch_metrics(self) -> dict[str, float]:
        """The training weight of the "z" site at the last step (when β or warm-up is on)."""
        cfg = self.config
        if cfg.beta == 1 and not cfg.warmup_steps:
            return {}
        return {"kl_weight": self.train_kl_weight}

    def prior(self, x: torch.Tensor) -> dist.TorchDistribution:
        """p(z), batch-shaped like ``x``'s leading dimension: N(0, I), or the learned prior
        (a VampPrior evaluates the guide's ``posterior`` at its pseudo-inputs)."""
        if self.learned_prior is None:
            return standard_normal(x, self.config.z_dim)
        return self.learned_prior.distribution(x, getattr(self, "posterior", None))

    def model(self, x: torch.Tensor) -> None:
        pyro.module("decoder", self.decoder)
        pyro.module("likelihood", self.likelihood)
        if self.learned_prior is not None:
            pyro.module("prior", self.learned_prior)
        with pyro.plate("data", x.shape[0]):
            with poutine.scale(scale=self.kl_weight):
                z = pyro.sample("z", self.prior(x))
            self.observe(x, z)

    def prior_sample(self, n: int) -> torch.Tensor:
        if self.learned_prior is None:
            return torch.randn(n, self.config.z_dim, device=self.device)
        weight = next(self.parameters())
        return self.prior(weight.new_empty(n, 0)).sample()


class VAE(VAEBase):
    """p(z) = N(0, I) or learned; p(x|z) = likelihood(decoder(z)); q(z|x) = N(encoder(x)).

    The likelihood is Bernoulli by default (continuous Bernoulli or Gaussian for intensities),
    the encoder and decoder MLPs or strided conv nets. The decoder and encoder are registered
    with :func:`pyro.module` inside ``model`` and ``guide``, so the pair trains both through the
    module interface (``Trace_ELBO()(vae.model, vae.guide)`` with a torch optimizer over
    ``vae.parameters()``) and through :class:`pyro.infer.SVI` with a Pyro optimizer.

    The ``"z"`` site is scaled by :attr:`kl_weight` with :func:`pyro.poutine.scale` in both
    model and guide (so log p(z) − log q(z|x), i.e. the KL term, is weighted, and
    ``TraceMeanField_ELBO`` sees equal scales). In training mode the weight follows
    :meth:`VAEConfig.kl_weight` of the step last given to :meth:`on_train_step`; in eval mode it
    is 1, so validation and test numbers are the true -ELBO whatever β and the warm-up are.

    With ``--model.prior mog`` or ``vamp`` p(z) is a learned mixture (:mod:`.priors`), the guide
    unchanged: the prior is then no longer a factorized Normal, so the closed-form KL (and
    ``--objective meanfield``) does not apply.

    Capabilities: :class:`~ppl_vae.models.capabilities.GaussianGuide` (``posterior``),
    :class:`~ppl_vae.models.capabilities.ExplicitPrior` (``prior``),
    :class:`~ppl_vae.models.capabilities.TrainingHooks` (the warm-up).

    :param VAEConfig config: networks, likelihood, β and warm-up.
    """

    recordable = True
    mixed_precision = True

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.train_kl_weight = config.kl_weight(0)
        self.encoder = nets.GaussianHead(config.encoder_net(2 * config.z_dim))
        self.decoder = config.decoder_net(config.z_dim)
        self.likelihood = config.build_likelihood()
        self.learned_prior = priors.build(config)  # after the networks: the same initial weights

    def posterior(self, x: torch.Tensor) -> dist.TorchDistribution:
        """q(z|x) = N(z_loc, diag z_scale²) from the encoder."""
        z_loc, z_scale = self.network(self.encoder, x)
        return dist.Normal(z_loc, z_scale).to_event(1)

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            with poutine.scale(scale=self.kl_weight):
                pyro.sample("z", self.posterior(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[0]
