"""Estimators of the ELBO and of importance-weighted bounds, and measurements of their gradients.

The objectives here complement Pyro's :class:`~pyro.infer.Trace_ELBO` and
:class:`~pyro.infer.TraceMeanField_ELBO` (see :func:`ppl_vae.objectives.make_elbo`). They are
:class:`~pyro.infer.ELBO` subclasses, so ``objective(model.model, model.guide)`` is the
``nn.Module`` the training loop drives and ``pyro.infer.SVI`` accepts them as its ``loss``.

**Pyro's RenyiELBO and local latents.** :class:`~pyro.infer.RenyiELBO` (pyro-ppl 1.9.2) sums
each particle's log weight only over the plates *not* shared by every sample site
(``get_dependent_plate_dims``), log-mean-exps over particles, and then sums what is left. When
every site of model and guide sits in the ``"data"`` plate, as in all models of this library,
that plate is shared, so its α = 0 value is the per-datapoint IWAE bound
``Σ_b log (1/K) Σ_k w_kb`` (Burda et al. 2015), not the pooled ``log (1/K) Σ_k Π_b w_kb``;
``tests/test_objectives.py`` checks values and gradients against it. It pools the batch as soon
as one site lies outside the plate (a global latent), which is then the right bound of the joint.
The classes here exist because RenyiELBO and TraceGraph_ELBO have no ``differentiable_loss``, so
they do not work as the ``nn.Module`` the training loop drives, and because STL and DReG need
the traces themselves.

The bounds here are built on Pyro traces: the guide runs under a vectorized particle plate to
the left of ``"data"`` and the model is replayed on its draws, keeping the plate dimensions, so
that every datapoint gets its own ``(K,)`` vector of log weights.

Assumptions of the trace-based objectives: every latent site of the guide is
reparameterizable (gradients flow through z; there is no score-function term), the first
argument of model and guide is the batch, and all latent sites sit inside the ``"data"``
plate (at most :data:`~ppl_vae.objectives.MAX_PLATE_NESTING` plates).

References:

- Y. Burda, R. Grosse, R. Salakhutdinov (2015), Importance Weighted Autoencoders.
- Y. Li, R. E. Turner (2016), Rényi Divergence Variational Inference.
- G. Roeder, Y. Wu, D. Duvenaud (2017), Sticking the Landing: Simple, Lower-Variance Gradient
  Estimators for Variational Inference.
- T. Rainforth, A. R. Kosiorek, T. A. Le, C. J. Maddison, M. Igl, F. Wood, Y. W. Teh (2018),
  Tighter Variational Bounds are Not Necessarily Better.
- G. Tucker, D. Lawson, S. Gu, C. J. Maddison (2018), Doubly Reparameterized Gradient
  Estimators for Monte Carlo Objectives.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pyro
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO, TraceGraph_ELBO
from pyro.poutine.util import site_is_subsample
from torch import distributions as tdist

from ppl_vae import objectives
from ppl_vae.config import ObjectiveConfig
from ppl_vae.errors import ConfigError
from ppl_vae.objectives import MAX_PLATE_NESTING, log_mean_exp, loss_module

# ----------------------------------------------------------------------------- traces → weights


def detach_parameters(fn: tdist.Distribution) -> tdist.Distribution:
    """The same distribution with its parameters detached from the autograd graph.

    Evaluating the guide's log density with detached parameters at a reparameterized draw
    keeps the path derivative through z and drops the score term ∇_φ log q_φ(z), whose
    expectation is zero (Roeder et al. 2017). Supports the guides of the library: Normal,
    MultivariateNormal and Delta, possibly wrapped in Independent.
    """
    if isinstance(fn, tdist.Independent):
        return type(fn)(detach_parameters(fn.base_dist), fn.reinterpreted_batch_ndims)
    if isinstance(fn, tdist.Normal):
        return type(fn)(fn.loc.detach(), fn.scale.detach())
    if isinstance(fn, tdist.MultivariateNormal):
        return type(fn)(fn.loc.detach(), scale_tril=fn.scale_tril.detach())
    if isinstance(fn, pyro.distributions.Delta):
        return type(fn)(fn.v.detach(), fn.log_density.detach(), event_dim=fn.event_dim)
    raise ConfigError(
        f"--objective stl/dreg detach the guide's parameters, which is implemented for Normal, "
        f"MultivariateNormal and Delta guides; got {type(fn).__name__}; use --objective iwae "
        "or trace"
    )


def latent_sites(trace) -> list[dict]:
    """The latent sample sites of a trace (no observations, no plates' subsample sites)."""
    return [
        site
        for site in trace.nodes.values()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    ]


def particle_traces(
    model_fn: Callable, guide_fn: Callable, num_particles: int, args, kwargs, objective: str
):
    """:func:`ppl_vae.objectives.particle_traces`, for objectives that differentiate through
    the guide's draws.

    Raises :class:`ConfigError` when a latent site of the guide cannot be reparameterized.
    """
    model_trace, guide_trace = objectives.particle_traces(
        model_fn, guide_fn, num_particles, *args, **kwargs
    )
    for site in latent_sites(guide_trace):
        if not site["fn"].has_rsample:
            raise ConfigError(
                f"--objective {objective} differentiates through the draws of the guide, but "
                f"its site {site['name']!r} ({type(site['fn']).__name__}) is not "
                "reparameterizable; use --objective tracegraph (score-function gradients with "
                "baselines) or trace"
            )
    return model_trace, guide_trace


def particle_log_weights(model_trace, guide_trace, batch_size: int, detach_guide: bool = False):
    """``(K, B)`` log weights log p(x, z_kb) - log q(z_kb|x_b) from particle traces.

    Each site's log density keeps its particle and ``"data"`` dimensions (and its
    :func:`~pyro.poutine.scale`). With ``detach_guide`` the guide's log densities are evaluated
    with its parameters detached (sticking the landing); their values are unchanged.
    """
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    log_w = 0.0
    for site in model_trace.nodes.values():
        if site["type"] == "sample" and not site_is_subsample(site):
            log_w = log_w + site["log_prob"]  # latents and observations
    for site in latent_sites(guide_trace):
        if detach_guide:
            log_q = detach_parameters(site["fn"]).log_prob(site["value"])
            log_q = scale_and_mask(log_q, site["scale"], site["mask"])
        else:
            log_q = site["log_prob"]
        log_w = log_w - log_q
    return log_w.expand(log_w.shape[0], batch_size)


# ----------------------------------------------------------------------------- objectives


class _PerDatapointELBO(ELBO):
    """Shared plumbing: ``loss`` and ``loss_and_grads`` from :meth:`differentiable_loss`."""

    name = ""

    def __init__(self, num_particles: int = 1):
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=MAX_PLATE_NESTING,
            vectorize_particles=True,
        )

    def log_weights(self, model, guide, args, kwargs, detach_guide: bool = False):
        model_trace, guide_trace = particle_traces(
            model, guide, self.num_particles, args, kwargs, self.name
        )
        log_w = particle_log_weights(model_trace, guide_trace, args[0].shape[0], detach_guide)
        return log_w, guide_trace

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("the traces come from particle_traces, all particles at once")

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def loss(self, model, guide, *args, **kwargs) -> float:
        return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward(retain_graph=self.retain_graph)
        return loss.item()


class STL_ELBO(_PerDatapointELBO):
    """The ELBO with the sticking-the-landing gradient (Roeder et al. 2017).

    The value is the usual Monte Carlo ELBO, ``Σ_b (1/K) Σ_k log w_kb`` (the same number as
    :class:`~pyro.infer.Trace_ELBO` on the same draws). Its gradient keeps only the path
    derivative of ``log q``: the guide's log density is evaluated with detached parameters, so
    the score term ∇_φ log q_φ(z), of expectation zero, is dropped. The estimator stays unbiased;
    at the exact posterior its encoder gradient is exactly zero.

    :param int num_particles: draws of z per datapoint (vectorized).
    """

    name = "stl"

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        log_w, _ = self.log_weights(model, guide, args, kwargs, detach_guide=True)
        return -log_w.mean(0).sum()


class ImportanceWeightedELBO(_PerDatapointELBO):
    """The importance-weighted (α = 0) or Rényi bound, log-mean-exp'ed per datapoint.

    ``L = Σ_b 1/(1-α) · log (1/K) Σ_k w_kb^(1-α)`` with ``w_kb = p(x_b, z_kb) / q(z_kb|x_b)``:
    the IWAE bound (Burda et al. 2015) for α = 0, the Rényi bound (Li & Turner 2016) otherwise.
    Each datapoint has its own K particles; the value and gradient are those of
    :class:`~pyro.infer.RenyiELBO` for models whose sites all sit in the ``"data"`` plate.

    With ``dreg=True`` (α = 0 only) the value is the same but the encoder gradient is the
    doubly reparameterized one (Tucker et al. 2018): ``Σ_k w̃_k² ∂ log w_k/∂z_k ∂z_k/∂φ`` with
    normalized weights ``w̃`` and ``log q`` evaluated at detached parameters; the decoder
    gradient stays the IWAE one, ``Σ_k w̃_k ∇_θ log w_k``. Both are unbiased for the gradient of
    the IWAE bound. Implementation: the surrogate ``Σ_k w̃_k log w_k`` gives the decoder
    gradient, and a hook on each draw z_k multiplies the gradient reaching it by ``w̃_k``.

    :param int num_particles: K, draws of z per datapoint (vectorized).
    :param float alpha: the Rényi order; α = 1 (the ELBO) is excluded, use ``trace``.
    :param bool dreg: use the doubly reparameterized gradient (needs α = 0).
    """

    def __init__(self, num_particles: int = 1, alpha: float = 0.0, dreg: bool = False):
        if alpha == 1:
            raise ConfigError("--objective.alpha must differ from 1 (α = 1 is the ELBO: trace)")
        if dreg and alpha != 0:
            raise ConfigError(f"--objective dreg needs --objective.alpha 0 (got {alpha!r})")
        super().__init__(num_particles)
        self.alpha = alpha
        self.dreg = dreg
        self.name = "dreg" if dreg else ("iwae" if alpha == 0 else "renyi")

    def bound(self, log_w: torch.Tensor) -> torch.Tensor:
        """The per-datapoint bounds, shape ``(B,)``, from ``(K, B)`` log weights."""
        return log_mean_exp((1 - self.alpha) * log_w, dim=0) / (1 - self.alpha)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        if not self.dreg:
            log_w, _ = self.log_weights(model, guide, args, kwargs)
            return -self.bound(log_w).sum()
        log_w, guide_trace = self.log_weights(model, guide, args, kwargs, detach_guide=True)
        weights = torch.softmax(log_w.detach(), dim=0)  # w̃_kb, normalized over k
        for site in latent_sites(guide_trace):
            value = site["value"]
            if value.requires_grad:
                per_draw = weights.reshape(weights.shape + (1,) * (value.dim() - weights.dim()))
                value.register_hook(lambda grad, w=per_draw: grad * w)
        surrogate = (weights * log_w).sum()
        value = self.bound(log_w).sum().detach()
        return -(value + surrogate - surrogate.detach())


class TraceGraphModule_ELBO(TraceGraph_ELBO):
    """:class:`~pyro.infer.TraceGraph_ELBO` with a ``differentiable_loss``, so it works as a module.

    Its value is the ELBO; its gradient is that of TraceGraph_ELBO's surrogate loss
    (score-function terms with Rao-Blackwellization by the dependency structure, and baselines
    where the guide declares them). For the reparameterized guides of the library it equals
    :class:`~pyro.infer.Trace_ELBO`'s gradient.
    """

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        elbo, surrogate_loss = self._loss_and_surrogate_loss(model, guide, args, kwargs)
        elbo = torch.as_tensor(elbo)
        return -elbo.detach() + surrogate_loss - surrogate_loss.detach()


def make_estimator(name: str, num_particles: int, alpha: float) -> ELBO:
    """The objective ``name`` of :class:`~ppl_vae.config.ObjectiveConfig` not in Pyro as is."""
    if name == "stl":
        return STL_ELBO(num_particles)
    if name == "tracegraph":
        return TraceGraphModule_ELBO(
            num_particles=num_particles,
            vectorize_particles=num_particles > 1,
            max_plate_nesting=MAX_PLATE_NESTING,
        )
    if name in ("iwae", "dreg"):
        return ImportanceWeightedELBO(num_particles, 0.0, dreg=name == "dreg")
    if name == "renyi":
        return ImportanceWeightedELBO(num_particles, alpha)
    raise ConfigError(f"--objective {name!r} is unknown")


# ----------------------------------------------------------------------------- gradient noise


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


def parameter_groups(model: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """``{"encoder": guide parameters, "decoder": every other parameter}`` of a model."""
    encoder = list(model.encoder.parameters())
    ids = {id(p) for p in encoder}
    return {"encoder": encoder, "decoder": [p for p in model.parameters() if id(p) not in ids]}


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

    :param model: a model with ``encoder`` (the guide's parameters) and the rest.
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
            loss_module(model, cfg), (x,), parameter_groups(model), num_draws
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
            grads = gradient_statistics(loss_fn, (x,), parameter_groups(model), num_draws)
            curve["encoder"].append(grads["encoder"].mean_snr)
            curve["decoder"].append(grads["decoder"].mean_snr)
        curves[name] = curve
    return curves


def kl_standard_normal_monte_carlo(
    z_loc: torch.Tensor, z_scale: torch.Tensor, num_samples: int
) -> torch.Tensor:
    """Monte Carlo KL(N(z_loc, diag z_scale²) ‖ N(0, I)) from ``num_samples`` draws, per row.

    The estimate ``(1/S) Σ_s [log q(z_s) - log p(z_s)]``, ``z_s ~ q``, is what
    :class:`~pyro.infer.Trace_ELBO` uses in place of the closed form
    :func:`~ppl_vae.objectives.kl_standard_normal` (which ``TraceMeanField_ELBO`` uses). It is
    unbiased; its variance falls as 1/S.

    :returns: a tensor of shape ``z_loc.shape[:-1]``.
    """
    guide = tdist.Normal(z_loc, z_scale)
    prior = tdist.Normal(torch.zeros_like(z_loc), torch.ones_like(z_scale))
    z = guide.rsample((num_samples,))
    return (guide.log_prob(z) - prior.log_prob(z)).sum(-1).mean(0)
