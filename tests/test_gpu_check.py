"""benchmarks/gpu_check.sh (``make bench-gpu``), the one command for the GPU figures, kept from
rotting on a machine without a GPU: its CPU dry run (``--device cpu --tiny``) runs every step
(the CUDA tests, step/zoo/evaluation throughput, a training run, the 1-process torchrun path)
and writes a results block that names each figure with a number and its command; ``--device
cuda`` without CUDA is refused in one line before anything runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"

# figure → what its command must contain (the dry run's tiny sizes: batches 16 and 32, k = 20)
FIGURES = {
    "CUDA tests (pytest -m cuda)": "-m pytest -m cuda",
    "training step, batch 16": "-m benchmarks.step_overhead --device cpu",
    "training step, batch 32": "-m benchmarks.step_overhead --device cpu",
    "zoo vae_mlp, training": "-m benchmarks.zoo_throughput --device cpu",
    "zoo vae_conv, training": "-m benchmarks.zoo_throughput --device cpu",
    "zoo vqvae, training": "-m benchmarks.zoo_throughput --device cpu",
    "IS log p(x), k = 20": "-m benchmarks.eval_throughput --device cpu",
    "ppl-vae train (default), per epoch": "-m ppl_vae train --train.device cpu",
    "ppl-vae train (default), whole command": "-m ppl_vae train --train.device cpu",
    "torchrun --nproc-per-node 1: ppl_vae's process group": (
        "-m torch.distributed.run --standalone --nproc-per-node 1 -m benchmarks.torchrun_world"
    ),
    "torchrun --nproc-per-node 1 ppl-vae train, per epoch": (
        "-m torch.distributed.run --standalone --nproc-per-node 1 -m ppl_vae train"
    ),
}
STEPS = (
    "cuda-tests",
    "step-overhead",
    "zoo-throughput",
    "eval-throughput",
    "train",
    "torchrun-world",
    "torchrun-train",
)


def gpu_check(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``bash benchmarks/gpu_check.sh ARGS`` with this interpreter as its Python."""
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def table(results: str) -> dict[str, tuple[str, str]]:
    """figure → (value, command) of the results block's table rows."""
    rows = {}
    for line in results.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and len(cells) == 3 and cells[0] != "figure":
            rows[cells[0]] = (cells[1], cells[2])
    return rows


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu_check")
    return gpu_check("--device", "cpu", "--tiny", "--out", str(out)), out


def test_dry_run_passes_and_writes_every_step_log(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"logs and results in {out}" in proc.stdout
    logs = sorted(p.name for p in out.glob("*.log"))
    assert logs == [f"{i:02d}-{name}.log" for i, name in enumerate(STEPS, 1)]
    assert len(list(out.iterdir())) <= 8  # what comes back from a device machine's $OUT


def test_results_block_names_every_figure_with_a_number_and_its_command(dry_run):
    proc, out = dry_run
    results = (out / "results.md").read_text()
    assert results in proc.stdout  # printed too, ready to paste
    header = results.splitlines()[0]
    assert header.startswith("## ") and re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", header)
    assert f"torch {torch.__version__}" in results and "pyro-ppl " in results
    assert "0 step(s) failed" in results
    rows = table(results)
    assert set(rows) == set(FIGURES)
    for figure, (value, command) in rows.items():
        assert "FAILED" not in value, (figure, value)
        assert re.search(r"\d", value), (figure, value)
        assert command.startswith("`") and FIGURES[figure] in command, (figure, command)
        assert re.search(r"\(\d+\.\d s\)$", command), command  # the step's wall time
        assert f"$ {command[1 : command.rindex('`')]}" in proc.stdout  # as the step printed it
    assert "skipped" in rows["CUDA tests (pytest -m cuda)"][0] or not torch.cuda.is_available()
    assert "s/epoch" in rows["ppl-vae train (default), per epoch"][0]


def test_a_failed_step_is_recorded_and_the_others_still_run(tmp_path):
    """With no time budget left every step is recorded as failed, none stops the others, and
    the script exits 1."""
    proc = gpu_check("--device", "cpu", "--tiny", "--budget", "0", "--out", str(tmp_path))
    assert proc.returncode == 1, proc.stderr
    rows = table((tmp_path / "results.md").read_text())
    assert set(rows) == set(FIGURES) - {"ppl-vae train (default), whole command"}
    assert all(value.startswith("FAILED (not run") for value, _ in rows.values())


def test_cuda_without_a_gpu_is_refused_in_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present; the refusal cannot be reached")
    out = tmp_path / "never"
    proc = gpu_check("--device", "cuda", "--out", str(out), timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1 and "no CUDA device" in proc.stderr, proc.stderr
    assert proc.stdout == "" and not out.exists()
