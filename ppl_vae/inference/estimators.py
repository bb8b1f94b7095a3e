"""The ELBO estimators of the library, all :class:`~pyro.infer.ELBO` subclasses built on the one
implementation of the log importance weights (:mod:`ppl_vae.inference.weights`).

``objective(model.model, model.guide)`` is the ``nn.Module`` the training loop drives, and
``pyro.infer.SVI`` accepts each as its ``loss``.

* :class:`LeanTrace_ELBO` is Pyro's ``Trace_ELBO`` whose loss skips trace bookkeeping when it
  may (validation off, every guide site reparameterized): the summed weights of one run.
* :class:`ImportanceWeightedELBO` (IWAE, Rényi, DReG) and :class:`STL_ELBO` work on the ``(K,
  B)`` per-datum weights.
* :class:`TraceGraphModule_ELBO` is ``TraceGraph_ELBO`` with a ``differentiable_loss``.
* :class:`MeanField_ELBO` is ``TraceMeanField_ELBO`` that refuses a latent site without a
  closed-form KL instead of silently estimating it as ``Trace_ELBO`` would, and a guide that is
  not mean-field (latent sites sampled in another order than the model's: two stochastic
  layers).

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
the draws themselves.

Assumptions of the per-datum objectives: every latent site of the guide is reparameterizable
(gradients flow through z; there is no score-function term), the first argument of model and
guide is the batch, and all latent sites sit inside the ``"data"`` plate (at most
:data:`~ppl_vae.inference.weights.MAX_PLATE_NESTING` plates).

References:

- Y. Burda, R. Grosse, R. Salakhutdinov (2015), Importance Weighted Autoencoders.
- Y. Li, R. E. Turner (2016), Rényi Divergence Variational Inference.
- G. Roeder, Y. Wu, D. Duvenaud (2017), Sticking the Landing: Simple, Lower-Variance Gradient
  Estimators for Variational Inference.
- G. Tucker, D. Lawson, S. Gu, C. J. Maddison (2018), Doubly Reparameterized Gradient
  Estimators for Monte Carlo Objectives.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from pyro.infer import ELBO, Trace_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled

from ppl_vae.errors import ConfigError
from ppl_vae.inference import weights
from ppl_vae.inference.kl import has_analytic_kl
from ppl_vae.inference.weights import MAX_PLATE_NESTING, NeedsScoreFunction, log_mean_exp


class LeanTrace_ELBO(Trace_ELBO):
    """``Trace_ELBO`` whose differentiable loss skips trace bookkeeping when it may.

    For a guide whose sites are all reparameterized, Trace_ELBO's loss is
    −(Σ_model log p − Σ_guide log q), each site's log density scaled and masked and summed over
    every dimension, averaged over particles: :func:`~ppl_vae.inference.weights.neg_elbo_of_run`
    computes that sum while the programs run, with no trace objects and no host
    synchronization (``Trace_ELBO`` reads every site's density back with ``.item()``). With
    validation enabled, with ``max_plate_nesting`` unknown under vectorized particles, or once a
    site has needed a score function or enumeration, it *is* ``Trace_ELBO`` (all its checks
    included). ``loss`` and ``loss_and_grads`` (used by :class:`pyro.infer.SVI`) are
    Trace_ELBO's own.

    :param own_params: the parameters of the module(s) being trained; ``pyro.module``
        registrations of exactly these tensors are answered without the param store.
    :param fused: the fused density forms of :func:`~ppl_vae.inference.weights.site_log_density`.
    """

    def __init__(self, *args, own_params: Iterable[torch.Tensor] = (), fused: bool = True,
                 **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        self.own_params = {id(p): p for p in own_params}
        self.fused = fused
        self.fallbacks = 0  # times the lean path handed a call to Trace_ELBO
        self.needs_trace_elbo = False
        self.rng_state: tuple | None = None

    def differentiable_loss(self, model: Callable, guide: Callable, *args, **kwargs):
        lean_possible = not is_validation_enabled() and not (
            self.vectorize_particles and self.max_plate_nesting == math.inf
        )
        if lean_possible and not self.needs_trace_elbo:
            # The first lean call keeps the random state: if the program turns out to need
            # Trace_ELBO, it gets the draws it would have had (seed replays stay exact).
            first = self.rng_state is None
            if first:
                self.rng_state = weights.random_state()
            try:
                return self.lean_loss(model, guide, args, kwargs)
            except NeedsScoreFunction:
                self.fallbacks += 1
                self.needs_trace_elbo = True  # programs have static structure (as for JIT)
                if first:
                    weights.set_random_state(self.rng_state)
        return super().differentiable_loss(model, guide, *args, **kwargs)

    def lean_loss(self, model, guide, args, kwargs, own_params=None) -> torch.Tensor:
        """The loss without traces (``own_params``: ids → tensors, default the constructor's)."""
        own = self.own_params if own_params is None else own_params
        if self.vectorize_particles:
            model = self._vectorized_num_particles(model)
            guide = self._vectorized_num_particles(guide)
            runs = 1
        else:
            runs = self.num_particles
        loss = None
        for _ in range(runs):
            run = weights.neg_elbo_of_run(model, guide, args, kwargs, own, self.fused)
            loss = run if loss is None else loss + run
        return loss if self.num_particles == 1 else loss / self.num_particles


class _PerDatapointELBO(ELBO):
    """Shared plumbing: the ``(K, B)`` weights, and ``loss`` / ``loss_and_grads`` from
    :meth:`differentiable_loss`."""

    name = ""

    def __init__(self, num_particles: int = 1, own_params: Iterable[torch.Tensor] = (),
                 fused: bool = True):  # fmt: skip
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=MAX_PLATE_NESTING,
            vectorize_particles=True,
        )
        self.own_params = {id(p): p for p in own_params}
        self.fused = fused

    def log_weights(self, model, guide, args, kwargs, detach_guide: bool = False):
        try:
            (x,) = args  # the models' programs take the batch alone
            return weights.weighted_draws(
                model, guide, x, self.num_particles, detach_guide=detach_guide,
                fused=self.fused, own_params=self.own_params, require_rsample=True,
            )  # fmt: skip
        except NeedsScoreFunction as site:
            raise ConfigError(
                f"--objective {self.name} differentiates through the draws of the guide, but "
                f"its site {site.args[0]!r} is not reparameterizable; use --objective "
                "tracegraph (score-function gradients with baselines) or trace"
            ) from None

    @staticmethod
    def needs_path_form(drawn: weights.Weights) -> bool:
        """Whether the detached densities of ``drawn`` miss part of the path derivative: with
        several latent sites (a later site's distribution may depend on an earlier site's
        draw, q(z2|z), which detaching each site's distribution would cut), or a site that
        could not be detached (a flow guide)."""
        return len(drawn.values) > 1 or bool(drawn.undetached)

    def path_log_weights(self, model, guide, args, drawn: weights.Weights,
                         gradient_scale: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """The log weights of the draws ``drawn`` whose encoder gradient is the path
        derivative through every latent site (:func:`~ppl_vae.inference.weights.path_log_weights`),
        where :meth:`needs_path_form`."""
        (x,) = args
        return weights.path_log_weights(
            model, guide, x, drawn.values, self.num_particles, gradient_scale,
            fused=self.fused, own_params=self.own_params,
        )  # fmt: skip

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("the weights come from ppl_vae.inference.weights at once")

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

    With several latent sites (a hierarchical guide q(z|x) q(z2|z)) detaching each site's
    distribution would also drop the dependence of log q(z2|z) on z through its parameters,
    which is part of the path derivative (dropping it stays unbiased, but the gradient no
    longer vanishes at the exact posterior); the draws are then scored again with the score
    term cancelled instead (:meth:`path_log_weights`): two more guide runs and one model run.
    So are the draws of a guide whose distribution cannot be rebuilt with detached parameters
    (a normalizing flow, :func:`~ppl_vae.inference.weights.detachable`).

    :param int num_particles: draws of z per datapoint (vectorized).
    """

    name = "stl"

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        drawn = self.log_weights(model, guide, args, kwargs, detach_guide=True)
        if not self.needs_path_form(drawn):
            return -drawn.log_w.mean(0).sum()
        surrogate = self.path_log_weights(model, guide, args, drawn).mean(0).sum()
        value = drawn.log_w.mean(0).sum().detach()
        return -(value + surrogate - surrogate.detach())


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
    gradient, and a hook on the draw z_k multiplies the gradient reaching it by ``w̃_k``.

    Several latent sites (all in the ``"data"`` plate): z is the joint draw (z, z2, ...), its
    reparameterization the guide's program, and ∂ log w/∂z the partial derivative at fixed φ,
    through every dependence on z, the parameters of later sites' distributions included. A
    hook per draw would be wrong for a hierarchical guide q(z|x) q(z2|z): the gradient that
    reaches z from z2's draw would be scaled by w̃ twice, and detaching q(z2|z)'s parameters
    would drop log q(z2|z)'s dependence on z. The draws are then scored again, the gradient of
    log w alone scaled and the score term cancelled (:meth:`path_log_weights`): two more guide
    runs and one model run. ``tests/test_hvae.py`` checks it against the plain IWAE gradient
    and at the exact posterior of a two-layer linear-Gaussian model. A flow guide takes the same
    form (its parameters cannot be detached; ``tests/test_flows_priors.py``).

    :param int num_particles: K, draws of z per datapoint (vectorized).
    :param float alpha: the Rényi order; α = 1 (the ELBO) is excluded, use ``trace``.
    :param bool dreg: use the doubly reparameterized gradient (needs α = 0).
    """

    def __init__(self, num_particles: int = 1, alpha: float = 0.0, dreg: bool = False,
                 own_params: Iterable[torch.Tensor] = (), fused: bool = True):  # fmt: skip
        if alpha == 1:
            raise ConfigError("--objective.alpha must differ from 1 (α = 1 is the ELBO: trace)")
        if dreg and alpha != 0:
            raise ConfigError(f"--objective dreg needs --objective.alpha 0 (got {alpha!r})")
        super().__init__(num_particles, own_params, fused)
        self.alpha = alpha
        self.dreg = dreg
        self.name = "dreg" if dreg else ("iwae" if alpha == 0 else "renyi")

    def bound(self, log_w: torch.Tensor) -> torch.Tensor:
        """The per-datapoint bounds, shape ``(B,)``, from ``(K, B)`` log weights."""
        return log_mean_exp((1 - self.alpha) * log_w, dim=0) / (1 - self.alpha)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        if not self.dreg:
            return -self.bound(self.log_weights(model, guide, args, kwargs).log_w).sum()
        drawn = self.log_weights(model, guide, args, kwargs, detach_guide=True)
        log_w = drawn.log_w
        normalized = torch.softmax(log_w.detach(), dim=0)  # w̃_kb, normalized over k
        value = self.bound(log_w).sum().detach()
        if self.needs_path_form(drawn):
            path = self.path_log_weights(model, guide, args, drawn, normalized)
            surrogate = (normalized * path).sum()
            return -(value + surrogate - surrogate.detach())
        for draw in drawn.values.values():
            if draw.requires_grad:
                extra = (1,) * (draw.dim() - normalized.dim())
                per_draw = normalized.reshape(normalized.shape + extra)
                draw.register_hook(lambda grad, w=per_draw: grad * w)
        surrogate = (normalized * log_w).sum()
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


class MeanField_ELBO(TraceMeanField_ELBO):
    """:class:`~pyro.infer.TraceMeanField_ELBO` (the analytic KL(q ‖ p) of each latent site)
    that refuses, with a :class:`~ppl_vae.errors.ConfigError`, a site whose KL has no closed
    form: a normalizing-flow guide, a mixture prior. Pyro would fall back to the Monte Carlo
    estimate of ``Trace_ELBO`` at that site without a word, and ``--objective meanfield``
    would then not be what it says.

    It also refuses a pair whose latent sites model and guide sample in different orders
    (:func:`same_latent_order`), as a hierarchical guide q(z|x) q(z2|z) under a top-down model
    p(z2) p(z|z2) must: the analytic KL(q(z|x) ‖ p(z|z2)) integrates z out at a z2 that was
    drawn given z, so its expectation is not the KL term of the ELBO. Pyro only warns, and only
    under validation. The same order is Pyro's sufficient condition for mean-field structure;
    a pair that meets the precise one with sites out of order is refused too (use ``trace``).
    """

    def _get_trace(self, model, guide, args, kwargs):
        # Trace_ELBO's traces, checked here: TraceMeanField_ELBO's own check of the order only
        # warns (under validation), before this one could refuse
        model_trace, guide_trace = Trace_ELBO._get_trace(self, model, guide, args, kwargs)
        check_mean_field_order(model_trace, guide_trace)
        return model_trace, guide_trace

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"] or name not in guide_trace:
                continue
            q, p = guide_trace.nodes[name]["fn"], site["fn"]
            if not has_analytic_kl(q, p):
                raise ConfigError(
                    f"--objective meanfield needs KL(q || p) in closed form at every latent "
                    f"site; at {name!r} q is {_shown(q)} and p is {_shown(p)}, which have none; "
                    "use --objective trace (the same ELBO, its KL estimated by Monte Carlo)"
                )
        return super()._differentiable_loss_particle(model_trace, guide_trace)


def _shown(fn) -> str:
    """A distribution's type, with what ``Independent`` wraps: ``Independent(Normal)``."""
    if isinstance(fn, torch.distributions.Independent):
        return f"Independent({_shown(fn.base_dist)})"
    return type(fn).__name__


def _latent_order(trace, other) -> list[str]:
    """The latent sample sites of ``trace`` that ``other`` has too, in ``trace``'s order."""
    return [name for name in weights.latent_nodes(trace) if name in other.nodes]


def same_latent_order(model_trace, guide_trace) -> bool:
    """Whether model and guide sample their shared latent sites in the same order: the
    sufficient condition of :class:`~pyro.infer.TraceMeanField_ELBO` for the mean-field
    structure it assumes (for every latent z of the guide, none of z's parents in the model is
    a descendant of z in the guide). One latent site always meets it."""
    return _latent_order(model_trace, guide_trace) == _latent_order(guide_trace, model_trace)


def check_mean_field_order(model_trace, guide_trace) -> None:
    """Raise :class:`ConfigError` unless :func:`same_latent_order` holds."""
    if not same_latent_order(model_trace, guide_trace):
        model_order = ", ".join(_latent_order(model_trace, guide_trace))
        guide_order = ", ".join(_latent_order(guide_trace, model_trace))
        raise ConfigError(
            f"--objective meanfield (TraceMeanField_ELBO's analytic KL per site) needs a "
            f"mean-field guide, but the model samples its latent sites in the order "
            f"{model_order} and the guide in the order {guide_order} (a hierarchical guide): "
            "the analytic KL at a site would integrate out a variable that the draws of the "
            "others depend on; use --objective trace (the same ELBO, its KL estimated by "
            "Monte Carlo), iwae or dreg"
        )
