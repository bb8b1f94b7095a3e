"""The model registry: one entry per model file. The CLI and the parametrized tests read it.

Adding a variant: write ``models/<name>.py`` with its config (a frozen dataclass deriving from
:class:`ModelConfig` with a ``kind``) and its module (a :class:`LatentVariableModel` with the
capabilities of :mod:`ppl_vae.models.capabilities` it has), then add one line to
:data:`REGISTRY`. Nothing else changes: evaluation reads what it needs off the programs and the
capabilities.
"""

from __future__ import annotations

from typing import Any

from ppl_vae.errors import ConfigError
from ppl_vae.models.ae import AE, AEConfig
from ppl_vae.models.base import LatentVariableModel, ModelConfig
from ppl_vae.models.flow import FlowVAE, FlowVAEConfig
from ppl_vae.models.hvae import HVAE, HVAEConfig
from ppl_vae.models.linear import LinearGaussian, LinearGaussianConfig
from ppl_vae.models.vae import VAE, VAEConfig
from ppl_vae.models.vqvae import VQVAE, VQVAEConfig

REGISTRY: dict[str, tuple[type[ModelConfig], type[LatentVariableModel]]] = {
    VAEConfig.kind: (VAEConfig, VAE),
    AEConfig.kind: (AEConfig, AE),
    VQVAEConfig.kind: (VQVAEConfig, VQVAE),
    LinearGaussianConfig.kind: (LinearGaussianConfig, LinearGaussian),
    FlowVAEConfig.kind: (FlowVAEConfig, FlowVAE),
    HVAEConfig.kind: (HVAEConfig, HVAE),
}


def config_class(kind: str) -> type[ModelConfig]:
    if kind not in REGISTRY:
        raise ConfigError(f"unknown model {kind!r}; choose one of {', '.join(REGISTRY)}")
    return REGISTRY[kind][0]


def build(config: ModelConfig) -> LatentVariableModel:
    """Construct the module registered for ``config``'s kind."""
    return REGISTRY[config.kind][1](config)


def default_config(kind: str, **overrides: Any) -> ModelConfig:
    return config_class(kind)(**overrides)


__all__ = [
    "REGISTRY",
    "AE",
    "AEConfig",
    "FlowVAE",
    "FlowVAEConfig",
    "HVAE",
    "HVAEConfig",
    "VAE",
    "VAEConfig",
    "VQVAE",
    "VQVAEConfig",
    "LatentVariableModel",
    "ModelConfig",
    "build",
]
