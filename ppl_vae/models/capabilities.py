"""Opt-in capabilities: what only some models have, and what evaluation, diagnostics, training
and reports ask for with ``isinstance(model, Capability)``.

Each is a :class:`typing.Protocol`: a model has it by having the methods, with no base class to
inherit. Evaluation keeps a table of metrics with what each needs (``ppl_vae.metrics``); a
metric whose needs a model does not meet is absent, never computed on a wrong assumption.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from torch.distributions import Distribution


@runtime_checkable
class GaussianGuide(Protocol):
    """q(z|x) is Gaussian over a vector z."""

    def posterior(self, x: torch.Tensor) -> Distribution:
        """q(z|x) for the batch ``x``: an ``Independent(Normal, 1)`` or a ``MultivariateNormal``
        with batch shape ``(B,)`` and event shape ``(d,)``, the very distribution the guide
        samples ``"z"`` from (outside any particle plate)."""
        ...


@runtime_checkable
class ExplicitPrior(Protocol):
    """p(z) is available as a distribution."""

    def prior(self, x: torch.Tensor) -> Distribution:
        """p(z) for a batch like ``x`` (batch shape ``(B,)``): the distribution the model
        samples ``"z"`` from."""
        ...


@runtime_checkable
class TrainingHooks(Protocol):
    """Step-dependent behaviour inside the SVI loop (a KL warm-up, dead-code revival)."""

    def on_train_step(self, step: int) -> None:
        """Called before SVI step ``step`` (0-based, global). Users driving
        :class:`pyro.infer.SVI` themselves call it likewise."""
        ...

    def epoch_metrics(self) -> dict[str, float]:
        """Extra columns for this epoch's row of ``metrics.csv`` (and reset of their counters)."""
        ...


@dataclass(frozen=True)
class AuxiliaryFit:
    """A second model/guide pair fitted by SVI once the main pair is trained, on data made from
    the training images (a VQ-VAE's code prior on their code maps). Its parameters live in the
    model's ``state_dict``, so the checkpoint holds them.

    :param data: images (flat model inputs) → the pair's observations.
    :param evaluate: the pair's validation numbers, from the validation observations.
    :param done: called once the fit is finished (e.g. to mark the prior as fitted).
    """

    name: str
    module: nn.Module
    model: Callable
    guide: Callable
    data: Callable[[torch.Tensor], torch.Tensor]
    epochs: int
    batch_size: int
    lr: float
    evaluate: Callable[[torch.Tensor], dict[str, float]]
    done: Callable[[], None]


@runtime_checkable
class AuxiliaryFits(Protocol):
    """Parts fitted after the SVI loop, on the frozen model."""

    def auxiliary_fits(self) -> list[AuxiliaryFit]:
        ...


@runtime_checkable
class Codebook(Protocol):
    """z is a grid of vectors from a finite codebook (vector quantization)."""

    @property
    def codebook_size(self) -> int:
        """K, the number of codes."""
        ...

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest-code indices of the images ``x``, ``(B, h, w)``."""
        ...


@runtime_checkable
class LearnedCodePrior(Protocol):
    """A learned density over code maps (besides the model's own prior)."""

    def has_code_prior(self) -> bool:
        """Whether it has been fitted."""
        ...

    def code_prior_log_prob(self, codes: torch.Tensor) -> torch.Tensor:
        """log p(c) per code map, ``(B,)``, in nats."""
        ...


DEFAULT_SAMPLES_CAPTION = "Prior samples (mean of p(x|z), z ~ p(z))"


@runtime_checkable
class SampleCaption(Protocol):
    """Says what the sample grid of ``report.md`` shows, when the default caption
    ("prior samples") would not be true."""

    def samples_caption(self) -> str:
        ...
