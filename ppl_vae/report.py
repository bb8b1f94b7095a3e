"""``report.md``: one file with a run's numbers and figures."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ppl_vae import data, plots, runs
from ppl_vae.config import to_dict
from ppl_vae.evaluate import EVAL_JSON, LABELS

REPORT = "report.md"
DEFAULT_SAMPLES_CAPTION = "Prior samples (mean of p(x|z), z ~ p(z))"
COMMON_METRICS = ("epoch", "train_neg_elbo", "val_neg_elbo", "lr", "seconds", "images_per_s")


def write_figures(run_dir: Path, model, dataset: data.Dataset, binarization: str, seed: int = 0):
    """samples.png, reconstructions.png and curves.png in ``run_dir`` (fixed seed, test images)."""
    shape = data.IMAGE_SHAPE[dataset.name]
    torch.manual_seed(seed)
    plots.samples_figure(model, run_dir / plots.SAMPLES, shape)
    x = data.eval_inputs(dataset.test, binarization)[:32]
    plots.reconstructions_figure(model, x, run_dir / plots.RECONSTRUCTIONS, shape)
    metrics = runs.read_metrics(run_dir)
    if metrics:
        plots.curves_figure(metrics, run_dir / plots.CURVES)


def write_report(run_dir: Path, samples_caption: str = DEFAULT_SAMPLES_CAPTION) -> Path:
    """Assemble ``report.md`` from config.json, metrics.csv, eval.json and the figures."""
    run_dir = Path(run_dir)
    cfg = runs.read_config(run_dir)
    metrics = runs.read_metrics(run_dir)
    lines = [f"# Run `{run_dir.name}`", ""]
    lines += [
        f"Model **{cfg.model.kind}** on **{cfg.data.dataset}** "
        f"({cfg.data.binarization} binarization), objective **{cfg.objective.name}** "
        f"with {cfg.objective.num_particles} particle(s); {len(metrics)} epoch(s) of batch "
        f"{cfg.train.batch_size}, Adam lr {cfg.train.lr:g} ({cfg.train.lr_schedule}), "
        f"seed {cfg.train.seed}.",
        "",
    ]
    eval_path = run_dir / EVAL_JSON
    if eval_path.exists():
        ev = json.loads(eval_path.read_text())
        lines += [
            f"## Results on the {ev['split']} set ({ev['images']} images)",
            "",
            "| quantity | value |",
            "|---|---|",
        ]
        for key, label in LABELS.items():
            if key in ev:
                value = f"{ev[key]:.4g}"
                if key == "nll_is":
                    label = f"{label}, k = {ev['k']}"
                    value = f"{ev[key]:.2f} ± {ev['nll_is_stderr']:.2f}"
                cell = label.replace("|", "\\|")  # a bar inside a table cell must be escaped
                lines.append(f"| {cell} | {value} |")
        lines.append("")
        if "nll_is" in ev:
            lines += [
                "The ± is the standard error over test images. -ELBO ≥ -log p(x) estimate: the "
                "importance-sampled bound is the tighter one.",
                "",
            ]
        lines += [f"Note: {note}." for note in ev.get("notes", [])]
        lines.append("")
    if metrics:
        total = sum(r["seconds"] for r in metrics)
        # model-specific columns (codebook perplexity, KL weight, ...) follow the common ones
        extra = [k for k in metrics[0] if k not in COMMON_METRICS]
        lines += [
            "## Training",
            "",
            f"{total:.0f} s of training, {metrics[-1]['images_per_s']:.0f} images/s in the "
            "last epoch.",
            "",
            "![curves](curves.png)",
            "",
            "| epoch | train -ELBO | val -ELBO | lr | seconds |"
            + "".join(f" {k} |" for k in extra),
            "|---|---|---|---|---|" + "---|" * len(extra),
        ]
        shown = metrics if len(metrics) <= 12 else metrics[:3] + metrics[-9:]
        for r in shown:
            lines.append(
                f"| {int(r['epoch'])} | {r['train_neg_elbo']:.2f} | {r['val_neg_elbo']:.2f} "
                f"| {r['lr']:.2g} | {r['seconds']:.1f} |" + "".join(f" {r[k]:.4g} |" for k in extra)
            )
        lines.append("")
    lines += [
        "## Figures",
        "",
        f"{samples_caption}:",
        "",
        f"![samples]({plots.SAMPLES})",
        "",
        "Test images (upper rows) and their reconstructions (lower rows):",
        "",
        f"![reconstructions]({plots.RECONSTRUCTIONS})",
        "",
        "## Config",
        "",
        "```json",
        json.dumps(to_dict(cfg), indent=2),
        "```",
        "",
    ]
    path = run_dir / REPORT
    path.write_text("\n".join(lines))
    return path


@torch.no_grad()
def build_report(run_dir: Path, device: str = "auto", dataset: data.Dataset | None = None) -> Path:
    """Figures and report.md for a finished run folder."""
    torch_device = data.resolve_device(device)
    cfg, model, _ = runs.load_model(run_dir, torch_device)
    dataset = dataset or data.load(cfg.data, torch_device)
    write_figures(Path(run_dir), model, dataset, cfg.data.binarization, cfg.train.seed)
    return write_report(run_dir, model.samples_caption())
