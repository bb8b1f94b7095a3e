"""Log importance weights log p(x, z) − log q(z|x): the one implementation.

Every estimator of the library is built on this module: the lean ``Trace_ELBO`` (the weights
of one run, summed over the batch), the importance-weighted and Rényi bounds, STL and DReG (the
per-datum weights of K particles, with the guide's parameters detached for the last two), the
importance-sampled log p(x) of evaluation, and the PSIS k̂, ELBO draws and mixture proposals
of the diagnostics.

How the programs run. The guide runs first and its latent sites are drawn; the model runs
second with those draws replayed into its sites of the same name (as :func:`pyro.poutine.replay`
does). Every sample site's log density is taken after every other handler has acted on it (as
:class:`~pyro.poutine.Trace` records it), scaled and masked exactly as
``Trace.compute_log_prob`` does, and either kept batch-shaped (per datum: ``(K, B)`` under a
particle plate) or summed over every dimension (the ELBO). Sites of both programs count,
observed ones included: a ``pyro.factor`` in the guide counts as part of log q, as in Pyro's
ELBOs. Plates' index sites count for nothing.

Two drivers share the one density function :func:`site_log_density`:

* with Pyro validation on, Pyro's own traces (:func:`pyro.infer.enum.get_importance_trace`):
  every check Pyro makes (model/guide site match, site shapes, supports) runs as it would in
  ``Trace_ELBO``;
* otherwise one small messenger (:class:`_Densities`) that computes the densities while the
  programs run, without trace objects.

Shortcuts, taken only when the call is not inside another Pyro handler (so that an outer
``poutine.scale``, ``condition`` or ``lift`` sees exactly Pyro's semantics):

* ``pyro.module`` registrations of the trained module's own parameters are answered with those
  tensors, without the param store;
* a guide site drawn from a plain reparameterized Normal is drawn here, keeping its noise ε, so
  its log density is taken at the draw (:func:`neg_log_density_at_draw`);

and, with ``fused`` (the fast paths; ``--no-fast`` turns it off), a plain Bernoulli's density
is one fused kernel and a plain Normal's a few ops fewer (:func:`site_log_density`). Each is the
same number as ``Distribution.log_prob`` to float rounding, with the same gradients
(``tests/test_fast_paths.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import is_validation_enabled
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK, Message
from pyro.poutine.subsample_messenger import _Subsample
from torch import distributions as tdist
from torch.distributions import Bernoulli, Independent, Normal, constraints
from torch.nn import functional as F

MAX_PLATE_NESTING = 1
"""Plates of the library's models: one, ``"data"``. Particle plates go to its left."""
PARTICLE_DIM = -(MAX_PLATE_NESTING + 1)

_BERNOULLI_LOG_PROB = Bernoulli.log_prob
_NORMAL_LOG_PROB = Normal.log_prob
_NORMAL_RSAMPLE = Normal.rsample
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def particle_plate(fn: Callable, num_particles: int) -> Callable:
    """``fn`` run inside a vectorized plate ``"particles"`` of ``num_particles`` at
    :data:`PARTICLE_DIM`, to the left of ``"data"``: every site gets its own particle
    dimension, nothing is pooled over the batch."""

    def wrapped(*args, **kwargs):
        with pyro.plate("particles", num_particles, dim=PARTICLE_DIM):
            return fn(*args, **kwargs)

    return wrapped


def latent_nodes(trace) -> dict[str, Message]:
    """The latent sample sites of a Pyro trace by name, in its order: sample sites that are
    neither observed nor a plate's index draw."""
    return {
        name: site for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"]
        and not isinstance(site["fn"], _Subsample)
    }  # fmt: skip


def log_mean_exp(log_w: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """log (1/K) Σ_k exp(log_w_k) along ``dim``, computed stably."""
    return torch.logsumexp(log_w, dim=dim) - math.log(log_w.shape[dim])


# ----------------------------------------------------------------------------- one site's density


def _base(fn):
    """``fn`` without its :class:`~torch.distributions.Independent` wrappers."""
    while isinstance(fn, Independent):
        fn = fn.base_dist
    return fn


def _plain_normal(base) -> bool:
    """A Normal whose ``rsample``/``log_prob`` are torch's own (so the formulas below hold)."""
    return (
        isinstance(base, Normal)
        and type(base).log_prob is _NORMAL_LOG_PROB
        and type(base).rsample is _NORMAL_RSAMPLE
        and not base._validate_args
    )


def _plain_bernoulli(base) -> bool:
    """A Bernoulli whose ``log_prob`` is torch's own (BCE with logits), unvalidated."""
    return (
        isinstance(base, Bernoulli)
        and type(base).log_prob is _BERNOULLI_LOG_PROB
        and not base._validate_args
    )


def detachable(fn: tdist.Distribution) -> bool:
    """Whether :func:`detach_parameters` can rebuild ``fn`` from detached parameters."""
    return isinstance(_base(fn), tdist.Normal | tdist.MultivariateNormal | pyro.distributions.Delta)


def detach_parameters(fn: tdist.Distribution) -> tdist.Distribution:
    """The same distribution with its parameters detached from the autograd graph.

    Evaluating the guide's log density with detached parameters at a reparameterized draw
    keeps the path derivative through z and drops the score term ∇_φ log q_φ(z), whose
    expectation is zero (Roeder et al. 2017). Supports Normal, MultivariateNormal and Delta,
    possibly wrapped in Independent (:func:`detachable`). Other guide distributions (a
    normalizing flow, whose parameters live in its transforms' networks) are not rebuilt: the
    estimators cancel their score term instead (:func:`path_log_weights`).
    """
    if isinstance(fn, tdist.Independent):
        return type(fn)(detach_parameters(fn.base_dist), fn.reinterpreted_batch_ndims)
    if isinstance(fn, tdist.Normal):
        return type(fn)(fn.loc.detach(), fn.scale.detach())
    if isinstance(fn, tdist.MultivariateNormal):
        return type(fn)(fn.loc.detach(), scale_tril=fn.scale_tril.detach())
    if isinstance(fn, pyro.distributions.Delta):
        return type(fn)(fn.v.detach(), fn.log_density.detach(), event_dim=fn.event_dim)
    raise TypeError(f"detach_parameters: {type(fn).__name__} is not detachable")


def reparameterized_normal_draw(fn) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(z, ε)`` with z = loc + ε·scale drawn exactly as ``fn()`` would (same random stream,
    same ops), for a plain (possibly ``to_event``'d) Normal; ``None`` for anything else."""
    base = _base(fn)
    if not _plain_normal(base):
        return None
    loc = base.loc
    eps = torch.empty(base._extended_shape(), dtype=loc.dtype, device=loc.device).normal_()
    return loc + eps * base.scale, eps


def neg_log_density_at_draw(
    fn, eps: torch.Tensor, scale=1.0, per_datum: bool = False
) -> torch.Tensor:
    """−log N(z; loc, scale) at the draw z = loc + ε·scale, as Σ log scale + ½ Σ ε² + n·c,
    summed over every dimension (or, ``per_datum``, over ``fn``'s event dimensions only).

    The same number as ``Normal.log_prob(z)`` summed and negated, up to rounding, and the same
    gradient: ((z − loc)/scale)² depends on the parameters only through z and (loc, scale), and
    its total derivative along the reparameterization is zero, which autograd finds by adding
    terms that cancel; here the quadratic is ε², a constant, and those terms are never computed.
    """
    log_sd, eps_sq = _base(fn).scale.log(), eps.square()
    if per_datum:
        dims, n = tuple(range(-len(fn.event_shape), 0)), math.prod(fn.event_shape)
        if dims:
            log_sd, eps_sq = log_sd.sum(dims), eps_sq.sum(dims)
    else:
        log_sd, eps_sq, n = log_sd.sum(), eps_sq.sum(), eps.numel()
    nlp = log_sd + (0.5 * eps_sq + n * _HALF_LOG_2PI)
    return nlp if scale == 1.0 else nlp * scale


def _fused_density(fn, value, scale, per_datum: bool) -> torch.Tensor | None:
    """A plain Bernoulli's or Normal's density in fewer kernels (None for other
    distributions): per datum its log density, summed its *negative* log density.

    Bernoulli, summed: ``binary_cross_entropy_with_logits(..., reduction="sum")``, the very
    kernel ``Bernoulli.log_prob`` runs, reduced inside it. Bernoulli, per datum: Σ_event
    (x·l − softplus(l)), two reductions instead of BCE's full-size elementwise tensor. Normal,
    summed: ½ Σ ((v − loc)/scale)² + Σ log scale + n·½ log 2π, its constants grouped last so
    that a recorded graph folds them.
    """
    base = _base(fn)
    if _plain_bernoulli(base):
        logits, target = base.logits, value
        if not per_datum:
            if logits.shape != target.shape:
                logits, target = torch.broadcast_tensors(logits, target)
            out = F.binary_cross_entropy_with_logits(logits, target, reduction="sum")
        elif logits.shape == torch.broadcast_shapes(logits.shape, target.shape):
            dims = tuple(range(-len(fn.event_shape), 0))
            if dims:
                out = (target * logits).sum(dims) - F.softplus(logits).sum(dims)
            else:
                out = target * logits - F.softplus(logits)
        else:
            return None
        return out if scale == 1.0 else out * scale
    if not per_datum and _plain_normal(base):
        loc, sd = base.loc, base.scale
        if not value.shape == loc.shape == sd.shape:
            value, loc, sd = torch.broadcast_tensors(value, loc, sd)
        nlp = 0.5 * ((value - loc) / sd).square().sum() + (
            sd.log().sum() + value.numel() * _HALF_LOG_2PI
        )
        return nlp if scale == 1.0 else nlp * scale
    return None


def site_log_density(
    site: Message,
    *,
    per_datum: bool,
    fused: bool = True,
    detach: bool = False,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """The density of one sample site (a message or a trace node), scaled and masked as
    ``Trace.compute_log_prob`` does: with ``per_datum`` its log density, batch-shaped;
    otherwise its *negative* log density summed over every dimension (what a loss adds; the
    fused forms compute that directly).

    :param fused: allow the fused Bernoulli and Normal forms of :func:`_fused_density`.
    :param detach: evaluate a latent site with its distribution's parameters detached (STL).
    :param noise: the ε of a reparameterized Normal draw (:func:`reparameterized_normal_draw`):
        the density is then taken at the draw (:func:`neg_log_density_at_draw`).
    """
    fn, value, scale, mask = site["fn"], site["value"], site["scale"], site["mask"]
    extra = site["args"] or site["kwargs"]
    if detach and not site["is_observed"]:
        fn = detach_parameters(fn)
    elif fused and mask is None and isinstance(scale, int | float) and not extra:
        if noise is not None:
            nlp = neg_log_density_at_draw(fn, noise, scale, per_datum)
            return -nlp if per_datum else nlp
        out = _fused_density(fn, value, scale, per_datum)
        if out is not None:
            return out
    log_p = scale_and_mask(fn.log_prob(value, *site["args"], **site["kwargs"]), scale, mask)
    return log_p if per_datum else -log_p.sum()


# ----------------------------------------------------------------------------- running programs


class NeedsScoreFunction(Exception):
    """A guide site without ``rsample`` (or an enumerated one): estimators that differentiate
    through the draws cannot use it; the lean ELBO hands such programs to ``Trace_ELBO``."""


def _total(terms: list[torch.Tensor]):
    total = None
    for term in terms:
        total = term if total is None else total + term
    return total


class _Densities(Messenger):
    """Runs programs one after the other and collects every sample site's log density.

    A program run with ``draw=True`` (the guide) draws its latent sites and keeps their values
    in :attr:`values`; one run with ``draw=False`` (the model, or a guide scored at another
    guide's draws) replays :attr:`values` into its sites of the same name, as
    ``poutine.replay`` does. Pushed when called, so the program's own handlers (plates,
    ``poutine.scale``) act on a site before this one reads it in post-processing, and outer
    handlers act on it too.
    """

    def __init__(
        self,
        *,
        per_datum: bool,
        fused: bool,
        own_params: dict[int, torch.Tensor] | None = None,
        detach: bool = False,
        require_rsample: bool = False,
    ):
        super().__init__()
        # shortcuts only when nothing else handles the sites (decided before this is pushed)
        self.shortcuts = not _PYRO_STACK
        self.per_datum, self.fused, self.detach = per_datum, fused, detach
        self.own_params = own_params or {}
        self.require_rsample = require_rsample
        self.values: dict[str, torch.Tensor] = {}
        self.noise: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.undetached: list[str] = []  # latent sites whose parameters could not be detached
        self.drawing = False
        self.latent_only = False  # collect the latent sites' densities alone (no observations)
        self.terms: list[torch.Tensor] = []  # the running program's densities, in site order

    def run(self, program: Callable, *args, draw: bool, **kwargs) -> list[torch.Tensor]:
        """Run ``program`` and return its sites' densities (:func:`site_log_density`)."""
        self.drawing, self.terms = draw, []
        program(*args, **kwargs)
        return self.terms

    def _pyro_param(self, msg: Message) -> None:
        # pyro.module(name, net) asks the store for each of net's parameters and keeps using
        # net's own tensor; under the module interface the store's answer changes nothing, so
        # the trained module's own real-valued parameters are returned as they are.
        args = msg["args"]
        if (
            self.shortcuts
            and len(args) > 1
            and self.own_params.get(id(args[1])) is args[1]
            and msg["kwargs"].get("constraint", constraints.real) is constraints.real
        ):
            msg["value"] = args[1]
            msg["done"] = True

    def _pyro_sample(self, msg: Message) -> None:
        if msg["is_observed"] or msg["done"] or msg["value"] is not None:
            return
        if not self.drawing:
            value = self.values.get(msg["name"])
            if value is not None:
                msg["value"] = value
                msg["done"] = True
        elif (
            self.shortcuts
            and self.fused
            and msg["mask"] is None
            and isinstance(msg["scale"], int | float)
            and not (msg["args"] or msg["kwargs"] or msg["infer"].get("enumerate"))
        ):
            draw = reparameterized_normal_draw(msg["fn"])
            if draw is not None:
                msg["value"] = draw[0]
                self.noise[msg["name"]] = draw
                msg["done"] = True

    def _pyro_post_sample(self, msg: Message) -> None:
        fn = msg["fn"]
        if isinstance(fn, _Subsample):  # a plate's index draw: log density 0
            return
        name, drawing = msg["name"], self.drawing
        if drawing and self.require_rsample:
            if msg["infer"].get("enumerate") or not fn.has_rsample:
                raise NeedsScoreFunction(name)
        if self.latent_only and msg["is_observed"]:
            return
        noise = self.noise.pop(name, None) if drawing else None
        if noise is not None and noise[0] is not msg["value"]:
            noise = None  # another handler changed the value after the draw
        detach = self.detach and drawing and not msg["is_observed"]
        if detach and not detachable(fn):
            self.undetached.append(name)
            detach = False
        self.terms.append(
            site_log_density(
                msg,
                per_datum=self.per_datum,
                fused=self.fused,
                detach=detach,
                noise=None if noise is None else noise[1],
            )
        )
        if drawing and not msg["is_observed"]:
            self.values[name] = msg["value"]


def neg_elbo_of_run(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    own_params: dict[int, torch.Tensor] | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """−Σ log w of one run of the guide and the replayed model: the negative Trace_ELBO of one
    particle (all dimensions summed), without trace objects.

    Raises :class:`NeedsScoreFunction` when a guide site has no ``rsample``.
    """
    with _Densities(per_datum=False, fused=fused, own_params=own_params,
                    require_rsample=True) as run:  # fmt: skip
        nlq = _total(run.run(guide, *args, draw=True, **kwargs))  # −Σ log q
        nlp = _total(run.run(model, *args, draw=False, **kwargs))  # −Σ log p
    if nlq is None:
        return nlp if nlp is not None else torch.zeros(())
    return -nlq if nlp is None else nlp - nlq


@dataclass
class Weights:
    """``log_w`` ``(K, B)``: log p(x_b, z_kb) − log q(z_kb|x_b); ``values``: the guide's draws
    by site name (what DReG hooks into); ``undetached``: with ``detach_guide``, the latent
    sites whose densities kept their parameters (not :func:`detachable`)."""

    log_w: torch.Tensor
    values: dict[str, torch.Tensor]
    undetached: tuple[str, ...] = ()


def log_weights(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    num_particles: int = 1,
    *,
    fused: bool = True,
    own_params: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """log p(x, z) − log q(z|x) for ``num_particles`` draws z ~ q(z|x) per datum: a
    ``(num_particles, B)`` tensor, the importance weights of every datum, not pooled over the
    batch (:func:`weighted_draws`)."""
    return weighted_draws(model, guide, x, num_particles, fused=fused, own_params=own_params).log_w


def weighted_draws(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    num_particles: int = 1,
    *,
    detach_guide: bool = False,
    fused: bool = True,
    own_params: dict[int, torch.Tensor] | None = None,
    require_rsample: bool = False,
) -> Weights:
    """``num_particles`` draws z ~ q(z|x) per datum and their log weights, ``(K, B)``.

    The guide and model run once each under a particle plate left of ``"data"``; with Pyro
    validation on, through Pyro's traces and all their checks, otherwise through
    :class:`_Densities` (the same densities; fused ones to float rounding).

    :param detach_guide: the guide's latent densities with detached parameters (STL, DReG)
        where :func:`detachable`, the others named in ``undetached``; values unchanged.
    :param fused: allow the fused density forms (the fast paths).
    :param own_params: ids → tensors whose ``pyro.module`` registrations are answered directly.
    :param require_rsample: raise :class:`NeedsScoreFunction` for a guide site without rsample.
    """
    guide_p, model_p = particle_plate(guide, num_particles), particle_plate(model, num_particles)
    batch = x.shape[0]
    if is_validation_enabled():
        return _traced_log_weights(model_p, guide_p, x, num_particles, detach_guide,
                                   require_rsample)  # fmt: skip
    with _Densities(per_datum=True, fused=fused, own_params=own_params, detach=detach_guide,
                    require_rsample=require_rsample) as run:  # fmt: skip
        guide_terms = run.run(guide_p, x, draw=True)
        model_terms = run.run(model_p, x, draw=False)
    log_w = _combine(model_terms, guide_terms, x, num_particles, batch)
    return Weights(log_w, run.values, tuple(run.undetached))


def _combine(model_terms, guide_terms, x, num_particles: int, batch: int) -> torch.Tensor:
    """Σ model terms − Σ guide terms, as a ``(K, B)`` tensor."""
    log_w = x.new_zeros(num_particles, batch)
    for term in model_terms:
        log_w = log_w + term
    for term in guide_terms:
        log_w = log_w - term
    return log_w


def _traced_log_weights(model_p, guide_p, x, num_particles, detach_guide, require_rsample):
    """:func:`weighted_draws` through Pyro's traces, with Pyro's validation of the pair.

    The traces hold each site's scaled and masked ``log_prob`` (what :func:`site_log_density`
    computes per datum without fusion); only detached guide densities are computed again.
    """
    model_trace, guide_trace = get_importance_trace(
        "flat", MAX_PLATE_NESTING + 1, model_p, guide_p, (x,), {}
    )
    guide_terms, undetached = [], []
    for site in guide_trace.nodes.values():
        if site["type"] != "sample":
            continue
        if require_rsample and (site["infer"].get("enumerate") or not site["fn"].has_rsample):
            raise NeedsScoreFunction(site["name"])
        detach = detach_guide and not site["is_observed"]
        if detach and not detachable(site["fn"]):
            undetached.append(site["name"])
            detach = False
        guide_terms.append(
            site_log_density(site, per_datum=True, detach=True) if detach else site["log_prob"]
        )
    model_terms = [
        site["log_prob"] for site in model_trace.nodes.values() if site["type"] == "sample"
    ]
    values = {name: site["value"] for name, site in latent_nodes(guide_trace).items()}
    log_w = _combine(model_terms, guide_terms, x, num_particles, x.shape[0])
    return Weights(log_w, values, tuple(undetached))


def log_density(
    program: Callable,
    x: torch.Tensor,
    values: dict[str, torch.Tensor],
    num_particles: int,
    draw: bool = False,
    fused: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Σ of ``program``'s site log densities, ``(K, B)``, under a particle plate of
    ``num_particles``, and its latent values: with ``draw``, its own draws; otherwise with
    ``values`` replayed into its sites (a guide scored at another guide's draws, or the model)."""
    with _Densities(per_datum=True, fused=fused) as run:
        run.values = {} if draw else dict(values)
        terms = run.run(particle_plate(program, num_particles), x, draw=draw)
    return _combine(terms, [], x, num_particles, x.shape[0]), run.values


def path_log_weights(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    values: dict[str, torch.Tensor],
    num_particles: int,
    gradient_scale: torch.Tensor | None = None,
    *,
    fused: bool = True,
    own_params: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """log w = log p(x, z) − log q(z|x) at the guide's draws ``values``, ``(K, B)``, whose
    gradient in the guide's parameters φ is the path derivative alone, (∂ log w/∂z)(dz/dφ):
    the score term −∂_φ log q_φ(z) at fixed z (of expectation zero) is left out, and ∂ log w/∂z
    follows *every* dependence on z, the parameters of later guide sites included (z in
    q(z2|z)). Detaching each site's distribution (:func:`detach_parameters`, enough for one
    latent site) would cut that dependence: it is right only for guides whose sites do not
    depend on each other's draws. It also needs nothing of the guide's distributions beyond
    ``log_prob``, so it serves a guide site that cannot be rebuilt with detached parameters (a
    normalizing flow: scoring the replayed draw runs the flow's inverse, one pass per dimension
    of z for IAF, twice).

    Three runs with the draws replayed, sg the stop-gradient::

        log p(x, z̃) − log q_φ(z̃|x) + [log q_φ(sg z|x) − sg(log q_φ(sg z|x))]

    with z̃ = sg z + s·(z − sg z): equal to z, the gradient reaching it multiplied by
    ``gradient_scale`` s (``(K, B)``, default 1). The bracket is zero, its gradient the score
    term of the latent sites, which cancels the second term's; a guide's factors stay in log q
    as they are. Only the gradient of log w at z̃ is scaled, not the one that flows on along
    the draws themselves (z2 = μ(z) + σ(z)·ε back to z, and z to φ), so Σ s·(this) with s the
    normalized weights w̃ has the encoder gradient Σ w̃² (∂ log w/∂z)(dz/dφ) of DReG (Tucker
    et al. 2018) for the joint z = (z, z2, ...), and the decoder gradient Σ w̃ ∇_θ log p(x, z).

    :param values: the guide's draws by site name, ``(K, B, ...)``, differentiable in φ.
    """
    if gradient_scale is None:
        scaled = values
    else:
        scaled = {}
        for name, value in values.items():
            scale = gradient_scale.reshape(
                gradient_scale.shape + (1,) * (value.dim() - gradient_scale.dim())
            )
            fixed = value.detach()
            scaled[name] = fixed + scale * (value - fixed)
    guide_p, model_p = particle_plate(guide, num_particles), particle_plate(model, num_particles)
    with _Densities(per_datum=True, fused=fused, own_params=own_params) as run:
        run.values = dict(scaled)
        guide_terms = run.run(guide_p, x, draw=False)
        model_terms = run.run(model_p, x, draw=False)
        run.values = {name: value.detach() for name, value in values.items()}
        run.latent_only = True
        score_terms = run.run(guide_p, x, draw=False)
    batch = x.shape[0]
    score = _combine(score_terms, [], x, num_particles, batch)
    return _combine(model_terms, guide_terms, x, num_particles, batch) + (score - score.detach())


def program_parameters(program: Callable, *args, **kwargs) -> list[torch.Tensor]:
    """The tensors ``program`` registers with ``pyro.module`` / ``pyro.param`` (as handed to
    those calls, not the param store's copies), in order, each once; the program runs once
    without gradients and without touching the store."""
    seen: dict[int, torch.Tensor] = {}

    class _Collect(Messenger):
        def _pyro_param(self, msg: Message) -> None:
            args = msg["args"]
            if len(args) > 1 and isinstance(args[1], torch.Tensor):
                seen.setdefault(id(args[1]), args[1])
                msg["value"], msg["done"] = args[1], True

    with torch.no_grad(), _Collect(), pyro.validation_enabled(False):
        program(*args, **kwargs)
    return list(seen.values())


def random_state() -> tuple:
    """torch's CPU (and, once initialized, CUDA) random states."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def set_random_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
