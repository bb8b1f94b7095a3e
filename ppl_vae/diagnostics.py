"""Diagnostics of the guide with arviz: PSIS k̂ of the importance weights, the amortization and
approximation gaps, and NUTS gold-standard posteriors; everything exportable as InferenceData.

All three look at a model whose guide q(z|x) has a density over a vector z (a VAE, the
linear-Gaussian model); point-mass guides (AE, VQ-VAE) have no importance weights and are
refused with a :class:`~ppl_vae.errors.ConfigError`. The local q* of the gaps lies in the
guide's family: a diagonal Gaussian per image for a Gaussian guide
(:class:`~ppl_vae.models.capabilities.GaussianGuide`), and for a flow guide or two stochastic
layers the guide itself with its encoder's outputs free per image
(:class:`LocalEncoderOutputs`); other density guides have no gaps, with a note. A guide with
several latent sites (two stochastic layers: ``"z"`` and ``"z2"``) has importance weights and
k̂ like any other; NUTS samples all its sites, and its draws and the guide's are compared as
one vector, the sites joined in the guide's order (``nuts_latent_sites`` in diagnostics.json).

References:

- Yao, Vehtari, Simpson & Gelman (2018), *Yes, but did it work?: Evaluating variational
  inference*: k̂ < 0.5 good, 0.5–0.7 usable, > 0.7 the importance-sampled estimate is
  unreliable.
- Vehtari, Simpson, Gelman, Yao & Gabry (2015–2024), *Pareto smoothed importance sampling*.
- Cremer, Li & Duvenaud (2018), *Inference suboptimality in variational autoencoders*:
  log p(x) − ELBO(q_amortized) = approximation gap [log p(x) − ELBO(q*)] + amortization gap
  [ELBO(q*) − ELBO(q_amortized)], with q* the best member of the guide's family for this x.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS
from tqdm.auto import tqdm

from ppl_vae import data, files, plots, runs
from ppl_vae.distributed import map_batches, share_of, world
from ppl_vae.errors import ConfigError, check
from ppl_vae.inference import weights
from ppl_vae.inference.objectives import ObjectiveConfig, make_elbo
from ppl_vae.inference.svi import SVIStep, run_svi
from ppl_vae.inference.weights import MAX_PLATE_NESTING, log_mean_exp
from ppl_vae.metrics import DENSITY_GUIDE, VECTOR_LATENT, ProgramFacts
from ppl_vae.models.capabilities import GaussianGuide

DIAGNOSTICS_JSON = "diagnostics.json"
IMPORTANCE_NC = "importance.nc"
POSTERIORS_NC = {
    "nuts": "posterior_nuts.nc",
    "amortized": "posterior_q.nc",
    "local": "posterior_q_star.nc",
}
KHAT_THRESHOLDS = (0.5, 0.7)  # Yao et al. (2018)
CONSTANT_SPREAD = 1e-6  # log weights within this many nats of each other are constant


def _arviz():
    """arviz, imported on first use (it is slow to import and warns about its 1.0 refactor)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


@dataclass(frozen=True)
class DiagnoseConfig:
    """Sizes of ``ppl-vae diagnose``; the defaults finish in a few minutes on a 2-core CPU for an
    MLP VAE."""

    images: int = 500
    """Test images for the k̂ of the importance weights."""
    k: int = 1000
    """Importance samples per image (for k̂, log p(x), and the gaps' log p(x))."""
    gap_images: int = 50
    """Test images (the first ones) for the amortization and approximation gaps."""
    local_steps: int = 500
    """Adam steps of the local q*(z|x) per image (decoder frozen)."""
    local_lr: float = 0.05
    """Initial Adam learning rate of q*, decayed exponentially to 1% of it."""
    local_particles: int = 16
    """Particles per step of the local Trace_ELBO."""
    elbo_particles: int = 1000
    """Draws of z for the reported ELBO(q) and ELBO(q*)."""
    nuts_images: int = 2
    """Test images (the first ones) with NUTS posteriors (0: skip NUTS)."""
    nuts_chains: int = 2
    """NUTS chains per image, run one after the other (r_hat needs two or more)."""
    nuts_warmup: int = 100
    """NUTS warm-up steps per chain."""
    nuts_samples: int = 100
    """NUTS draws per chain kept."""
    batch_size: int = 100
    """Images per batch for the importance weights."""
    seed: int = 0
    """Seeds torch and Pyro."""

    def __post_init__(self) -> None:
        for name in ("images", "k", "gap_images", "local_particles", "elbo_particles"):
            check(
                getattr(self, name) >= 1, f"--{name.replace('_', '-')}", ">= 1", getattr(self, name)
            )
        check(self.local_steps >= 0, "--local-steps", ">= 0", self.local_steps)
        check(self.local_lr > 0, "--local-lr", "positive", self.local_lr)
        check(self.nuts_images >= 0, "--nuts-images", ">= 0", self.nuts_images)
        check(self.nuts_chains >= 1, "--nuts-chains", ">= 1", self.nuts_chains)
        check(self.nuts_warmup >= 1, "--nuts-warmup", ">= 1", self.nuts_warmup)
        check(self.nuts_samples >= 1, "--nuts-samples", ">= 1", self.nuts_samples)
        check(self.batch_size >= 1, "--batch-size", ">= 1", self.batch_size)


# ----------------------------------------------------------------------------- what applies


def check_density_guide(model, x: torch.Tensor, where: str | Path = "") -> None:
    """Raise :class:`ConfigError` unless q(z|x) has a density over a vector z; ``where`` (the
    run folder) starts the message."""
    facts = ProgramFacts.of(model, x[:1])
    if not (DENSITY_GUIDE.holds(model, facts) and VECTOR_LATENT.holds(model, facts)):
        prefix = f"{where}: " if where else ""
        raise ConfigError(
            f"{prefix}{type(model).__name__}: q(z|x) is a point mass (or z is not a vector), so it "
            "has no importance weights, k-hat or gaps; diagnose a model with a density guide (vae)"
        )


# ----------------------------------------------------------------------------- PSIS k-hat


def psis(log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pareto k̂ and PSIS-smoothed log p(x) of each column of log importance weights.

    :param torch.Tensor log_w: ``(K, B)`` log p(x, z_k) − log q(z_k|x), K draws per datapoint
        (:func:`ppl_vae.inference.weights.log_weights`).
    :returns: ``(khat, log_px_psis)``, each ``(B,)`` float64 on the CPU. ``khat`` is the shape
        of the generalized Pareto distribution fitted to the largest weights by
        :func:`arviz.psislw`; ``log_px_psis`` is log (1/K) Σ_k w̃_k with the smoothed weights
        w̃ (not normalized). Columns whose log weights are constant to
        :data:`CONSTANT_SPREAD` nats (the guide is the exact posterior) have no tail to fit;
        their k̂ is −inf and their PSIS estimate the plain one.
    """
    az = _arviz()
    lw = log_w.detach().double().cpu().numpy().T.copy()  # (B, K): arviz smooths the last axis
    constant = (lw.max(1) - lw.min(1)) < CONSTANT_SPREAD
    khat = np.full(lw.shape[0], -np.inf)
    smoothed = lw.copy()
    if (~constant).any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # arviz warns once per call about k̂ > 0.7
            out, kss = az.psislw(lw[~constant].copy(), normalize=False)
        smoothed[~constant] = out
        khat[~constant] = kss
    smoothed_t = torch.from_numpy(smoothed)
    log_px = torch.logsumexp(smoothed_t, dim=1) - math.log(lw.shape[1])
    return torch.from_numpy(khat), log_px


@torch.no_grad()
def importance_weights(
    model, inputs: torch.Tensor, k: int, batch_size: int = 100, progress: bool = False,
    seed: int = 0,
) -> torch.Tensor:
    """All ``k`` log importance weights of every input, ``(k, N)`` float64 on the CPU.

    Memory grows as k · N (the weights are kept for k̂), one decoder pass at a time as
    ``batch_size · particle chunk`` images.
    """
    chunk = max(1, min(k, 20_000 // max(1, batch_size)))
    total = share_of(data.num_batches(inputs.shape[0], batch_size))
    bar = tqdm(total=total, desc="log weights", leave=False,
               disable=None if progress and world().main else True)  # fmt: skip

    def rows(x: torch.Tensor) -> torch.Tensor:  # (batch, k)
        parts = [
            weights.log_weights(model.model, model.guide, x, min(chunk, k - start))
            for start in range(0, k, chunk)
        ]
        return torch.cat(parts).T

    # shared over the processes of a distributed job, the same numbers for any number of them
    log_w = map_batches(rows, inputs, batch_size, seed, shape=(k,), dtype=torch.float64,
                        on_batch=bar.update)  # fmt: skip
    bar.close()
    return log_w.T.cpu()


def khat_summary(khat: torch.Tensor) -> dict[str, Any]:
    """Share of k̂ in the bands of Yao et al. (2018) and a histogram (bins of 0.1).

    k̂ is clipped to [−1, 2] for the mean, maximum and histogram: −inf marks constant weights,
    +inf a tail too short to fit (k draws too few), which counts as above 0.7.
    """
    finite = khat.clamp(-1.0, 2.0)
    counts, edges = np.histogram(finite.numpy(), bins=np.arange(-1.0, 2.01, 0.1).round(2))
    low, high = KHAT_THRESHOLDS
    return {
        "khat_mean": float(finite.mean()),
        "khat_max": float(finite.max()),
        "khat_share_good": float((khat < low).double().mean()),
        "khat_share_ok": float(((khat >= low) & (khat <= high)).double().mean()),
        "khat_share_bad": float((khat > high).double().mean()),
        "khat_histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
    }


# ----------------------------------------------------------------------------- local q*(z|x)


class LocalGuide(torch.nn.Module):
    """q*(z|x_b) = N(z_loc_b, diag z_scale_b²): free parameters per datapoint, no encoder.

    The same ``"data"`` plate and ``"z"`` site as the amortized guides, so it pairs with the
    model's ``model(x)`` in any Pyro ELBO. ``z_scale`` is stored as its log.
    """

    def __init__(self, z_loc: torch.Tensor, z_scale: torch.Tensor):
        super().__init__()
        self.z_loc = torch.nn.Parameter(z_loc.detach().clone())
        self.log_z_scale = torch.nn.Parameter(z_scale.detach().clamp(min=1e-6).log())

    @property
    def z_scale(self) -> torch.Tensor:
        return self.log_z_scale.exp()

    def forward(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.z_loc, self.z_scale).to_event(1))

    def select(self, points: list[int]) -> LocalGuide:
        """q* of the datapoints ``points`` alone."""
        return LocalGuide(self.z_loc[points], self.z_scale[points])


class LocalEncoderOutputs(torch.nn.Module):
    """q*(·|x_b): the model's own guide with what its encoder computes from x_b (the raw
    output of ``model.encoder.net``: for a flow guide the base Normal's parameters and the
    context of the transforms, for two stochastic layers those of q(z|x)) replaced by free
    parameters per datapoint.

    The family is the set of distributions the guide can express for *some* encoder output:
    the flow's transforms and the second layer's q(z2|z), which see no x, stay as trained
    (for the hvae that loses nothing: p(z2|z, x) = p(z2|z) in its model). For a Gaussian
    guide this is the family of :class:`LocalGuide`. The substitution is a forward hook on
    the encoder network while the guide runs; the encoder still runs, its output unused.
    Starts at the amortized guide's outputs for ``x``.
    """

    def __init__(self, model, x: torch.Tensor, raw: torch.Tensor | None = None):
        super().__init__()
        self.models = [model]  # a list, so that the model's parameters are not q*'s
        if raw is None:
            with torch.no_grad():
                raw = model.encoder.net(x)
        self.raw = torch.nn.Parameter(raw.detach().clone())

    def forward(self, x: torch.Tensor) -> None:
        model = self.models[0]

        def substitute(module, inputs, output):
            if output.shape != self.raw.shape:
                raise ValueError(
                    f"the local q* was fitted to {self.raw.shape[0]} images; the guide ran on "
                    f"{x.shape[0]}"
                )
            return self.raw.to(output.dtype)

        handle = model.encoder.net.register_forward_hook(substitute)
        try:
            model.guide(x)
        finally:
            handle.remove()

    def select(self, points: list[int]) -> LocalEncoderOutputs:
        """q* of the datapoints ``points`` alone."""
        return LocalEncoderOutputs(self.models[0], None, self.raw[points])


def local_family(model) -> str | None:
    """How the gaps' local q* is made for ``model``: ``"gaussian"`` (:class:`LocalGuide`, a
    Gaussian guide), ``"encoder-outputs"`` (:class:`LocalEncoderOutputs`, a guide whose x
    enters through ``encoder.net``: a flow guide, two stochastic layers), or None."""
    if isinstance(model, GaussianGuide):
        return "gaussian"
    encoder = getattr(model, "encoder", None)
    if isinstance(getattr(encoder, "net", None), torch.nn.Module):
        return "encoder-outputs"
    return None


@contextlib.contextmanager
def frozen(model: torch.nn.Module):
    """``model`` in eval mode with every parameter's ``requires_grad`` off, restored after:
    SVI on another guide then fits that guide's parameters alone."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    model.eval()
    for param, _ in saved:
        param.requires_grad_(False)
    try:
        yield model
    finally:
        for param, flag in saved:
            param.requires_grad_(flag)
        model.train(training)


def fit_local_guide(
    model,
    x: torch.Tensor,
    cfg: DiagnoseConfig,
    progress: bool = False,
    fast: bool = True,
    family: str | None = None,
) -> LocalGuide | LocalEncoderOutputs:
    """Optimize a local q* for the batch ``x`` by SVI, the model frozen.

    For a Gaussian guide a :class:`LocalGuide`, started from the amortized guide's mean and
    marginal standard deviations (:class:`~ppl_vae.models.capabilities.GaussianGuide`), so q*
    can only improve on the diagonal part of q; otherwise a :class:`LocalEncoderOutputs`,
    started from the encoder's outputs (without the fast paths: the recorder does not follow
    a forward hook). Then it takes ``cfg.local_steps`` Adam steps of the one SVI loop on the
    Trace_ELBO with ``cfg.local_particles`` vectorized particles, the learning rate decaying
    from ``cfg.local_lr`` to 1% of it. The loss is a sum over datapoints whose parameters are
    disjoint, and Adam works per coordinate, so every datapoint is fitted independently. The
    model is frozen (:func:`frozen`): its parameters and their gradients stay untouched.

    :param family: ``"gaussian"`` or ``"encoder-outputs"``; default :func:`local_family`.
    """
    if (family or local_family(model)) == "gaussian":
        with torch.no_grad():
            q = model.posterior(x)
            local = LocalGuide(q.mean, q.variance.sqrt())
    else:
        local, fast = LocalEncoderOutputs(model, x), False
    params = list(local.parameters())
    elbo = make_elbo(ObjectiveConfig("trace", cfg.local_particles), fast, params)
    optimizer = torch.optim.Adam(params, lr=cfg.local_lr)
    decay = 0.01 ** (1 / max(1, cfg.local_steps))
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, decay)
    step = SVIStep(elbo(model.model, local), optimizer, fast, scheduler=schedule)
    with frozen(model):
        run_svi(step, itertools.repeat(x, cfg.local_steps), total=cfg.local_steps,
                desc="local q*", progress=progress)  # fmt: skip
    return local


@torch.no_grad()
def mixture_log_px(model, guides: list, x: torch.Tensor, k: int) -> torch.Tensor:
    """log p(x) by multiple importance sampling from the equal mixture of ``guides``.

    k / len(guides) draws z from each guide, each weighted by p(x, z) / ((1/G) Σ_g q_g(z|x))
    (the balance heuristic of Veach & Guibas 1995). The estimate of p(x) is unbiased, so its
    log is a stochastic lower bound of log p(x), and a weight is at most G times the weight
    it would have under its best guide: one poor guide cannot spoil the estimate, as it can
    when single-guide estimates are averaged.
    """
    per_guide = max(1, k // len(guides))
    log_w = []
    for source in guides:
        log_q_source, values = weights.log_density(source, x, {}, per_guide, draw=True)
        log_q = [
            log_q_source if g is source else weights.log_density(g, x, values, per_guide)[0]
            for g in guides
        ]
        log_mixture = torch.logsumexp(torch.stack(log_q), 0) - math.log(len(guides))
        log_joint, _ = weights.log_density(model.model, x, values, per_guide)
        log_w.append(log_joint - log_mixture)
    return log_mean_exp(torch.cat(log_w))


def inference_gaps(
    model, x: torch.Tensor, cfg: DiagnoseConfig, progress: bool = False, fast: bool = True
) -> tuple[dict[str, Any], LocalGuide]:
    """Amortization and approximation gaps (Cremer et al. 2018) of the batch ``x``.

    Per datapoint: ELBO(q) of the amortized guide and ELBO(q*) of :func:`fit_local_guide`,
    each the mean of ``cfg.elbo_particles`` log weights, and log p(x) by importance sampling
    with ``cfg.k`` draws from the better of q and q* (each estimate is a stochastic lower
    bound; the larger is the tighter one). Gaps are reported as means over the batch, in nats
    per image, with their standard errors over images:

    - approximation gap = log p(x) − ELBO(q*): the price of the guide's family;
    - amortization gap = ELBO(q*) − ELBO(q): the price of one encoder for all x.
    """
    local = fit_local_guide(model, x, cfg, progress, fast)
    with torch.no_grad():
        elbo_q = weights.log_weights(model.model, model.guide, x, cfg.elbo_particles).mean(0)
        elbo_local = weights.log_weights(model.model, local, x, cfg.elbo_particles).mean(0)
    log_px = mixture_log_px(model, [model.guide, local], x, cfg.k)
    per_image = {
        "elbo_q": elbo_q,
        "elbo_q_star": elbo_local,
        "log_px_is": log_px,
        "approximation_gap": log_px - elbo_local,
        "amortization_gap": elbo_local - elbo_q,
        "inference_gap": log_px - elbo_q,
    }
    n = x.shape[0]
    results: dict[str, Any] = {"gap_images": n}
    for name, values in per_image.items():
        values = values.double()
        results[name] = values.mean().item()
        results[f"{name}_stderr"] = (values.std() / math.sqrt(n)).item() if n > 1 else 0.0
    return results, local


# ----------------------------------------------------------------------------- NUTS


def latent_sites(model, x: torch.Tensor) -> dict[str, int]:
    """The guide's latent sites, in its order, and the size of each per datum: ``{"z": d}``
    for one latent, ``{"z": d1, "z2": d2}`` for two stochastic layers. The diagnostics' latent
    vector is their concatenation in this order."""
    with torch.no_grad():
        trace = pyro.poutine.trace(model.guide).get_trace(x)
    return {name: site["value"][0].numel() for name, site in weights.latent_nodes(trace).items()}


def _joined(values: dict[str, torch.Tensor], sites, lead: int) -> torch.Tensor:
    """The latent sites' values, each flattened after its ``lead`` leading dimensions, joined
    in the order of ``sites``."""
    return torch.cat([values[name].reshape(*values[name].shape[:lead], -1) for name in sites], -1)


def nuts_draws(model, x: torch.Tensor, cfg: DiagnoseConfig, progress: bool = False) -> torch.Tensor:
    """NUTS draws from p(z|x) for one image ``x`` ``(1, D)``, the trained decoder fixed.

    Runs ``cfg.nuts_chains`` chains one after the other (``pyro.infer.MCMC`` in one process)
    from the guide's point summary ``encode(x)`` (its mean) plus a little jitter at ``"z"``;
    the guide's other latent sites (a second stochastic layer's ``"z2"``) start at a draw from
    the guide given that z. Returns ``(chains, draws, latent size)``, the latent sites joined
    in the guide's order (:func:`latent_sites`).
    """
    sites = latent_sites(model, x)
    z_init = model.encode(x).detach()
    chains = []
    for _ in range(cfg.nuts_chains):
        init = {"z": z_init + 0.1 * torch.randn_like(z_init)}
        if len(sites) > 1:
            with torch.no_grad():
                given = poutine.condition(model.guide, data=init)
                trace = poutine.trace(given).get_trace(x)
            init.update({name: trace.nodes[name]["value"].detach() for name in sites})
        kernel = NUTS(model.model, max_plate_nesting=MAX_PLATE_NESTING)
        mcmc = MCMC(
            kernel,
            num_samples=cfg.nuts_samples,
            warmup_steps=cfg.nuts_warmup,
            initial_params=init,
            disable_progbar=not (progress and sys.stderr.isatty()),
        )
        mcmc.run(x)
        chains.append(_joined(mcmc.get_samples(), sites, 1))
    return torch.stack(chains).detach()


def to_inference_data(draws: torch.Tensor, observations: list[int]):
    """``(chains, draws, points, z_dim)`` → InferenceData with ``z`` over dims point, z_dim."""
    az = _arviz()
    return az.from_dict(
        posterior={"z": draws.double().cpu().numpy()},
        coords={"point": observations, "z_dim": list(range(draws.shape[-1]))},
        dims={"z": ["point", "z_dim"]},
    )


def guide_draws_for(guide_fn, x: torch.Tensor, chains: int, n: int) -> torch.Tensor:
    """``chains · n`` independent draws of z from ``guide_fn(x)`` as ``(chains, n, B, z_dim)``:
    split into 'chains' like the NUTS draws they are compared with (any split of independent
    draws is a valid set of chains, and arviz's r_hat needs two or more). With several latent
    sites, z is their draws joined in the guide's order, as in :func:`nuts_draws`."""
    with torch.no_grad():
        _, values = weights.log_density(guide_fn, x, {}, chains * n, draw=True)
    return _joined(values, values, 2).reshape(chains, n, x.shape[0], -1)


def compare_posteriors(idata: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """arviz summaries (mean, sd, ess, r_hat) of NUTS, and each guide's discrepancy from NUTS:
    mean over points and dims of |mean_q − mean_NUTS| / sd_NUTS and of sd_q / sd_NUTS."""
    az = _arviz()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summaries = {
            name: az.summary(data, var_names=["z"], kind="all", round_to=None)
            for name, data in idata.items()
        }
    nuts = summaries["nuts"]
    results: dict[str, Any] = {
        "nuts_r_hat_max": float(nuts["r_hat"].max()),
        "nuts_ess_bulk_min": float(nuts["ess_bulk"].min()),
        "nuts_ess_tail_min": float(nuts["ess_tail"].min()),
    }
    for name in idata:
        if name == "nuts":
            continue
        frame = summaries[name]
        results[f"{name}_mean_error_in_sd"] = float(
            ((frame["mean"] - nuts["mean"]).abs() / nuts["sd"]).mean()
        )
        results[f"{name}_sd_ratio"] = float((frame["sd"] / nuts["sd"]).mean())
    return results, summaries


# ----------------------------------------------------------------------------- the whole run


def diagnose_run(
    run_dir: Path,
    cfg: DiagnoseConfig | None = None,
    device: str = "auto",
    progress: bool = True,
    dataset: data.Dataset | None = None,
) -> dict[str, Any]:
    """k̂, gaps and NUTS comparison of a run folder's model on test images.

    Writes ``diagnostics.json``, ``importance.nc`` (the log weights, k̂ and both log p(x)
    estimates), ``posterior_nuts.nc``, ``posterior_q.nc``, ``posterior_q_star.nc`` and the
    figures ``khat.png`` and ``posterior_pairs.png``.
    """
    cfg = cfg or DiagnoseConfig()
    run_dir = Path(run_dir)
    runs.open_for_writing(run_dir, DIAGNOSTICS_JSON)
    # every output is renamed into place together, once all are written
    hint = "free space or fix the permissions, then rerun"
    with files.Staged(run_dir, hint, keep=world().main) as stage:  # rank 0 writes
        return _diagnose(stage, cfg, device, progress, dataset)


def _diagnose(stage, cfg, device, progress, dataset) -> dict[str, Any]:
    run_dir = stage.folder
    torch.manual_seed(cfg.seed)
    pyro.set_rng_seed(cfg.seed)
    torch_device = data.resolve_device(device)
    run_cfg, model, _ = runs.load_model(run_dir, torch_device)
    dataset = dataset or data.load(run_cfg.data, torch_device)
    inputs = data.eval_inputs(dataset.test, run_cfg.data.binarization)
    check_density_guide(model, inputs, run_dir)
    az = _arviz()

    # k-hat of the importance weights
    x = inputs[: cfg.images]
    log_w = importance_weights(model, x, cfg.k, cfg.batch_size, progress, cfg.seed)
    khat, log_px_psis = psis(log_w)
    log_px_is = log_mean_exp(log_w)
    results: dict[str, Any] = {"config": asdict(cfg), "images": x.shape[0], "k": cfg.k}
    results.update(khat_summary(khat))
    results["nll_is"] = -log_px_is.mean().item()
    results["nll_psis"] = -log_px_psis.mean().item()
    importance = az.from_dict(
        sample_stats={"log_weight": log_w.unsqueeze(0).numpy()},  # (chain, draw, point)
        constant_data={
            "khat": khat.numpy(),
            "log_px_is": log_px_is.numpy(),
            "log_px_psis": log_px_psis.numpy(),
        },
        coords={"point": list(range(x.shape[0]))},
        dims={
            "log_weight": ["point"],
            "khat": ["point"],
            "log_px_is": ["point"],
            "log_px_psis": ["point"],
        },  # fmt: skip
    )
    importance.to_netcdf(str(stage.path(IMPORTANCE_NC)))
    plots.khat_figure(khat, stage.path(plots.KHAT))

    # amortization and approximation gaps (q* in the guide's family, fitted per image)
    x_gap = inputs[: cfg.gap_images]
    local, family = None, local_family(model)
    if family is not None:
        gaps, local = inference_gaps(model, x_gap, cfg, progress, run_cfg.fast)
        results.update(gaps)
        results["gap_local_family"] = family
    else:
        results["gap_images"] = 0
        results["notes"] = [
            f"the gaps are left out: {type(model).__name__}'s guide has neither a Gaussian "
            "q(z|x) nor an encoder network whose outputs a local q* could free"
        ]

    # NUTS on a few images, against q (and q*)
    if cfg.nuts_images:
        points = list(range(min(cfg.nuts_images, x_gap.shape[0])))
        nuts = torch.stack(
            [nuts_draws(model, x_gap[i : i + 1], cfg, progress) for i in points], dim=2
        )  # (chains, draws, points, z_dim)
        chains, n = cfg.nuts_chains, cfg.nuts_samples
        sub = x_gap[points]
        idata = {
            "nuts": to_inference_data(nuts, points),
            "amortized": to_inference_data(guide_draws_for(model.guide, sub, chains, n), points),
        }
        if local is not None:
            local_sub = local.select(points)
            idata["local"] = to_inference_data(guide_draws_for(local_sub, sub, chains, n), points)
        for name, item in idata.items():
            item.to_netcdf(str(stage.path(POSTERIORS_NC[name])))
        comparison, summaries = compare_posteriors(idata)
        results["nuts_images"] = len(points)
        results["nuts_latent_sites"] = latent_sites(model, sub[:1])  # joined in this order
        results.update(comparison)
        results["nuts_summary_point0"] = (
            summaries["nuts"]
            .iloc[: nuts.shape[-1]][["mean", "sd", "ess_bulk", "r_hat"]]
            .round(3)
            .to_dict(orient="index")
        )
        plots.posterior_pairs_figure(idata, stage.path(plots.POSTERIOR_PAIRS))
    stage.write_text(DIAGNOSTICS_JSON, json.dumps(results, indent=2) + "\n")
    return results


DIAGNOSTIC_LABELS: dict[str, str] = {
    "khat_share_bad": "share of test images with k̂ > 0.7 (unreliable importance sampling)",
    "khat_share_ok": "share with 0.5 ≤ k̂ ≤ 0.7",
    "khat_share_good": "share with k̂ < 0.5",
    "khat_mean": "mean k̂",
    "nll_is": "importance-sampled -log p(x) on these images (nats/image)",
    "nll_psis": "PSIS-smoothed -log p(x) on these images (nats/image)",
    "elbo_q": "ELBO(q amortized) (nats/image)",
    "elbo_q_star": "ELBO(q* local, decoder frozen) (nats/image)",
    "log_px_is": "log p(x), importance sampled (nats/image)",
    "amortization_gap": "amortization gap ELBO(q*) − ELBO(q) (nats/image)",
    "approximation_gap": "approximation gap log p(x) − ELBO(q*) (nats/image)",
    "inference_gap": "inference gap log p(x) − ELBO(q) (nats/image)",
    "nuts_r_hat_max": "NUTS: largest r_hat",
    "nuts_ess_bulk_min": "NUTS: smallest bulk ESS",
    "amortized_mean_error_in_sd": "q vs NUTS: mean |Δ mean| / sd_NUTS",
    "amortized_sd_ratio": "q vs NUTS: mean sd_q / sd_NUTS",
    "local_mean_error_in_sd": "q* vs NUTS: mean |Δ mean| / sd_NUTS",
    "local_sd_ratio": "q* vs NUTS: mean sd_q* / sd_NUTS",
}


def format_diagnostics(results: dict[str, Any]) -> list[str]:
    """One line per reported diagnostic (for the CLI and report.md)."""
    lines = [f"k̂ on {results['images']} test images (k = {results['k']}), gaps on "
             f"{results['gap_images']}:"]  # fmt: skip
    for key, label in DIAGNOSTIC_LABELS.items():
        if key in results:
            extra = ""
            if f"{key}_stderr" in results:
                extra = f" ± {results[key + '_stderr']:.2f}"
            lines.append(f"  {label}: {results[key]:.4g}{extra}")
    lines += [f"  note: {note}" for note in results.get("notes", [])]
    return lines
