"""``report.md``: one file with a run's numbers and figures."""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Callable
from pathlib import Path

import torch

from ppl_vae import data, files, plots, runs
from ppl_vae.config import to_dict
from ppl_vae.diagnostics import DIAGNOSTIC_LABELS, DIAGNOSTICS_JSON
from ppl_vae.distributed import seeded, world
from ppl_vae.errors import RunDirError
from ppl_vae.evaluate import EVAL_JSON
from ppl_vae.metrics import LABELS
from ppl_vae.models.capabilities import DEFAULT_SAMPLES_CAPTION, SampleCaption

REPORT = "report.md"
REPORT_HTML = "report.html"
COMMON_METRICS = ("epoch", "train_neg_elbo", "val_neg_elbo", "lr", "seconds", "images_per_s")
INPUTS = {  # what --data.binarization makes of the 8-bit images
    "dynamic": "dynamic binarization",
    "static": "static binarization",
    "none": "8-bit values k/255",
    "dequantize": "uniformly dequantized 8-bit values (k + u)/256",
}


def write_figures(
    stage: files.Staged, model, dataset: data.Dataset, binarization: str, seed: int = 0
) -> None:
    """samples.png, reconstructions.png, curves.png and the latent-space figures of the run
    folder ``stage`` writes into (fixed seed, test images): interpolations.png always;
    traversals.png when z is a vector; latent_map.png and manifold.png when z has two
    dimensions."""
    shape = dataset.shape
    with seeded(seed):
        plots.samples_figure(model, stage.path(plots.SAMPLES), shape)
    x = data.eval_inputs(dataset.test, binarization)[:32]
    plots.reconstructions_figure(model, x, stage.path(plots.RECONSTRUCTIONS), shape)
    metrics = runs.read_metrics(stage.folder)
    if metrics:
        plots.curves_figure(metrics, stage.path(plots.CURVES))
    write_latent_figures(stage, model, dataset, binarization)


TRAVERSAL_ORDERS = {
    "kl_per_dim": "dimensions sorted by KL (largest first)",
    "posterior_mean_variance": "dimensions sorted by the variance of encode(x) over the test "
    "images (largest first)",
}
"""The eval.json entries traversals are sorted by, the first present, and what the caption says."""


def traversal_key(ev: dict, z_dim: int) -> str | None:
    """The entry of :data:`TRAVERSAL_ORDERS` that orders ``z_dim`` dimensions (None: none)."""
    return next((key for key in TRAVERSAL_ORDERS if len(ev.get(key, [])) == z_dim), None)


def traversal_order(run_dir: Path, z_dim: int) -> list[int]:
    """Latent dimensions by decreasing KL per dimension (eval.json), else by decreasing variance
    of the posterior mean, else in index order."""
    ev = read_results(Path(run_dir) / EVAL_JSON)
    key = traversal_key(ev, z_dim)
    if key is not None:
        return sorted(range(z_dim), key=lambda i: -ev[key][i])
    return list(range(z_dim))


def write_latent_figures(
    stage: files.Staged, model, dataset: data.Dataset, binarization: str, max_traversals: int = 10
) -> None:
    """Interpolations between (up to three pairs of) test images, traversals of the first
    ``max_traversals`` dimensions by KL, and for z_dim = 2 the latent map and the decoded
    manifold."""
    shape = dataset.shape
    x = data.eval_inputs(dataset.test, binarization)
    pairs = min(3, x.shape[0] // 2)  # a test file of a few images has fewer pairs, or none
    if pairs:
        start, end = x[:pairs], x[pairs : 2 * pairs]
        plots.interpolations_figure(model, start, end, stage.path(plots.INTERPOLATIONS), shape)
    z = model.encode(x[:1])
    if z.dim() != 2:
        return
    z_dim = z.shape[1]
    dims = traversal_order(stage.folder, z_dim)[:max_traversals]
    plots.traversals_figure(model, x, dims, stage.path(plots.TRAVERSALS), shape)
    if z_dim == 2:
        n = min(5000, x.shape[0])
        labels = dataset.test.labels[:n]
        plots.latent_map_figure(model, x[:n], labels, stage.path(plots.LATENT_MAP))
        plots.manifold_figure(model, stage.path(plots.MANIFOLD), shape)


def markdown_table(rows: list[tuple[str, str]]) -> list[str]:
    """A two-column ``| quantity | value |`` table; bars inside cells are escaped."""
    escaped = [(label.replace("|", "\\|"), value.replace("|", "\\|")) for label, value in rows]
    return ["| quantity | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in escaped)]


def read_results(path: Path) -> dict:
    """eval.json or diagnostics.json of a run folder ({} when absent); damaged is an error."""
    if not path.exists():
        return {}
    ev = runs.read_json(path, "rerun the command that writes it (ppl-vae evaluate or diagnose)")
    if not isinstance(ev, dict):
        raise RunDirError(f"{path}: not a table of results; rerun the command that writes it")
    return ev


def write_report(
    run_dir: Path, samples_caption: str = DEFAULT_SAMPLES_CAPTION, stage: files.Staged | None = None
) -> Path:
    """Assemble ``report.md`` and ``report.html`` from config.json, metrics.csv, eval.json and
    the figures (those of ``stage``, when given, not yet renamed into place)."""
    run_dir = Path(run_dir)
    if stage is None:
        with files.Staged(run_dir) as own:
            return write_report(run_dir, samples_caption, own)
    lines = checked_lines(run_dir, samples_caption, stage.location)
    stage.write_text(REPORT, "\n".join(lines))
    stage.write_text(REPORT_HTML, markdown_to_html("\n".join(lines), run_dir, stage.location))
    return run_dir / REPORT


def checked_lines(run_dir: Path, samples_caption: str, where: Callable[[str], Path]) -> list[str]:
    """:func:`report_lines`, with a results file that lacks or mangles an entry as a one-line
    error."""
    try:
        return report_lines(run_dir, samples_caption, where)
    except (KeyError, TypeError, ValueError, AttributeError) as err:  # a hand-edited results file
        raise RunDirError(
            f"{run_dir}: {EVAL_JSON} or {DIAGNOSTICS_JSON} lacks or mangles an entry "
            f"({type(err).__name__}: {err}); rerun `ppl-vae evaluate` or `ppl-vae diagnose`"
        ) from None


def report_lines(run_dir: Path, samples_caption: str, where: Callable[[str], Path]) -> list[str]:
    """The lines of report.md; ``where`` says where a file of the run folder can be read."""
    cfg = runs.read_config(run_dir)
    metrics = runs.read_metrics(run_dir)
    lines = [f"# Run `{run_dir.name}`", ""]
    likelihood = getattr(cfg.model, "likelihood", None)
    likelihood = f", likelihood {likelihood}" if likelihood else ""
    lines += [
        f"Model **{cfg.model.kind}** on **{cfg.data.dataset}** "
        f"({INPUTS.get(cfg.data.binarization, cfg.data.binarization)}{likelihood}), "
        f"objective **{cfg.objective.name}** "
        f"with {cfg.objective.num_particles} particle(s); {len(metrics)} epoch(s) of batch "
        f"{cfg.train.batch_size}, Adam lr {cfg.train.lr:g} ({cfg.train.lr_schedule}), "
        f"seed {cfg.train.seed}.",
        "",
    ]
    ev = read_results(where(EVAL_JSON))
    if ev:
        lines += [
            f"## Results on the {ev['split']} set ({ev['images']} images)",
            "",
        ]
        rows = []
        for key, label in LABELS.items():
            if key in ev:
                value, label = f"{ev[key]:.4g}", label.text
                if key == "nll_is":
                    label = f"{label}, k = {ev['k']}"
                    value = f"{ev[key]:.2f} ± {ev['nll_is_stderr']:.2f}"
                rows.append((label, value))
        lines += [*markdown_table(rows), ""]
        if "nll_is" in ev:
            lines += [
                "The ± is the standard error over test images. -ELBO ≥ -log p(x) estimate: the "
                "importance-sampled bound is the tighter one.",
                "",
            ]
        lines += [f"Note: {note}." for note in ev.get("notes", [])]
        lines.append("")
        lines += latent_units_section(ev)
    lines += diagnostics_section(where)
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
        *latent_figures_section(where),
        "## Config",
        "",
        "```json",
        json.dumps(to_dict(cfg), indent=2),
        "```",
        "",
    ]
    return lines


@torch.no_grad()
def build_report(run_dir: Path, device: str = "auto", dataset: data.Dataset | None = None) -> Path:
    """Figures and report.md for a finished run folder."""
    run_dir = Path(run_dir)
    torch_device = data.resolve_device(device)
    runs.open_for_writing(run_dir, "the report and its figures")
    # metrics.csv, eval.json and diagnostics.json are checked before any figure is drawn
    checked_lines(run_dir, DEFAULT_SAMPLES_CAPTION, lambda name: run_dir / name)
    cfg, model, _ = runs.load_model(run_dir, torch_device)
    dataset = dataset or data.load(cfg.data, torch_device)
    caption = model.samples_caption() if isinstance(model, SampleCaption) else None
    # every figure and both reports are renamed into place together, once all are written
    hint = "free space or fix the permissions, then rerun"
    with files.Staged(run_dir, hint, keep=world().main) as stage:  # rank 0 writes
        write_figures(stage, model, dataset, cfg.data.binarization, cfg.train.seed)
        return write_report(run_dir, caption or DEFAULT_SAMPLES_CAPTION, stage)


# ----------------------------------------------------------------------------- evaluation and
# diagnostics sections (issue 6), and the self-contained HTML version of report.md


def latent_units_section(ev: dict) -> list[str]:
    """Active units and the KL per dimension (largest first) of eval.json, when present."""
    if "posterior_mean_variance" not in ev:
        return []
    variance = ev["posterior_mean_variance"]
    lines = [
        "### Latent units",
        "",
        f"{ev['active_units']} of {len(variance)} units are active (variance over the test "
        f"images of the posterior mean above 0.01; Burda et al. 2015).",
        "",
    ]
    if "kl_per_dim" in ev:
        kl = ev["kl_per_dim"]
        order = sorted(range(len(kl)), key=lambda i: -kl[i])
        lines += [
            "| dimension (by KL) | " + " | ".join(str(i) for i in order) + " |",
            "|---|" + "---|" * len(order),
            "| KL (nats) | " + " | ".join(f"{kl[i]:.2f}" for i in order) + " |",
            "| Var_x E_q[z_i] | " + " | ".join(f"{variance[i]:.2f}" for i in order) + " |",
            "",
        ]
    return lines


def diagnostics_section(where: Callable[[str], Path]) -> list[str]:
    """The numbers of diagnostics.json (``ppl-vae diagnose``) with their figures; ``where``
    says where a file of the run folder can be read."""
    diag = read_results(where(DIAGNOSTICS_JSON))
    if not diag:
        return []
    lines = [
        "## Diagnostics of the guide",
        "",
        f"PSIS k̂ of the importance weights p(x, z)/q(z|x) on {diag['images']} test images "
        f"(k = {diag['k']} draws each; Yao et al. 2018: k̂ > 0.7 means the importance-sampled "
        f"estimate is unreliable); gaps (Cremer et al. 2018) on {diag['gap_images']} images, "
        f"q* fitted per image by {diag['config']['local_steps']} Adam steps with the decoder "
        "frozen.",
        "",
    ]
    rows = []
    for key, label in DIAGNOSTIC_LABELS.items():
        if key in diag:
            value = f"{diag[key]:.4g}"
            if f"{key}_stderr" in diag:
                value = f"{diag[key]:.3g} ± {diag[key + '_stderr']:.2g}"
            rows.append((label, value))
    lines += markdown_table(rows)
    lines += ["", "The ± is the standard error over images.", ""]
    if where(plots.KHAT).exists():
        lines += [f"![k-hat histogram]({plots.KHAT})", ""]
    if where(plots.POSTERIOR_PAIRS).exists():
        lines += [
            f"NUTS on p(z|x) ({diag.get('nuts_images', 0)} images, the trained decoder fixed) "
            "against q(z|x) and q*(z|x), the three latent dimensions of test image 0 that "
            "NUTS finds narrowest; "
            "InferenceData in `posterior_nuts.nc`, `posterior_q.nc`, `posterior_q_star.nc`, "
            "the importance weights in `importance.nc`:",
            "",
            f"![posterior pairs]({plots.POSTERIOR_PAIRS})",
            "",
        ]
    return lines


def latent_figures_section(where: Callable[[str], Path]) -> list[str]:
    """The latent-space figures that :func:`write_latent_figures` drew; the traversals'
    caption says the order :func:`traversal_order` took from eval.json."""
    ev = read_results(where(EVAL_JSON))
    key = next((k for k in TRAVERSAL_ORDERS if ev.get(k)), None)
    order = TRAVERSAL_ORDERS[key] if key else "dimensions in index order"
    captions = [
        (plots.INTERPOLATIONS, "Interpolations between test images: per pair a linear (upper) "
         "and a spherical (lower) path between their codes, the originals at the ends"),
        (plots.TRAVERSALS, "Latent traversals of one test image's code, one row per dimension "
         f"from -3 to 3, {order}"),
        (plots.LATENT_MAP, "Posterior means of test images, colored by label"),
        (plots.MANIFOLD, "Decoded manifold: z on a grid of Gaussian quantiles"),
    ]  # fmt: skip
    lines = []
    for name, caption in captions:
        if where(name).exists():
            lines += [f"{caption}:", "", f"![{name.removesuffix('.png')}]({name})", ""]
    return lines


def _inline(text: str, where: Callable[[str], Path]) -> str:
    """Inline markdown of report.md → HTML: images (embedded as base64), bold, code."""
    def image(match: re.Match) -> str:
        alt, src = match.group(1), match.group(2)
        path = where(src)
        if not path.exists():
            return html.escape(alt)
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'

    parts = re.split(r"(!\[[^\]]*\]\([^)]*\))", text)
    out = []
    for part in parts:
        found = re.fullmatch(r"!\[([^\]]*)\]\(([^)]*)\)", part)
        if found:
            out.append(image(found))
            continue
        part = html.escape(part, quote=False).replace("\\|", "|")
        part = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", part)
        part = re.sub(r"`([^`]+)`", r"<code>\1</code>", part)
        out.append(part)
    return "".join(out)


HTML_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.9rem; }
td, th { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; }
tr:nth-child(even) { background: #f6f6f6; }
img { max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }
pre { background: #f4f4f4; padding: 0.75rem; overflow-x: auto; font-size: 0.8rem; }
h1, h2, h3 { border-bottom: 1px solid #eee; padding-bottom: 0.2rem; }
"""


def markdown_to_html(
    markdown: str, run_dir: Path, where: Callable[[str], Path] | None = None
) -> str:
    """The subset of markdown that report.md uses (headings, paragraphs, pipe tables, fenced
    code, images, bold, inline code) → one self-contained HTML page, images as data URIs."""
    where = where or (lambda name: Path(run_dir) / name)
    body: list[str] = []
    lines = markdown.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            end = next(
                (j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines)
            )
            body.append(f"<pre>{html.escape(chr(10).join(lines[i + 1 : end]))}</pre>")
            i = end + 1
        elif heading := re.match(r"(#{1,6}) (.*)", line):
            level = len(heading.group(1))
            body.append(f"<h{level}>{_inline(heading.group(2), where)}</h{level}>")
            i += 1
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(lines[i])
                i += 1
            cells = [re.split(r"(?<!\\)\|", row.strip())[1:-1] for row in rows]
            table = ["<table>"]
            for n, row in enumerate(cells):
                if n == 1 and all(set(c.strip()) <= set("-:") for c in row):
                    continue
                tag = "th" if n == 0 else "td"
                table.append(
                    "<tr>" + "".join(f"<{tag}>{_inline(c.strip(), where)}</{tag}>" for c in row)
                    + "</tr>"
                )  # fmt: skip
            body.append("\n".join(table + ["</table>"]))
        elif line.strip():
            paragraph = []
            while i < len(lines) and lines[i].strip() and not re.match(r"(#|\||```)", lines[i]):
                paragraph.append(lines[i])
                i += 1
            body.append(f"<p>{_inline(' '.join(paragraph), where)}</p>")
        else:
            i += 1
    title = html.escape(Path(run_dir).name)
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>ppl_vae run {title}</title>\n<style>{HTML_STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
