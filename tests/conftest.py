"""Shared fixtures: a fixed seed per test, a clean Pyro param store, small real data."""

from __future__ import annotations

from pathlib import Path

import pyro
import pytest
import torch

from ppl_vae import data
from ppl_vae.config import DataConfig


@pytest.fixture(autouse=True)
def _clean_pyro_state():
    """Every test starts with an empty param store and Pyro's validation on."""
    pyro.clear_param_store()
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()


@pytest.fixture
def seed() -> int:
    """The seed of a test; fixed so that CI is deterministic."""
    pyro.set_rng_seed(0)
    return 0


def write_fake_idx(folder: Path, n_train: int = 120, n_test: int = 40, gz: bool = True) -> Path:
    """Four small IDX files with random 28×28 images, as the datasets ship them."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    suffix = ".gz" if gz else ""
    for part, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), generator=gen, dtype=torch.uint8)
        labels = torch.randint(0, 10, (n,), generator=gen, dtype=torch.uint8)
        data.write_idx(folder / f"{part}-images-idx3-ubyte{suffix}", images)
        data.write_idx(folder / f"{part}-labels-idx1-ubyte{suffix}", labels)
    return folder


@pytest.fixture
def fake_data_dir(tmp_path: Path) -> Path:
    return write_fake_idx(tmp_path / "idx")


@pytest.fixture(scope="session")
def fashion() -> data.Dataset:
    """Real Fashion-MNIST on the CPU (Debian copy, else torchvision's download)."""
    return data.load(DataConfig(), "cpu")


REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 300):
    """Run ``ppl-vae ARGS`` in a subprocess (this checkout's code, progress bars off)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ppl_vae.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )
