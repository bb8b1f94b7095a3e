"""The VAE with a normalizing-flow guide: q(z|x) is the encoder's Normal pushed through K
inverse autoregressive (IAF; Kingma et al. 2016) or affine coupling (Dinh et al. 2017)
transforms conditioned on a context h(x) from the encoder, all of them Pyro's own
(:mod:`pyro.distributions.transforms`).

The guide samples ``"z"`` from one :class:`~pyro.distributions.TransformedDistribution`, so its
log density at a draw is the change of variables log N(ε; μ, σ) − Σ_k log |det ∂T_k|, which
Pyro's transforms give from their cache at no extra cost (both transforms cache the draw and
its log scale). Scoring any *other* z needs the inverse: one pass for a coupling transform, one
pass per dimension of z for IAF.

It is a kind of its own (``ppl-vae train flow``), not an option of ``vae``: what a model is
able to do is read off its class (:mod:`.capabilities`), and this guide is not Gaussian, so the
model has no ``posterior``; everything that needs one (the analytic KL, the active units) is
absent rather than wrong, and the gaps fit their local q* in this guide's own family
(:class:`~ppl_vae.diagnostics.LocalEncoderOutputs`: the encoder's outputs free per image).
The generative half (p(z), p(x|z), β and warm-up) is the VAE's
(:class:`~ppl_vae.models.vae.VAEBase`), with ``--model.prior standard`` or ``mog``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import pyro
import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro import poutine
from pyro.nn import ConditionalAutoRegressiveNN, ConditionalDenseNN
from torch import nn
from torch.nn import functional as F

from ppl_vae.errors import ConfigError, check
from ppl_vae.models import priors
from ppl_vae.models.vae import VAEBase, VAEConfig
from ppl_vae.nets import MIN_SCALE

FlowName = Literal["iaf", "coupling"]


@dataclass(frozen=True)
class FlowVAEConfig(VAEConfig):
    kind: ClassVar[str] = "flow"

    guide_flow: FlowName = "iaf"
    """The transforms of q(z|x): iaf (affine autoregressive, the stable sigmoid-gated update of
    Kingma et al. 2016, eq. 14), or coupling (affine coupling of the two halves of z, Dinh et
    al. 2017, the order of z reversed between steps)."""
    flow_steps: int = 2
    """K, the transforms after the encoder's Normal."""
    flow_hidden: tuple[int, ...] = (128,)
    """Hidden sizes of each transform's network (a MADE for iaf: each at least --model.z-dim)."""
    flow_context: int = 32
    """Size of the context h(x) the encoder hands every transform."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.z_dim >= 2, "--model.z-dim", "at least 2 for a flow guide", self.z_dim)
        check(self.flow_steps >= 1, "--model.flow-steps", "a positive integer", self.flow_steps)
        check(self.flow_context >= 1, "--model.flow-context", "a positive integer",
              self.flow_context)  # fmt: skip
        check(
            len(self.flow_hidden) >= 1 and all(h >= 1 for h in self.flow_hidden),
            "--model.flow-hidden",
            "one or more positive sizes",
            self.flow_hidden,
        )
        check(
            self.guide_flow != "iaf" or min(self.flow_hidden) >= self.z_dim,
            "--model.flow-hidden",
            f"sizes of at least --model.z-dim ({self.z_dim}) for --model.guide-flow iaf (a "
            "MADE cannot connect fewer hidden units to every output)",
            self.flow_hidden,
        )
        if self.prior == "vamp":
            raise ConfigError(
                "--model.prior vamp: a VampPrior scores z under the guide at its pseudo-inputs, "
                "which for a flow guide means inverting the flow at each of them (one pass per "
                "dimension of z for iaf); use --model.prior mog or standard with flow, or vamp "
                "with ppl-vae train vae"
            )


class ContextHead(nn.Module):
    """Wraps a network with ``2 · z_dim + context`` outputs into ``(z_loc, z_scale, h)``:
    the base Normal (``z_scale = softplus(raw) + 1e-6``, as :class:`~ppl_vae.nets.GaussianHead`)
    and the context h(x) of the transforms."""

    def __init__(self, net: nn.Module, z_dim: int):
        super().__init__()
        self.net = net
        self.z_dim = z_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.net(x)
        d = self.z_dim
        return out[..., :d], F.softplus(out[..., d : 2 * d]) + MIN_SCALE, out[..., 2 * d :]


def conditional_flow(
    name: FlowName, z_dim: int, context: int, hidden: tuple[int, ...], steps: int
) -> nn.ModuleList:
    """K conditional transforms of Pyro's (the modules holding their networks' parameters).

    IAF: :class:`~pyro.distributions.transforms.ConditionalAffineAutoregressive` with
    ``stable=True`` (y = σ ⊙ x + (1 − σ) ⊙ μ, σ = sigmoid(s + 2), (μ, s) from a MADE of
    (x, h)); the MADE's variable order alternates between the identity and its reversal, so
    that consecutive steps condition each coordinate on different ones (a fixed order, held in
    a buffer, so a checkpoint rebuilds the same flow). Coupling:
    :class:`~pyro.distributions.transforms.ConditionalAffineCoupling` of the first ⌊d/2⌋
    coordinates to the rest (log scales clipped to [−5, 3], Pyro's default).
    """
    layers: list[nn.Module] = []
    for step in range(steps):
        if name == "iaf":
            order = torch.arange(z_dim)
            arn = ConditionalAutoRegressiveNN(
                z_dim, context, list(hidden), permutation=order.flip(0) if step % 2 else order
            )
            layers.append(T.ConditionalAffineAutoregressive(arn, stable=True))
        else:
            split = z_dim // 2
            net = ConditionalDenseNN(split, context, list(hidden), [z_dim - split] * 2)
            layers.append(T.ConditionalAffineCoupling(split, net))
    return nn.ModuleList(layers)


def condition(
    flow: nn.ModuleList, name: FlowName, z_dim: int, h: torch.Tensor
) -> list[T.Transform]:
    """The transforms of ``flow`` conditioned on the context ``h`` (fresh objects, so each
    caches its own draw); coupling steps are separated by a reversal of z."""
    transforms: list[T.Transform] = []
    for step, layer in enumerate(flow):
        if name == "coupling" and step > 0:
            transforms.append(T.Permute(torch.arange(z_dim - 1, -1, -1, device=h.device)))
        transforms.append(layer.condition(h))
    return transforms


class FlowVAE(VAEBase):
    """p(z) = N(0, I) or mog; p(x|z) = likelihood(decoder(z)); q(z|x) = T_h(x) # N(encoder(x)).

    The encoder gives the base Normal N(μ(x), diag σ(x)²) and a context h(x); each T_k is an
    IAF or affine coupling step conditioned on h(x) (:func:`conditional_flow`), registered with
    ``pyro.module("flow", ...)`` in the guide. ``"data"``, ``"z"`` and ``"x"`` as in the VAE,
    and the same β/warm-up scale on ``"z"`` in model and guide.

    Capabilities: :class:`~ppl_vae.models.capabilities.ExplicitPrior` (``prior``) and
    :class:`~ppl_vae.models.capabilities.TrainingHooks`; not ``GaussianGuide``. Not
    ``recordable``: Pyro's transform modules keep lists and dicts the recorder cannot watch,
    so it would refuse them anyway; nor ``mixed_precision``: the transforms call their networks
    themselves, outside :meth:`network` (bf16 is refused).

    :param FlowVAEConfig config: networks, likelihood, prior, β, warm-up and the flow.
    """

    constant_buffers = True
    """Distributed training: the buffers are the MADEs' masks and variable orders, made at
    construction from the seed every rank shares (:func:`conditional_flow`) and never written
    afterwards (``tests/test_distributed.py``), so they are equal on every rank."""

    def __init__(self, config: FlowVAEConfig):
        super().__init__()
        self.config = config
        self.train_kl_weight = config.kl_weight(0)
        width = 2 * config.z_dim + config.flow_context
        self.encoder = ContextHead(config.encoder_net(width), config.z_dim)
        self.decoder = config.decoder_net(config.z_dim)
        self.likelihood = config.build_likelihood()
        self.flow = conditional_flow(config.guide_flow, config.z_dim, config.flow_context,
                                     config.flow_hidden, config.flow_steps)  # fmt: skip
        self.learned_prior = priors.build(config)

    def transforms(self, h: torch.Tensor) -> list[T.Transform]:
        """T_1, …, T_K conditioned on the context ``h`` (:func:`condition`)."""
        return condition(self.flow, self.config.guide_flow, self.config.z_dim, h)

    def flow_posterior(self, x: torch.Tensor) -> dist.TransformedDistribution:
        """q(z|x): the encoder's Normal through the transforms conditioned on h(x); batch
        shape ``(B,)``, event shape ``(d,)``. Not Gaussian, hence not named ``posterior``.
        Pyro's conditional networks expand the context to the value's leading dimensions, so a
        value scored under it must have the full batch shape ``(..., B, d)`` (a draw has)."""
        z_loc, z_scale, h = self.network(self.encoder, x)
        base = dist.Normal(z_loc, z_scale).to_event(1)
        return dist.TransformedDistribution(base, self.transforms(h))

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("encoder", self.encoder)
        pyro.module("flow", self.flow)
        with pyro.plate("data", x.shape[0]):
            with poutine.scale(scale=self.kl_weight):
                pyro.sample("z", self.flow_posterior(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The base mean μ(x) pushed through the transforms: a point summary of q(z|x), not
        its mean (which has no closed form; metrics that need the mean leave it out)."""
        z_loc, _, h = self.encoder(x)
        z = z_loc
        for transform in self.transforms(h):
            z = transform(z)
        return z
