"""The run folder: ``config.json``, ``metrics.csv``, ``checkpoint.pt`` and what is built from them.

Every file is replaced atomically (:mod:`ppl_vae.files`): a kill at any moment leaves each file
either as it was or as it was meant to be. The checkpoint also holds the rows of
``metrics.csv`` up to its epoch, so a resumed run rewrites the file from the checkpoint and a
kill between the two renames loses nothing. Checkpoints hold only tensors and plain Python
values and are read back with ``torch.load(..., weights_only=True)``: anything else is refused.
A new run folder is claimed atomically (a hard link of its ``config.json``), so two processes
started in the same second never share one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import zipfile
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from ppl_vae import files
from ppl_vae.config import RunConfig, from_dict, to_dict
from ppl_vae.errors import RunDirError, UserError, first_line
from ppl_vae.models import LatentVariableModel, build

CONFIG = "config.json"
METRICS = "metrics.csv"
CHECKPOINT = "checkpoint.pt"
DATA_SOURCE = "data_source"  # config.json's record of the data a run read (not a flag)
RESUME_KEYS = ("model", "optimizer", "epoch", "step", "rng")


def disk_hint(run_dir: Path) -> str:
    return f"free space or fix the permissions, then `ppl-vae train --resume {run_dir}`"


def new_run_dir(cfg: RunConfig, data_source: dict | None = None) -> tuple[Path, Path | None]:
    """Claim ``runs_dir/name`` and write its ``config.json``; returns the folder and the topmost
    folder this call created (the run folder, or a missing ``--runs-dir`` above it; None when it
    took an existing empty folder), which a run that fails before its first epoch removes. The
    default name ``<kind>-<date>-<time>`` gets a ``-2``, ``-3``, ... when another run holds it;
    a given ``--name`` that is taken is an error."""
    runs_dir = Path(cfg.runs_dir)
    if runs_dir.exists() and not runs_dir.is_dir():  # (mkdir would say "already exists")
        raise RunDirError(f"--runs-dir {runs_dir}: is a file, not a folder; pass a folder")
    top_missing = next(
        (p for p in reversed([runs_dir.absolute(), *runs_dir.absolute().parents])
         if not p.exists()), None,
    )  # fmt: skip
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise files.os_error(err, runs_dir, "pass a writable folder as --runs-dir") from None
    files.check_writable(runs_dir, "pass a writable folder as --runs-dir")
    base = cfg.name or f"{cfg.model.kind}-{datetime.now():%Y%m%d-%H%M%S}"
    payload = config_text(cfg, data_source).encode()
    for attempt in range(1, 1000):
        run_dir = runs_dir / (base if attempt == 1 else f"{base}-{attempt}")
        claimed, created = _claim(run_dir, payload)
        if claimed:
            return run_dir, (top_missing or run_dir) if created else None
        if cfg.name:
            raise RunDirError(
                f"{run_dir} already exists and is not empty; pass another --name, "
                f"or --resume {run_dir}"
            )
    raise RunDirError(f"{runs_dir}: no free run folder name {base}-N; pass --name")


def _claim(run_dir: Path, payload: bytes) -> tuple[bool, bool]:
    """Make ``run_dir`` ours: create it (or take an empty one) and link a complete config.json
    into it; ``os.link`` fails when the name exists, so of two racing processes one wins."""
    try:
        os.mkdir(run_dir)
        created = True
    except FileExistsError:
        created = False
        if not run_dir.is_dir() or any(not files.TEMP.match(p.name) for p in run_dir.iterdir()):
            return False, False
    except OSError as err:
        raise files.os_error(err, run_dir, "pass a writable folder as --runs-dir") from None
    tmp = files.temp_path(run_dir / CONFIG)
    try:
        tmp.write_bytes(payload)
        files.fsync(tmp)
        os.link(tmp, run_dir / CONFIG)
    except FileExistsError:
        return False, created
    except OSError as err:
        if created:
            files.remove_tree(run_dir)
        raise files.os_error(err, run_dir, "pass a writable folder as --runs-dir") from None
    finally:
        tmp.unlink(missing_ok=True)
    files.fsync(run_dir)
    return True, created


def config_text(cfg: RunConfig, data_source: dict | None = None) -> str:
    saved = to_dict(cfg)
    if data_source is not None:
        saved[DATA_SOURCE] = data_source
    return json.dumps(saved, indent=2) + "\n"


def write_config(run_dir: Path, cfg: RunConfig, data_source: dict | None = None) -> None:
    files.write_atomic(Path(run_dir) / CONFIG, config_text(cfg, data_source), disk_hint(run_dir))


def read_json(path: Path, what: str) -> Any:
    """A JSON file of a run folder; anything unreadable is a one-line :class:`RunDirError`."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise RunDirError(f"{path}: not found; {what}") from None
    except OSError as err:
        raise files.os_error(err, path, what) from None
    except UnicodeDecodeError:
        raise RunDirError(f"{path}: not UTF-8 text; {what}") from None
    except json.JSONDecodeError as err:
        raise RunDirError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno}); {what}"
        ) from None
    except RecursionError:
        raise RunDirError(f"{path}: not valid JSON (nested too deeply); {what}") from None
    except ValueError:  # an integer of more digits than int() converts (4300)
        raise RunDirError(f"{path}: not valid JSON (a number of too many digits); {what}") from None


def read_saved_config(run_dir: Path) -> dict[str, Any]:
    """config.json as a dict (the config's own keys and the data source record)."""
    path = Path(run_dir) / CONFIG
    if Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise RunDirError(
            f"{run_dir}: is a file; RUN_DIR must be a folder written by `ppl-vae train`"
        )
    saved = read_json(path, "RUN_DIR must be a folder written by `ppl-vae train`")
    if not isinstance(saved, dict):
        raise RunDirError(f"{path}: not a run config (a JSON object is expected)")
    return saved


def read_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / CONFIG
    saved = dict(read_saved_config(run_dir))
    saved.pop(DATA_SOURCE, None)
    train = saved.get("train")
    if isinstance(train, dict) and "capture" in train:
        # written before the one speed switch: --train.capture became --fast
        saved["fast"] = train["capture"]
        saved["train"] = {k: v for k, v in train.items() if k != "capture"}
    try:
        return from_dict(RunConfig, saved)
    except UserError as err:
        raise RunDirError(f"{path}: not a valid run config ({err})") from None
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise RunDirError(f"{path}: not a valid run config ({type(err).__name__}: {err})") from None


def open_for_writing(run_dir: Path, writes: str) -> RunConfig:
    """A run folder a command is about to add ``writes`` to: its config, checked before any
    work; temporary files of dead processes removed; a folder nothing can be written into is a
    one-line error now rather than after the work."""
    cfg = read_config(run_dir)
    files.remove_stale_temps(run_dir)
    files.check_writable(run_dir, f"{writes} cannot be written there; copy the run folder to a "
                         "writable place or fix its permissions")  # fmt: skip
    return cfg


def data_source(run_dir: Path) -> dict[str, Any] | None:
    record = read_saved_config(run_dir).get(DATA_SOURCE)
    return record if isinstance(record, dict) else None


def save_epoch(run_dir: Path, state: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Replace ``checkpoint.pt`` (``state`` with ``rows`` as its history) and ``metrics.csv``
    (the same rows), each atomically, the checkpoint first."""
    state = {**state, "history": rows}
    with files.Staged(run_dir, disk_hint(run_dir)) as stage:
        stage.write_bytes(CHECKPOINT, files.torch_bytes(state))
        stage.write_text(METRICS, metrics_text(rows))


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """Replace ``checkpoint.pt`` by ``state`` atomically (temporary file, fsync, rename)."""
    files.write_atomic(Path(run_dir) / CHECKPOINT, files.torch_bytes(state), disk_hint(run_dir))


def load_checkpoint(
    run_dir: Path, device: torch.device | str = "cpu", keys: tuple[str, ...] = ("model", "epoch")
) -> dict[str, Any]:
    """``checkpoint.pt`` of ``run_dir``, checked to hold ``keys``; one-line errors otherwise."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise RunDirError(f"{path}: not found; has `ppl-vae train` finished an epoch in {run_dir}?")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; these are bytes
            raise RunDirError(
                f"{path}: not a readable checkpoint (not the zip archive torch.save writes); it "
                "is damaged or was not written by `ppl-vae train`"
            ) from None
        raise RunDirError(
            f"{path}: refused: it holds objects other than tensors and plain values, which "
            "ppl-vae never writes (loading them could run code); use a checkpoint written by "
            "`ppl-vae train`"
        ) from None
    except OSError as err:
        raise files.os_error(err, path, "") from None
    except Exception as err:  # a damaged zip or pickle stream comes in many types
        # torch's first sentence; the rest is advice for developers
        first = first_line(err).split(". ")[0]
        raise RunDirError(
            f"{path}: not a readable checkpoint ({first[:120]}); it is damaged or was not "
            "written by `ppl-vae train`"
        ) from None
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing:
        raise RunDirError(
            f"{path}: not a ppl-vae checkpoint (no {', '.join(missing)} entry); use a "
            "checkpoint written by `ppl-vae train`"
        )
    if not isinstance(state["model"], dict):
        raise RunDirError(f"{path}: not a ppl-vae checkpoint (its model entry is no state dict)")
    return state


def load_state(module: torch.nn.Module, state: dict[str, Any], path: Path, what: str) -> None:
    """``module.load_state_dict(state)`` with a one-line error when they do not fit."""
    try:
        module.load_state_dict(state)
        if isinstance(module, torch.optim.Optimizer):
            check_optimizer_shapes(module)
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        first = str(err).strip().splitlines()
        detail = next(
            (line.strip() for line in first[1:] if line.strip()), first[0] if first else ""
        )
        raise RunDirError(
            f"{path}: does not fit {what} ({detail[:160]}); the checkpoint belongs to another "
            "model or config.json was edited"
        ) from None
    if isinstance(module, torch.nn.Module):  # training never saves a diverged epoch
        for name, param in module.named_parameters():
            if not torch.isfinite(param).all():
                raise RunDirError(
                    f"{path}: its {name} holds NaN or infinite values; it is damaged or was not "
                    "written by `ppl-vae train`"
                )


def check_optimizer_shapes(optimizer: torch.optim.Optimizer) -> None:
    """An optimizer's ``load_state_dict`` checks the number of parameters, not their shapes: a
    state of another model would fail only at its first step, half way into training."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.dim() and value.shape != param.shape:
                    raise ValueError(
                        f"its {name} has shape {tuple(value.shape)} where the parameter has "
                        f"{tuple(param.shape)}"
                    )


def load_model(
    run_dir: Path, device: torch.device | str = "cpu"
) -> tuple[RunConfig, LatentVariableModel, dict[str, Any]]:
    """Rebuild the model of a run folder from its config and checkpoint, in eval mode."""
    cfg = read_config(run_dir)
    checkpoint = load_checkpoint(run_dir, device)
    model = build(cfg.model).to(device)
    load_state(model, checkpoint["model"], Path(run_dir) / CHECKPOINT, "the model of config.json")
    model.eval()
    return cfg, model, checkpoint


def metrics_text(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    what = "it is damaged; `ppl-vae train --resume RUN_DIR` rewrites it from the checkpoint"
    try:
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        parsed = [{k: float(v) for k, v in row.items()} for row in rows]
    except (UnicodeDecodeError, csv.Error, ValueError, TypeError, AttributeError):
        raise RunDirError(f"{path}: not a metrics table of numbers; {what}") from None
    except OSError as err:
        raise files.os_error(err, path, "") from None
    if any("epoch" not in row for row in parsed):
        raise RunDirError(f"{path}: has no epoch column; {what}")
    return parsed


def history(checkpoint: dict[str, Any], run_dir: Path) -> list[dict[str, Any]]:
    """The metrics rows up to the checkpoint's epoch: the checkpoint's own copy, or (a
    checkpoint written before it held one) the rows of metrics.csv."""
    if "history" not in checkpoint:
        rows = read_metrics(run_dir)
    else:
        rows = checkpoint["history"]
        numbers = isinstance(rows, list) and all(
            isinstance(r, dict) and "epoch" in r
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in r.values())
            for r in rows
        )  # fmt: skip
        if not numbers:
            raise RunDirError(
                f"{Path(run_dir) / CHECKPOINT}: its history is damaged (rows of numbers with an "
                "epoch are expected); use a checkpoint written by `ppl-vae train`"
            )
    rows = [r for r in rows if r["epoch"] <= checkpoint["epoch"]]
    return [{k: (int(v) if k == "epoch" else v) for k, v in r.items()} for r in rows]
