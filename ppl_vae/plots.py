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
