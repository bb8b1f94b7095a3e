"""Several processes on torch.distributed (gloo, 2 processes on this CPU) give one process's
numbers: evaluation and the importance weights of ``diagnose`` are shared over the ranks batch
by batch, each batch on random streams seeded by its index (ppl_vae/distributed.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, write_fake_idx

from ppl_vae import distributed, runs, train
from ppl_vae.config import RunConfig, TrainConfig
from ppl_vae.data import DataConfig
from ppl_vae.metrics import EvalConfig
from ppl_vae.models import VAEConfig, build


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


TINY = ["--model.z-dim", "2", "--model.hidden", "16", "--eval.k", "5", "--no-train.progress",
        "--train.device", "cpu"]  # fmt: skip


def data_flags(run_dir: Path) -> list[str]:
    return ["--data.data-dir", str(run_dir.parent.parent / "idx")]


def load(path: Path) -> dict:
    return torch.load(path / "checkpoint.pt", weights_only=True)


def test_ae_training_on_two_processes_equals_one(run_dir, tmp_path):
    """A deterministic model (AE, static binarization): the global batch is split over the two
    ranks and their gradients averaged, so 2 processes take one process's steps (float
    rounding apart), 3 epochs of 7 steps with a ragged last batch (200 = 6·32 + 8)."""
    flags = ["train", "ae", *data_flags(run_dir), *TINY, "--data.binarization", "static",
             "--train.epochs", "3", "--train.batch-size", "32",
             "--runs-dir", str(tmp_path)]  # fmt: skip
    single = torchrun(1, *flags, "--name", "one")
    double = torchrun(2, *flags, "--name", "two")
    assert single.returncode == 0, single.stderr[-2000:]
    assert double.returncode == 0, double.stderr[-2000:]
    assert double.stdout.count("run folder:") == 1  # rank 0 alone prints
    a, b = load(tmp_path / "one"), load(tmp_path / "two")
    worst = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
    assert worst < 1e-5, worst
    for row_a, row_b in zip(a["history"], b["history"], strict=True):
        for key in ("train_neg_elbo", "val_neg_elbo"):
            assert row_b[key] == pytest.approx(row_a[key], abs=2e-3), key
    assert b["world_size"] == 2 and len(b["rng_ranks"]) == 2


FLOW = ["--model.flow-steps", "2", "--model.flow-hidden", "8", "--model.flow-context", "4"]


@pytest.mark.parametrize("kind", ["vae", "flow"])
def test_resume_on_two_processes_is_bit_exact_and_needs_the_same_count(kind, run_dir, tmp_path):
    """Each rank's random streams are in the checkpoint: 1 epoch + --resume to 3 equals 3
    epochs straight, bit for bit. Batch 199 of 200 images leaves a last batch of 1 image: one
    rank steps on a stand-in (zero weight) so that neither waits for the other. The flow guide
    (IAF) has buffers, its MADEs' masks and orders: constant, equal to a fresh model's."""
    flags = ["train", kind, *data_flags(run_dir), *TINY, "--train.batch-size", "199",
             "--runs-dir", str(tmp_path), *(FLOW if kind == "flow" else [])]  # fmt: skip
    straight = torchrun(2, *flags, "--train.epochs", "3", "--name", "straight")
    first = torchrun(2, *flags, "--train.epochs", "1", "--name", "resumed")
    assert straight.returncode == 0 and first.returncode == 0, straight.stderr[-2000:]
    resumed = torchrun(2, "train", "--resume", str(tmp_path / "resumed"), "--train.epochs", "3")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = load(tmp_path / "straight"), load(tmp_path / "resumed")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["history"][-1]["train_neg_elbo"] == b["history"][-1]["train_neg_elbo"]
    assert [r["val_neg_elbo"] for r in a["history"]] == [r["val_neg_elbo"] for r in b["history"]]
    before = (tmp_path / "resumed" / "config.json").read_bytes()
    other = torchrun(1, "train", "--resume", str(tmp_path / "resumed"), "--train.epochs", "4")
    assert other.returncode != 0
    lines = [line for line in other.stderr.splitlines() if line.startswith("ppl-vae train:")]
    assert len(lines) == 1 and "was written by 2 process(es), this job has 1" in lines[0]
    assert (tmp_path / "resumed" / "config.json").read_bytes() == before
    if kind == "flow":
        _, fresh, _ = runs.load_model(tmp_path / "straight", torch.device("cpu"))
        rebuilt = build(fresh.config).state_dict()
        buffers = [name for name in a["model"] if "mask" in name or "permutation" in name]
        assert len(buffers) >= 4
        assert all(torch.equal(a["model"][name], rebuilt[name]) for name in buffers)


VQ = ["--model.codebook-size", "16", "--model.code-dim", "8", "--model.conv-channels", "8", "8",
      "--model.code-prior.epochs", "1", "--model.code-prior.channels", "8",
      "--model.code-prior.layers", "1", "--eval.k", "5", "--no-train.progress",
      "--train.device", "cpu", "--data.binarization", "static"]  # fmt: skip


@pytest.mark.parametrize(
    "flags", [["--model.ema", "--model.revive-every", "3"], ["--model.revive-every", "0"]],
    ids=["ema-revival", "codebook-loss-no-revival"],
)
def test_vqvae_training_on_two_processes_equals_one(run_dir, tmp_path, flags):
    """The quantizer's usage counts, EMA sums and counts, code seeding and dead-code revival
    come from the whole global batch (gathered) with rank 0's random choices; the code prior is
    left out of DDP while the VQ-VAE trains and fitted alike on every rank. Parameters, EMA
    buffers, the code prior and the metrics equal one process's after 2 epochs."""
    common = ["train", "vqvae", *data_flags(run_dir), *VQ, *flags, "--train.epochs", "2",
              "--train.batch-size", "32", "--runs-dir", str(tmp_path)]  # fmt: skip
    single = torchrun(1, *common, "--name", "one")
    double = torchrun(2, *common, "--name", "two")
    assert single.returncode == 0, single.stderr[-2000:]
    assert double.returncode == 0, double.stderr[-2000:]
    a, b = load(tmp_path / "one"), load(tmp_path / "two")
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.allclose(a["model"][key].double(), b["model"][key].double(), atol=1e-5), key
    assert bool(b["model"]["code_prior_fitted"])
    for row_a, row_b in zip(a["history"], b["history"], strict=True):
        for key in ("train_neg_elbo", "val_neg_elbo", "perplexity", "codebook_usage"):
            assert row_b[key] == pytest.approx(row_a[key], abs=2e-3), key


def test_models_whose_buffers_are_not_shared_are_refused_in_one_line(run_dir, tmp_path):
    """A model with buffers it does not keep equal over the ranks (no ``syncs_buffers``)."""
    from ppl_vae.errors import ConfigError
    from ppl_vae.models import VAE

    model = VAE(VAEConfig(z_dim=2, hidden=(16,)))
    model.register_buffer("running_mean", torch.zeros(3))
    with pytest.raises(ConfigError, match="running_mean, which distributed training does not"):
        train.check_distributable(model)
    train.check_distributable(VAE(VAEConfig(z_dim=2, hidden=(16,))))  # no buffers: fine


def test_a_killed_rank_ends_the_job_and_the_checkpoint_stays_loadable(run_dir, tmp_path):
    """kill -9 of one worker: torchrun ends the other within a bounded time, with a non-zero
    exit; the last checkpoint written by rank 0 loads."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "ppl_vae",
        "train", "vae", *data_flags(run_dir), *TINY, "--train.batch-size", "8",
        "--train.epochs", "500", "--runs-dir", str(tmp_path), "--name", "run",
    ]  # fmt: skip
    job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "checkpoint.pt").exists():
            assert job.poll() is None and time.monotonic() < deadline, "no epoch finished"
            time.sleep(0.2)
        workers = children(job.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        started = time.monotonic()
        job.wait(timeout=90)
        ended = time.monotonic() - started
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode != 0
    assert ended < 90
    assert not [pid for pid in workers if pid_alive(pid)]
    state = load(tmp_path / "run")
    assert state["epoch"] >= 1 and state["world_size"] == 2


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(p) for p in text]
    return sorted(found)


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


# ----------------------------------------------------------------------------- the VAE's gradient

REPLICATES, BATCH, DIRECTIONS = 200, 16, 4


def gradient_setup():
    """A small VAE (fixed initial weights), a fixed binary batch and fixed random directions
    onto which the flattened gradient is projected."""
    from ppl_vae.inference.objectives import ObjectiveConfig, loss_module
    from ppl_vae.models import VAE

    torch.manual_seed(0)
    model = VAE(VAEConfig(z_dim=2, hidden=(16,)))
    x = torch.bernoulli(torch.full((BATCH, 784), 0.3), generator=torch.Generator().manual_seed(1))
    n = sum(p.numel() for p in model.parameters())
    directions = torch.randn(DIRECTIONS, n, generator=torch.Generator().manual_seed(2))
    return model, loss_module(model, ObjectiveConfig("trace")), x, directions.double()


def projected(model, directions) -> torch.Tensor:
    flat = torch.cat([p.grad.flatten() for p in model.parameters()]).double()
    model.zero_grad(set_to_none=True)
    return directions @ flat


def gradient_worker(rank: int, port: int, seed: int, out) -> None:
    """One rank of 2: the first step's gradient, DDP-averaged, for every replicate's streams."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model, loss_fn, x, directions = gradient_setup()
        ddp = torch.nn.parallel.DistributedDataParallel(train.DistributedLoss(model, loss_fn))
        rows = []
        for r in range(REPLICATES):
            torch.manual_seed(distributed.stream_seed(seed * REPLICATES + r, rank))
            (ddp(x[rank::2]) / (BATCH / 2)).backward()  # the denominator of train._train
            rows.append(projected(model, directions))
        if rank == 0:
            out.put(torch.stack(rows).tolist())  # plain numbers: no shared memory
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.stat(comparisons=DIRECTIONS)
def test_vae_first_step_gradient_on_two_processes_equals_one_in_expectation(seed):
    """Estimand: E[g_2] - E[g_1] = 0 for the first step's gradient (projected on 4 fixed
    directions) of 2 DDP ranks (each its own ε stream, half the batch, gradients averaged)
    and of one process on the whole batch; 200 independent pairs, two-sided, k =
    k_two_sided(200)."""
    from stats import assert_mc_close

    ctx = torch.multiprocessing.get_context("spawn")
    out = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=gradient_worker, args=(r, port, seed, out)) for r in range(2)]
    for p in procs:
        p.start()
    model, loss_fn, x, directions = gradient_setup()
    single = []
    for r in range(REPLICATES):
        torch.manual_seed(distributed.stream_seed(seed * REPLICATES + r, 7))  # independent
        (loss_fn(x) / BATCH).backward()
        single.append(projected(model, directions))
    double = torch.tensor(out.get(), dtype=torch.float64)
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0, p.exitcode
    differences = double - torch.stack(single)
    assert differences.std(0).min() > 0  # real noise on both sides
    assert_mc_close(differences, 0.0, what="E[g_2 processes] - E[g_1 process]")
