"""The linear-Gaussian latent model (probabilistic PCA; Tipping & Bishop 1999): the ground truth.

Everything about this model is available in closed form: the marginal likelihood
``p(x) = N(b, W Wᵀ + σ² I)``, the posterior ``p(z|x)``, and the ELBO of any Gaussian guide. That
makes it the reference against which the Monte Carlo estimators of the library (Pyro's ELBOs,
the importance-sampled ``log p(x)`` of :mod:`ppl_vae.metrics`) are tested, and a sanity model
for the notebooks.

The guide is amortized and linear: ``q(z|x) = N(A x + c, L Lᵀ)`` with one lower-triangular
``L`` (positive diagonal) shared by all data points. This family contains the exact posterior for
every ``W``, ``b`` and ``σ``: the posterior covariance ``σ² (WᵀW + σ² I)⁻¹`` does not depend on
``x`` but is a full matrix in general (a diagonal guide would only be exact when the columns of
``W`` are orthogonal), and the posterior mean is affine in ``x``.

The prior is written as a :class:`~pyro.distributions.MultivariateNormal` with identity
``scale_tril`` (the same density as the VAE's ``Normal(0, 1).expand([d]).to_event(1)``) so that
``KL(guide ‖ prior)`` is the analytic KL that torch registers for two multivariate normals, which
:class:`~pyro.infer.TraceMeanField_ELBO` then uses instead of a Monte Carlo estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import constraints, transform_to

from ppl_vae.errors import check
from ppl_vae.models.base import LatentVariableModel, ModelConfig


@dataclass(frozen=True)
class LinearGaussianConfig(ModelConfig):
    kind: ClassVar[str] = "linear"

    z_dim: int = 16
    """Dimension of the latent z."""
    x_dim: int = 784
    """Dimension of an observation x (pixels of a flattened image)."""
    x_scale: float = 0.5
    """Initial noise scale σ of p(x|z) = N(W z + b, σ² I); σ is learned with the other weights."""

    def __post_init__(self) -> None:
        check(self.z_dim >= 1, "--model.z-dim", "a positive integer", self.z_dim)
        check(self.x_dim >= 1, "--model.x-dim", "a positive integer", self.x_dim)
        check(self.x_scale > 0, "--model.x-scale", "positive", self.x_scale)


class LinearGaussianDecoder(nn.Module):
    """The likelihood's parameters: ``W`` (``linear.weight``), ``b`` (``linear.bias``) and σ."""

    def __init__(self, z_dim: int, x_dim: int, x_scale: float):
        super().__init__()
        self.linear = nn.Linear(z_dim, x_dim)
        self.log_x_scale = nn.Parameter(torch.tensor(math.log(x_scale)))

    @property
    def x_scale(self) -> torch.Tensor:
        return self.log_x_scale.exp()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """The mean ``W z + b`` of p(x|z)."""
        return self.linear(z)


class LinearGaussianEncoder(nn.Module):
    """x ↦ (``z_loc = A x + c``, ``z_scale_tril = L``), with ``L`` shared by every x.

    ``L`` is stored unconstrained: its strict lower triangle as is, its diagonal as a log
    (:class:`~torch.distributions.transforms.LowerCholeskyTransform`); the upper triangle of the
    stored matrix is unused.
    """

    def __init__(self, x_dim: int, z_dim: int):
        super().__init__()
        self.linear = nn.Linear(x_dim, z_dim)
        self.z_scale_tril_unconstrained = nn.Parameter(torch.zeros(z_dim, z_dim))

    @property
    def z_scale_tril(self) -> torch.Tensor:
        return transform_to(constraints.lower_cholesky)(self.z_scale_tril_unconstrained)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.linear(x), self.z_scale_tril


class LinearGaussian(LatentVariableModel):
    """p(z) = N(0, I); p(x|z) = N(W z + b, σ² I); q(z|x) = N(A x + c, L Lᵀ).

    Probabilistic PCA as a Pyro model/guide pair with the same plate and sites as the VAE
    (``"data"``, ``"z"``, ``"x"``); both run under an outer particle plate. Besides the
    stochastic pair it gives the exact quantities the estimators are tested against:
    :meth:`log_marginal` (exact ``log p(x)``), :meth:`exact_posterior` (exact ``p(z|x)``),
    :meth:`elbo` (the closed-form ELBO of the current guide, differentiable in every parameter)
    and :meth:`set_guide_to_posterior`. Capabilities:
    :class:`~ppl_vae.models.capabilities.GaussianGuide` (:meth:`posterior`, the guide's q(z|x))
    and :class:`~ppl_vae.models.capabilities.ExplicitPrior`.

    :param LinearGaussianConfig config: dimensions and the initial noise scale.
    """

    recordable = True

    def __init__(self, config: LinearGaussianConfig):
        super().__init__()
        self.config = config
        self.decoder = LinearGaussianDecoder(config.z_dim, config.x_dim, config.x_scale)
        self.encoder = LinearGaussianEncoder(config.x_dim, config.z_dim)

    # ------------------------------------------------------------------ the model/guide pair

    def prior(self, x: torch.Tensor) -> dist.MultivariateNormal:
        """p(z) = N(0, I) as a MultivariateNormal, batch-shaped like ``x``'s leading dimension."""
        z_dim = self.config.z_dim
        eye = torch.eye(z_dim, dtype=x.dtype, device=x.device)
        return dist.MultivariateNormal(x.new_zeros(z_dim), scale_tril=eye).expand([x.shape[0]])

    def posterior(self, x: torch.Tensor) -> dist.MultivariateNormal:
        """The guide's q(z|x) = N(A x + c, L Lᵀ) (the exact one is :meth:`exact_posterior`)."""
        z_loc, z_scale_tril = self.encoder(x)
        return dist.MultivariateNormal(z_loc, scale_tril=z_scale_tril)

    def model(self, x: torch.Tensor) -> None:
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.prior(x))
            x_loc = self.decoder(z)
            pyro.sample("x", dist.Normal(x_loc, self.decoder.x_scale).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", self.posterior(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.linear(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The mean ``W z + b`` of p(x|z) (not clipped to [0, 1]: the likelihood is Gaussian)."""
        return self.decoder(z)

    def prior_sample(self, n: int) -> torch.Tensor:
        weight = self.decoder.linear.weight
        return torch.randn(n, self.config.z_dim, dtype=weight.dtype, device=weight.device)

    # ------------------------------------------------------------------ closed forms

    def marginal(self) -> dist.MultivariateNormal:
        """The exact marginal p(x) = N(b, W Wᵀ + σ² I) of the current parameters."""
        weight, bias = self.decoder.linear.weight, self.decoder.linear.bias
        x_scale = self.decoder.x_scale
        eye = torch.eye(self.config.x_dim, dtype=weight.dtype, device=weight.device)
        return dist.MultivariateNormal(bias, covariance_matrix=weight @ weight.T + x_scale**2 * eye)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x), one value per row of ``x`` (shape ``x.shape[:-1]``)."""
        return self.marginal().log_prob(x)

    def posterior_parameters(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(A, c, L)`` with p(z|x) = N(A x + c, L Lᵀ) exactly.

        With ``M = WᵀW + σ² I``: ``A = M⁻¹ Wᵀ``, ``c = -A b`` and ``L Lᵀ = σ² M⁻¹``
        (Tipping & Bishop 1999, eq. 6).
        """
        weight, bias = self.decoder.linear.weight, self.decoder.linear.bias
        x_var = self.decoder.x_scale**2
        eye = torch.eye(self.config.z_dim, dtype=weight.dtype, device=weight.device)
        precision_factor = torch.linalg.cholesky(weight.T @ weight + x_var * eye)  # chol(M)
        z_from_x = torch.cholesky_solve(weight.T, precision_factor)  # A = M⁻¹ Wᵀ
        z_cov = x_var * torch.cholesky_inverse(precision_factor)
        return z_from_x, -z_from_x @ bias, torch.linalg.cholesky(z_cov)

    def exact_posterior(self, x: torch.Tensor) -> dist.MultivariateNormal:
        """The exact posterior p(z|x), batched over the leading dimensions of ``x``."""
        z_from_x, z_offset, z_scale_tril = self.posterior_parameters()
        return dist.MultivariateNormal(x @ z_from_x.T + z_offset, scale_tril=z_scale_tril)

    @torch.no_grad()
    def set_guide_to_posterior(self) -> None:
        """Overwrite the guide's ``A``, ``c`` and ``L`` with those of the exact posterior."""
        z_from_x, z_offset, z_scale_tril = self.posterior_parameters()
        self.encoder.linear.weight.copy_(z_from_x)
        self.encoder.linear.bias.copy_(z_offset)
        unconstrained = transform_to(constraints.lower_cholesky).inv(z_scale_tril)
        self.encoder.z_scale_tril_unconstrained.copy_(unconstrained)

    def expected_log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """E_q[log p(x|z)] under the current guide, in closed form, one value per row of ``x``.

        With ``m = A x + c``, ``S = L Lᵀ`` and residual ``r = x - W m - b``, it is
        ``-D/2 log(2πσ²) - (‖r‖² + tr(W S Wᵀ)) / (2σ²)``.
        """
        weight, bias = self.decoder.linear.weight, self.decoder.linear.bias
        x_var = self.decoder.x_scale**2
        z_loc, z_scale_tril = self.encoder(x)
        residual = x - z_loc @ weight.T - bias
        squared_error = residual.square().sum(-1) + (weight @ z_scale_tril).square().sum()
        return -0.5 * (self.config.x_dim * torch.log(2 * math.pi * x_var) + squared_error / x_var)

    def kl_to_prior(self, x: torch.Tensor) -> torch.Tensor:
        """KL(q(z|x) ‖ p(z)) = (tr S + ‖m‖² - d) / 2 - Σ_i log L_ii, one value per row of ``x``."""
        z_loc, z_scale_tril = self.encoder(x)
        trace_and_mean = z_scale_tril.square().sum() + z_loc.square().sum(-1)
        return 0.5 * (trace_and_mean - self.config.z_dim) - z_scale_tril.diagonal().log().sum()

    def elbo(self, x: torch.Tensor) -> torch.Tensor:
        """The ELBO E_q[log p(x, z) - log q(z|x)] of the current guide, in closed form, per row.

        :meth:`expected_log_likelihood` minus :meth:`kl_to_prior`. No sampling is involved, so
        its autograd gradient is the exact gradient of the ELBO, in every parameter.
        """
        return self.expected_log_likelihood(x) - self.kl_to_prior(x)
