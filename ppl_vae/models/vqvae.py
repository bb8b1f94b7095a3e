"""The VQ-VAE (van den Oord et al. 2017) as a Pyro model/guide pair with a deterministic guide.

The encoder maps an image to an h×w grid of D-dim vectors z_e; the guide replaces each by its
nearest codebook vector e_k and samples the straight-through z_q = z_e + (e_k − z_e).detach() as
a point mass at ``"z"``. The model's prior is uniform over the K codes at each of the h·w
positions (:class:`UniformCodebook`), so with q one-hot, KL(q(z|x) || p(z)) = h·w·log K for
every image: a constant, reported as such. The ELBO is then log p(x|z_q) − h·w·log K, and the
training loss (in training mode) adds the auxiliary loss ‖sg[z_e] − e_k‖² + β ‖z_e − sg[e_k]‖²
per datum.

For generation a learned :class:`~ppl_vae.models.code_prior.CodePrior` (a PixelCNN over code
maps) is fitted by SVI after the main loop (:meth:`VQVAE.auxiliary_fits`) and kept in the
state_dict; :meth:`VQVAE.prior_sample` draws from it once fitted, from the uniform prior before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import TorchDistribution, constraints
from torch import nn

from ppl_vae import nets
from ppl_vae.errors import check
from ppl_vae.models.capabilities import AuxiliaryFit
from ppl_vae.models.code_prior import CodePrior, CodePriorConfig
from ppl_vae.models.common import Activation, ImageConfig, ImageModel, check_conv_shape
from ppl_vae.quantizer import Quantizer


@dataclass(frozen=True)
class VQVAEConfig(ImageConfig):
    kind: ClassVar[str] = "vqvae"

    activation: Activation = "relu"
    """Nonlinearity between layers."""
    conv_channels: tuple[int, ...] = (32, 64)
    """Channels of the stride-2 conv layers; each halves the side of the code grid."""
    codebook_size: int = 512
    """K, the number of codes."""
    code_dim: int = 64
    """D, the dimension of each code vector."""
    beta: float = 0.25
    """Weight of the commitment term ‖z_e − sg[e_k]‖²."""
    ema: bool = False
    """Update the codebook by exponential moving averages instead of the codebook term."""
    ema_decay: float = 0.99
    """Decay of the EMA codebook updates (--model.ema)."""
    ema_eps: float = 1e-5
    """Laplace smoothing of the EMA cluster sizes (--model.ema)."""
    revive_every: int = 100
    """Re-seed codes unused for this many SVI steps from encoder outputs (0: never)."""
    code_prior: CodePriorConfig = field(default_factory=CodePriorConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_conv_shape(self)
        check(self.codebook_size >= 2, "--model.codebook-size", ">= 2", self.codebook_size)
        check(self.code_dim >= 1, "--model.code-dim", "a positive integer", self.code_dim)
        check(self.beta >= 0, "--model.beta", ">= 0", self.beta)
        check(0 < self.ema_decay < 1, "--model.ema-decay", "in (0, 1)", self.ema_decay)
        check(self.ema_eps > 0, "--model.ema-eps", "positive", self.ema_eps)
        check(self.revive_every >= 0, "--model.revive-every", ">= 0", self.revive_every)

    @property
    def grid(self) -> tuple[int, int]:
        side = nets.image_side(self.x_dim, self.channels) // 2 ** len(self.conv_channels)
        return side, side

    @property
    def kl_constant(self) -> float:
        """KL(q(z|x) || uniform p(z)) = positions · log K, in nats per image."""
        return math.prod(self.grid) * math.log(self.codebook_size)


class _CodebookGrids(constraints.Constraint):
    """Grids ``(D, h, w)`` of codebook vectors: a finite, discrete set (event_dim 3).

    ``check`` does not look up which code a value is: values at ``"z"`` are codebook vectors by
    construction (the guide's straight-through z_q).
    """

    is_discrete = True
    event_dim = 3

    def check(self, value: torch.Tensor) -> torch.Tensor:
        return torch.ones(value.shape[:-3], dtype=torch.bool, device=value.device)


class UniformCodebook(TorchDistribution):
    """Uniform over the K codebook vectors, independently at each of the h×w grid positions.

    A discrete distribution on grids ``(D, h, w)`` of codebook vectors (event_dim 3), with
    density −h·w·log K with respect to counting measure on those grids. :meth:`log_prob` does
    not look up which code a value is: values at ``"z"`` are codebook vectors by construction.
    """

    arg_constraints: ClassVar[dict] = {}
    support = _CodebookGrids()

    def __init__(self, codebook: torch.Tensor, grid: tuple[int, int], batch_shape=()):
        self.codebook, self.grid = codebook, tuple(grid)
        event_shape = (codebook.shape[1], *self.grid)
        super().__init__(torch.Size(batch_shape), torch.Size(event_shape), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return UniformCodebook(self.codebook, self.grid, batch_shape)

    def sample(self, sample_shape=()):
        shape = torch.Size(sample_shape) + self.batch_shape + self.grid
        codes = torch.randint(self.codebook.shape[0], shape, device=self.codebook.device)
        return self.codebook[codes].movedim(-1, -3)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        shape = torch.broadcast_shapes(value.shape[:-3], self.batch_shape)
        return value.new_full(shape, -math.prod(self.grid) * math.log(self.codebook.shape[0]))


class VQVAE(ImageModel):
    """p(z) = Uniform(codebook)^(h·w); p(x|z) = likelihood(decoder(z)); q(z|x) = Delta(z_q(x)).

    z_q(x) is the straight-through nearest-code quantization of the encoder's grid z_e(x).

    Capabilities: :class:`~ppl_vae.models.capabilities.ExplicitPrior`,
    :class:`~ppl_vae.models.capabilities.Codebook`,
    :class:`~ppl_vae.models.capabilities.LearnedCodePrior`,
    :class:`~ppl_vae.models.capabilities.TrainingHooks` (revival, usage statistics),
    :class:`~ppl_vae.models.capabilities.AuxiliaryFits` (the code prior) and
    :class:`~ppl_vae.models.capabilities.SampleCaption`. Not recordable: the quantizer's
    training-time bookkeeping (usage counts, EMA) reads tensor values in Python.

    :param VQVAEConfig config: networks, codebook, auxiliary loss, code prior.
    """

    mixed_precision = True  # the quantizer, outside network(), stays float32

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        self.config = config
        cfg = config
        side = nets.image_side(cfg.x_dim, cfg.channels)
        act = nets.ACTIVATIONS[cfg.activation]
        self.encoder = nets.ImageIn(
            nn.Sequential(
                nets.conv_trunk(cfg.channels, cfg.conv_channels, cfg.activation),
                nn.Conv2d(cfg.conv_channels[-1], cfg.code_dim, 1),
            ),
            (cfg.channels, side, side),
        )
        self.decoder = nets.ImageOut(
            nn.Sequential(
                nn.Conv2d(cfg.code_dim, cfg.conv_channels[-1], 3, padding=1),
                act(),
                nets.deconv_trunk(
                    cfg.conv_channels, cfg.params_per_value * cfg.channels, cfg.activation
                ),  # the likelihood's parameter planes
            ),
            in_dims=3,
        )
        self.likelihood = cfg.build_likelihood()
        self.quantizer = Quantizer(
            cfg.codebook_size, cfg.code_dim, cfg.beta, cfg.ema, cfg.ema_decay, cfg.ema_eps
        )
        self.code_prior = CodePrior(cfg.codebook_size, cfg.grid, cfg.code_prior)
        self.register_buffer("code_prior_fitted", torch.tensor(False))

    syncs_buffers = True
    """Distributed training: the quantizer computes its usage counts, EMA statistics and code
    seeding from the whole global batch (gathered) with rank 0's random choices, so its buffers
    stay equal on every rank; the code prior is fitted alike on every rank."""

    def prior(self, x: torch.Tensor) -> UniformCodebook:
        """p(z): uniform over the codes at every grid position, batch-shaped like ``x``."""
        return UniformCodebook(self.quantizer.codebook.detach(), self.config.grid, (x.shape[0],))

    def model(self, x: torch.Tensor) -> None:
        pyro.module("decoder", self.decoder)
        pyro.module("likelihood", self.likelihood)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.prior(x))
            self.observe(x, z)

    def guide(self, x: torch.Tensor) -> torch.Tensor:
        """Returns the code indices ``(B, h, w)`` (for diagnostics)."""
        pyro.module("encoder", self.encoder)
        pyro.module("quantizer", self.quantizer)
        with pyro.plate("data", x.shape[0]):
            z_q, codes, aux = self.quantizer(self.network(self.encoder, x))
            pyro.sample("z", dist.Delta(z_q, event_dim=3))
            if self.training:
                # A guide factor counts as part of log q(z|x), which the ELBO subtracts: +aux
                # here adds +aux (per datum, like the reconstruction term) to the loss. In eval
                # mode it is left out, so validation numbers are the -ELBO itself.
                pyro.factor("vq_aux", aux, has_rsample=True)
        return codes

    # ------------------------------------------------------------------ encode / decode / sample

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest-code indices ``(B, h, w)`` of the images ``x``."""
        return self.quantizer.codes(self.encoder(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer.lookup(self.codes(x))

    def prior_sample(self, n: int) -> torch.Tensor:
        """Code maps from the learned code prior once fitted, else uniform; as vector grids."""
        if bool(self.code_prior_fitted):
            codes = self.code_prior.sample(n)
        else:
            shape = (n, *self.config.grid)
            codes = torch.randint(self.config.codebook_size, shape, device=self.device)
        return self.quantizer.lookup(codes)

    def samples_caption(self) -> str:
        source = "the learned PixelCNN code prior" if bool(self.code_prior_fitted) else "uniform"
        return f"Samples: code maps drawn from {source}, decoded (mean of p(x|z))"

    # ------------------------------------------------------------------ hooks of the training loop

    def on_train_step(self, step: int) -> None:
        every = self.config.revive_every
        if every and step and step % every == 0:
            self.quantizer.revive_dead_codes()

    def epoch_metrics(self) -> dict[str, float]:
        return self.quantizer.take_epoch_stats()

    @torch.no_grad()
    def all_codes(self, inputs: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """Nearest-code indices of every image of ``inputs``, ``(N, h, w)``."""
        return torch.cat([self.codes(x) for x in inputs.split(batch_size)])

    # ------------------------------------------------------------------ the learned code prior

    def has_code_prior(self) -> bool:
        return bool(self.code_prior_fitted)

    def code_prior_log_prob(self, codes: torch.Tensor) -> torch.Tensor:
        return self.code_prior.log_prob(codes)

    def auxiliary_fits(self) -> list[AuxiliaryFit]:
        """The code prior, fitted on the code maps of the training images (none for 0 epochs)."""
        cfg = self.config.code_prior
        if cfg.epochs == 0:
            return []
        prior = self.code_prior
        return [
            AuxiliaryFit(
                name="code prior",
                module=prior,
                model=prior.model,
                guide=prior.guide,
                data=self.all_codes,
                epochs=cfg.epochs,
                batch_size=cfg.batch_size,
                lr=cfg.lr,
                evaluate=prior.validation_metrics,
                done=lambda: self.code_prior_fitted.fill_(True),
            )
        ]
