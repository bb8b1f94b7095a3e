"""Metrics: pure functions of a model and data, and the table of what evaluation reports.

Nothing here changes parameters or optimizer state: every estimate runs under
``torch.no_grad`` and only reads the model. Which numbers a model gets is decided by
:data:`METRICS`, a table of metric groups with what each needs: a density guide (read off the
guide's program: no point-mass site), a vector latent, a factorized Gaussian guide and prior (the
:class:`~ppl_vae.models.capabilities.GaussianGuide` and
:class:`~ppl_vae.models.capabilities.ExplicitPrior` capabilities, and their distributions), a
codebook... A group whose needs a model does not meet is absent from its results, never
computed on a wrong assumption; every number a group returns has a label, or the evaluation
fails (a test runs every registered model through it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.util import is_validation_enabled
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence
from tqdm.auto import tqdm

from ppl_vae import data
from ppl_vae.distributed import map_batches, seeded, share_of, world
from ppl_vae.errors import check
from ppl_vae.inference import weights
from ppl_vae.inference.estimators import same_latent_order
from ppl_vae.inference.kl import has_analytic_kl
from ppl_vae.inference.objectives import ObjectiveConfig, loss_module, own_parameters
from ppl_vae.inference.recording import RecordedLogWeights, recordable
from ppl_vae.inference.svi import check_program
from ppl_vae.likelihoods import LEVELS
from ppl_vae.models.capabilities import Codebook, ExplicitPrior, GaussianGuide, LearnedCodePrior
from ppl_vae.quantizer import perplexity

ACTIVE_THRESHOLD = 0.01
"""Burda et al. (2015): a unit is active when the variance of its posterior mean exceeds this."""


@dataclass(frozen=True)
class EvalConfig:
    k: int = 1000
    """Importance samples per test image for the log p(x) estimate."""
    batch_size: int = 100
    """Test images per evaluation batch."""
    particle_chunk: int = 50
    """Importance samples drawn at once; bounds memory at batch_size·particle_chunk·784 floats
    (50 × 100 images: 16 MB of logits). The guide's encoder runs once per chunk, so larger
    chunks amortize it (benchmarks/RESULTS.md)."""
    seed: int = 0
    """Seeds the Monte Carlo draws of evaluation: the same checkpoint gives the same numbers."""

    def __post_init__(self) -> None:
        check(self.k >= 1, "--eval.k", "a positive integer", self.k)
        check(self.batch_size >= 1, "--eval.batch-size", "a positive integer", self.batch_size)
        check(self.particle_chunk >= 1, "--eval.particle-chunk", ">= 1", self.particle_chunk)


# ----------------------------------------------------------------------------- estimates


@torch.no_grad()
def neg_elbo(
    model, inputs: torch.Tensor, objective: ObjectiveConfig, batch_size: int = 500,
    fast: bool = True, seed: int = 0,
) -> float:  # fmt: skip
    """Mean -ELBO per datapoint of ``inputs`` (flat floats) under ``objective``.

    With ``fast``, Pyro's validation (as configured) checks the program once, on the first
    batch, in a pass of its own whose draws are undone; every batch is then computed without
    it, so the ``"trace"`` objective takes the lean path (same estimator). Batch b draws from
    streams seeded by ``(seed, b)`` and the batches are shared over the processes of a
    distributed job (:func:`ppl_vae.distributed.map_batches`): the same number for any number
    of processes.
    """
    loss_fn = loss_module(model, objective, fast)
    validate = is_validation_enabled()
    first = True

    def batch_loss(x: torch.Tensor) -> torch.Tensor:
        nonlocal first
        if first and validate and fast:
            check_program(loss_fn, x)
        first = False
        with pyro.validation_enabled(validate and not fast):
            return loss_fn(x)

    totals = map_batches(batch_loss, inputs, batch_size, seed, per_image=False,
                         dtype=torch.float64)  # fmt: skip
    return totals.sum().item() / inputs.shape[0]


@torch.no_grad()
def log_likelihood(
    model,
    inputs: torch.Tensor,
    k: int = 1000,
    batch_size: int = 100,
    particle_chunk: int = 50,
    progress: bool = False,
    fast: bool = True,
    seed: int = 0,
) -> torch.Tensor:
    """Importance-sampled log p(x) with ``k`` draws from the guide, one estimate per datapoint.

    log p(x) ≈ log (1/k) Σ_i p(x, z_i) / q(z_i|x),  z_i ~ q(z|x). The estimate is a lower bound in
    expectation (Jensen) that tightens as k grows (Burda et al. 2015). Draws are taken
    ``particle_chunk`` at a time and merged with ``logaddexp``, so memory stays bounded by
    ``batch_size · particle_chunk`` likelihood evaluations whatever ``k`` is.

    The weights are :func:`ppl_vae.inference.weights.log_weights`. Pyro's validation, as
    configured, checks model/guide, supports and shapes once on the real inputs, in a pass of
    its own whose draws are undone; with ``fast`` every chunk then runs without it, with fused
    densities, recorded and replayed as a graph of tensor ops for models that opt in
    (:class:`~ppl_vae.inference.recording.RecordedLogWeights`). Batch b draws from streams
    seeded by ``(seed, b)``; the batches are shared over the processes of a distributed job.
    """
    chunks = [min(particle_chunk, k - start) for start in range(0, k, particle_chunk)]
    bar = tqdm(
        total=share_of(data.num_batches(inputs.shape[0], batch_size)) * len(chunks),
        desc=f"log p(x), k={k}",
        disable=None if progress and world().main else True,
        leave=False,
    )
    own = {id(p): p for p in own_parameters(model)} if fast else None
    recorded = RecordedLogWeights(model) if fast and recordable(model) else None
    validate = is_validation_enabled()
    validated = False

    def estimate(x: torch.Tensor) -> torch.Tensor:
        nonlocal validated
        if validate and fast and not validated:  # one particle is enough for the checks
            check_program(
                lambda x: weights.log_weights(model.model, model.guide, x, 1, own_params=own), x
            )
        validated = True
        acc = None
        for size in chunks:
            if recorded is not None:
                log_w = recorded(x, size)
            else:
                with pyro.validation_enabled(validate and not fast):
                    log_w = weights.log_weights(
                        model.model, model.guide, x, size, fused=fast, own_params=own
                    )
            lse = torch.logsumexp(log_w, dim=0)
            acc = lse if acc is None else torch.logaddexp(acc, lse)
            bar.update()
        return acc - math.log(k)

    estimates = map_batches(estimate, inputs, batch_size, seed, dtype=inputs.dtype)
    bar.close()
    return estimates


@torch.no_grad()
def reconstruction_log_prob(model, x: torch.Tensor) -> torch.Tensor:
    """log p(x | z = encode(x)) per image, ``(B,)``: the model's program with ``"z"``
    conditioned on the code, read at its ``"x"`` site."""
    conditioned = poutine.condition(model.model, data={"z": model.encode(x)})
    site = poutine.trace(conditioned).get_trace(x).nodes["x"]
    return site["fn"].log_prob(site["value"])


@torch.no_grad()
def reconstruction_metrics(model, inputs: torch.Tensor, batch_size: int = 500) -> dict[str, float]:
    """Mean -log p(x | z = encode(x)) and mean Σ_pixels (x − E[x|z])² over ``inputs``."""
    nll = torch.zeros((), device=inputs.device, dtype=torch.float64)
    sq_error = torch.zeros_like(nll)
    for x in data.batches(inputs, batch_size):
        nll -= reconstruction_log_prob(model, x).sum()
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


def _factorized_normal(fn) -> Normal | None:
    """The Normal of an ``Independent(Normal, 1)`` over a vector, else None."""
    if isinstance(fn, Independent) and fn.reinterpreted_batch_ndims == 1:
        base = fn.base_dist
        if type(base) in (Normal, dist.Normal):
            return base
    return None


@torch.no_grad()
def kl_per_dimension(model, inputs: torch.Tensor, batch_size: int = 500) -> dict[str, Any]:
    """Mean analytic KL(q(z_i|x) || p(z_i)) per latent dimension over ``inputs``.

    For models whose guide q(z|x) and prior p(z) both factorize into Normals over the dimensions
    of z (``posterior`` and ``prior`` are ``Independent(Normal, 1)``): the KL of each coordinate
    in closed form, in float64.

    :returns: ``kl_per_dim`` (list, nats) and ``kl_sum`` (their total).
    """
    total = None
    for x in data.batches(inputs, batch_size):
        q, p = _factorized_normal(model.posterior(x)), _factorized_normal(model.prior(x))
        kl = kl_divergence(
            Normal(q.loc.double(), q.scale.double()), Normal(p.loc.double(), p.scale.double())
        ).sum(0)
        total = kl if total is None else total + kl
    kl = total / inputs.shape[0]
    return {"kl_per_dim": kl.tolist(), "kl_sum": kl.sum().item()}


@torch.no_grad()
def codebook_metrics(model, inputs: torch.Tensor, batch_size: int = 500) -> dict[str, Any]:
    """Code usage on ``inputs``: perplexity exp(H), share of codes used, dead codes."""
    codes = torch.cat([model.codes(x) for x in data.batches(inputs, batch_size)])
    counts = torch.bincount(codes.reshape(-1), minlength=model.codebook_size).double()
    return {
        "perplexity": perplexity(counts),
        "codebook_usage": (counts > 0).double().mean().item(),
        "dead_codes": int((counts == 0).sum()),
        "uniform_bits_per_position": math.log2(model.codebook_size),
    }


@torch.no_grad()
def code_prior_nll(model, inputs: torch.Tensor, batch_size: int = 500) -> tuple[float, int]:
    """Mean -log p(codes) under the learned code prior, and the code positions per image."""
    total, positions = 0.0, 0
    for x in data.batches(inputs, batch_size):
        codes = model.codes(x)
        total -= model.code_prior_log_prob(codes).sum().item()
        positions = codes[0].numel()
    return total / inputs.shape[0], positions


def like_inputs(means: torch.Tensor, data_mode: str) -> torch.Tensor:
    """Mean images in [0, 1] in the form ``--data.binarization data_mode`` gives the data:
    binarized by one Bernoulli draw per pixel (dynamic, static), rounded to the 8-bit values
    k/255 (none), or rounded to a byte k and dequantized to (k + u)/256 (dequantize)."""
    means = means.clamp(0, 1)
    if data_mode in ("dynamic", "static"):
        return torch.bernoulli(means)
    levels = (means * (LEVELS - 1)).round()
    if data_mode == "dequantize":
        return (levels + torch.rand_like(levels)) / LEVELS
    return levels / (LEVELS - 1)


@torch.no_grad()
def reference_metrics(
    model, reference, inputs: torch.Tensor, eval_cfg: EvalConfig, data_mode: str,
    n: int = 1000, progress: bool = False, fast: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """-log p under a reference density model (a trained VAE) of ``n`` samples of ``model``
    and, for scale, of the first ``n`` test images.

    A sample is the mean image of p(x|z), z ~ p(z) (``model.sample``), put in the form of the
    test images (:func:`like_inputs`). Each -log p is importance sampled with the reference's
    guide and ``eval_cfg.k`` draws.
    """
    means = torch.cat([model.sample(min(500, n - i)) for i in range(0, n, 500)])
    samples = like_inputs(means, data_mode)
    args = (eval_cfg.k, eval_cfg.batch_size, eval_cfg.particle_chunk, progress, fast, eval_cfg.seed)
    nll_samples = -log_likelihood(reference, samples, *args)
    nll_data = -log_likelihood(reference, inputs[:n], *args)
    return {
        "reference_nll_of_samples": nll_samples.mean().item(),
        "reference_nll_of_samples_stderr": (nll_samples.std() / math.sqrt(n)).item(),
        "reference_nll_of_data": nll_data.mean().item(),
        "reference_samples": n,
    }


# ----------------------------------------------------------------------------- what a model has


@dataclass(frozen=True)
class ProgramFacts:
    """What the metrics ask of a model, read once off its programs and capabilities on a probe
    batch: whether q(z|x) has a point-mass site, whether z is discrete (the prior's support),
    whether z is a vector, whether guide and prior factorize into Normals, and what p(x|z) at
    ``"x"`` is: its distribution (without ``Independent``) and whether it is a probability mass
    function (a discrete support) or a density. Then what the analytic and mean-based metrics
    assume: that every latent site has a closed-form KL(q ‖ p) (not a flow guide, not a mixture
    prior), that ``encode(x)`` is the mean of q(z|x) at ``"z"`` (not a flow's point summary),
    and that p(z) is N(0, I) or flat (not a learned prior). And whether model and guide sample
    their latent sites in the same order, the mean-field structure TraceMeanField_ELBO assumes
    (not a hierarchical guide q(z|x) q(z2|z) under a top-down model)."""

    point_mass: bool
    discrete: bool
    vector: bool
    factorized_gaussian: bool
    x_distribution: str = ""
    x_discrete: bool = False
    analytic_kl: bool = True
    mean_code: bool = True
    standard_prior: bool = True
    mean_field: bool = True

    @staticmethod
    @torch.no_grad()
    def of(model, x: torch.Tensor) -> ProgramFacts:
        guide_trace = poutine.trace(model.guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(x)
        latents = list(weights.latent_nodes(guide_trace).values())
        point_mass = any(_is_point_mass(site["fn"]) for site in latents)
        prior = model_trace.nodes["z"]["fn"]
        likelihood = model_trace.nodes["x"]["fn"]
        factorized = (
            isinstance(model, GaussianGuide)
            and isinstance(model, ExplicitPrior)
            and _factorized_normal(model.posterior(x)) is not None
            and _factorized_normal(model.prior(x)) is not None
        )
        return ProgramFacts(
            point_mass=point_mass,
            discrete=bool(getattr(prior.support, "is_discrete", False)),
            vector=guide_trace.nodes["z"]["value"].dim() == 2,
            factorized_gaussian=factorized,
            x_distribution=type(_without_independent(likelihood)).__name__,
            x_discrete=bool(getattr(likelihood.support, "is_discrete", False)),
            analytic_kl=all(
                has_analytic_kl(site["fn"], model_trace.nodes[site["name"]]["fn"])
                for site in latents
                if site["name"] in model_trace
            ),
            mean_code=_encodes_the_mean(model, x, guide_trace.nodes["z"]["fn"]),
            standard_prior=_standard_or_flat(prior),
            mean_field=same_latent_order(model_trace, guide_trace),
        )


def _encodes_the_mean(model, x: torch.Tensor, fn) -> bool:
    """Whether ``model.encode(x)`` is the mean of q(z|x), the guide's ``"z"`` distribution
    (False where that mean has no closed form, as for a normalizing flow)."""
    try:
        mean = fn.mean
    except NotImplementedError:
        return False
    code = model.encode(x)
    return mean.shape == code.shape and bool(torch.allclose(mean, code))


def _standard_or_flat(fn) -> bool:
    """Whether p(z) is N(0, I) (an Independent Normal or a MultivariateNormal), or flat."""
    if isinstance(fn, dist.ImproperUniform):  # a plain AE's flat prior, compared with N(0, I)
        return True
    base = _without_independent(fn)
    if type(base) in (Normal, dist.Normal):
        return bool((base.loc == 0).all() and (base.scale == 1).all())
    if isinstance(base, MultivariateNormal):
        eye = torch.eye(base.event_shape[-1], dtype=base.loc.dtype, device=base.loc.device)
        return bool((base.loc == 0).all() and (base.scale_tril == eye).all())
    return False


def _without_independent(fn):
    while isinstance(fn, Independent):
        fn = fn.base_dist
    return fn


def _is_point_mass(fn) -> bool:
    return isinstance(_without_independent(fn), dist.Delta)


# ----------------------------------------------------------------------------- bits/dim

LOG_LEVELS = math.log(LEVELS)
"""log 256: the density of (k + u)/256 on [0, 1) against the probability of byte k."""


def bits_per_dim_basis(facts: ProgramFacts, data_mode: str | None) -> tuple[float | None, str]:
    """How -log p(x) (nats per image of D values) becomes bits per dimension of the data:
    ``(c, basis)`` with bits/dim = (-log p(x) + D·c) / (D ln 2), or ``(None, why)`` where no
    bits/dim of the data exists.

    - A probability mass function at ``"x"`` (Bernoulli on binarized pixels, the discretized
      logistic on 8-bit values): -log P(x) is a code length already, c = 0.
    - A density on uniformly dequantized values y = (k + u)/256 (``--data.binarization
      dequantize``): the discrete model P(k) = ∫_0^1 p((k + u)/256) du / 256 has
      log P(k) ≥ E_u[log p((k + u)/256)] − log 256 per value (Jensen; Theis et al. 2016),
      − D log 256 per image, so c = log 256 gives an upper bound on the bits/dim of the 8-bit
      data under that discrete model.

    Both are bits/dim of the data, the unit of the CIFAR-10 figures of van den Oord et al.
    2017; which likelihood and correction a number uses is in ``basis``.
    - A density on anything else (intensities k/255 without dequantization): -log p(x) is a
      density, not a code length; it can be negative and grows without bound as a scale
      shrinks, so no bits/dim is given.
    """
    name = facts.x_distribution or "the likelihood"
    if facts.x_discrete:
        if data_mode in ("dynamic", "static"):
            what = (
                "binarized pixels, so these are bits per binary pixel, not comparable with "
                "figures on 8-bit data"
            )
        else:
            what = "the 8-bit values k/255" if data_mode == "none" else "the data's values"
        return 0.0, (
            f"{name} likelihood, a probability mass function of {what}: "
            "bits/dim = -log P(x) / (D ln 2), no correction"
        )
    if data_mode == "dequantize":
        return LOG_LEVELS, (
            f"{name} density of uniformly dequantized 8-bit values (k + u)/256: bits/dim = "
            "(-log p(x) + D ln 256) / (D ln 2), an upper bound on the bits/dim of the 8-bit data "
            "(the dequantization bound)"
        )
    shown = f" of --data.binarization {data_mode}" if data_mode else ""
    return None, (
        f"-log p(x) is a {name} density at the inputs{shown}, not a probability of 8-bit "
        "data, so no bits/dim is reported; --data.binarization dequantize (gaussian, "
        "continuous-bernoulli) or --model.likelihood discretized-logistic gives one"
    )


def _bits(c: Context, nll: float) -> tuple[float | None, str]:
    """bits/dim of a -log p(x) in nats per image (None where the basis gives none), and the
    basis (:func:`bits_per_dim_basis`)."""
    offset, basis = bits_per_dim_basis(c.facts, c.data_mode)
    if offset is None:
        return None, basis
    dims = c.inputs.shape[1]
    return (nll + dims * offset) / (dims * math.log(2)), basis


def _with_bits(c: Context, results: dict[str, Any], key: str, nll: float) -> dict[str, Any]:
    """``results`` with ``key`` = bits/dim of ``nll``, ``bits_per_dim_basis`` and a note
    saying which likelihood and correction the figure uses (or why there is none)."""
    bits, basis = _bits(c, nll)
    if bits is not None:
        results[key] = bits
        results["bits_per_dim_basis"] = basis
    results.setdefault("notes", []).append(f"bits/dim: {basis}" if bits is not None else basis)
    return results


@dataclass(frozen=True)
class Requirement:
    """A condition a metric group needs, checked on the model and its :class:`ProgramFacts`."""

    name: str
    holds: Callable[[Any, ProgramFacts], bool]


DENSITY_GUIDE = Requirement("a guide with a density (no point-mass site)",
                            lambda m, f: not f.point_mass)  # fmt: skip
DISCRETE_POINT_MASS = Requirement("a point-mass guide on a discrete latent",
                                  lambda m, f: f.point_mass and f.discrete)  # fmt: skip
CONTINUOUS_POINT_MASS = Requirement("a point-mass guide on a continuous latent",
                                    lambda m, f: f.point_mass and not f.discrete)  # fmt: skip
VECTOR_LATENT = Requirement("a vector latent z", lambda m, f: f.vector)
FACTORIZED_GAUSSIAN = Requirement(
    "q(z|x) and p(z) factorized Normals (GaussianGuide and ExplicitPrior)",
    lambda m, f: f.factorized_gaussian,
)
ANALYTIC_KL = Requirement("a closed-form KL(q(z|x) || p(z)) at every latent site",
                          lambda m, f: f.analytic_kl)  # fmt: skip
MEAN_FIELD = Requirement(
    "model and guide sampling their latent sites in the same order (mean-field structure)",
    lambda m, f: f.mean_field,
)
MEAN_CODE = Requirement("encode(x) is the mean of q(z|x)", lambda m, f: f.mean_code)
STANDARD_PRIOR = Requirement("p(z) = N(0, I) (or flat)", lambda m, f: f.standard_prior)
CODEBOOK = Requirement("a codebook (Codebook)", lambda m, f: isinstance(m, Codebook))
FITTED_CODE_PRIOR = Requirement(
    "a fitted code prior (LearnedCodePrior)",
    lambda m, f: isinstance(m, LearnedCodePrior) and m.has_code_prior(),
)


@dataclass(frozen=True)
class Context:
    """What a metric group computes from: the model in eval mode, the evaluation inputs, the
    settings, and the results of the groups before it in the table."""

    model: Any
    inputs: torch.Tensor
    cfg: EvalConfig
    progress: bool
    fast: bool
    results: dict[str, Any]
    facts: ProgramFacts | None = None
    data_mode: str | None = None
    """The ``--data.binarization`` the inputs were made with (None: not known)."""


@dataclass(frozen=True)
class Label:
    """What the CLI and report.md print for a number, and what follows its value."""

    text: str
    extra: Callable[[dict[str, Any]], str] = lambda results: ""


@dataclass(frozen=True)
class MetricGroup:
    """Numbers computed together; ``labels`` for those printed, ``details`` for the rest
    (standard errors, per-dimension lists, notes)."""

    name: str
    needs: tuple[Requirement, ...]
    compute: Callable[[Context], dict[str, Any]] | None
    labels: dict[str, Label]
    details: tuple[str, ...] = ()

    def applies(self, model, facts: ProgramFacts) -> bool:
        return all(need.holds(model, facts) for need in self.needs)


def _elbo(c: Context) -> dict[str, Any]:
    return {
        "neg_elbo": neg_elbo(c.model, c.inputs, ObjectiveConfig("trace"), c.cfg.batch_size,
                             c.fast, c.cfg.seed),  # fmt: skip
    }


def _meanfield_elbo(c: Context) -> dict[str, Any]:
    return {
        "neg_elbo_meanfield": neg_elbo(
            c.model, c.inputs, ObjectiveConfig("meanfield"), c.cfg.batch_size, c.fast, c.cfg.seed
        ),
    }


def _importance_sampled(c: Context) -> dict[str, Any]:
    cfg = c.cfg
    log_px = log_likelihood(c.model, c.inputs, cfg.k, cfg.batch_size, cfg.particle_chunk,
                            c.progress, c.fast, cfg.seed)  # fmt: skip
    nll = -log_px.mean().item()
    results = {
        "nll_is": nll,
        "nll_is_stderr": (log_px.std() / math.sqrt(log_px.numel())).item(),
        "k": cfg.k,
    }
    return _with_bits(c, results, "bits_per_dim", nll)


def _map_objective(c: Context) -> dict[str, Any]:
    return {
        "neg_log_joint": neg_elbo(c.model, c.inputs, ObjectiveConfig("trace"), c.cfg.batch_size,
                                  c.fast, c.cfg.seed),  # fmt: skip
        "notes": [
            "q(z|x) is a point mass, so importance-sampled log p(x) and the -ELBO are not "
            "defined: the reconstruction error and the MAP objective "
            "-log p(x, z = encoder(x)) are reported instead"
        ],
    }


def _discrete_elbo(c: Context) -> dict[str, Any]:
    value = neg_elbo(c.model, c.inputs, ObjectiveConfig("trace"), c.cfg.batch_size, c.fast,
                     c.cfg.seed)  # fmt: skip
    results = {
        "neg_elbo": value,
        "kl_point_mass": value - c.results["recon_nll"],
        "notes": [
            "q(z|x) is a point mass on discrete codes, so importance sampling cannot estimate "
            "log p(x); the -ELBO is exact: the reconstruction -log p(x|z_q) plus "
            "KL(q || p) = -log p(z_q) (positions · log K under the uniform code prior)"
        ],
    }
    return _with_bits(c, results, "elbo_bits_per_dim", value)


def _code_prior(c: Context) -> dict[str, Any]:
    nll, positions = code_prior_nll(c.model, c.inputs, c.cfg.batch_size)
    results = {
        "code_prior_nll": nll,
        "code_prior_bits_per_position": nll / (positions * math.log(2)),
        "code_prior_bits_per_dim": nll / (c.inputs.shape[1] * math.log(2)),
        "code_prior_neg_elbo": c.results["recon_nll"] + nll,
    }
    bits, _ = _bits(c, results["code_prior_neg_elbo"])
    if bits is not None:  # its basis is the one of the exact -ELBO's bits/dim, noted there
        results["code_prior_elbo_bits_per_dim"] = bits
    if "kl_point_mass" in c.results:
        results["notes"] = [
            "the code prior's -log p(codes) replaces the model prior's -log p(z_q) = "
            f"{c.results['kl_point_mass']:.1f} nats/image"
        ]
    return results


def _nll_is_extra(r: dict[str, Any]) -> str:
    return f" ± {r['nll_is_stderr']:.2f} (k={r['k']})"


def _active_extra(r: dict[str, Any]) -> str:
    return f" of {len(r['posterior_mean_variance'])}" if "posterior_mean_variance" in r else ""


def _reference_extra(r: dict[str, Any]) -> str:
    return f" ± {r['reference_nll_of_samples_stderr']:.2f} ({r['reference_samples']} samples)"


# In the order they are computed and printed: later groups may read earlier groups' results.
METRICS: tuple[MetricGroup, ...] = (
    MetricGroup("elbo", (DENSITY_GUIDE,), _elbo, {
        "neg_elbo": Label("-ELBO, Trace_ELBO (nats/image)"),
    }),
    MetricGroup("analytic-KL elbo", (DENSITY_GUIDE, ANALYTIC_KL, MEAN_FIELD), _meanfield_elbo, {
        "neg_elbo_meanfield": Label("-ELBO, TraceMeanField_ELBO (nats/image)"),
    }),
    MetricGroup("importance sampling", (DENSITY_GUIDE,), _importance_sampled, {
        "nll_is": Label("importance-sampled -log p(x) (nats/image)", _nll_is_extra),
        "bits_per_dim": Label("importance-sampled -log p(x) in bits/dim (basis in the notes)"),
    }, ("nll_is_stderr", "k", "bits_per_dim_basis", "notes")),
    MetricGroup("reconstruction", (), lambda c: reconstruction_metrics(
        c.model, c.inputs, c.cfg.batch_size), {
        "recon_nll": Label("reconstruction -log p(x | z = encode(x)) (nats/image)"),
        "recon_sq_error": Label("reconstruction squared error Σ (x - E[x|z])² (per image)"),
    }),
    MetricGroup("MAP objective", (CONTINUOUS_POINT_MASS,), _map_objective, {
        "neg_log_joint": Label(
            "training objective at the code, -log p(x, z = encoder(x)) (nats/image)"),
    }, ("notes",)),
    MetricGroup("exact ELBO of a discrete point mass", (DISCRETE_POINT_MASS,), _discrete_elbo, {
        "neg_elbo": Label("-ELBO, Trace_ELBO (nats/image)"),
        "kl_point_mass": Label("KL(q(z|x) || p(z)) = -log p(z_q), q a point mass on codes "
                               "(nats/image)"),
        "elbo_bits_per_dim": Label("-ELBO in bits/dim, an upper bound (basis in the notes)"),
    }, ("notes", "bits_per_dim_basis")),
    MetricGroup("active units", (VECTOR_LATENT, MEAN_CODE), lambda c: active_units(
        c.model, c.inputs, c.cfg.batch_size), {
        "active_units": Label("active units: Var_x(encode(x)_i) > 0.01 (Burda et al. 2015)",
                              _active_extra),
    }, ("posterior_mean_variance",)),
    MetricGroup("KL per dimension", (FACTORIZED_GAUSSIAN,), lambda c: kl_per_dimension(
        c.model, c.inputs, c.cfg.batch_size), {
        "kl_sum": Label("KL(q(z|x) || p(z)), analytic, summed over dimensions (nats/image)"),
    }, ("kl_per_dim",)),
    MetricGroup("aggregate posterior", (VECTOR_LATENT, STANDARD_PRIOR), lambda c: (
        aggregate_posterior_gap(c.model, c.inputs, c.cfg.batch_size)), {
        "aggregate_kl_to_prior": Label(
            "KL(N(mean, cov of z ~ q(z|x) over the data) || N(0, I)) (nats)"),
        "aggregate_sq_norm_per_dim": Label(
            "mean |z|² / dim of z ~ q(z|x) over the data (1 under N(0, I))"),
    }),
    MetricGroup("codebook", (CODEBOOK,), lambda c: codebook_metrics(
        c.model, c.inputs, c.cfg.batch_size), {
        "perplexity": Label("codebook perplexity exp(H(code usage)) on these images"),
        "codebook_usage": Label("fraction of codes used on these images"),
        "dead_codes": Label("dead codes: codes no test image uses"),
        "uniform_bits_per_position": Label("uniform code prior, bits per code position (log2 K)"),
    }),
    MetricGroup("code prior", (CODEBOOK, FITTED_CODE_PRIOR), _code_prior, {
        "code_prior_nll": Label("code prior -log p(codes) (nats/image)"),
        "code_prior_bits_per_position": Label(
            "code prior, bits per code position (uniform: log2 K)"),
        "code_prior_bits_per_dim": Label("code prior -log p(codes) in bits per pixel"),
        "code_prior_neg_elbo": Label(
            "-ELBO with the code prior: reconstruction + -log p(codes) (nats/image)"),
        "code_prior_elbo_bits_per_dim": Label(
            "-ELBO with the code prior in bits/dim, an upper bound (basis in the notes)"),
    }, ("notes",)),
)  # fmt: skip

REFERENCE = MetricGroup("reference density", (), None, {
    "reference_nll_of_samples": Label("-log p(samples) under the reference VAE (nats/image)",
                                      _reference_extra),
    "reference_nll_of_data": Label("-log p(x) of these test images under the reference VAE"),
}, ("reference_nll_of_samples_stderr", "reference_samples"))  # fmt: skip
"""Computed by ``ppl-vae evaluate --reference-vae`` (:func:`reference_metrics`)."""

LABELS: dict[str, Label] = {}
for _group in (*METRICS, REFERENCE):
    for _key, _label in _group.labels.items():
        LABELS.setdefault(_key, _label)


def applicable(model, x: torch.Tensor) -> list[str]:
    """The names of the metric groups that apply to ``model`` (probed on the batch ``x``)."""
    facts = ProgramFacts.of(model, x[:2])
    return [group.name for group in METRICS if group.applies(model, facts)]


def evaluate_model(
    model, inputs: torch.Tensor, cfg: EvalConfig, progress: bool = False, fast: bool = True,
    data_mode: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Every metric group of :data:`METRICS` that applies to ``model``, on ``inputs``.

    ``data_mode``: the ``--data.binarization`` that made ``inputs``; it decides the bits/dim of
    a continuous density (:func:`bits_per_dim_basis`). Raises ``RuntimeError`` when a group
    returns a number it has no label for (it would not be printed).
    """
    with seeded(cfg.seed, inputs.device):
        return _evaluate_model(model, inputs, cfg, progress, fast, data_mode)


def _evaluate_model(model, inputs, cfg, progress, fast, data_mode) -> dict[str, Any]:
    facts = ProgramFacts.of(model, inputs[:2])
    results: dict[str, Any] = {}
    notes: list[str] = []
    for group in METRICS:
        if not group.applies(model, facts):
            continue
        context = Context(model, inputs, cfg, progress, fast, results, facts, data_mode)
        out = group.compute(context)
        notes += out.pop("notes", [])
        unknown = set(out) - set(group.labels) - set(group.details)
        if unknown:
            raise RuntimeError(f"metric group {group.name!r} returned unlabelled {sorted(unknown)}")
        results.update(out)
    if notes:
        results["notes"] = notes
    return results


def format_results(results: dict[str, Any]) -> list[str]:
    """One line per reported number, then the notes (for the CLI)."""
    lines = [f"{results['split']} set, {results['images']} images:"]
    for key, label in LABELS.items():
        if key in results:
            lines.append(f"  {label.text}: {results[key]:.4g}{label.extra(results)}")
    lines += [f"  note: {note}" for note in results.get("notes", [])]
    return lines
