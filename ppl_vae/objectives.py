"""Objective configs → Pyro ELBOs, and per-datapoint log importance weights from Pyro traces.

Every objective works on the same model/guide pair. :func:`loss_module` returns Pyro's module
form of the ELBO (``elbo(model.model, model.guide)`` is an ``nn.Module`` whose forward is the
differentiable loss, summed over the ``"data"`` plate), which :func:`ppl_vae.train.fit` drives
with a torch optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO

from ppl_vae.config import ObjectiveConfig
from ppl_vae.fast import LeanTrace_ELBO, own_parameters

MAX_PLATE_NESTING = 1  # models have one plate, "data"; particle plates go to its left

ELBOS: dict[str, type[ELBO]] = {
    "trace": Trace_ELBO,
    "meanfield": TraceMeanField_ELBO,
}


def make_elbo(cfg: ObjectiveConfig) -> ELBO:
    """The Pyro ELBO named by ``cfg.name``, vectorizing particles when there is more than one.

    ``tracegraph``, ``renyi``, ``iwae``, ``stl`` and ``dreg`` come from
    :func:`ppl_vae.estimators.make_estimator` (per-datapoint bounds built on Pyro traces).
    """
    if cfg.name not in ELBOS:
        from ppl_vae.estimators import make_estimator  # it builds on this module

        return make_estimator(cfg.name, cfg.num_particles, cfg.alpha)
    return ELBOS[cfg.name](
        num_particles=cfg.num_particles,
        vectorize_particles=cfg.num_particles > 1,
        max_plate_nesting=MAX_PLATE_NESTING,
    )


def loss_module(model, cfg: ObjectiveConfig, lean: bool = True) -> torch.nn.Module:
    """``elbo(model.model, model.guide)``: an ``nn.Module`` giving -ELBO summed over the batch.

    With ``lean`` (default) the ``"trace"`` objective is :class:`~ppl_vae.fast.LeanTrace_ELBO`:
    the same estimator, computed with less bookkeeping whenever Pyro validation is off (see
    :mod:`ppl_vae.fast`); ``lean=False`` gives the plain Pyro class.
    """
    elbo = make_elbo(cfg)
    if lean and type(elbo) is Trace_ELBO:
        elbo = LeanTrace_ELBO(
            num_particles=elbo.num_particles,
            vectorize_particles=elbo.vectorize_particles,
            max_plate_nesting=MAX_PLATE_NESTING,
            own_params=own_parameters(model),
        )
    return elbo(model.model, model.guide)


def particle_traces(model_fn: Callable, guide_fn: Callable, num_particles: int, *args, **kwargs):
    """``(model_trace, guide_trace)`` of one vectorized run under a particle plate.

    The guide runs under a plate of ``num_particles`` to the left of ``"data"``; the model is
    replayed on the guide's draws under the same plate. Every site keeps its particle and data
    dimensions, so nothing is pooled over the batch.
    """

    def particles(fn: Callable) -> Callable:
        def wrapped(*a, **k):
            with pyro.plate("particles", num_particles, dim=-(MAX_PLATE_NESTING + 1)):
                return fn(*a, **k)

        return wrapped

    guide_trace = poutine.trace(particles(guide_fn)).get_trace(*args, **kwargs)
    replayed = poutine.replay(particles(model_fn), trace=guide_trace)
    return poutine.trace(replayed).get_trace(*args, **kwargs), guide_trace


def log_weights(
    model_fn: Callable, guide_fn: Callable, x: torch.Tensor, num_particles: int
) -> torch.Tensor:
    """log p(x, z) - log q(z|x) for ``num_particles`` draws z ~ q(z|x), one per datapoint.

    Sums each site's log density of :func:`particle_traces`, keeping the plate dimensions.
    Returns a ``(num_particles, B)`` tensor: the importance weights of every datapoint, not
    pooled over the batch.
    """
    model_trace, guide_trace = particle_traces(model_fn, guide_fn, num_particles, x)
    log_w = x.new_zeros(num_particles, x.shape[0])
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        trace.compute_log_prob()
        for site in trace.nodes.values():
            if site["type"] == "sample" and (sign > 0 or not site["is_observed"]):
                log_w = log_w + sign * site["log_prob"]
    return log_w


def log_mean_exp(log_w: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """log (1/K) Σ_k exp(log_w_k) along ``dim``, computed stably."""
    return torch.logsumexp(log_w, dim=dim) - math.log(log_w.shape[dim])


def kl_standard_normal(z_loc: torch.Tensor, z_scale: torch.Tensor) -> torch.Tensor:
    """KL(N(z_loc, diag z_scale²) ‖ N(0, I)) per latent dimension, in closed form.

    Each coordinate contributes ``(z_scale² + z_loc² - 1) / 2 - log z_scale``; the result has the
    broadcast shape of the arguments, so ``.sum(-1)`` is the KL of the whole latent and the
    unsummed values are the KL per dimension (used for active units). Assumes ``z_scale > 0``.

    :param torch.Tensor z_loc: means of the diagonal Gaussian.
    :param torch.Tensor z_scale: standard deviations (not variances, not logs).
    """
    return 0.5 * (z_scale.square() + z_loc.square() - 1) - torch.log(z_scale)
