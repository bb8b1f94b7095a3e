"""KL(N(μ, diag σ²) ‖ N(0, I)): the closed form and its Monte Carlo estimate; whether a pair
of distributions has a closed-form KL at all."""

from __future__ import annotations

import torch
from torch import distributions as tdist


def kl_standard_normal(z_loc: torch.Tensor, z_scale: torch.Tensor) -> torch.Tensor:
    """KL(N(z_loc, diag z_scale²) ‖ N(0, I)) per latent dimension, in closed form.

    Each coordinate contributes ``(z_scale² + z_loc² - 1) / 2 - log z_scale``; the result has the
    broadcast shape of the arguments, so ``.sum(-1)`` is the KL of the whole latent and the
    unsummed values are the KL per dimension. Assumes ``z_scale > 0``.

    :param torch.Tensor z_loc: means of the diagonal Gaussian.
    :param torch.Tensor z_scale: standard deviations (not variances, not logs).
    """
    return 0.5 * (z_scale.square() + z_loc.square() - 1) - torch.log(z_scale)


def kl_standard_normal_monte_carlo(
    z_loc: torch.Tensor, z_scale: torch.Tensor, num_samples: int
) -> torch.Tensor:
    """Monte Carlo KL(N(z_loc, diag z_scale²) ‖ N(0, I)) from ``num_samples`` draws, per row.

    The estimate ``(1/S) Σ_s [log q(z_s) - log p(z_s)]``, ``z_s ~ q``, is what
    :class:`~pyro.infer.Trace_ELBO` uses in place of the closed form
    :func:`kl_standard_normal` (which ``TraceMeanField_ELBO`` uses). It is unbiased; its
    variance falls as 1/S.

    :returns: a tensor of shape ``z_loc.shape[:-1]``.
    """
    guide = tdist.Normal(z_loc, z_scale)
    prior = tdist.Normal(torch.zeros_like(z_loc), torch.ones_like(z_scale))
    z = guide.rsample((num_samples,))
    return (guide.log_prob(z) - prior.log_prob(z)).sum(-1).mean(0)


@torch.no_grad()
def has_analytic_kl(q: tdist.Distribution, p: tdist.Distribution) -> bool:
    """Whether ``kl_divergence(q, p)`` has a closed form registered with torch (or Pyro).

    :class:`~pyro.infer.TraceMeanField_ELBO` uses it where it exists and silently falls back to
    the Monte Carlo estimate of ``Trace_ELBO`` where it does not (a normalizing-flow guide, a
    mixture prior); this is the test it makes, asked before the fact. Registrations that
    dispatch on the outer type and fail inside (``Independent`` of two unrelated bases) count
    as absent, as they do there.
    """
    try:
        tdist.kl_divergence(q, p)
    except NotImplementedError:
        return False
    return True
