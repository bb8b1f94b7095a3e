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
from ppl_vae.errors import RunDirError
from ppl_vae.objectives import MAX_PLATE_NESTING, kl_standard_normal, log_weights, loss_module

EVAL_JSON = "eval.json"
EVALUATE_K = 5000
"""Importance samples per image of ``ppl-vae evaluate`` (training's final evaluation uses the
run's ``--eval.k``)."""
ACTIVE_THRESHOLD = 0.01
"""Burda et al. (2015): a unit is active when the variance of its posterior mean exceeds this."""


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
    batch_size: int = 100,
    particle_chunk: int = 50,
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
    :func:`ppl_vae.fast.log_weights`, the same weights (to float rounding: fused densities)
    without trace bookkeeping, recorded and replayed as a graph of tensor ops for
    ``capturable`` models (:class:`ppl_vae.fast.CapturedLogWeights`, bit for bit the lean
    weights). ``lean=False``: every chunk through the traces.
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
    plate_dim = -(MAX_PLATE_NESTING + 1)
    weights = fast.CapturedLogWeights(model) if getattr(model, "capturable", False) else None
    for x in data.batches(inputs, batch_size):
        acc = None
        for size in chunks:
            if validated and lean and weights is not None:
                log_w = weights(x, size, plate_dim)
            elif validated and lean:
                log_w = fast.log_weights(model.model, model.guide, x, size, plate_dim)
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
    "active_units": "active units: Cov_x(E_q[z_i]) > 0.01 (Burda et al. 2015)",
    "kl_sum": "KL(q(z|x) || p(z)), analytic, summed over dimensions (nats/image)",
    "reference_nll_of_samples": "-log p(samples) under the reference VAE (nats/image)",
    "reference_nll_of_data": "-log p(x) of these test images under the reference VAE",
    "kl_constant": "KL = positions · log K, a constant (nats/image)",
    "vq_neg_elbo": "-ELBO = reconstruction -log p(x|z_q) + positions · log K (nats/image)",
    "perplexity": "codebook perplexity exp(H(code usage)) on these images",
    "codebook_usage": "fraction of codes used on these images",
    "dead_codes": "dead codes: codes no test image uses",
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
            if key == "reference_nll_of_samples":
                extra = (
                    f" ± {results[key + '_stderr']:.2f} ({results['reference_samples']} samples)"
                )
            if key == "active_units" and "posterior_mean_variance" in results:
                extra = f" of {len(results['posterior_mean_variance'])}"
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
        **active_units(model, inputs, eval_cfg.batch_size),
    }


@torch.no_grad()
def active_units(
    model, inputs: torch.Tensor, batch_size: int = 500, threshold: float = ACTIVE_THRESHOLD
) -> dict[str, Any]:
    """Active units (Burda et al. 2015, sec. 5.2): dimension i of z is active when
    Cov_x(E_q[z_i|x]) > ``threshold``, the variance over the data of its posterior mean.

    Uses :meth:`encode` (the posterior mean for Gaussian guides, the code for point masses) in
    float64; a unit that does not vary with x carries no information about x.

    :returns: ``active_units`` (count), ``posterior_mean_variance`` (one value per dimension).
    """
    z_loc = torch.cat([model.encode(x).flatten(1) for x in data.batches(inputs, batch_size)])
    variance = z_loc.double().var(0)
    return {
        "active_units": int((variance > threshold).sum()),
        "posterior_mean_variance": variance.tolist(),
    }


@torch.no_grad()
def kl_per_dimension(z_loc_scale, inputs: torch.Tensor, batch_size: int = 500) -> dict[str, Any]:
    """Mean analytic KL(q(z_i|x) || N(0, 1)) per latent dimension over ``inputs``.

    For diagonal Gaussian guides: ``z_loc_scale(x)`` returns ``(z_loc, z_scale)``; the KL of
    each coordinate is :func:`ppl_vae.objectives.kl_standard_normal`.

    :returns: ``kl_per_dim`` (list, nats) and ``kl_sum`` (their total).
    """
    total = None
    for x in data.batches(inputs, batch_size):
        z_loc, z_scale = z_loc_scale(x)
        kl = kl_standard_normal(z_loc.double(), z_scale.double()).sum(0)
        total = kl if total is None else total + kl
    kl = total / inputs.shape[0]
    return {"kl_per_dim": kl.tolist(), "kl_sum": kl.sum().item()}


@torch.no_grad()
def reference_metrics(
    model, reference, inputs: torch.Tensor, eval_cfg: EvalConfig, binary: bool,
    n: int = 1000, progress: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """-log p under a reference density model (a trained VAE) of ``n`` samples of ``model``
    and, for scale, of the first ``n`` test images.

    A sample is the mean image of p(x|z), z ~ p(z) (``model.sample``); for a binary reference
    likelihood it is binarized by one Bernoulli draw per pixel, as the test images are. Each
    -log p is importance sampled with the reference's guide and ``eval_cfg.k`` draws.
    """
    means = torch.cat([model.sample(min(500, n - i)) for i in range(0, n, 500)])
    samples = torch.bernoulli(means.clamp(0, 1)) if binary else means
    args = (eval_cfg.k, eval_cfg.batch_size, eval_cfg.particle_chunk, progress)
    nll_samples = -log_likelihood(reference, samples, *args)
    nll_data = -log_likelihood(reference, inputs[:n], *args)
    return {
        "reference_nll_of_samples": nll_samples.mean().item(),
        "reference_nll_of_samples_stderr": (nll_samples.std() / math.sqrt(n)).item(),
        "reference_nll_of_data": nll_data.mean().item(),
        "reference_samples": n,
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
    images: int = 0,
    reference_dir: Path | None = None,
) -> dict[str, Any]:
    """Evaluate a run folder's model on ``split`` and write the numbers to ``eval.json``.

    Which numbers depends on the model (its ``evaluation_metrics``): a density guide gets the
    -ELBO and importance-sampled log p(x); point-mass guides (AE, VQ-VAE) get reconstruction
    errors and their own constants, with a note saying why. ``images`` > 0 evaluates the
    first ``images`` images of the split only. ``reference_dir``: a run folder of a density
    model (a VAE) under which the model's samples are scored (:func:`reference_metrics`).
    """
    torch_device = data.resolve_device(device)
    cfg, model, checkpoint = runs.load_model(run_dir, torch_device)
    eval_cfg = eval_cfg or cfg.eval
    dataset = dataset or data.load(cfg.data, torch_device)
    inputs = data.eval_inputs(getattr(dataset, split), cfg.data.binarization)
    if images:
        inputs = inputs[:images]
    results = {
        "split": split,
        "images": inputs.shape[0],
        "epoch": checkpoint["epoch"],
        **model.evaluation_metrics(inputs, eval_cfg, progress),
    }
    if reference_dir is not None:
        ref_cfg, reference, _ = runs.load_model(reference_dir, torch_device)
        if ref_cfg.data.binarization != cfg.data.binarization:
            raise RunDirError(
                f"{reference_dir}: the reference was trained with --data.binarization "
                f"{ref_cfg.data.binarization}, this run with {cfg.data.binarization}"
            )
        results["reference"] = str(reference_dir)
        results.update(
            reference_metrics(
                model,
                reference,
                inputs,
                eval_cfg,
                cfg.data.binarization != "none",
                min(1000, inputs.shape[0]),
                progress,
            )  # fmt: skip
        )
    (Path(run_dir) / EVAL_JSON).write_text(json.dumps(results, indent=2) + "\n")
    return results
