"""Evaluation: test -ELBO, importance-sampled log p(x), per-run results in ``eval.json``.

Nothing here changes parameters or optimizer state: every function runs under
``torch.no_grad`` and only reads the model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.infer.util import is_validation_enabled
from tqdm.auto import tqdm

from ppl_vae import data, fast, runs
from ppl_vae.config import EvalConfig, ObjectiveConfig
from ppl_vae.objectives import MAX_PLATE_NESTING, log_weights, loss_module

EVAL_JSON = "eval.json"


@torch.no_grad()
def neg_elbo(
    model, inputs: torch.Tensor, objective: ObjectiveConfig, batch_size: int = 500
) -> float:
    """Mean -ELBO per datapoint of ``inputs`` (flat floats) under ``objective``.

    The first batch runs with Pyro's validation as configured; the rest without it, so the
    ``"trace"`` objective takes the lean path of :mod:`ppl_vae.fast` (same estimator).
    """
    loss_fn = loss_module(model, objective)
    total = torch.zeros((), device=inputs.device)
    for i, x in enumerate(data.batches(inputs, batch_size)):
        with pyro.validation_enabled(i == 0 and is_validation_enabled()):
            total += loss_fn(x)
    return total.item() / inputs.shape[0]


@torch.no_grad()
def log_likelihood(
    model,
    inputs: torch.Tensor,
    k: int = 1000,
    batch_size: int = 500,
    particle_chunk: int = 10,
    progress: bool = False,
    lean: bool = True,
) -> torch.Tensor:
    """Importance-sampled log p(x) with ``k`` draws from the guide, one estimate per datapoint.

    log p(x) ≈ log (1/k) Σ_i p(x, z_i) / q(z_i|x),  z_i ~ q(z|x). The estimate is a lower bound in
    expectation (Jensen) that tightens as k grows (Burda et al. 2015). Draws are taken
    ``particle_chunk`` at a time and merged with ``logaddexp``, so memory stays bounded by
    ``batch_size · particle_chunk`` likelihood evaluations whatever ``k`` is.

    The first chunk runs through Pyro's traces with validation (model/guide, supports and
    shapes are checked once, on the real inputs); the others through
    :func:`ppl_vae.fast.log_weights`, the same weights without trace bookkeeping
    (``lean=False``: every chunk through the traces).
    """
    estimates = []
    chunks = [min(particle_chunk, k - start) for start in range(0, k, particle_chunk)]
    bar = tqdm(
        total=data.num_batches(inputs.shape[0], batch_size) * len(chunks),
        desc=f"log p(x), k={k}",
        disable=None if progress else True,
        leave=False,
    )
    validated = False
    for x in data.batches(inputs, batch_size):
        acc = None
        for size in chunks:
            if validated and lean:
                log_w = fast.log_weights(
                    model.model, model.guide, x, size, plate_dim=-(MAX_PLATE_NESTING + 1)
                )
            else:
                log_w, validated = log_weights(model.model, model.guide, x, size), True
            lse = torch.logsumexp(log_w, dim=0)
            acc = lse if acc is None else torch.logaddexp(acc, lse)
            bar.update()
        estimates.append(acc - math.log(k))
    bar.close()
    return torch.cat(estimates)


def evaluate_run(
    run_dir: Path,
    eval_cfg: EvalConfig | None = None,
    split: str = "test",
    device: str = "auto",
    progress: bool = True,
    dataset: data.Dataset | None = None,
) -> dict[str, Any]:
    """Evaluate a run folder's model on ``split`` and write the numbers to ``eval.json``."""
    torch_device = data.resolve_device(device)
    cfg, model, checkpoint = runs.load_model(run_dir, torch_device)
    eval_cfg = eval_cfg or cfg.eval
    dataset = dataset or data.load(cfg.data, torch_device)
    inputs = data.eval_inputs(getattr(dataset, split), cfg.data.binarization)
    log_px = log_likelihood(
        model, inputs, eval_cfg.k, eval_cfg.batch_size, eval_cfg.particle_chunk, progress
    )
    nll = -log_px.mean().item()
    results = {
        "split": split,
        "images": inputs.shape[0],
        "epoch": checkpoint["epoch"],
        "neg_elbo": neg_elbo(model, inputs, ObjectiveConfig("trace"), eval_cfg.batch_size),
        "neg_elbo_meanfield": neg_elbo(
            model, inputs, ObjectiveConfig("meanfield"), eval_cfg.batch_size
        ),
        "nll_is": nll,
        "nll_is_stderr": (log_px.std() / math.sqrt(log_px.numel())).item(),
        "k": eval_cfg.k,
        "bits_per_dim": nll / (inputs.shape[1] * math.log(2)),
    }
    (Path(run_dir) / EVAL_JSON).write_text(json.dumps(results, indent=2) + "\n")
    return results
