"""Fast paths for SVI training and evaluation, equal in value to Pyro's plain paths (issue 7).

All of them run the same ``model(x)`` / ``guide(x)`` pair; ``tests/test_fast_paths.py`` replays
one seed through each and the plain path and checks losses, gradients and weights agree.

* :class:`LeanTrace_ELBO` is :class:`~pyro.infer.Trace_ELBO` with a cheaper
  ``differentiable_loss`` for fully reparameterized guides. Instead of recording two
  :class:`~pyro.poutine.Trace` objects, pruning them and looping over their sites, one small
  messenger runs the guide, replays its draws into the model and accumulates
  Σ_model log p − Σ_guide log q (scaled and masked exactly as Pyro does) as it goes, with
  fused density sums (:func:`neg_log_prob_sum`). It has no host synchronizations (``Trace_ELBO``
  reads every site's log-density back with ``.item()``) and it answers ``pyro.module``
  registrations of the model's own parameters without the param store. Whenever Pyro
  validation is on, or the guide has a site that needs a score function or enumeration, it
  *is* ``Trace_ELBO``: same checks, same estimator.
* :class:`TrainStep` is the one training step :func:`ppl_vae.train.fit` runs (and the
  benchmarks time): loss, backward of the batch mean, optimizer step, cleared gradients. Its
  first call runs with Pyro validation on, so the full ``Trace_ELBO`` checks (model/guide site
  match, distribution arguments, observation support, plate shapes, NaN warnings) see the real
  data and networks; later calls switch validation off, because they would repeat the same
  checks on the same program. What can still change between steps, a loss that becomes NaN
  or infinite, is checked on the summed loss that ``fit`` reads back once per epoch
  (:meth:`TrainStep.check_finite`). ``validate="always"`` keeps every step validated.
* :class:`CapturedELBO` (what ``fit`` trains with, for models that allow it; turned off by
  ``--no-train.capture``) records the lean loss once per input shape as a straight-line graph
  of tensor ops, simplified by exact rewrites (:func:`simplify_graph`), and replays it while
  the model's plain Python state holds still.
* The lean loss takes the log-density of a guide's reparameterized Normal draw at the draw
  (:func:`neg_log_density_at_draw`): Σ log σ + ½ Σ ε², without recomputing (z − μ)/σ.
* :func:`log_weights` is :func:`ppl_vae.objectives.log_weights` (per-datum importance
  weights) without traces and with fused per-datum densities, for the importance-sampled
  log p(x) of :mod:`ppl_vae.evaluate`, which replays it recorded (:class:`CapturedLogWeights`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Literal

import pyro
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import Trace_ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import Message
from pyro.poutine.subsample_messenger import _Subsample
from torch.distributions import Bernoulli, Independent, Normal, constraints
from torch.nn import functional as F

_BERNOULLI_LOG_PROB = Bernoulli.log_prob
_NORMAL_LOG_PROB = Normal.log_prob
_NORMAL_RSAMPLE = Normal.rsample
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
FUSED_LOG_PROBS = True  # False: every site through fn.log_prob (benchmark ablations only)


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


def neg_log_prob_sum(fn, value: torch.Tensor, scale=1.0, mask=None) -> torch.Tensor:
    """−Σ scale_and_mask(fn.log_prob(value), scale, mask) over every dimension.

    For a (possibly ``to_event``'d) :class:`~torch.distributions.Bernoulli` under a scalar
    scale and no mask, this is ``binary_cross_entropy_with_logits(..., reduction="sum")``:
    the very kernel ``Bernoulli.log_prob`` runs, reduced inside the kernel instead of through
    an elementwise tensor, a negation and two sums (forward and backward). For a Normal it is
    ½ Σ ((v − loc)/scale)² + Σ log scale + n·½ log 2π, four fewer tensor ops than
    ``Normal.log_prob`` followed by sums. Anything else goes through ``fn.log_prob``.
    """
    if FUSED_LOG_PROBS and mask is None and isinstance(scale, int | float):
        base = _base(fn)
        if _plain_bernoulli(base):
            logits, target = base.logits, value
            if logits.shape != target.shape:
                logits, target = torch.broadcast_tensors(logits, target)
            nlp = F.binary_cross_entropy_with_logits(logits, target, reduction="sum")
            return nlp if scale == 1.0 else nlp * scale
        if _plain_normal(base):
            loc, sd = base.loc, base.scale
            if not value.shape == loc.shape == sd.shape:
                value, loc, sd = torch.broadcast_tensors(value, loc, sd)
            # constants grouped last, so a recorded graph can fold them (CapturedELBO)
            nlp = 0.5 * ((value - loc) / sd).square().sum() + (
                sd.log().sum() + value.numel() * _HALF_LOG_2PI
            )
            return nlp if scale == 1.0 else nlp * scale
    return -scale_and_mask(fn.log_prob(value), scale, mask).sum()


def reparameterized_normal_draw(fn) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(z, ε)`` with z = loc + ε·scale drawn exactly as ``fn()`` would (same random stream,
    same ops), for a plain (possibly ``to_event``'d) Normal; ``None`` for anything else."""
    base = _base(fn)
    if not (FUSED_LOG_PROBS and _plain_normal(base)):
        return None
    loc = base.loc
    eps = torch.empty(base._extended_shape(), dtype=loc.dtype, device=loc.device).normal_()
    return loc + eps * base.scale, eps


def neg_log_density_at_draw(
    fn, eps: torch.Tensor, scale=1.0, per_datum: bool = False
) -> torch.Tensor:
    """−Σ log N(z; loc, scale) at the draw z = loc + ε·scale, as Σ log scale + ½ Σ ε² + n·c,
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


class NeedsTraceELBO(Exception):
    """Raised inside a lean run when a site needs what only the full ``Trace_ELBO`` does."""


class _GuideThenModel(Messenger):
    """Accumulates −(log p(x, z) − log q(z|x)) over one guide run and one replayed model run.

    Used as the outermost handler, so every inner handler (plates, ``poutine.scale``,
    ``poutine.mask``, blocks) has acted on a site before it is seen here, as with
    ``poutine.trace``. The guide runs first (``in_model`` False), then the model.
    A guide site drawn from a plain Normal is drawn here, keeping its noise ε, so that its
    log-density is taken at the draw (:func:`neg_log_density_at_draw`).
    """

    def __init__(self, own_params: dict[int, torch.Tensor]):
        super().__init__()
        self.own_params = own_params
        self.guide_values: dict[str, torch.Tensor] = {}
        self.noise: dict[str, torch.Tensor] = {}
        self.in_model = False
        self.model_nlp: torch.Tensor | None = None  # −Σ log p over the model's sites
        self.guide_nlp: torch.Tensor | None = None  # −Σ log q over the guide's sites

    @property
    def loss(self) -> torch.Tensor:
        """−ELBO = −log p(x, z) + log q(z|x) of this run."""
        if self.guide_nlp is None:
            return self.model_nlp if self.model_nlp is not None else torch.zeros(())
        if self.model_nlp is None:
            return -self.guide_nlp
        return self.model_nlp - self.guide_nlp

    def _pyro_param(self, msg: Message) -> None:
        # pyro.module(name, net) asks the store for each of net's parameters and keeps using
        # net's own tensor; under the module interface the store's answer changes nothing, so
        # the model's own real-valued parameters are returned as they are.
        args = msg["args"]
        if (
            len(args) > 1
            and self.own_params.get(id(args[1])) is args[1]
            and msg["kwargs"].get("constraint", constraints.real) is constraints.real
        ):
            msg["value"] = args[1]
            msg["done"] = True

    def _pyro_sample(self, msg: Message) -> None:
        if msg["is_observed"] or msg["done"] or msg["value"] is not None:
            return
        if self.in_model:
            value = self.guide_values.get(msg["name"])
            if value is not None:  # replay the guide's draw, as poutine.replay does
                msg["value"] = value
                msg["done"] = True
        elif (
            msg["mask"] is None
            and isinstance(msg["scale"], int | float)
            and not (msg["args"] or msg["kwargs"] or msg["infer"].get("enumerate"))
        ):
            draw = reparameterized_normal_draw(msg["fn"])
            if draw is not None:
                msg["value"], self.noise[msg["name"]] = draw
                msg["done"] = True

    def _pyro_post_sample(self, msg: Message) -> None:
        fn = msg["fn"]
        if isinstance(fn, _Subsample):  # a plate's index draw, pruned by Trace_ELBO too
            return
        if msg["infer"].get("enumerate") or not (self.in_model or fn.has_rsample):
            raise NeedsTraceELBO(msg["name"])
        if not self.in_model and not msg["is_observed"]:
            self.guide_values[msg["name"]] = msg["value"]
        eps = None if self.in_model else self.noise.get(msg["name"])
        if eps is not None:
            nlp = neg_log_density_at_draw(fn, eps, msg["scale"])
        elif msg["args"] or msg["kwargs"]:
            log_p = fn.log_prob(msg["value"], *msg["args"], **msg["kwargs"])
            nlp = -scale_and_mask(log_p, msg["scale"], msg["mask"]).sum()
        else:
            nlp = neg_log_prob_sum(fn, msg["value"], msg["scale"], msg["mask"])
        if self.in_model:
            self.model_nlp = nlp if self.model_nlp is None else self.model_nlp + nlp
        else:
            self.guide_nlp = nlp if self.guide_nlp is None else self.guide_nlp + nlp


def _random_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_random_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class LeanTrace_ELBO(Trace_ELBO):
    """``Trace_ELBO`` whose differentiable loss skips trace bookkeeping when it may.

    For a guide whose latent sites are all reparameterized, Trace_ELBO's loss is
    −(Σ_model log p − Σ_guide log q), each site's log-density scaled and masked and summed over
    every dimension, averaged over particles; this class computes that sum while the programs
    run. With validation enabled, with ``max_plate_nesting`` unknown under vectorized
    particles, or once a site has needed a score function or enumeration, it defers to
    ``Trace_ELBO`` (all its checks included). ``loss`` and ``loss_and_grads`` (used by
    :class:`pyro.infer.SVI`) are Trace_ELBO's own.

    :param own_params: the parameters of the module(s) being trained; ``pyro.module``
        registrations of exactly these tensors are answered without the param store.
    """

    def __init__(self, *args, own_params: Iterable[torch.Tensor] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.own_params = {id(p): p for p in own_params}
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
                self.rng_state = _random_state()
            try:
                return self._lean_loss(model, guide, args, kwargs)
            except NeedsTraceELBO:
                self.fallbacks += 1
                self.needs_trace_elbo = True  # programs have static structure (as for JIT)
                if first:
                    _set_random_state(self.rng_state)
        return super().differentiable_loss(model, guide, *args, **kwargs)

    def _lean_loss(self, model, guide, args, kwargs, own_params=None) -> torch.Tensor:
        if self.vectorize_particles:
            model = self._vectorized_num_particles(model)
            guide = self._vectorized_num_particles(guide)
            runs = 1
        else:
            runs = self.num_particles
        loss = None
        for _ in range(runs):
            with _GuideThenModel(self.own_params if own_params is None else own_params) as handler:
                guide(*args, **kwargs)
                handler.in_model = True
                model(*args, **kwargs)
            loss = handler.loss if loss is None else loss + handler.loss
        return loss if self.num_particles == 1 else loss / self.num_particles


def log_prob_event_sum(fn, value: torch.Tensor) -> torch.Tensor:
    """``fn.log_prob(value)``: the log-density summed over the event dimensions, batch-shaped.

    For a plain (possibly ``to_event``'d) Bernoulli with logits l it is Σ_event (x·l −
    softplus(l)): two reductions instead of ``binary_cross_entropy_with_logits``' elementwise
    tensor of the full shape (about six passes over it, the expanded x materialized) and its
    negation; equal to float rounding.
    """
    base = _base(fn)
    if (
        FUSED_LOG_PROBS
        and _plain_bernoulli(base)
        and base.logits.shape == torch.broadcast_shapes(base.logits.shape, value.shape)
    ):
        dims = tuple(range(-len(fn.event_shape), 0))
        logits = base.logits
        if not dims:
            return value * logits - F.softplus(logits)
        return (value * logits).sum(dims) - F.softplus(logits).sum(dims)
    return fn.log_prob(value)


class _LogWeights(_GuideThenModel):
    """Like :class:`_GuideThenModel`, but keeps each site's batch-shaped log-density: a
    guide's reparameterized Normal at its draw, −Σ log σ − ½ Σ ε² − n·c over the event; a
    Bernoulli through :func:`log_prob_event_sum`; anything else through ``fn.log_prob``; then
    ``scale_and_mask`` as ``Trace.compute_log_prob`` does."""

    def __init__(self, own_params: dict[int, torch.Tensor]):
        super().__init__(own_params)
        self.model_terms: list[torch.Tensor] = []
        self.guide_terms: list[torch.Tensor] = []

    def _pyro_post_sample(self, msg: Message) -> None:
        fn = msg["fn"]
        if isinstance(fn, _Subsample):  # a plate's index draw: log-density 0
            return
        eps = None if self.in_model else self.noise.get(msg["name"])
        if eps is not None:
            log_p = -neg_log_density_at_draw(fn, eps, per_datum=True)
        elif msg["args"] or msg["kwargs"]:
            log_p = fn.log_prob(msg["value"], *msg["args"], **msg["kwargs"])
        else:
            log_p = log_prob_event_sum(fn, msg["value"])
        log_p = scale_and_mask(log_p, msg["scale"], msg["mask"])
        if self.in_model:
            self.model_terms.append(log_p)
        elif not msg["is_observed"]:
            self.guide_terms.append(log_p)
            self.guide_values[msg["name"]] = msg["value"]


def log_weights(
    model_fn: Callable,
    guide_fn: Callable,
    x: torch.Tensor,
    num_particles: int,
    plate_dim: int,
    own_params: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """:func:`ppl_vae.objectives.log_weights` without traces: a ``(num_particles, B)`` tensor.

    log p(x, z) − log q(z|x) for ``num_particles`` draws z ~ q(z|x) per datapoint, the guide
    and model run once each under a particle plate at ``plate_dim`` (left of ``"data"``), with
    Pyro validation off; the draws consume the random stream exactly as the traced version's,
    and the densities are those of :class:`_LogWeights` (equal to the traced ones to float
    rounding, with fewer passes over the likelihood's full-size tensors).
    ``own_params`` (ids → tensors) answers those tensors' ``pyro.module`` registrations
    without the param store, as :class:`LeanTrace_ELBO` does.
    """

    def particles(fn: Callable) -> Callable:
        def wrapped(*args):
            with pyro.plate("particles", num_particles, dim=plate_dim):
                return fn(*args)

        return wrapped

    with pyro.validation_enabled(False), _LogWeights(own_params or {}) as handler:
        particles(guide_fn)(x)
        handler.in_model = True
        particles(model_fn)(x)
    log_w = x.new_zeros(num_particles, x.shape[0])
    for term in handler.model_terms:  # the traced version's order: model sites, then guide's
        log_w = log_w + term
    for term in handler.guide_terms:
        log_w = log_w - term
    return log_w


_PLAIN = (bool, int, float, str)


class _Program(torch.nn.Module):
    """``forward(x, values, *static)``: ``fn(x, own, *static)`` where ``own`` maps the ids of
    ``values`` (the tensors standing for ``model``'s parameters while a graph is recorded) to
    themselves, so that ``pyro.module`` registrations are answered with them."""

    def __init__(self, model: torch.nn.Module, fn: Callable):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, x: torch.Tensor, values: list[torch.Tensor], *static) -> torch.Tensor:
        return self.fn(x, {id(v): v for v in values}, *static)


class _Watched:
    """What a recorded graph of ``model`` depends on besides its input, read cheaply per call.

    :meth:`state` is every plain Python value held by the modules that were there when this was
    made, with the sizes of their attribute, parameter, buffer and submodule dicts (so an added
    or removed entry changes it too); :meth:`current` says whether each parameter and buffer is
    still the tensor it was. Building it walks the module tree once; the per-call checks do not.
    """

    def __init__(self, model: torch.nn.Module):
        modules = [module for _, module in model.named_modules()]
        self.plain = [
            (module.__dict__, name)
            for module in modules
            for name, value in module.__dict__.items()
            if type(value) in _PLAIN
        ]
        self.dicts = [
            d
            for module in modules
            for d in (module.__dict__, module._parameters, module._buffers, module._modules)
        ]
        self.names: list[str] = []
        self.tensors: list[torch.Tensor] = []
        self.slots: list[tuple[dict, str, torch.Tensor]] = []
        for prefix, module in model.named_modules():
            for kind in ("_parameters", "_buffers"):
                for name, tensor in getattr(module, kind).items():
                    if tensor is not None:
                        self.names.append(f"{prefix}.{name}" if prefix else name)
                        self.tensors.append(tensor)
                        self.slots.append((getattr(module, kind), name, tensor))
        self.names_key = tuple(self.names)

    def state(self) -> tuple | None:
        """The plain values and dict sizes; None once a watched value is gone or not plain."""
        try:
            values = tuple([d[name] for d, name in self.plain])
        except KeyError:
            return None
        if not all(type(value) in _PLAIN for value in values):
            return None
        return values, tuple([len(d) for d in self.dicts])

    def current(self) -> bool:
        return all(owner.get(name) is tensor for owner, name, tensor in self.slots)


class Recorded(torch.nn.Module):
    """A function of ``(x, *static)`` over ``model``'s programs, recorded once per key as a
    straight-line graph of tensor ops and replayed (see :class:`CapturedELBO`).

    Subclasses give :meth:`program` (what is recorded; it answers ``pyro.module``
    registrations from the tensors it is handed) and :meth:`direct` (what runs unrecorded:
    with Pyro validation on, for a new key, or when recording failed). ``static`` are plain
    Python arguments; they are part of the key.
    """

    what = "the function"
    # With Pyro validation on, run unrecorded (a function that validates must see it happen);
    # false for functions that switch validation off themselves.
    direct_when_validating = True

    def __init__(self, model: torch.nn.Module, simplify: bool = True):
        super().__init__()
        self.simplify = simplify
        self.replays = 0  # calls answered by a recorded graph
        self.target = [model]  # a list, so the model is not registered as a submodule twice
        self.graphs: dict[tuple, Callable] = {}
        self.unrecordable: str | None = None  # why recording failed; then direct() runs
        self.last_key: tuple | None = None
        self.max_graphs = 8
        self.watched: _Watched | None = None

    def program(self, x: torch.Tensor, own: dict[int, torch.Tensor], *static) -> torch.Tensor:
        raise NotImplementedError

    def direct(self, x: torch.Tensor, *static) -> torch.Tensor:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the recorded graphs (the next call records afresh)."""
        self.graphs.clear()
        self.watched = None
        self.unrecordable = None

    def forward(self, x: torch.Tensor, *static) -> torch.Tensor:
        if self.unrecordable is not None or (
            self.direct_when_validating and is_validation_enabled()
        ):
            return self.direct(x, *static)
        (model,) = self.target
        watched = self.watched
        state = None if watched is None or not watched.current() else watched.state()
        if state is None:  # first call, or the model's tensors or attributes changed
            watched = self.watched = _Watched(model)
            state = watched.state()
        key = (tuple(x.shape), x.dtype, x.device, static, watched.names_key, state)
        graph = self.graphs.get(key)
        if graph is None:
            if key != self.last_key:  # new or changing state: unrecorded until it holds still
                self.last_key = key
                return self.direct(x, *static)
            if len(self.graphs) >= self.max_graphs:
                self.graphs.clear()
            graph = self._record(model, watched, x, static)
            if graph is None:
                return self.direct(x, *static)
            self.graphs[key] = graph
        self.last_key = key
        self.replays += 1
        return graph.forward(watched.tensors, x)

    def _record(self, model, watched: _Watched, x, static) -> Callable | None:
        """The recorded graph, or None (with a warning) when the programs cannot be recorded.

        Recording runs the function once for real; the random state and the buffers are put
        back afterwards, so that the first replay draws and updates as an unrecorded call.
        """
        from torch.fx.experimental.proxy_tensor import make_fx

        holder = _Program(model, self.program)
        names = watched.names

        def run(values: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            # functional_call puts the graph's inputs in place of the model's tensors while the
            # programs run (they read them from the model), then puts the tensors back.
            swapped = {f"model.{name}": value for name, value in zip(names, values, strict=True)}
            return torch.func.functional_call(holder, swapped, (x, values, *static))

        state = _random_state()
        buffers = [(b, b.detach().clone()) for b in model.buffers()]
        try:
            graph = make_fx(run)(list(watched.tensors), x)
        except Exception as err:  # e.g. Python that reads tensor values (bool(tensor))
            # The direct path runs the same code unrecorded, so a genuine error still surfaces.
            self.unrecordable = f"{type(err).__name__}: {str(err).splitlines()[0]}"
            warnings.warn(
                f"{self.what} cannot be recorded ({self.unrecordable});"
                " running it unrecorded instead",
                stacklevel=4,
            )
            return None
        finally:
            _set_random_state(state)
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
        # Drop what nothing reads (a plate's index tensor, unused constants). In-place ops,
        # the random draws among them (empty + normal_), count as side effects and stay.
        graph.graph.eliminate_dead_code()
        if self.simplify:
            simplify_graph(graph)
        else:
            graph.recompile()
        return graph


class CapturedELBO(Recorded):
    """A :class:`LeanTrace_ELBO` loss recorded once as a straight-line graph of tensor ops.

    The first call for an input shape (and dtype, device, train/eval mode) runs the lean loss
    under :func:`torch.fx.experimental.proxy_tensor.make_fx`, with the model's parameters and
    buffers as graph inputs; every later call replays that graph: the same tensor operations,
    random draws included (``normal_`` nodes draw afresh each call, from the same stream), with
    none of the Pyro, distribution or module Python around them. Gradients flow to the
    parameters as usual. With Pyro validation on it is the wrapped loss (Trace_ELBO's checks).

    :func:`ppl_vae.train.fit` uses it (through :func:`capture`) for models that declare
    ``capturable`` (``--no-train.capture`` turns it off). The graph freezes whatever Python
    decides while the programs run, as Pyro's ``JitTrace_ELBO`` does. The plain Python values held
    by the model and its submodules (a KL weight set by a schedule, ``training``) are part of
    the graph's key (:class:`_Watched`): a call whose key differs from the previous call's
    runs the lean loss, and a graph is recorded only once a key repeats, so a weight that
    changes every step trains lean (and exact) until it settles. State the key cannot see,
    globals, closures, values inside tensors, is replayed stale: call :meth:`reset` after
    changing it (models whose programs read tensor values in Python set ``capturable`` false).
    Recorded graphs are simplified with exact rewrites (:func:`simplify_graph`).
    Programs that branch on tensor values (a VQ-VAE's training-time bookkeeping) cannot be
    recorded at all: then it warns once and computes the lean loss instead.

    :param loss_fn: ``LeanTrace_ELBO()(model.model, model.guide)``.
    :param model: the module whose parameters and buffers the programs use.
    :param simplify: apply :func:`simplify_graph` to recorded graphs (tests compare both).
    """

    what = "the training loss"

    def __init__(self, loss_fn: torch.nn.Module, model: torch.nn.Module, simplify: bool = True):
        super().__init__(model, simplify)
        self.loss_fn = loss_fn

    def program(self, x: torch.Tensor, own: dict[int, torch.Tensor]) -> torch.Tensor:
        loss_fn = self.loss_fn
        return loss_fn.elbo._lean_loss(loss_fn.model, loss_fn.guide, (x,), {}, own_params=own)

    def direct(self, x: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(x)


class CapturedLogWeights(Recorded):
    """:func:`log_weights` of ``model`` recorded per (batch shape, number of particles) and
    replayed: the importance weights of :func:`ppl_vae.evaluate.log_likelihood`, bit for bit
    the same, without Pyro's Python at every chunk of particles.

    Call as ``weights(x, num_particles, plate_dim)``.
    """

    what = "the importance weights"
    direct_when_validating = False  # log_weights runs with validation off in any case

    def program(self, x, own, num_particles: int, plate_dim: int) -> torch.Tensor:
        (model,) = self.target
        return log_weights(model.model, model.guide, x, num_particles, plate_dim, own)

    def direct(self, x: torch.Tensor, num_particles: int, plate_dim: int) -> torch.Tensor:
        (model,) = self.target
        own = {id(p): p for p in own_parameters(model)}
        return log_weights(model.model, model.guide, x, num_particles, plate_dim, own)


_aten = torch.ops.aten
# Pure functions of their inputs whose results a recorded graph may compute once, when every
# input is a constant of the graph (a prior's zeros and ones, their logs and sums).
_FOLDABLE = {
    _aten.zeros.default,
    _aten.ones.default,
    _aten.full.default,
    _aten.scalar_tensor.default,
    _aten.lift_fresh_copy.default,
    _aten.expand.default,
    _aten.log.default,
    _aten.sum.default,
    _aten.neg.default,
    _aten.add.Tensor,
    _aten.sub.Tensor,
    _aten.mul.Tensor,
    _aten.div.Tensor,
    _aten.pow.Tensor_Scalar,
}
# x.new_zeros(size) reads only x's dtype and device, which are part of a graph's key.
_NEW_CONSTANT = {_aten.new_zeros.default: torch.zeros, _aten.new_ones.default: torch.ones}


def _meta(node):
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _identity_input(node, constants: dict) -> torch.fx.Node | None:
    """The input that ``node`` returns unchanged, bit for bit: x − 0, x / 1, x · 1, or an
    ``expand`` to x's own shape; None otherwise (or when shapes and dtypes could differ)."""
    out = _meta(node)
    if out is None or node.kwargs:
        return None

    def same(arg) -> bool:
        a = _meta(arg)
        return a is not None and a.shape == out.shape and a.dtype == out.dtype

    def all_equal(arg, value: float) -> bool:
        c = constants.get(arg)
        return c is not None and bool((c == value).all())

    args = node.args
    if node.target is _aten.expand.default and len(args) == 2 and same(args[0]):
        return args[0]
    if node.target is _aten.sub.Tensor and len(args) == 2 and all_equal(args[1], 0.0):
        return args[0] if same(args[0]) else None
    if node.target is _aten.div.Tensor and all_equal(args[1], 1.0):
        return args[0] if same(args[0]) else None
    if node.target is _aten.mul.Tensor:
        for keep, one in ((args[0], args[1]), (args[1], args[0])):
            if all_equal(one, 1.0) and same(keep):
                return keep
    return None


def _only_fresh_tensors_mutated(graph: torch.fx.Graph) -> bool:
    """Whether every in-place op of ``graph`` writes into a tensor the graph has just allocated
    (``empty`` then ``normal_``, as random draws record), so no constant is ever written."""
    for node in graph.nodes:
        target = node.target
        if node.op == "call_function" and isinstance(target, torch._ops.OpOverload):
            if target._schema.is_mutable:
                first = node.args[0] if node.args else None
                if not (
                    isinstance(first, torch.fx.Node)
                    and isinstance(first.target, torch._ops.OpOverload)
                    and first.target._schema.name in ("aten::empty", "aten::empty_like")
                    and len(first.users) == 1
                ):
                    return False
    return True


def _fuse_linear(graph: torch.fx.Graph) -> None:
    """``addmm(b, x, t(W))`` → ``linear(x, W, b)``: one call instead of two; for a 2-D input
    ``linear`` is that very ``addmm`` of ``t(W)`` (same kernels, same autograd nodes)."""
    for node in list(graph.nodes):
        if node.target is not _aten.addmm.default or node.kwargs or len(node.args) != 3:
            continue
        bias, x, t = node.args
        if not (isinstance(t, torch.fx.Node) and t.target is _aten.t.default):
            continue
        weight = t.args[0]
        if not (_meta(x) is not None and _meta(x).dim() == 2 and _meta(weight) is not None):
            continue
        if _meta(weight).dim() != 2 or _meta(bias) is None or _meta(bias).dim() != 1:
            continue
        with graph.inserting_before(node):
            fused = graph.call_function(_aten.linear.default, (x, weight, bias))
        fused.meta = dict(node.meta)
        node.replace_all_uses_with(fused)
        graph.erase_node(node)


def simplify_graph(graph_module: torch.fx.GraphModule) -> None:
    """Exact rewrites of a recorded loss graph, in place (none at all when the graph writes
    in place into anything but a tensor it has just allocated: a folded constant must stay put).

    * Constant folding: a node of :data:`_FOLDABLE` whose inputs are all constants of the graph
      (not inputs, not random draws) is computed once, here,
      and becomes a buffer of the graph (a standard Normal prior's ``new_zeros``, ``new_ones``,
      ``expand``s, Σ log 1, ...).
    * Identities: x − 0, x / 1, x · 1 with a folded constant, and ``expand`` to the same shape
      become x. These return x's own values in IEEE arithmetic (and pass gradients unchanged),
      so the rewritten graph computes the same bits with fewer operations.
    * ``addmm(b, x, t(W))`` becomes ``linear(x, W, b)`` (:func:`_fuse_linear`), which runs
      exactly those two ops below Python.
    """
    graph = graph_module.graph
    if not _only_fresh_tensors_mutated(graph):
        graph_module.recompile()  # a folded constant could be changed in place: no rewrites
        return
    constants: dict[torch.fx.Node, torch.Tensor] = {}

    def is_constant(arg) -> bool:
        if isinstance(arg, torch.fx.Node):
            return arg in constants
        if isinstance(arg, list | tuple):
            return all(is_constant(a) for a in arg)
        return not isinstance(arg, torch.Tensor)

    def value(arg):
        if isinstance(arg, torch.fx.Node):
            return constants[arg]
        if isinstance(arg, list | tuple):
            return type(arg)(value(a) for a in arg)
        return arg

    for node in list(graph.nodes):
        if node.op == "get_attr":
            attr = getattr(graph_module, node.target, None)
            if isinstance(attr, torch.Tensor) and not attr.requires_grad:
                constants[node] = attr  # nothing writes into it (checked above)
            continue
        if node.op != "call_function":
            continue
        replacement = _identity_input(node, constants)
        if replacement is not None:
            node.replace_all_uses_with(replacement)
            continue
        like = _meta(node.args[0]) if node.args else None
        if (
            node.target in _NEW_CONSTANT
            and like is not None
            and len(node.args) == 2
            and is_constant(node.args[1])
            and set(node.kwargs) <= {"dtype", "device", "pin_memory", "layout"}
            and node.kwargs.get("layout") in (None, torch.strided)
        ):
            constants[node] = _NEW_CONSTANT[node.target](
                value(node.args[1]),
                dtype=node.kwargs.get("dtype") or like.dtype,
                device=node.kwargs.get("device") or like.device,
            )
        elif (
            node.target in _FOLDABLE
            and is_constant(node.args)
            and is_constant(tuple(node.kwargs.values()))
        ):
            constants[node] = node.target(*value(node.args), **value(node.kwargs)).detach()
    _fuse_linear(graph)
    graph.eliminate_dead_code()
    folded = 0
    for node, tensor in constants.items():
        if node.op == "call_function" and any(u not in constants for u in node.users):
            name = f"_folded_{folded}"
            folded += 1
            graph_module.register_buffer(name, tensor, persistent=False)
            with graph.inserting_before(node):
                attr = graph.get_attr(name)
            attr.meta = dict(node.meta)
            node.replace_all_uses_with(attr)
    graph.eliminate_dead_code()
    graph_module.recompile()


def capture(loss_fn: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
    """``loss_fn`` as a :class:`CapturedELBO` when it is a :class:`LeanTrace_ELBO` loss and
    ``model`` is ``capturable``; otherwise ``loss_fn`` itself (other objectives, VQ-VAE)."""
    if getattr(model, "capturable", False) and isinstance(
        getattr(loss_fn, "elbo", None), LeanTrace_ELBO
    ):
        return CapturedELBO(loss_fn, model)
    return loss_fn


class TrainStep:
    """One SVI step of ``fit``: −ELBO, backward of its batch mean, optimizer step, zero grads.

    :param loss_fn: the ELBO in module form, ``elbo(model.model, model.guide)``.
    :param optimizer: a torch optimizer over the model's parameters.
    :param validate: ``"first"`` (default) validates the first call only; ``"always"``
        validates every call (Pyro's default behaviour, the plain path). Nothing is validated
        while Pyro validation is switched off globally.
    """

    def __init__(
        self,
        loss_fn: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        validate: Literal["first", "always"] = "first",
    ):
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.validate = validate
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Take one step on the batch ``x``; returns the detached −ELBO summed over the batch."""
        if is_validation_enabled() and self.validate == "always":
            loss = self.loss_fn(x)
        else:
            if is_validation_enabled() and self.calls == 0:
                self.check(x)
            with pyro.validation_enabled(False):
                loss = self.loss_fn(x)
        self.calls += 1
        (loss / x.shape[0]).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def check(self, x: torch.Tensor) -> None:
        """Run the model and guide once with Pyro's validation on, for its checks alone.

        A separate pass without gradients, whose random draws are undone afterwards: the steps
        that train are then the same arithmetic whether or not they follow a check, so a run
        resumed from a checkpoint (which checks its first step again) repeats an uninterrupted
        one bit for bit.
        """
        devices = [x.device.index or 0] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            with pyro.validation_enabled(True):
                self.loss_fn(x)

    @staticmethod
    def check_finite(total: float, where: str) -> None:
        """Warn, as Pyro's per-step validation would, when a read-back loss is NaN or ±inf."""
        if not math.isfinite(total):
            warnings.warn(f"-ELBO is {total} in {where}: training diverged", stacklevel=2)


def own_parameters(model: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters :class:`LeanTrace_ELBO` may hand back without the param store."""
    return [p for p in model.parameters() if p.requires_grad]
