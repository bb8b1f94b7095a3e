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
from pyro import poutine
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


# Every number an evaluation may report, with the words the CLI and report.md print for it;
# a model reports the subset that makes sense for it (see its ``evaluation_metrics``).
LABELS: dict[str, str] = {
    "neg_elbo": "-ELBO, Trace_ELBO (nats/image)",
    "neg_elbo_meanfield": "-ELBO, TraceMeanField_ELBO (nats/image)",
    "nll_is": "importance-sampled -log p(x) (nats/image)",
    "bits_per_dim": "-log p(x) in bits/dim",
    "recon_nll": "reconstruction -log p(x | z = encode(x)) (nats/image)",
    "recon_sq_error": "reconstruction squared error Σ (x - E[x|z])² (per image)",
    "neg_log_joint": "training objective at the code, -log p(x, z = encoder(x)) (nats/image)",
    "aggregate_kl_to_prior": "KL(N(mean, cov of z ~ q(z|x) over the data) || N(0, I)) (nats)",
    "aggregate_sq_norm_per_dim": "mean |z|² / dim of z ~ q(z|x) over the data (1 under N(0, I))",
    "kl_constant": "KL = positions · log K, a constant (nats/image)",
    "vq_neg_elbo": "-ELBO = reconstruction -log p(x|z_q) + positions · log K (nats/image)",
    "perplexity": "codebook perplexity exp(H(code usage)) on these images",
    "codebook_usage": "fraction of codes used on these images",
    "code_prior_nll": "code prior -log p(codes) (nats/image)",
    "code_prior_bits_per_position": "code prior, bits per code position (uniform: log2 K)",
    "uniform_bits_per_position": "uniform code prior, bits per code position (log2 K)",
    "code_prior_bits_per_dim": "code prior -log p(codes) in bits per pixel",
    "code_prior_neg_elbo": "-ELBO with the code prior: reconstruction + -log p(codes) (nats/image)",
}


def format_results(results: dict[str, Any]) -> list[str]:
    """One line per reported number, then the notes (for the CLI)."""
    lines = [f"{results['split']} set, {results['images']} images:"]
    for key, label in LABELS.items():
        if key in results:
            extra = ""
            if key == "nll_is":
                extra = f" ± {results['nll_is_stderr']:.2f} (k={results['k']})"
            lines.append(f"  {label}: {results[key]:.4g}{extra}")
    lines += [f"  note: {note}" for note in results.get("notes", [])]
    return lines


@torch.no_grad()
def reconstruction_metrics(model, inputs: torch.Tensor, batch_size: int = 500) -> dict[str, float]:
    """Mean -log p(x | z = encode(x)) and mean Σ_pixels (x − E[x|z])² over ``inputs``."""
    nll = torch.zeros((), device=inputs.device, dtype=torch.float64)
    sq_error = torch.zeros_like(nll)
    for x in data.batches(inputs, batch_size):
        nll -= model.reconstruction_log_prob(x).sum()
        sq_error += (x - model.reconstruct(x)).pow(2).sum()
    n = inputs.shape[0]
    return {"recon_nll": nll.item() / n, "recon_sq_error": sq_error.item() / n}


@torch.no_grad()
def guide_draws(model, inputs: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """One z ~ q(z|x) per input, read from the guide's ``"z"`` site, flattened per input."""
    draws = []
    for x in data.batches(inputs, batch_size):
        z = poutine.trace(model.guide).get_trace(x).nodes["z"]["value"]
        draws.append(z.reshape(x.shape[0], -1))
    return torch.cat(draws)


@torch.no_grad()
def aggregate_posterior_gap(model, inputs: torch.Tensor, batch_size: int = 500) -> dict[str, float]:
    """How far the aggregate posterior q(z) = mean_x q(z|x) is from N(0, I).

    From one draw z ~ q(z|x) per input: KL(N(m, S) || N(0, I)) = ½ (tr S + |m|² − d − log det S)
    for the Gaussian with q(z)'s sample mean m and covariance S (a moment-matched summary, in
    float64), and mean |z|²/d (1 under N(0, I)). A VAE's KL term pulls q(z) towards the prior;
    an autoencoder's codes are under no such pull.
    """
    z = guide_draws(model, inputs, batch_size).double()
    d = z.shape[1]
    z_mean = z.mean(0)
    z_cov = torch.cov(z.T).reshape(d, d)
    logdet = torch.linalg.slogdet(z_cov)[1]
    kl = 0.5 * (z_cov.trace() + z_mean.dot(z_mean) - d - logdet)
    return {
        "aggregate_kl_to_prior": kl.item(),
        "aggregate_sq_norm_per_dim": z.pow(2).sum(1).mean().item() / d,
    }


def density_guide_metrics(
    model, inputs: torch.Tensor, eval_cfg: EvalConfig, progress: bool = False
) -> dict[str, Any]:
    """-ELBO (both estimators), importance-sampled log p(x) and reconstruction error."""
    log_px = log_likelihood(
        model, inputs, eval_cfg.k, eval_cfg.batch_size, eval_cfg.particle_chunk, progress
    )
    nll = -log_px.mean().item()
    return {
        "neg_elbo": neg_elbo(model, inputs, ObjectiveConfig("trace"), eval_cfg.batch_size),
        "neg_elbo_meanfield": neg_elbo(
            model, inputs, ObjectiveConfig("meanfield"), eval_cfg.batch_size
        ),
        "nll_is": nll,
        "nll_is_stderr": (log_px.std() / math.sqrt(log_px.numel())).item(),
        "k": eval_cfg.k,
        "bits_per_dim": nll / (inputs.shape[1] * math.log(2)),
        **reconstruction_metrics(model, inputs, eval_cfg.batch_size),
    }


def point_guide_metrics(model, inputs: torch.Tensor, batch_size: int = 500) -> dict[str, Any]:
    """For a point-mass guide: reconstruction error and the training objective at the atom."""
    return {
        **reconstruction_metrics(model, inputs, batch_size),
        "neg_log_joint": neg_elbo(model, inputs, ObjectiveConfig("trace"), batch_size),
    }


def evaluate_run(
    run_dir: Path,
    eval_cfg: EvalConfig | None = None,
    split: str = "test",
    device: str = "auto",
    progress: bool = True,
    dataset: data.Dataset | None = None,
) -> dict[str, Any]:
    """Evaluate a run folder's model on ``split`` and write the numbers to ``eval.json``.

    Which numbers depends on the model (its ``evaluation_metrics``): a density guide gets the
    -ELBO and importance-sampled log p(x); point-mass guides (AE, VQ-VAE) get reconstruction
    errors and their own constants, with a note saying why.
    """
    torch_device = data.resolve_device(device)
    cfg, model, checkpoint = runs.load_model(run_dir, torch_device)
    eval_cfg = eval_cfg or cfg.eval
    dataset = dataset or data.load(cfg.data, torch_device)
    inputs = data.eval_inputs(getattr(dataset, split), cfg.data.binarization)
    results = {
        "split": split,
        "images": inputs.shape[0],
        "epoch": checkpoint["epoch"],
        **model.evaluation_metrics(inputs, eval_cfg, progress),
    }
    (Path(run_dir) / EVAL_JSON).write_text(json.dumps(results, indent=2) + "\n")
    return results
