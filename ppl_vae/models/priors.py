"""Learned priors p(z) over a vector latent: a mixture of Gaussians and the VampPrior.

Each is a plain ``nn.Module`` holding the prior's parameters, registered by the model with
``pyro.module("prior", ...)``, whose :meth:`distribution` is the p(z) the model samples ``"z"``
from: one :class:`DiagonalNormalMixture` over K diagonal Gaussians, batch-shaped like the
``"data"`` plate. The component index is *marginalized*, not sampled: log p(z) =
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
from torch.distributions import constraints
from torch.nn import functional as F

from ppl_vae.nets import MIN_SCALE

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

PriorName = Literal["standard", "mog", "vamp"]


def _softplus_inverse(value: float) -> float:
    return value + math.log(-math.expm1(-value))


class DiagonalNormalMixture(dist.TorchDistribution):
    """p(z) = Σ_k π_k N(z; μ_k, diag σ_k²): K diagonal Gaussians over a vector z, the same K
    for every batch element (the batch shape only broadcasts).

    The density is :class:`~pyro.distributions.MixtureSameFamily`'s number, computed without
    its ``(N, K, d)`` intermediate: Σ_d (z_d − μ_kd)²/σ_kd² expands into two ``(N, d) × (d, K)``
    matrix products and a per-component constant, in float64 (the expansion subtracts terms of
    size (z/σ)², which float32 would round), so a VampPrior with K = 500 costs about as much as
    one more encoder layer instead of most of the step. ``tests/test_flows_priors.py`` checks it
    against a log-sum-exp by hand and against ``TraceEnum_ELBO``.

    :param logits: ``(K,)`` unnormalized log weights.
    :param loc: ``(K, d)`` component means.
    :param scale: ``(K, d)`` component standard deviations (positive).
    :param batch_shape: the batch shape the distribution is broadcast to.
    """

    arg_constraints = {
        "logits": constraints.real_vector,
        "loc": constraints.independent(constraints.real, 2),
        "scale": constraints.independent(constraints.positive, 2),
    }
    support = constraints.real_vector
    has_rsample = False

    def __init__(self, logits: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor,
                 batch_shape=(), validate_args=None):  # fmt: skip
        if loc.dim() != 2 or scale.shape != loc.shape or logits.shape != loc.shape[:1]:
            raise ValueError(
                f"a DiagonalNormalMixture takes logits (K,), loc and scale (K, d); got "
                f"{tuple(logits.shape)}, {tuple(loc.shape)}, {tuple(scale.shape)}"
            )
        self.logits, self.loc, self.scale = logits, loc, scale
        super().__init__(torch.Size(batch_shape), loc.shape[-1:], validate_args)

    def expand(self, batch_shape, _instance=None) -> DiagonalNormalMixture:
        return DiagonalNormalMixture(self.logits, self.loc, self.scale, batch_shape,
                                     validate_args=self._validate_args)  # fmt: skip

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        d = self.event_shape[0]
        z = value.reshape(-1, d).double()
        loc, precision = self.loc.double(), self.scale.double().pow(-2)
        weighted = loc * precision
        quadratic = (  # Σ_d (z_d − μ_kd)² / σ_kd², (N, K)
            z.square() @ precision.T - 2 * (z @ weighted.T) + (loc * weighted).sum(-1)
        )
        log_norm = torch.log_softmax(self.logits.double(), -1) - (
            self.scale.double().log().sum(-1) + d * _HALF_LOG_2PI
        )
        out = torch.logsumexp(log_norm - 0.5 * quadratic, -1).to(value.dtype)
        out = out.reshape(value.shape[:-1])
        return out.expand(torch.broadcast_shapes(out.shape, self.batch_shape))

    @torch.no_grad()
    def sample(self, sample_shape=()) -> torch.Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))[:-1]
        component = dist.Categorical(logits=self.logits).sample(shape)
        noise = torch.randn(shape + self.event_shape, dtype=self.loc.dtype,
                            device=self.loc.device)  # fmt: skip
        return self.loc[component] + self.scale[component] * noise

    @property
    def mean(self) -> torch.Tensor:
        weights = torch.softmax(self.logits, -1)
        return (weights @ self.loc).expand(self.batch_shape + self.event_shape)


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

    def distribution(self, x: torch.Tensor, posterior=None) -> DiagonalNormalMixture:
        """p(z) with batch shape ``(B,)`` for the batch ``x`` (``posterior`` is not used)."""
        return DiagonalNormalMixture(self.logits, self.z_loc, self.z_scale, x.shape[:1])


PSEUDO_INIT = (0.05, 0.01)
"""Mean and standard deviation of the VampPrior's pseudo-input pixels at initialization."""


class VampPrior(nn.Module):
    """p(z) = (1/K) Σ_k q(z | u_k): the guide's own Gaussian q(z|x) at K learned pseudo-inputs
    u_k (Tomczak & Welling 2018), the prior that the aggregate posterior (1/N) Σ_n q(z|x_n)
    would be with the pseudo-inputs in place of the data.

    The pseudo-inputs are images: u_k = hardtanh(w_k) = clamp(w_k, 0, 1) in [0, 1]^D, like the
    model's inputs, as Tomczak & Welling parameterize them. They start as near-black images,
    u ≈ 0.05 ± 0.01 per pixel (:data:`PSEUDO_INIT`). Measured on Fashion-MNIST with K = 500
    (``benchmarks/RESULTS.md``):

    - grey noise (u ≈ 0.5 ± 0.2) let the posterior collapse: every latent unit was inactive
      after the first epoch and stayed so, with or without a KL warm-up;
    - u = sigmoid(w) from the near-black start kept the units but barely moved the
      pseudo-inputs (mean pixel 0.055 after 50 epochs: the sigmoid's slope there is 0.05),
      test -log p(x) 242.30; the clamp, whose slope is 1, moved them (mean 0.11) and reached
      239.07 at the same budget (the one-layer VAE with N(0, I): 237.85).

    A pixel pushed past 0 or 1 stops learning (the clamp's slope is 0 there). Every evaluation
    of p(z) runs the encoder on the K pseudo-inputs (K extra rows per batch), with the
    encoder's parameters, which the guide registers; the gradient of log p(z) reaches them as
    well as the pseudo-inputs.

    :param int components: K, the number of pseudo-inputs.
    :param int x_dim: values per (flat) input image.
    """

    def __init__(self, components: int, x_dim: int):
        super().__init__()
        mean, sd = PSEUDO_INIT
        self.pseudo_pixels = nn.Parameter((mean + sd * torch.randn(components, x_dim)).clamp(0, 1))

    @property
    def pseudo_inputs(self) -> torch.Tensor:
        return self.pseudo_pixels.clamp(0, 1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the clamp held w with u = sigmoid(w): the same u, exactly
        logits = state_dict.pop(prefix + "pseudo_logits", None)
        if logits is not None:
            state_dict[prefix + "pseudo_pixels"] = torch.sigmoid(logits)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def distribution(
        self, x: torch.Tensor, posterior: Callable[[torch.Tensor], dist.TorchDistribution]
    ) -> DiagonalNormalMixture:
        """p(z) with batch shape ``(B,)`` for the batch ``x``; ``posterior(u)`` is the guide's
        diagonal Normal q(z|u) (batch shape ``(K,)``, event shape ``(d,)``)."""
        q = posterior(self.pseudo_inputs.to(x.dtype)).base_dist
        logits = x.new_zeros(q.loc.shape[:1])  # equal weights 1/K
        return DiagonalNormalMixture(logits, q.loc, q.scale, x.shape[:1])


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
