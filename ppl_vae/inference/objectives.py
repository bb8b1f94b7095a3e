"""The objective table: ``--objective NAME`` → the Pyro ELBO that estimates it, in one place.

Every objective works on the same model/guide pair. :func:`loss_module` returns Pyro's module
form of the ELBO (``elbo(model.model, model.guide)`` is an ``nn.Module`` whose forward is the
differentiable loss, summed over the ``"data"`` plate), which :func:`ppl_vae.train.fit` drives
with a torch optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from pyro.infer import ELBO, Trace_ELBO

from ppl_vae.errors import ConfigError, check
from ppl_vae.inference.estimators import (
    STL_ELBO,
    ImportanceWeightedELBO,
    LeanTrace_ELBO,
    MeanField_ELBO,
    TraceGraphModule_ELBO,
)
from ppl_vae.inference.weights import MAX_PLATE_NESTING

ObjectiveName = Literal["trace", "meanfield", "tracegraph", "renyi", "iwae", "stl", "dreg"]


@dataclass(frozen=True)
class ObjectiveConfig:
    name: ObjectiveName = "trace"
    """trace: Trace_ELBO (Monte Carlo KL); meanfield: TraceMeanField_ELBO (analytic KL; refused
    where a latent site has none: a flow guide, a mixture prior);
    tracegraph: TraceGraph_ELBO; renyi: Rényi bound of order --objective.alpha; iwae:
    importance-weighted bound, per datapoint; stl: ELBO with sticking-the-landing gradients;
    dreg: IWAE bound with doubly reparameterized gradients (see ppl_vae.inference)."""
    num_particles: int = 1
    """Samples of z per datapoint in each ELBO estimate (vectorized); K of iwae/renyi/dreg."""
    alpha: float = 0.5
    """Order α of the Rényi bound (--objective renyi); α ≠ 1, and α = 0 is the IWAE bound."""

    def __post_init__(self) -> None:
        check(self.num_particles >= 1, "--objective.num-particles", ">= 1", self.num_particles)
        check(
            self.name != "renyi" or self.alpha != 1,
            "--objective.alpha",
            "different from 1 for --objective renyi (α = 1 is the ELBO: --objective trace)",
            self.alpha,
        )


def _pyro_kwargs(cfg: ObjectiveConfig) -> dict:
    return {
        "num_particles": cfg.num_particles,
        "vectorize_particles": cfg.num_particles > 1,
        "max_plate_nesting": MAX_PLATE_NESTING,
    }


def _trace(cfg: ObjectiveConfig, fast: bool, own: list[torch.Tensor]) -> ELBO:
    if fast:
        return LeanTrace_ELBO(own_params=own, **_pyro_kwargs(cfg))
    return Trace_ELBO(**_pyro_kwargs(cfg))


# name → (cfg, fast, the trained module's own parameters) → ELBO
OBJECTIVES: dict[str, Callable[[ObjectiveConfig, bool, list[torch.Tensor]], ELBO]] = {
    "trace": _trace,
    "meanfield": lambda cfg, fast, own: MeanField_ELBO(**_pyro_kwargs(cfg)),
    "tracegraph": lambda cfg, fast, own: TraceGraphModule_ELBO(**_pyro_kwargs(cfg)),
    "renyi": lambda cfg, fast, own: ImportanceWeightedELBO(
        cfg.num_particles, cfg.alpha, own_params=own, fused=fast
    ),
    "iwae": lambda cfg, fast, own: ImportanceWeightedELBO(
        cfg.num_particles, 0.0, own_params=own, fused=fast
    ),
    "stl": lambda cfg, fast, own: STL_ELBO(cfg.num_particles, own_params=own, fused=fast),
    "dreg": lambda cfg, fast, own: ImportanceWeightedELBO(
        cfg.num_particles, 0.0, dreg=True, own_params=own, fused=fast
    ),
}
assert set(OBJECTIVES) == set(get_args(ObjectiveName)), "the table and --objective's choices"


def make_elbo(cfg: ObjectiveConfig, fast: bool = True, own_params: Iterable = ()) -> ELBO:
    """The ELBO of the objective ``cfg.name``.

    :param fast: the fast paths (``--no-fast`` turns them off): ``trace`` is
        :class:`~ppl_vae.inference.estimators.LeanTrace_ELBO` rather than Pyro's ``Trace_ELBO``
        (the same estimator), and the per-datum objectives use fused densities.
    :param own_params: parameters whose ``pyro.module`` registrations may skip the param store.
    """
    if cfg.name not in OBJECTIVES:
        names = ", ".join(OBJECTIVES)
        raise ConfigError(f"--objective {cfg.name!r} is unknown; choose one of {names}")
    return OBJECTIVES[cfg.name](cfg, fast, list(own_params))


def own_parameters(model: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters whose ``pyro.module`` registrations the fast paths answer directly."""
    return [p for p in model.parameters() if p.requires_grad]


def loss_module(model, cfg: ObjectiveConfig, fast: bool = True) -> torch.nn.Module:
    """``elbo(model.model, model.guide)``: an ``nn.Module`` giving -ELBO summed over the batch."""
    return make_elbo(cfg, fast, own_parameters(model))(model.model, model.guide)
