"""Several processes on torch.distributed (gloo, 2 processes on this CPU) give one process's
numbers: evaluation and the importance weights of ``diagnose`` are shared over the ranks batch
by batch, each batch on random streams seeded by its index (ppl_vae/distributed.py)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, write_fake_idx

from ppl_vae import distributed, train
from ppl_vae.config import RunConfig, TrainConfig
from ppl_vae.data import DataConfig
from ppl_vae.metrics import EvalConfig
from ppl_vae.models import VAEConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node N -m ppl_vae ARGS`` on this checkout, one thread per process."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "ppl_vae", *args,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One small trained VAE (fake data, 2 epochs): the test set is 40 images."""
    root = tmp_path_factory.mktemp("dist")
    idx = write_fake_idx(root / "idx", n_train=240, n_test=40)
    cfg = RunConfig(
        name="vae",
        runs_dir=root / "runs",
        model=VAEConfig(z_dim=2, hidden=(16,)),
        data=DataConfig(data_dir=idx),
        train=TrainConfig(epochs=2, batch_size=32, progress=False, device="cpu"),
        eval=EvalConfig(k=8),
    )
    return train.fit(cfg)


def numbers(results: dict, prefix: str = "") -> dict[str, float]:
    """Every number of an eval.json/diagnostics.json, flattened to ``key[.i]``."""
    out: dict[str, float] = {}
    for key, value in results.items():
        if isinstance(value, bool) or isinstance(value, str):
            continue
        if isinstance(value, int | float):
            out[prefix + key] = float(value)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                if isinstance(v, int | float):
                    out[f"{prefix}{key}.{i}"] = float(v)
        elif isinstance(value, dict):
            out.update(numbers(value, f"{prefix}{key}."))
    return out


def copy(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


def test_evaluation_on_two_processes_equals_one(run_dir, tmp_path):
    one, two = copy(run_dir, tmp_path / "1"), copy(run_dir, tmp_path / "2")
    args = ["--k", "40", "--batch-size", "6", "--device", "cpu"]  # 7 batches: a ragged last one
    single = torchrun(1, "evaluate", str(one), *args)
    double = torchrun(2, "evaluate", str(two), *args)
    assert single.returncode == 0, single.stderr[-2000:]
    assert double.returncode == 0, double.stderr[-2000:]
    # rank 0 alone prints and writes
    assert double.stdout.count("written:") == 1
    a = numbers(json.loads((one / "eval.json").read_text()))
    b = numbers(json.loads((two / "eval.json").read_text()))
    assert a.keys() == b.keys() and "nll_is" in a and "neg_elbo" in a
    # The sharded estimates are the same draws added in the same order: equal to float64
    # rounding. The others are computed whole on every rank; they differ only by the order of
    # float32 sums (threads), so a relative 1e-5 bounds them.
    for key in ("nll_is", "neg_elbo", "neg_elbo_meanfield"):
        assert b[key] == pytest.approx(a[key], rel=1e-12, abs=1e-9), key
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    assert not list(two.glob(".*.tmp*"))


def test_importance_weights_of_diagnose_on_two_processes_equal_one(run_dir, tmp_path):
    one, two = copy(run_dir, tmp_path / "1"), copy(run_dir, tmp_path / "2")
    args = ["--images", "30", "--k", "64", "--batch-size", "8", "--gap-images", "2",
            "--local-steps", "5", "--elbo-particles", "16", "--nuts-images", "0",
            "--device", "cpu"]  # fmt: skip
    single = torchrun(1, "diagnose", str(one), *args)
    double = torchrun(2, "diagnose", str(two), *args)
    assert single.returncode == 0, single.stderr[-2000:]
    assert double.returncode == 0, double.stderr[-2000:]
    a = json.loads((one / "diagnostics.json").read_text())
    b = json.loads((two / "diagnostics.json").read_text())
    for key in ("nll_is", "nll_psis", "khat_max", "khat_mean"):
        assert key in a, sorted(a)
        assert b[key] == pytest.approx(a[key], rel=1e-12, abs=1e-12), key


def test_map_batches_outside_a_job_is_the_plain_loop():
    """One process: batch b of the fixed batching, on streams seeded by (seed, b)."""
    x = torch.arange(10.0)

    def noisy(batch: torch.Tensor) -> torch.Tensor:
        return batch + torch.rand(batch.shape[0])

    got = distributed.map_batches(noisy, x, batch_size=4, seed=3)
    expected = []
    for b, start in enumerate(range(0, 10, 4)):
        torch.manual_seed(distributed.stream_seed(3, b))
        expected.append(x[start : start + 4] + torch.rand(len(x[start : start + 4])))
    assert torch.equal(got, torch.cat(expected))
    sums = distributed.map_batches(lambda b: b.sum(), x, 4, 0, per_image=False)
    assert sums.tolist() == [6.0, 22.0, 17.0]


def test_train_under_torchrun_is_refused_in_one_line(run_dir, tmp_path):
    result = torchrun(2, "train", "--runs-dir", str(tmp_path / "runs"), "--train.epochs", "1")
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("ppl-vae train:")]
    assert lines and "train runs as one process for now" in lines[0]
    assert not (tmp_path / "runs").exists()
