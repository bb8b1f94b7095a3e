"""The protocol every model shares: ``model(x)``, ``guide(x)`` and the helpers built on them.

A model is a :class:`~pyro.nn.PyroModule` whose ``model`` and ``guide`` take the same flat batch
``x`` of shape ``(B, D)`` and use the same names: the plate ``"data"``, the latent site ``"z"``
and the observed site ``"x"``. Both may be run under an extra, outer particle plate (vectorized
ELBOs and importance sampling do this), so neither assumes ``z`` has exactly two dimensions.
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
    """Shared interface: generative ``model``, amortized ``guide``, and deterministic helpers.

    Subclasses set ``self.config`` and implement :meth:`model`, :meth:`guide`, :meth:`encode`
    (the guide's point estimate of ``z``), :meth:`decode` (the likelihood's mean image) and
    :meth:`prior_sample`.
    """

    config: ModelConfig
    capturable: ClassVar[bool] = True
    """Whether fit may record the training loss as a graph (ppl_vae.fast.CapturedELBO): true
    when the programs' Python decisions depend only on the input shape and on plain Python
    attributes of the modules, never on values inside tensors."""

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

    # ------------------------------------------------------------------ hooks of the training loop
    # Model-specific behaviour lives behind these methods, so that train.py, evaluate.py and the
    # CLI never branch on the model's kind.

    def on_train_step(self, step: int) -> None:
        """Called by :func:`ppl_vae.train.fit` before SVI step ``step`` (0-based, global).

        Schedules that depend on the step (KL warm-up) and periodic maintenance (dead-code
        revival) go here. Users driving :class:`pyro.infer.SVI` themselves call it likewise.
        """

    def epoch_metrics(self) -> dict[str, float]:
        """Extra columns for this epoch's row of ``metrics.csv`` (and reset of their counters)."""
        return {}

    def fit_auxiliary(
        self, train_inputs: torch.Tensor, val_inputs: torch.Tensor, progress: bool = False
    ) -> dict[str, float]:
        """Fit parts trained after the SVI loop on the frozen model (a VQ-VAE's code prior).

        Their state must live in this module's ``state_dict`` so the checkpoint holds it.
        Returns numbers for the log; the default has nothing to fit.
        """
        return {}

    def evaluation_metrics(
        self, inputs: torch.Tensor, eval_cfg, progress: bool = False
    ) -> dict[str, object]:
        """Test-set numbers for ``eval.json``: by default those of a model whose guide has a
        density (-ELBO and importance-sampled log p(x)); point-mass guides override this."""
        from ppl_vae.evaluate import density_guide_metrics

        return density_guide_metrics(self, inputs, eval_cfg, progress)

    def samples_caption(self) -> str:
        """What the sample grid of ``report.md`` shows."""
        return "Prior samples (mean of p(x|z), z ~ p(z))"

    def reconstruction_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x | z = encode(x)) per image, ``(B,)``."""
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
