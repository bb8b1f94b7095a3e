"""Recorded programs: a loss or a set of importance weights recorded once as a straight-line
graph of tensor ops and replayed, safe by construction.

A program of the library's models (``model(x)``, ``guide(x)`` and the lean ELBO around them)
spends much of a small batch's time in Python: Pyro's messengers, distribution objects, module
calls. :class:`Recorded` runs the program once under
:func:`torch.fx.experimental.proxy_tensor.make_fx`, with the model's parameters and buffers as
graph inputs, and replays the recorded tensor operations afterwards: random draws included
(``normal_`` nodes draw afresh each call, from the same stream), gradients flowing to the
parameters as usual. Exact rewrites (:func:`simplify_graph`) make the replay leaner still.

A replay is only right while it replays the program the user wrote. So it is refused, and the
program runs as written (the lean loss, with exactly its value and gradients), whenever:

* the model's class has not opted in (``recordable = True`` set on that very class: a user's
  subclass of a library model is not recorded unless it sets it again), or the loss is not
  the model's own ``model``/``guide`` pair;
* the call runs inside any Pyro handler (an outer ``poutine.scale`` must scale the loss), with
  Pyro validation on, under autocast or a functorch transform, or with global module hooks;
* anything the graph depends on differs from when it was recorded (:class:`ProgramState`): the
  input's shape, dtype and device, the grad mode, the default dtype, and in the module tree the
  types of the modules, their ``forward`` methods, every plain Python attribute (a KL weight,
  ``training``), the names, dtypes, devices, shapes and ``requires_grad`` of the parameters and
  buffers, the identity of every parameter, buffer and submodule slot, and the absence of
  module hooks. A module attribute the key cannot watch (a list, a dict, a tensor that is not a
  buffer, an arbitrary object) makes the model unrecordable;
* the program does, while it is recorded, what a graph of tensor ops cannot reproduce:
  ``detach``, ``.data``, ``requires_grad_``, tensor hooks, ``torch.autograd.grad``, a change of
  grad mode (``torch.no_grad``, ``set_grad_enabled``, a custom ``autograd.Function``), reading a
  tensor's value in Python, or changing the module's attributes;
* the first replay of a new graph does not give the program's value and gradients on the same
  random draws (a check made once per graph, which catches what the rules above might miss).

What is still not seen: state outside the module tree (globals, closures, class attributes
other than ``forward``) that an opted-in program reads. That is why recording is opt-in per
class, for programs whose Python decisions depend only on shapes and on their modules'
attributes.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import warnings
from collections.abc import Callable

import pyro
import torch
from pyro.infer.util import is_validation_enabled
from pyro.poutine.runtime import _PYRO_STACK
from torch.fx.experimental.proxy_tensor import make_fx
from torch.nn.modules import module as torch_module
from torch.overrides import TorchFunctionMode

from ppl_vae.inference.estimators import LeanTrace_ELBO
from ppl_vae.inference.weights import log_weights, random_state, set_random_state

# ----------------------------------------------------------------------------- what graphs see

_PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)
_TENSOR_SLOTS = ("_parameters", "_buffers")
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_MUST_BE_EMPTY = (*_HOOKS, "_pyro_params", "_pyro_samples")  # PyroParam / PyroSample attributes
_IGNORED = {
    # torch and Pyro bookkeeping that a module's forward never reads
    "_non_persistent_buffers_set",
    "_is_full_backward_hook",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
    "_pyro_context",
}
_GLOBAL_HOOKS = (
    torch_module._global_forward_hooks,
    torch_module._global_forward_pre_hooks,
    torch_module._global_backward_hooks,
    torch_module._global_backward_pre_hooks,
)


def _immutable(value) -> bool:
    """Whether ``value`` cannot change without being replaced: plain values, tuples and
    frozensets of them, enums, frozen dataclasses of them, functions without closures."""
    if isinstance(value, _PLAIN) or isinstance(value, enum.Enum):
        return True
    if isinstance(value, tuple | frozenset):
        return all(_immutable(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value.__dataclass_params__.frozen and all(
            _immutable(getattr(value, f.name)) for f in dataclasses.fields(value)
        )
    if isinstance(value, types.FunctionType):
        return value.__closure__ is None
    return isinstance(value, types.BuiltinFunctionType | type)


class ProgramState:
    """A snapshot of what a recorded graph of ``model`` depends on in the module tree.

    :attr:`signature` (hashable) is part of a graph's key; :meth:`holds` tells cheaply whether
    the tree is still as it was, without walking it; :attr:`unwatchable` names an attribute no
    key can watch (then nothing is recorded). :attr:`tensors` are the parameters and buffers,
    in the order the graph takes them.
    """

    def __init__(self, model: torch.nn.Module):
        self.unwatchable: str | None = None
        self.names: list[str] = []
        self.tensors: list[torch.Tensor] = []
        self._slots: list[tuple[dict, str, object]] = []  # identity checks
        self._values: list[tuple[dict, str]] = []  # plain values, compared by value
        self._dicts: list[dict] = []  # sizes
        modules = list(model.named_modules())
        self._modules = [(module, type(module), type(module).forward) for _, module in modules]
        signature: list = []
        for prefix, module in modules:
            signature.append((prefix, type(module), type(module).forward))
            for name, value in module.__dict__.items():
                if name in _IGNORED:
                    continue
                if name in _TENSOR_SLOTS or name == "_modules":
                    self._dicts.append(value)
                    for key, item in value.items():
                        self._slots.append((value, key, item))
                        if name in _TENSOR_SLOTS and item is not None:
                            self.names.append(f"{prefix}.{key}" if prefix else key)
                            self.tensors.append(item)
                    continue
                if name in _MUST_BE_EMPTY:
                    self._dicts.append(value)
                    if value:
                        self.unwatchable = f"{prefix or type(model).__name__}.{name} is not empty"
                    continue
                if isinstance(value, _PLAIN):
                    self._values.append((module.__dict__, name))
                    signature.append((prefix, name, type(value), value))
                elif _immutable(value):
                    self._slots.append((module.__dict__, name, value))
                    signature.append((prefix, name, value))
                else:
                    self.unwatchable = (
                        f"{prefix or type(model).__name__}.{name} "
                        f"({type(value).__name__}) is not a plain or immutable value"
                    )
            self._dicts.append(module.__dict__)
        self._sizes = [len(d) for d in self._dicts]
        self._plain = [d[name] for d, name in self._values]
        self._plain_types = [type(v) for v in self._plain]
        self._metas = [_tensor_meta(t) for t in self.tensors]
        signature.append(tuple(self.names))
        signature.append(tuple(self._metas))
        self.signature = tuple(signature)
        self.token = 0  # set by the recorder: a number standing for the signature

    def holds(self) -> bool:
        """Whether every watched slot, value, size, type and tensor is as in the snapshot."""
        if [len(d) for d in self._dicts] != self._sizes:
            return False
        for owner, key, item in self._slots:
            if owner.get(key) is not item:
                return False
        plain = [d.get(name) for d, name in self._values]
        if plain != self._plain or list(map(type, plain)) != self._plain_types:
            return False
        for module, kind, forward in self._modules:
            if type(module) is not kind or kind.forward is not forward:
                return False
        return list(map(_tensor_meta, self.tensors)) == self._metas


def _tensor_meta(tensor: torch.Tensor) -> tuple:
    return tensor.dtype, tensor.device, tensor.shape, tensor.requires_grad


# ----------------------------------------------------------------------------- unrecordable

# Tensor methods and functions whose meaning is in autograd, not in the values: a graph of
# tensor ops records them as aliases (detach) or not at all (hooks).
_AUTOGRAD_CALLS = {
    "detach",
    "detach_",
    "requires_grad_",
    "register_hook",
    "register_post_accumulate_grad_hook",
    "retain_grad",
    "backward",
    "grad",  # torch.autograd.grad
}
_AUTOGRAD_ATTRIBUTES = {"data", "grad", "grad_fn", "_base"}  # read or written
_AUTOGRAD_SETTERS = {"requires_grad"}  # written


class _AutogradWatch(TorchFunctionMode):
    """Notes the first thing a program does that a recorded graph would not reproduce.

    Active only while the program itself runs under ``make_fx``. With gradients off for the
    whole program (evaluation), ``detach`` and friends change nothing and pass.
    """

    def __init__(self):
        super().__init__()
        self.grad_enabled = torch.is_grad_enabled()
        self.reason: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.reason is None:
            name = getattr(func, "__name__", "")
            owner = getattr(getattr(func, "__self__", None), "__name__", None)
            if name == "_set_grad_enabled":
                pass
            elif torch.is_grad_enabled() != self.grad_enabled:
                self.reason = (
                    f"{name} ran with gradients "
                    f"{'off' if self.grad_enabled else 'on'} (torch.no_grad, set_grad_enabled "
                    "or a custom autograd.Function inside the program)"
                )
            elif self.grad_enabled and (
                name in _AUTOGRAD_CALLS
                or (name in ("__get__", "__set__") and owner in _AUTOGRAD_ATTRIBUTES)
                or (name == "__set__" and owner in _AUTOGRAD_SETTERS)
            ):
                self.reason = f"the program calls {owner + '.' if owner else ''}{name}"
        return func(*args, **(kwargs or {}))


def _unwatched_global_state() -> str | None:
    """Why nothing may be replayed now, or None."""
    if _PYRO_STACK:
        return "inside a Pyro handler"
    if any(_GLOBAL_HOOKS):
        return "global module hooks are registered"
    if torch._C._is_any_autocast_enabled():
        return "autocast is on"
    if torch._C._are_functorch_transforms_active():
        return "a functorch transform is active"
    return None


def recordable(model: torch.nn.Module) -> bool:
    """Whether ``model``'s own class (not a base class) declares ``recordable = True``."""
    return type(model).__dict__.get("recordable", False) is True


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


def _close(got: torch.Tensor | None, expected: torch.Tensor | None) -> bool:
    """Equal to float rounding, relative to the largest magnitude of ``expected``."""
    if got is None or expected is None:
        return got is None and expected is None
    if got.shape != expected.shape or got.dtype != expected.dtype:
        return False
    tol = 1e-10 if expected.dtype == torch.float64 else 1e-4
    scale = expected.abs().max().item() if expected.numel() else 0.0
    return bool(((got - expected).abs() <= tol * max(scale, 1e-12) + 1e-30).all())


class Recorded(torch.nn.Module):
    """A function of ``(x, *static)`` over ``model``'s programs, recorded once per key as a
    straight-line graph of tensor ops and replayed where that is safe (module docstring).

    Subclasses give :meth:`program` (what is recorded; it answers ``pyro.module``
    registrations from the tensors it is handed) and :meth:`direct` (what runs unrecorded).
    ``static`` are plain Python arguments; they are part of the key. A graph is recorded the
    second time a key is seen in a row, so state that changes every call (a KL warm-up) runs
    unrecorded, and exact, until it settles.
    """

    what = "the function"
    # With Pyro validation on, run unrecorded (a function that validates must see it happen);
    # false for functions that switch validation off themselves.
    direct_when_validating = True
    max_graphs = 8

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.replays = 0  # calls answered by a recorded graph
        self.target = [model]  # a list, so the model is not registered as a submodule twice
        self.graphs: dict[tuple, Callable] = {}
        self.refused: dict[tuple, str] = {}  # key → why it is not recorded
        self.last_key: tuple | None = None
        self.state: ProgramState | None = None
        self._tokens: dict[tuple, int] = {}  # module-tree signature → its number

    def program(self, x: torch.Tensor, own: dict[int, torch.Tensor], *static) -> torch.Tensor:
        raise NotImplementedError

    def direct(self, x: torch.Tensor, *static) -> torch.Tensor:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the recorded graphs and refusals (the next call records afresh)."""
        self.graphs.clear()
        self.refused.clear()
        self._tokens.clear()
        self.state = None
        self.last_key = None

    def forward(self, x: torch.Tensor, *static) -> torch.Tensor:
        if (self.direct_when_validating and is_validation_enabled()) or _unwatched_global_state():
            return self.direct(x, *static)
        (model,) = self.target
        state = self.state
        if state is None or not state.holds():  # first call, or the module tree changed
            state = self.state = ProgramState(model)
            # a small number for the (long) signature, so that keys hash cheaply
            state.token = self._tokens.setdefault(state.signature, len(self._tokens))
        if state.unwatchable is not None:
            return self.direct(x, *static)
        key = (
            x.shape, x.dtype, x.device, static, torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(), torch.get_default_dtype(), state.token,
        )  # fmt: skip
        graph = self.graphs.get(key)
        if graph is None:
            if key in self.refused or key != self.last_key:  # new or changing: unrecorded
                self.last_key = key
                return self.direct(x, *static)
            if len(self.graphs) >= self.max_graphs:
                self.graphs.clear()
            graph = self._record(model, state, x, static)
            if isinstance(graph, str):  # why it may not replay
                self.refused[key] = graph
                warnings.warn(
                    f"{self.what} of {type(model).__name__} is not recorded ({graph});"
                    " it runs as written instead",
                    stacklevel=3,
                )
                return self.direct(x, *static)
            self.graphs[key] = graph
        self.last_key = key
        self.replays += 1
        return graph.forward(state.tensors, x)

    def _record(self, model, state: ProgramState, x, static) -> Callable | str:
        """The recorded and checked graph, or why it may not replay.

        Recording runs the program once; the random state and the buffers are put back
        afterwards, so that the first replay draws and updates as an unrecorded call would.
        """
        holder = _Program(model, self.program)
        names = state.names
        watch = _AutogradWatch()

        def run(values: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            # functional_call puts the graph's inputs in place of the model's tensors while the
            # programs run (they read them from the model), then puts the tensors back.
            swapped = {f"model.{name}": value for name, value in zip(names, values, strict=True)}
            with watch:
                return torch.func.functional_call(holder, swapped, (x, values, *static))

        saved = self._save(model)
        try:
            graph = make_fx(run)(list(state.tensors), x)
        except Exception as err:  # e.g. Python that reads tensor values (bool(tensor))
            # The direct path runs the same code unrecorded, so a genuine error still surfaces.
            return f"{type(err).__name__}: {str(err).splitlines()[0]}"
        finally:
            self._restore(model, saved)
        if watch.reason is not None:
            return watch.reason
        if not state.holds():
            return "the program changes its modules' attributes"
        # Drop what nothing reads (a plate's index tensor, unused constants). In-place ops,
        # the random draws among them (empty + normal_), count as side effects and stay.
        graph.graph.eliminate_dead_code()
        simplify_graph(graph)
        if not self._replays_the_program(model, state, graph, x, static):
            return "its replay differs from the program on the same draws"
        return graph

    @staticmethod
    def _save(model) -> tuple:
        return random_state(), [(b, b.detach().clone()) for b in model.buffers()]

    @staticmethod
    def _restore(model, saved: tuple) -> None:
        rng, buffers = saved
        set_random_state(rng)
        with torch.no_grad():
            for buffer, value in buffers:
                buffer.copy_(value)

    def _replays_the_program(self, model, state, graph, x, static) -> bool:
        """One replay and one direct call on the same random draws: the same output and the
        same gradients in every parameter and buffer that requires them."""
        wrt = [t for t in state.tensors if t.requires_grad]
        saved = self._save(model)
        results = []
        try:
            for fn in (lambda: graph.forward(state.tensors, x), lambda: self.direct(x, *static)):
                self._restore(model, saved)
                out = fn()
                grads: tuple = ()
                if torch.is_grad_enabled() and out.requires_grad and wrt:
                    grads = torch.autograd.grad(out.sum(), wrt, allow_unused=True)
                results.append((out.detach(), grads))
        finally:
            self._restore(model, saved)
        (out_g, grads_g), (out_d, grads_d) = results
        return _close(out_g, out_d) and len(grads_g) == len(grads_d) and all(
            _close(a, b) for a, b in zip(grads_g, grads_d, strict=True)
        )


class RecordedLoss(Recorded):
    """A :class:`~ppl_vae.inference.estimators.LeanTrace_ELBO` loss of ``model``'s own
    ``model``/``guide`` pair, recorded and replayed (with exactly its value and gradients).

    :param loss_fn: ``LeanTrace_ELBO(...)(model.model, model.guide)``.
    :param model: the module whose parameters and buffers the programs use.
    """

    what = "the training loss"

    def __init__(self, loss_fn: torch.nn.Module, model: torch.nn.Module):
        super().__init__(model)
        self.loss_fn = loss_fn

    def program(self, x: torch.Tensor, own: dict[int, torch.Tensor]) -> torch.Tensor:
        loss_fn = self.loss_fn
        return loss_fn.elbo.lean_loss(loss_fn.model, loss_fn.guide, (x,), {}, own_params=own)

    def direct(self, x: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(x)


class RecordedLogWeights(Recorded):
    """The importance weights of ``model`` (:func:`~ppl_vae.inference.weights.log_weights`,
    validation off) recorded per (batch shape, number of particles) and replayed.

    Call as ``weights(x, num_particles)``; returns the ``(num_particles, B)`` log weights.
    """

    what = "the importance weights"
    direct_when_validating = False  # the weights are computed with validation off in any case

    def program(self, x, own, num_particles: int) -> torch.Tensor:
        (model,) = self.target
        with pyro.validation_enabled(False):
            return log_weights(model.model, model.guide, x, num_particles, own_params=own)

    def direct(self, x: torch.Tensor, num_particles: int) -> torch.Tensor:
        (model,) = self.target
        own = {id(p): p for p in model.parameters() if p.requires_grad}
        with pyro.validation_enabled(False):
            return log_weights(model.model, model.guide, x, num_particles, own_params=own)




def record(loss_fn: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
    """``loss_fn`` as a :class:`RecordedLoss` when it is a lean Trace_ELBO loss of ``model``'s
    own pair and ``model``'s class opted in; otherwise ``loss_fn`` itself."""
    if (
        recordable(model)
        and isinstance(getattr(loss_fn, "elbo", None), LeanTrace_ELBO)
        and loss_fn.model == model.model
        and loss_fn.guide == model.guide
    ):
        return RecordedLoss(loss_fn, model)
    return loss_fn


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


