"""Vector quantization (van den Oord et al. 2017): nearest-code lookup, the straight-through
estimator, the codebook and commitment terms, EMA codebook updates, dead-code revival and usage
statistics. Plain torch (no Pyro calls); :mod:`ppl_vae.models.vqvae` builds the guide on it.

Shapes: a grid of encoder outputs ``z_e`` is ``(B, D, h, w)`` (channels first, as convolutions
give it); the codebook is ``(K, D)``; code indices are ``(B, h, w)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ppl_vae.distributed import from_rank0, gather_rows, world


def nearest_code(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row (squared Euclidean distance) for each row of ``vectors``.

    |v − e|² = |v|² − 2 v·e + |e|²; |v|² does not depend on the code, so the argmin is that of
    |e|² − 2 v·e, one ``(N, K)`` matrix product — never an ``(N, K, D)`` tensor of differences.
    """
    scores = torch.addmm(codebook.pow(2).sum(1), vectors, codebook.T, alpha=-2.0)
    return scores.argmin(dim=1)


def straight_through(z_e: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """``z_e + (z_q − z_e).detach()``: the value of ``z_q``, the gradient of ``z_e`` (identity)."""
    return z_e + (z_q - z_e).detach()


def per_datum_sq_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ (a − b)² over every dimension but the first: one number per datum, ``(B,)``."""
    return (a - b).pow(2).flatten(1).sum(1)


def codebook_loss(z_e: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """‖sg[z_e] − e_k‖² per datum: moves the codes towards the encoder outputs, not the encoder."""
    return per_datum_sq_error(z_e.detach(), z_q)


def commitment_loss(z_e: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """‖z_e − sg[e_k]‖² per datum: moves the encoder towards its codes, not the codes."""
    return per_datum_sq_error(z_e, z_q.detach())


def perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of the code frequencies: K when all codes are equally used, 1 for one code."""
    total = counts.sum()
    if total <= 0:
        return float("nan")
    p = counts[counts > 0] / total
    return math.exp(-(p * p.log()).sum().item())


def ema_inplace(average: torch.Tensor, new: torch.Tensor, decay: float) -> None:
    """``average ← decay · average + (1 − decay) · new``, in place."""
    average.mul_(decay).add_(new, alpha=1 - decay)


def laplace_smoothed(cluster_size: torch.Tensor, eps: float) -> torch.Tensor:
    """(n_k + ε) / (n + K ε) · n: counts kept away from 0 without changing their total n."""
    n = cluster_size.sum()
    return (cluster_size + eps) / (n + cluster_size.numel() * eps) * n


class Quantizer(nn.Module):
    """A K×D codebook with nearest-code quantization of ``(B, D, h, w)`` grids.

    With ``ema=False`` the codebook is a parameter trained by the codebook term of the auxiliary
    loss; with ``ema=True`` it is a buffer that tracks exponential moving averages of the encoder
    outputs assigned to each code (decay ``decay``, Laplace smoothing ``eps``), and the auxiliary
    loss is the commitment term alone. Either way the codebook is in the ``state_dict``.

    The first training batch seeds every code with one of its encoder outputs (a data-dependent
    initialization: codes drawn at random far from the encoder outputs would all go unused).
    In training mode (and with gradients on) each call counts code usage — per epoch
    (:meth:`take_epoch_stats`) and per revival window (:meth:`revive_dead_codes`) — updates the
    EMA codebook, and keeps the batch's encoder outputs to re-seed dead codes from.

    :param codebook_size: K.
    :param code_dim: D.
    :param beta: weight of the commitment term.
    :param ema: EMA codebook updates instead of the codebook term.
    """

    def __init__(
        self,
        codebook_size: int = 512,
        code_dim: int = 64,
        beta: float = 0.25,
        ema: bool = False,
        decay: float = 0.99,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.beta, self.ema, self.decay, self.eps = beta, ema, decay, eps
        init = torch.empty(codebook_size, code_dim).uniform_(-1 / codebook_size, 1 / codebook_size)
        if ema:
            self.register_buffer("codebook", init)
            self.register_buffer("ema_cluster_size", torch.ones(codebook_size))
            self.register_buffer("ema_code_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("epoch_counts", torch.zeros(codebook_size))
        self.register_buffer("window_counts", torch.zeros(codebook_size))
        self.last_z_e: torch.Tensor | None = None  # flat encoder outputs of the last batch

    @property
    def codebook_size(self) -> int:
        return self.codebook.shape[0]

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Code indices ``(..., h, w)`` → codebook vectors as a grid ``(..., D, h, w)``."""
        return self.codebook[codes].movedim(-1, -3)

    def codes(self, z_e: torch.Tensor) -> torch.Tensor:
        """Nearest-code indices ``(B, h, w)`` of a grid ``z_e`` ``(B, D, h, w)``."""
        flat = z_e.detach().movedim(1, -1).reshape(-1, z_e.shape[1])
        return nearest_code(flat, self.codebook.detach()).reshape(z_e.shape[0], *z_e.shape[2:])

    def forward(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantize ``z_e``: returns (straight-through z_q, code indices, auxiliary loss per datum).

        The auxiliary loss is ‖sg[z_e] − e_k‖² + β ‖z_e − sg[e_k]‖² (the first term dropped under
        EMA updates), summed over the grid of each datum, ``(B,)``.
        """
        codes = self.codes(z_e)
        if self.training and torch.is_grad_enabled():
            self.record(z_e, codes)
        e_k = self.lookup(codes)
        aux = self.beta * commitment_loss(z_e, e_k)
        if not self.ema:
            aux = aux + codebook_loss(z_e, e_k)
        return straight_through(z_e, e_k), codes, aux

    @torch.no_grad()
    def record(self, z_e: torch.Tensor, codes: torch.Tensor) -> None:
        """Training-time bookkeeping: usage counts, the EMA update, the batch kept for revival."""
        flat = z_e.detach().movedim(1, -1).reshape(-1, z_e.shape[1])
        if world().size > 1:  # the whole global batch: every rank updates as one process would
            rows = gather_rows(z_e.detach())
            flat = rows.movedim(1, -1).reshape(-1, z_e.shape[1])
        if not bool(self.initialized):
            self.seed_codes(torch.arange(self.codebook_size, device=flat.device), flat)
            self.initialized.fill_(True)
            codes.copy_(self.codes(z_e))
        flat_codes = codes.reshape(-1) if world().size == 1 else nearest_code(flat, self.codebook)
        counts = torch.bincount(flat_codes, minlength=self.codebook_size).to(flat.dtype)
        self.epoch_counts += counts
        self.window_counts += counts
        self.last_z_e = flat
        if self.ema:
            code_sums = torch.zeros_like(self.codebook).index_add_(0, flat_codes, flat)
            ema_inplace(self.ema_cluster_size, counts, self.decay)
            ema_inplace(self.ema_code_sum, code_sums, self.decay)
            self.codebook.copy_(
                self.ema_code_sum / laplace_smoothed(self.ema_cluster_size, self.eps)[:, None]
            )

    @torch.no_grad()
    def revive_dead_codes(self, generator: torch.Generator | None = None) -> int:
        """Re-seed every code unused since the last call with a random encoder output of the
        last training batch; returns how many were re-seeded."""
        dead = (self.window_counts == 0).nonzero().squeeze(1)
        self.window_counts.zero_()
        if self.last_z_e is None or dead.numel() == 0:
            return 0
        self.seed_codes(dead, self.last_z_e, generator)
        return dead.numel()

    @torch.no_grad()
    def seed_codes(
        self, which: torch.Tensor, vectors: torch.Tensor, generator: torch.Generator | None = None
    ) -> None:
        """Set the codes ``which`` to randomly chosen rows of ``vectors`` (with replacement)."""
        pick = torch.randint(vectors.shape[0], (which.numel(),), generator=generator)
        pick = from_rank0(pick.to(vectors.device))  # rank 0 chooses for all ranks
        chosen = vectors[pick]
        self.codebook[which] = chosen
        if self.ema:
            self.ema_cluster_size[which] = 1.0
            self.ema_code_sum[which] = chosen

    def take_epoch_stats(self) -> dict[str, float]:
        """Perplexity and fraction of codes used over the training batches since the last call."""
        counts = self.epoch_counts.clone()
        self.epoch_counts.zero_()
        return {
            "perplexity": perplexity(counts),
            "codebook_usage": (counts > 0).float().mean().item(),
        }
