"""Figures for run folders and notebooks. The only module that draws (torchvision / matplotlib)."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import save_image

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


# ----------------------------------------------------------------------------- estimator lab
# Figures of the notebooks that compare ELBO estimators (issue 5). They return a matplotlib
# Figure and leave the backend alone, so a notebook shows them inline.


def snr_versus_particles_figure(curves: dict[str, dict[str, list[float]]], title: str = ""):
    """Encoder and decoder gradient SNR against K, one line per objective, log-log axes.

    :param curves: the output of :func:`ppl_vae.estimators.snr_versus_particles`.
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

    from ppl_vae.quantizer import perplexity

    share = (counts / counts.sum()).sort(descending=True).values.cpu().numpy()
    fig, ax = plt.subplots(figsize=(6, 3), dpi=80)
    ax.bar(range(len(share)), share)
    ax.set_xlabel("codebook entry (sorted by use)")
    ax.set_ylabel("share of code positions")
    used = int((counts > 0).sum())
    ax.set_title(f"{used} of {len(share)} codes used, perplexity {perplexity(counts):.1f}")
    fig.tight_layout()
    return fig
