"""The baseline: the same VAE written directly in PyTorch, with its loss derived by hand.

For a datum x with q(z|x) = N(z_loc, diag z_scale²), p(z) = N(0, I) and
p(x|z) = Bernoulli(logits = decoder(z)), the negative ELBO with one reparameterized draw
z = z_loc + z_scale · ε, ε ~ N(0, I), is

    -ELBO(x) = -log p(x|z) + KL(q(z|x) ‖ p(z))
    -log p(x|z) = Σ_d [softplus(l_d) - x_d l_d]            (binary cross-entropy with logits l)
    KL = ½ Σ_j [z_loc_j² + z_scale_j² - 1 - 2 log z_scale_j]  (closed form for two Gaussians)

The networks come from :mod:`ppl_vae.nets`, built with the same sizes, so both sides of every
benchmark run identical layers; only the loss plumbing differs (Pyro traces vs. these lines).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ppl_vae import nets
from ppl_vae.distributed import stream_seed
from ppl_vae.models import VAEConfig


class ReferenceVAE(nn.Module):
    """The ppl_vae VAE without Pyro: encoder, decoder and an analytic-KL negative ELBO."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = nets.mlp_gaussian_encoder(
            config.x_dim, config.hidden, config.z_dim, config.activation
        )
        self.decoder = nets.mlp_decoder(
            config.z_dim, config.hidden, config.x_dim, config.activation
        )

    def neg_elbo(self, x: torch.Tensor) -> torch.Tensor:
        """-ELBO summed over the batch (one draw of z per datum)."""
        z_loc, z_scale = self.encoder(x)
        z = z_loc + z_scale * torch.randn_like(z_scale)
        x_logits = self.decoder(z)
        reconstruction = F.binary_cross_entropy_with_logits(x_logits, x, reduction="sum")
        kl = 0.5 * (z_loc.square() + z_scale.square() - 1 - 2 * z_scale.log()).sum()
        return reconstruction + kl

    @torch.no_grad()
    def log_weights(self, x: torch.Tensor, num_particles: int) -> torch.Tensor:
        """log p(x, z) - log q(z|x) for ``num_particles`` draws z ~ q(z|x): shape (K, B)."""
        z_loc, z_scale = self.encoder(x)
        eps = torch.randn((num_particles, *z_loc.shape), dtype=x.dtype, device=x.device)
        z = z_loc + z_scale * eps
        x_logits = self.decoder(z)
        log_px_z = -F.binary_cross_entropy_with_logits(
            x_logits, x.expand_as(x_logits), reduction="none"
        ).sum(-1)
        # log N(z; 0, I) - log N(z; z_loc, z_scale): the 2π constants cancel
        log_pz_minus_qz = (0.5 * (eps.square() - z.square()) + z_scale.log()).sum(-1)
        return log_px_z + log_pz_minus_qz


class ReferenceStep:
    """One hand-written training step: -ELBO, backward of its batch mean, Adam, zero grads."""

    def __init__(self, model: ReferenceVAE, lr: float = 1e-3, eps: float = 1e-8):
        self.model = model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr, eps=eps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        loss = self.model.neg_elbo(x)
        (loss / x.shape[0]).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


@torch.no_grad()
def reference_log_likelihood(
    model: ReferenceVAE, inputs: torch.Tensor, k: int, batch_size: int, particle_chunk: int,
    seed: int | None = None,
) -> torch.Tensor:
    """log (1/k) Σ_i p(x, z_i)/q(z_i|x), z_i ~ q(z|x): chunks of draws merged by logaddexp.
    With ``seed``, batch b draws from ``torch.manual_seed(stream_seed(seed, b))``, the streams
    of ppl_vae's evaluation."""
    estimates = []
    for b, start in enumerate(range(0, inputs.shape[0], batch_size)):
        if seed is not None:
            torch.manual_seed(stream_seed(seed, b))
        x = inputs[start : start + batch_size]
        acc = torch.full((x.shape[0],), -math.inf, device=x.device)
        for drawn in range(0, k, particle_chunk):
            log_w = model.log_weights(x, min(particle_chunk, k - drawn))
            acc = torch.logaddexp(acc, torch.logsumexp(log_w, dim=0))
        estimates.append(acc - math.log(k))
    return torch.cat(estimates)
