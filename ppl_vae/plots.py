"""Figures for run folders and notebooks. The only module that draws (torchvision / matplotlib)."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import save_image

from ppl_vae.quantizer import perplexity

SAMPLES = "samples.png"
RECONSTRUCTIONS = "reconstructions.png"
CURVES = "curves.png"


def as_images(flat: torch.Tensor, image_shape: tuple[int, int, int]) -> torch.Tensor:
    """``(B, C·H·W)`` intensities in [0, 1] → ``(B, C, H, W)`` on the CPU."""
    return flat.detach().float().clamp(0, 1).reshape(-1, *image_shape).cpu()


def save_grid(
    flat: torch.Tensor, path: Path, image_shape: tuple[int, int, int], nrow: int = 8
) -> Path:
    """Save images as one grid PNG (``nrow`` per row, 2-pixel white padding)."""
    save_image(as_images(flat, image_shape), path, nrow=nrow, padding=2, pad_value=1.0)
    return Path(path)


@torch.no_grad()
def samples_figure(
    model, path: Path, image_shape: tuple[int, int, int], n: int = 64, nrow: int = 8
) -> Path:
    """Mean images of p(x|z) for ``n`` draws z ~ p(z)."""
    return save_grid(model.sample(n), path, image_shape, nrow)


@torch.no_grad()
def reconstructions_figure(
    model, x: torch.Tensor, path: Path, image_shape: tuple[int, int, int], nrow: int = 8
) -> Path:
    """Originals (upper rows) above their reconstructions (lower rows), column by column."""
    rows = max(1, x.shape[0] // nrow)
    x = x[: rows * nrow]
    return save_grid(torch.cat([x, model.reconstruct(x)]), path, image_shape, nrow)


def curves_figure(metrics: list[dict[str, float]], path: Path) -> Path:
    """Train and validation -ELBO per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in metrics]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot(epochs, [r["train_neg_elbo"] for r in metrics], label="train")
    ax.plot(epochs, [r["val_neg_elbo"] for r in metrics], label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("-ELBO (nats / image)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


# ============================================================================= evaluation and
# diagnostics figures (issue 6): interpolations, traversals, latent map, k̂, posterior pairs

INTERPOLATIONS = "interpolations.png"
TRAVERSALS = "traversals.png"
LATENT_MAP = "latent_map.png"
MANIFOLD = "manifold.png"
KHAT = "khat.png"
POSTERIOR_PAIRS = "posterior_pairs.png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def slerp(z_start: torch.Tensor, z_end: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between rows of ``z_start`` and ``z_end`` at fractions ``t``.

    Follows the great circle between the two directions while the norm moves linearly (White
    2016, *Sampling generative networks*), which keeps interpolants at the typical radius of a
    Gaussian prior; falls back to linear interpolation for (nearly) parallel endpoints.
    Returns ``(len(t), B, *z.shape[1:])``.
    """
    a, b = z_start.flatten(1), z_end.flatten(1)
    a_norm, b_norm = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    cos = ((a / a_norm) * (b / b_norm)).sum(1, keepdim=True).clamp(-1, 1)
    omega = torch.acos(cos)
    t = t.reshape(-1, 1, 1).to(a)
    sin = torch.sin(omega)
    spherical = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / sin.clamp(min=1e-8)
    linear = (1 - t) * a + t * b
    out = torch.where(sin.abs() < 1e-6, linear, spherical)
    return out.reshape(len(t), *z_start.shape)


@torch.no_grad()
def interpolations_figure(
    model, x_start: torch.Tensor, x_end: torch.Tensor, path: Path,
    image_shape: tuple[int, int, int], steps: int = 10,
) -> Path:  # fmt: skip
    """Per pair of test images: a row of linear, then a row of spherical interpolations between
    their codes encode(x), decoded; the originals at both ends of each row."""
    z_start, z_end = model.encode(x_start), model.encode(x_end)
    t = torch.linspace(0, 1, steps, device=z_start.device)
    linear = torch.stack([(1 - s) * z_start + s * z_end for s in t])
    spherical = slerp(z_start, z_end, t)
    rows = []
    for i in range(x_start.shape[0]):
        for path_z in (linear, spherical):
            decoded = model.decode(path_z[:, i])
            rows.append(torch.cat([x_start[i : i + 1], decoded, x_end[i : i + 1]]))
    return save_grid(torch.cat(rows), path, image_shape, nrow=steps + 2)


@torch.no_grad()
def traversals_figure(
    model, x: torch.Tensor, dims: list[int], path: Path, image_shape: tuple[int, int, int],
    span: float = 3.0, steps: int = 9,
) -> Path:  # fmt: skip
    """One row per latent dimension in ``dims`` (e.g. sorted by KL): the code encode(x) of one
    image with that coordinate set to ``steps`` values in [−span, span], decoded."""
    z = model.encode(x[:1])[0]
    values = torch.linspace(-span, span, steps, device=z.device)
    rows = []
    for d in dims:
        zs = z.expand(steps, -1).clone()
        zs[:, d] = values
        rows.append(model.decode(zs))
    return save_grid(torch.cat(rows), path, image_shape, nrow=steps)


@torch.no_grad()
def latent_map_figure(model, x: torch.Tensor, labels: torch.Tensor, path: Path) -> Path:
    """Scatter of the 2-D codes encode(x) colored by class label (z_dim = 2 only)."""
    plt = _pyplot()
    z = torch.cat([model.encode(b) for b in x.split(500)]).cpu()
    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=100)
    points = ax.scatter(z[:, 0], z[:, 1], c=labels.cpu(), cmap="tab10", s=3, alpha=0.7)
    fig.colorbar(points, ax=ax, label="label")
    ax.set_xlabel("z₁ (posterior mean)")
    ax.set_ylabel("z₂ (posterior mean)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


@torch.no_grad()
def manifold_figure(
    model, path: Path, image_shape: tuple[int, int, int], n: int = 15, span: float = 0.95
) -> Path:
    """Decoded images on an n × n grid of z at the Gaussian quantiles in [1 − span, span]
    of each axis (z_dim = 2 only; Kingma & Welling 2014, fig. 4)."""
    quantiles = torch.linspace(1 - span, span, n, dtype=torch.float64)
    axis = torch.distributions.Normal(0.0, 1.0).icdf(quantiles).float()
    z2, z1 = torch.meshgrid(axis.flip(0), axis, indexing="ij")
    z = torch.stack([z1.flatten(), z2.flatten()], 1).to(model.device)
    return save_grid(model.decode(z), path, image_shape, nrow=n)


def khat_figure(khat: torch.Tensor, path: Path) -> Path:
    """Histogram of per-image PSIS k̂, with the 0.5 and 0.7 thresholds of Yao et al. (2018)."""
    plt = _pyplot()
    values = khat.clamp(-1.0, 2.0).numpy()  # ±inf (constant weights, short tails) at the ends
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.hist(values, bins=40, color="tab:blue", alpha=0.8)
    for threshold, color in ((0.5, "tab:orange"), (0.7, "tab:red")):
        ax.axvline(threshold, color=color, linestyle="--", label=f"k̂ = {threshold}")
    share = float((khat > 0.7).double().mean())
    ax.set_title(f"PSIS k̂ per test image: {100 * share:.1f}% above 0.7")
    ax.set_xlabel("k̂")
    ax.set_ylabel("images")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def posterior_pairs_figure(
    idata: dict, path: Path, point: int = 0, dims: list[int] | None = None
) -> Path:
    """Pair plot of latent dimensions ``dims`` (default: the three where NUTS is narrowest,
    i.e. the data inform them most) of one test image: draws of NUTS,
    q(z|x) and q*(z|x) (InferenceData of :mod:`ppl_vae.diagnostics`) overlaid, histograms on
    the diagonal, scatter plots below it."""
    plt = _pyplot()
    colors = {"nuts": "black", "amortized": "tab:blue", "local": "tab:orange"}
    names = {"nuts": "NUTS", "amortized": "q(z|x)", "local": "q*(z|x)"}
    draws = {
        name: item.posterior["z"].sel(point=point).values.reshape(-1, item.posterior.sizes["z_dim"])
        for name, item in idata.items()
    }
    if dims is None:
        dims = draws["nuts"].std(0).argsort()[:3].tolist()
    draws = {name: z[:, dims] for name, z in draws.items()}
    d = len(dims)
    fig, axes = plt.subplots(d, d, figsize=(2.4 * d + 0.6, 2.4 * d), dpi=100, squeeze=False)
    for i in range(d):
        for j in range(d):
            ax = axes[i, j]
            if j > i:
                ax.axis("off")
                continue
            for name, z in draws.items():
                if i == j:
                    ax.hist(z[:, i], bins=30, density=True, histtype="step", color=colors[name])
                else:
                    ax.scatter(z[:, j], z[:, i], s=3, alpha=0.3, color=colors[name])
            if i == d - 1:
                ax.set_xlabel(f"z[{dims[j]}]")
            if j == 0 and i > 0:
                ax.set_ylabel(f"z[{dims[i]}]")
    handles = [
        plt.Line2D([], [], marker="o", ls="", color=colors[n], label=names[n]) for n in draws
    ]
    fig.legend(handles=handles, loc="upper right")
    fig.suptitle(f"p(z|x) of test image {point}: NUTS against the guides")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------- estimator lab
# Figures of the notebooks that compare ELBO estimators (issue 5). They return a matplotlib
# Figure and leave the backend alone, so a notebook shows them inline.


def snr_versus_particles_figure(curves: dict[str, dict[str, list[float]]], title: str = ""):
    """Encoder and decoder gradient SNR against K, one line per objective, log-log axes.

    :param curves: the output of :func:`ppl_vae.inference.gradients.snr_versus_particles`.
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), dpi=80, sharex=True)
    for name, curve in curves.items():
        for ax, group in zip(axes, ("encoder", "decoder"), strict=True):
            ax.plot(curve["K"], curve[group], marker="o", label=name)
    for ax, group in zip(axes, ("encoder", "decoder"), strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("particles K")
        ax.set_ylabel("mean per-parameter SNR")
        ax.set_title(f"{group} gradient")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def value_distributions_figure(draws: dict[str, torch.Tensor], reference: float | None = None):
    """Box plots of independent draws of each estimator, with a reference line (exact log p(x)).

    :param draws: label → 1-D tensor of draws.
    """
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=80)
    ax.boxplot([d.detach().cpu().numpy() for d in draws.values()], showfliers=False)
    ax.set_xticks(range(1, len(draws) + 1), list(draws), rotation=30)
    if reference is not None:
        ax.axhline(reference, color="k", linestyle="--", label="exact log p(x)")
        ax.legend()
    ax.set_ylabel("estimate (nats / datapoint)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def metric_curves_figure(metrics: dict[str, list[dict[str, float]]], key: str, ylabel: str):
    """One curve per run of ``metrics[label][epoch][key]`` against the epoch."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=80)
    for label, rows in metrics.items():
        ax.plot([r["epoch"] for r in rows], [r[key] for r in rows], marker=".", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def histograms_figure(
    samples: dict[str, torch.Tensor], reference: float | None = None, xlabel: str = ""
):
    """Overlaid histograms of 1-D samples, one per label, with an optional reference line."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=80)
    for label, values in samples.items():
        ax.hist(values.detach().cpu().numpy(), bins=40, alpha=0.5, density=True, label=label)
    if reference is not None:
        ax.axvline(reference, color="k", linestyle="--", label="closed form")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


@torch.no_grad()
def interpolation_images(model, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 8):
    """Decoded points on the segment between the codes of two images, ``(steps, x_dim)``.

    ``z_t = (1 - t) encode(x_a) + t encode(x_b)`` for ``t`` evenly spaced in [0, 1], decoded
    with ``model.decode`` (the mean of p(x|z)). For a VQ-VAE the intermediate grids mix code
    vectors and are not on the codebook; the decoder sees them as they are.
    """
    z_a, z_b = model.encode(x_a[None]), model.encode(x_b[None])
    t = torch.linspace(0, 1, steps, device=z_a.device).reshape(-1, *[1] * (z_a.dim() - 1))
    return model.decode((1 - t) * z_a + t * z_b)


def image_rows_figure(rows: dict[str, torch.Tensor], image_shape=(1, 28, 28), title: str = ""):
    """One labelled row of images per entry of ``rows`` (flat images, values in [0, 1])."""
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 1.1 * len(rows) + 0.3), dpi=80)
    axes = [axes] if len(rows) == 1 else axes
    for ax, (label, images) in zip(axes, rows.items(), strict=True):
        grid = make_grid(as_images(images.detach().cpu(), image_shape), nrow=images.shape[0])
        ax.imshow(grid.permute(1, 2, 0).clamp(0, 1).numpy())
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def codebook_usage_figure(counts: torch.Tensor):
    """Share of the codes assigned to each codebook entry, sorted, with the perplexity."""
    import matplotlib.pyplot as plt

    share = (counts / counts.sum()).sort(descending=True).values.cpu().numpy()
    fig, ax = plt.subplots(figsize=(6, 3), dpi=80)
    ax.bar(range(len(share)), share)
    ax.set_xlabel("codebook entry (sorted by use)")
    ax.set_ylabel("share of code positions")
    used = int((counts > 0).sum())
    ax.set_title(f"{used} of {len(share)} codes used, perplexity {perplexity(counts):.1f}")
    fig.tight_layout()
    return fig
