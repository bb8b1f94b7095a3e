"""Learned priors p(z) over a vector latent: a mixture of Gaussians and the VampPrior.

Each is a plain ``nn.Module`` holding the prior's parameters, registered by the model with
``pyro.module("prior", ...)``, whose :meth:`distribution` is the p(z) the model samples ``"z"``
from: one :class:`~pyro.distributions.MixtureSameFamily` over K diagonal Gaussians, batch-shaped
like the ``"data"`` plate. The component index is *marginalized*, not sampled: log p(z) =
logsumexp_k [log π_k + log N(z; μ_k, diag σ_k²)]. That is the very number
:class:`~pyro.infer.TraceEnum_ELBO` computes when the index is a model-side site enumerated in
parallel (``config_enumerate``; ``tests/test_flows_priors.py`` checks the two agree), but written
as one density it keeps the program free of discrete sites, so every estimator of the library
(per-datum importance weights, IWAE, Rényi, STL, DReG, importance-sampled log p(x), PSIS k̂)
applies unchanged, and none has to know about enumeration.

What a learned prior takes away: the closed-form KL(q(z|x) ‖ p(z)) (there is none for a
mixture), so ``--objective meanfield`` is refused and the analytic-KL metrics are absent; and
N(0, I) as the reference of the aggregate posterior (:mod:`ppl_vae.metrics`).

References:

- J. M. Tomczak, M. Welling (2018), VAE with a VampPrior.
- N. Dilokthanakul et al. (2016), Deep Unsupervised Clustering with Gaussian Mixture VAEs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from ppl_vae.nets import MIN_SCALE

PriorName = Literal["standard", "mog", "vamp"]


def _softplus_inverse(value: float) -> float:
    return value + math.log(-math.expm1(-value))


class MixturePrior(nn.Module):
    """p(z) = Σ_k π_k N(z; μ_k, diag σ_k²), K components with learned weights π = softmax(logits),
    locations μ_k and scales σ_k = softplus(raw) + 1e-6.

    Initialized with equal weights, unit scales and locations drawn from N(0, I), so that the
    components start apart and the mixture is not K copies of one Gaussian.

    :param int components: K.
    :param int z_dim: dimension of z.
    """

    def __init__(self, components: int, z_dim: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(components))
        self.z_loc = nn.Parameter(torch.randn(components, z_dim))
        self.z_raw_scale = nn.Parameter(torch.full((components, z_dim), _softplus_inverse(1.0)))

    @property
    def z_scale(self) -> torch.Tensor:
        return F.softplus(self.z_raw_scale) + MIN_SCALE

    def distribution(self, x: torch.Tensor, posterior=None) -> dist.MixtureSameFamily:
        """p(z) with batch shape ``(B,)`` for the batch ``x`` (``posterior`` is not used)."""
        components = dist.Normal(self.z_loc, self.z_scale).to_event(1)  # batch (K,)
        mixture = dist.MixtureSameFamily(dist.Categorical(logits=self.logits), components)
        return mixture.expand([x.shape[0]])


class VampPrior(nn.Module):
    """p(z) = (1/K) Σ_k q(z | u_k): the guide's own Gaussian q(z|x) at K learned pseudo-inputs
    u_k (Tomczak & Welling 2018), the prior that the aggregate posterior (1/N) Σ_n q(z|x_n)
    would be with the pseudo-inputs in place of the data.

    The pseudo-inputs are images: u_k = sigmoid(w_k) in (0, 1)^D, like the model's inputs;
    w_k is initialized from N(0, 1). Every evaluation of p(z) runs the encoder on the K
    pseudo-inputs (K extra rows per batch), with the encoder's parameters, which the guide
    registers; the gradient of log p(z) reaches them as well as the pseudo-inputs.

    :param int components: K, the number of pseudo-inputs.
    :param int x_dim: values per (flat) input image.
    """

    def __init__(self, components: int, x_dim: int):
        super().__init__()
        self.pseudo_logits = nn.Parameter(torch.randn(components, x_dim))

    @property
    def pseudo_inputs(self) -> torch.Tensor:
        return torch.sigmoid(self.pseudo_logits)

    def distribution(
        self, x: torch.Tensor, posterior: Callable[[torch.Tensor], dist.TorchDistribution]
    ) -> dist.MixtureSameFamily:
        """p(z) with batch shape ``(B,)`` for the batch ``x``; ``posterior(u)`` is the guide's
        q(z|u) (batch shape ``(K,)``, event shape ``(d,)``)."""
        components = posterior(self.pseudo_inputs.to(x.dtype))
        logits = x.new_zeros(components.batch_shape)  # equal weights 1/K
        mixture = dist.MixtureSameFamily(dist.Categorical(logits=logits), components)
        return mixture.expand([x.shape[0]])


LEARNED: dict[str, Callable[..., nn.Module]] = {
    "mog": lambda cfg: MixturePrior(cfg.prior_components, cfg.z_dim),
    "vamp": lambda cfg: VampPrior(cfg.prior_components, cfg.x_dim),
}
"""``--model.prior`` → its module, from a VAE config; ``standard`` (N(0, I)) has none."""


def build(config) -> nn.Module | None:
    """The learned prior of a VAE config (``prior``, ``prior_components``, ``z_dim``,
    ``x_dim``), or None for the standard normal."""
    make = LEARNED.get(config.prior)
    return None if make is None else make(config)
