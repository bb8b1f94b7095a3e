"""ppl_vae: autoencoders (AE, VAE, VQ-VAE) written as Pyro probabilistic programs."""

from ppl_vae.config import DataConfig, EvalConfig, ObjectiveConfig, RunConfig, TrainConfig
from ppl_vae.evaluate import evaluate_run
from ppl_vae.inference.objectives import loss_module, make_elbo
from ppl_vae.inference.weights import log_weights
from ppl_vae.metrics import log_likelihood, neg_elbo
from ppl_vae.models import AE, REGISTRY, VAE, VQVAE, AEConfig, VAEConfig, VQVAEConfig, build
from ppl_vae.train import fit

__all__ = [
    "DataConfig",
    "EvalConfig",
    "ObjectiveConfig",
    "RunConfig",
    "TrainConfig",
    "REGISTRY",
    "AE",
    "AEConfig",
    "VAE",
    "VAEConfig",
    "VQVAE",
    "VQVAEConfig",
    "build",
    "evaluate_run",
    "fit",
    "log_likelihood",
    "log_weights",
    "loss_module",
    "make_elbo",
    "neg_elbo",
]
