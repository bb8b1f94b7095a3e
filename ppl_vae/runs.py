"""The run folder: ``config.json``, ``metrics.csv``, ``checkpoint.pt`` and what is built from them.

Checkpoints are written to a temporary file in the same folder and renamed over the old one,
so an interrupted write never leaves a half-written checkpoint; they hold only tensors and plain
Python values and are read back with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import csv
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from ppl_vae.config import RunConfig, from_dict, to_dict
from ppl_vae.errors import RunDirError
from ppl_vae.models import LatentVariableModel, build

CONFIG = "config.json"
METRICS = "metrics.csv"
CHECKPOINT = "checkpoint.pt"


def new_run_dir(cfg: RunConfig) -> Path:
    """Create ``runs_dir/name`` (default name: ``<kind>-<date>-<time>``); refuse to overwrite."""
    name = cfg.name or f"{cfg.model.kind}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(cfg.runs_dir) / name
    if run_dir.exists() and any(run_dir.iterdir()):
        raise RunDirError(
            f"{run_dir} already exists and is not empty; pass another --name, or --resume {run_dir}"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, cfg)
    return run_dir


def write_config(run_dir: Path, cfg: RunConfig) -> None:
    (Path(run_dir) / CONFIG).write_text(json.dumps(to_dict(cfg), indent=2) + "\n")


def read_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise RunDirError(f"{path}: not found; RUN_DIR must be a folder written by `ppl-vae train`")
    try:
        saved = json.loads(path.read_text())
        if isinstance(saved, dict) and "capture" in saved.get("train", {}):
            # written before the one speed switch: --train.capture became --fast
            saved = {**saved, "fast": saved["train"]["capture"]}
            saved["train"] = {k: v for k, v in saved["train"].items() if k != "capture"}
        return from_dict(RunConfig, saved)
    except (json.JSONDecodeError, TypeError) as err:
        raise RunDirError(f"{path}: not a valid run config ({err})") from None


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``checkpoint.pt`` atomically (temporary file, then rename)."""
    tmp = Path(run_dir) / f".{CHECKPOINT}.{os.getpid()}.tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, Path(run_dir) / CHECKPOINT)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(run_dir: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise RunDirError(f"{path}: not found; has `ppl-vae train` finished an epoch in {run_dir}?")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise RunDirError(f"{path}: unreadable checkpoint ({err})") from None


def load_model(
    run_dir: Path, device: torch.device | str = "cpu"
) -> tuple[RunConfig, LatentVariableModel, dict[str, Any]]:
    """Rebuild the model of a run folder from its config and checkpoint, in eval mode."""
    cfg = read_config(run_dir)
    checkpoint = load_checkpoint(run_dir, device)
    model = build(cfg.model).to(device)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    return cfg, model, checkpoint


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    path = Path(run_dir) / METRICS
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    with path.open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def truncate_metrics(run_dir: Path, epochs: int) -> None:
    """Drop rows after ``epochs`` (a resumed run rewrites epochs its checkpoint does not hold)."""
    rows = [r for r in read_metrics(run_dir) if r["epoch"] <= epochs]
    path = Path(run_dir) / METRICS
    path.unlink(missing_ok=True)
    for row in rows:
        append_metrics(run_dir, {k: (int(v) if k == "epoch" else v) for k, v in row.items()})
