"""Gradient noise of the estimators: mean, variance and signal-to-noise ratio of the encoder
(guide) and decoder (model) gradients, and side-by-side comparisons of objectives (the
notebooks' estimator lab)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ppl_vae.inference.objectives import ObjectiveConfig, loss_module
from ppl_vae.inference.weights import program_parameters


@dataclass
class GradientStatistics:
    """R independent gradient draws of one parameter group and their summaries.

    ``draws`` has shape ``(R, P)`` (P scalar parameters, flattened). ``mean`` and ``variance``
    are per parameter (unbiased variance). ``snr`` is per parameter, ``|mean| / std``; the
    summary :attr:`mean_snr` averages it over the parameters whose gradient varies (parameters
    with a constant gradient, e.g. the unused upper triangle of a Cholesky factor, have no SNR).
    This is the per-parameter SNR of Rainforth et al. (2018), averaged.
    """

    draws: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        return self.draws.mean(0)

    @property
    def variance(self) -> torch.Tensor:
        return self.draws.var(0)

    @property
    def snr(self) -> torch.Tensor:
        return self.mean.abs() / self.variance.sqrt()

    @property
    def mean_snr(self) -> float:
        varying = self.variance > 0
        return self.snr[varying].mean().item()

    @property
    def total_variance(self) -> float:
        """Σ_p Var g_p: the trace of the gradient's covariance."""
        return self.variance.sum().item()


def parameter_groups(model: torch.nn.Module, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """``{"encoder": the guide's parameters, "decoder": every other parameter}`` of a model.

    The guide's parameters are those its program registers (``pyro.module`` / ``pyro.param``)
    when run on the batch ``x``: read off the program, not off an attribute name.
    """
    guide = program_parameters(model.guide, x)
    ids = {id(p) for p in guide}
    return {"encoder": guide, "decoder": [p for p in model.parameters() if id(p) not in ids]}


def gradient_statistics(
    loss_fn: Callable[..., torch.Tensor],
    args: tuple,
    groups: dict[str, Iterable[torch.nn.Parameter]],
    num_draws: int = 100,
) -> dict[str, GradientStatistics]:
    """Draw ``num_draws`` independent gradient estimates of ``loss_fn(*args)`` per group.

    Each draw is one call of ``loss_fn`` (e.g. ``loss_module(model, cfg)``: the loss summed
    over the batch, so a draw is the gradient of the batch loss, with the objective's own
    particles) and one ``torch.autograd.grad``; parameters' ``.grad`` are not touched.
    Randomness comes from torch's global generator: seed it for reproducible draws, and reseed
    it identically to get paired draws (common random numbers) of two objectives that sample
    z the same way.

    :param loss_fn: returns a scalar loss whose gradient is the estimate.
    :param args: the arguments of ``loss_fn`` (the batch).
    :param groups: named parameter groups, e.g. :func:`parameter_groups` of the model.
    :param int num_draws: R, the number of independent draws.
    :returns: a :class:`GradientStatistics` per group.
    """
    groups = {name: list(params) for name, params in groups.items()}
    flat = [p for params in groups.values() for p in params]
    draws: dict[str, list[torch.Tensor]] = {name: [] for name in groups}
    for _ in range(num_draws):
        grads = torch.autograd.grad(loss_fn(*args), flat, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(flat, grads, strict=True)]
        start = 0
        for name, params in groups.items():
            part = grads[start : start + len(params)]
            draws[name].append(torch.cat([g.reshape(-1) for g in part]))
            start += len(params)
    return {name: GradientStatistics(torch.stack(rows)) for name, rows in draws.items()}


def log_mean_exp_pooled(log_w: torch.Tensor) -> torch.Tensor:
    """Pyro RenyiELBO(α = 0)'s value from ``(K, B)`` log weights: ``log (1/K) Σ_k Π_b w_kb``."""
    return torch.logsumexp(log_w.sum(1), dim=0) - math.log(log_w.shape[0])


# ----------------------------------------------------------------------------- comparisons


def bound_draws(model, x: torch.Tensor, cfg: ObjectiveConfig, num_draws: int) -> torch.Tensor:
    """``num_draws`` independent values of the objective ``cfg`` on the batch ``x``, ``(R,)``.

    Each value is the bound (minus the loss), summed over the batch, with ``cfg``'s particles.
    """
    loss_fn = loss_module(model, cfg)
    with torch.no_grad():
        return torch.stack([-loss_fn(x) for _ in range(num_draws)])


def compare_estimators(
    model,
    x: torch.Tensor,
    configs: dict[str, ObjectiveConfig],
    num_draws: int = 100,
    log_marginal: float | None = None,
) -> list[dict[str, float]]:
    """One row per objective: value, its spread, and the gradient SNR of encoder and decoder.

    Values are per datapoint (the batch sum divided by the batch size): ``mean`` and ``std``
    over ``num_draws`` independent draws, and ``bias = mean - log_marginal`` when the exact
    ``log p(x)`` per datapoint is given. ``encoder_snr`` and ``decoder_snr`` are
    :attr:`GradientStatistics.mean_snr` of ``num_draws`` gradient draws of the batch loss.

    :param model: a model; its guide's parameters are the "encoder" group
        (:func:`parameter_groups`).
    :param x: the batch.
    :param dict configs: label → :class:`~ppl_vae.config.ObjectiveConfig`.
    :param int num_draws: R, draws per objective (of values, and of gradients).
    :param log_marginal: exact mean log p(x) of the batch, if known.
    """
    rows = []
    batch_size = x.shape[0]
    for label, cfg in configs.items():
        values = bound_draws(model, x, cfg, num_draws) / batch_size
        grads = gradient_statistics(
            loss_module(model, cfg), (x,), parameter_groups(model, x), num_draws
        )
        row = {"objective": label, "mean": values.mean().item(), "std": values.std().item()}
        if log_marginal is not None:
            row["bias"] = row["mean"] - log_marginal
        row["encoder_snr"] = grads["encoder"].mean_snr
        row["decoder_snr"] = grads["decoder"].mean_snr
        rows.append(row)
    return rows


def snr_versus_particles(
    model, x: torch.Tensor, names: Iterable[str], particles: Iterable[int], num_draws: int = 100
) -> dict[str, dict[str, list[float]]]:
    """Encoder and decoder gradient SNR of each objective as K grows (Rainforth et al. 2018).

    :returns: ``{name: {"K": [...], "encoder": [...], "decoder": [...]}}``.
    """
    particles = list(particles)
    curves = {}
    for name in names:
        curve = {"K": particles, "encoder": [], "decoder": []}
        for num_particles in particles:
            loss_fn = loss_module(model, ObjectiveConfig(name, num_particles))
            grads = gradient_statistics(loss_fn, (x,), parameter_groups(model, x), num_draws)
            curve["encoder"].append(grads["encoder"].mean_snr)
            curve["decoder"].append(grads["decoder"].mean_snr)
        curves[name] = curve
    return curves


