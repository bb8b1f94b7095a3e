"""The protocol every model shares: ``model(x)``, ``guide(x)``, ``encode``, ``decode`` and
``prior_sample``. What only some models have is a capability (:mod:`.capabilities`).

A model is a :class:`~pyro.nn.PyroModule` whose ``model`` and ``guide`` take the same flat batch
``x`` of shape ``(B, D)`` and use the same names: the plate ``"data"``, the latent site ``"z"``
and the observed site ``"x"``. Both may be run under an extra, outer particle plate (vectorized
ELBOs and importance sampling do this), so neither assumes ``z`` has exactly two dimensions.
Evaluation reads what it needs off these programs (the guide's and the prior's distributions at
``"z"``, the likelihood at ``"x"``), so a new model is its own file and one registry line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from pyro.nn import PyroModule


@dataclass(frozen=True)
class ModelConfig:
    """Base of every model's config. ``kind`` is the registry name (``ppl-vae train KIND``)."""

    kind: ClassVar[str] = ""

    def check_data(self, binarization: str) -> None:
        """Raise :class:`~ppl_vae.errors.ConfigError` if the model cannot score inputs made with
        ``--data.binarization binarization`` (e.g. a Bernoulli likelihood on intensities)."""


class LatentVariableModel(PyroModule):
    """Generative ``model``, amortized ``guide``, and three deterministic maps.

    Subclasses set ``self.config`` and implement :meth:`model`, :meth:`guide`, :meth:`encode`
    (a point summary of q(z|x)), :meth:`decode` (the likelihood's mean image) and
    :meth:`prior_sample`. :meth:`reconstruct` and :meth:`sample` are built from those.
    """

    config: ModelConfig
    recordable: ClassVar[bool] = False
    """Opt-in, per class, to the recorded training loss and importance weights
    (:mod:`ppl_vae.inference.recording`): a class sets it to declare that its programs' Python
    decisions depend only on input shapes and on its modules' attributes. It is read off the
    model's own class, so a subclass is not recorded unless it sets it again."""

    mixed_precision: ClassVar[bool] = False
    """Set by a class whose ``model`` and ``guide`` call every network through
    :meth:`network`, so that ``--train.precision bf16`` reaches all of them; training refuses
    bf16 for the others."""
    autocast: torch.dtype | None = None
    """The dtype :meth:`network` runs networks in (None: as their parameters, float32).
    Training sets it on the instance for its steps only (``ppl_vae.train``)."""

    def network(self, net: torch.nn.Module, *inputs: torch.Tensor):
        """``net(*inputs)``; with :attr:`autocast` set, the network runs under
        :func:`torch.autocast` in that dtype and its outputs come back as float32, so that
        the log-densities, the ELBO's sums, a quantizer's distances and its statistics, all
        computed outside, stay float32."""
        if self.autocast is None:
            return net(*inputs)
        with torch.autocast(inputs[0].device.type, dtype=self.autocast):
            out = net(*inputs)
        if isinstance(out, torch.Tensor):
            return out.float()
        return type(out)(o.float() for o in out)

    def model(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def guide(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """A point summary of q(z|x): the mean for Gaussian guides, the code for AEs."""
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The mean of p(x|z), shaped like the flat input (pixel intensities in [0, 1])."""
        raise NotImplementedError

    def prior_sample(self, n: int) -> torch.Tensor:
        """``n`` draws of z from p(z) on the model's device."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of p(x | z = encode(x)): the deterministic reconstruction."""
        return self.decode(self.encode(x))

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """Mean images of p(x|z) for ``n`` prior draws z ~ p(z)."""
        return self.decode(self.prior_sample(n))
