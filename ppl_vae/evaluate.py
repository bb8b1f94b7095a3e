"""``ppl-vae evaluate``: a run folder's model on a split, the numbers in ``eval.json``.

The numbers are those of :func:`ppl_vae.metrics.evaluate_model` (the table of metric groups
and what each needs), plus, with a reference VAE, the reference density of the model's samples.
Nothing here changes parameters or optimizer state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ppl_vae import data, files, runs
from ppl_vae.distributed import seeded, world
from ppl_vae.errors import RunDirError
from ppl_vae.metrics import (
    DENSITY_GUIDE,
    EvalConfig,
    ProgramFacts,
    evaluate_model,
    format_results,
    reference_metrics,
)

EVAL_JSON = "eval.json"
EVALUATE_K = 5000
"""Importance samples per image of ``ppl-vae evaluate`` (training's final evaluation uses the
run's ``--eval.k``)."""

__all__ = ["EVAL_JSON", "EVALUATE_K", "evaluate_run", "format_results"]


def evaluate_run(
    run_dir: Path,
    eval_cfg: EvalConfig | None = None,
    split: str = "test",
    device: str = "auto",
    progress: bool = True,
    dataset: data.Dataset | None = None,
    images: int = 0,
    reference_dir: Path | None = None,
    fast: bool | None = None,
) -> dict[str, Any]:
    """Evaluate a run folder's model on ``split`` and write the numbers to ``eval.json``.

    Which numbers depends on the model (:data:`ppl_vae.metrics.METRICS`): a density guide gets
    the -ELBO and importance-sampled log p(x); point-mass guides (AE, VQ-VAE) get
    reconstruction errors and their own objectives, with a note saying why. ``images`` > 0
    evaluates the first ``images`` images of the split only. ``reference_dir``: a run folder of
    a density model (a VAE) under which the model's samples are scored. ``fast``: the fast
    paths (default: the run's ``--fast``).
    """
    torch_device = data.resolve_device(device)
    runs.open_for_writing(run_dir, EVAL_JSON)
    cfg, model, checkpoint = runs.load_model(run_dir, torch_device)
    eval_cfg = eval_cfg or cfg.eval
    fast = cfg.fast if fast is None else fast
    dataset = dataset or data.load(cfg.data, torch_device)
    inputs = data.eval_inputs(getattr(dataset, split), cfg.data.binarization)
    if images:
        inputs = inputs[:images]
    if reference_dir is not None:  # checked before the evaluation, which takes a while
        ref_cfg, reference, _ = runs.load_model(reference_dir, torch_device)
        if ref_cfg.data.binarization != cfg.data.binarization:
            raise RunDirError(
                f"--reference-vae {reference_dir}: the reference was trained with "
                f"--data.binarization {ref_cfg.data.binarization}, this run with "
                f"{cfg.data.binarization}; pass a reference trained on the same inputs"
            )
        if not DENSITY_GUIDE.holds(reference, ProgramFacts.of(reference, inputs[:2])):
            raise RunDirError(
                f"--reference-vae {reference_dir}: needs {DENSITY_GUIDE.name}; pass a VAE run"
            )
    results = {
        "split": split,
        "images": inputs.shape[0],
        "epoch": checkpoint["epoch"],
        "seed": eval_cfg.seed,
        **evaluate_model(model, inputs, eval_cfg, progress, fast, cfg.data.binarization),
    }
    if reference_dir is not None:
        results["reference"] = str(reference_dir)
        with seeded(eval_cfg.seed, torch_device):
            results.update(
                reference_metrics(
                    model, reference, inputs, eval_cfg, cfg.data.binarization,
                    min(1000, inputs.shape[0]), progress, fast,
                )  # fmt: skip
            )
    if world().main:  # rank 0 writes; the other processes of a distributed job only compute
        files.write_atomic(Path(run_dir) / EVAL_JSON, json.dumps(results, indent=2) + "\n")
    return results
