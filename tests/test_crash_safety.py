"""Crash safety of the run folder: kill -9 during --resume, divergence, racing run folders, a
full or read-only disk, bit-exact resumes for every model, reproducible evaluation.

Tiny runs on small random IDX files (``conftest.write_fake_idx``: 100 training, 20 validation
and 40 test images); training runs on one torch thread (also in the subprocesses, through
``OMP_NUM_THREADS=1``), so that "the same run" means the same bits.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import multiprocessing
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import REPO, write_fake_idx

from ppl_vae import data, evaluate, files, runs, train
from ppl_vae.cli import main
from ppl_vae.config import DataConfig, EvalConfig, RunConfig, TrainConfig
from ppl_vae.errors import RunDirError
from ppl_vae.models import REGISTRY, AEConfig, FlowVAEConfig, HVAEConfig, VAEConfig, VQVAEConfig
from ppl_vae.models.code_prior import CodePriorConfig
from ppl_vae.models.linear import LinearGaussianConfig
from ppl_vae.train import fit

# One tiny config per registered model, exercising what a resume must carry over: the KL
# warm-up (a step-dependent schedule), code revival and the code prior (random draws, an
# auxiliary fit after training).
MODELS = {
    "vae": lambda: VAEConfig(z_dim=2, hidden=(16,), warmup_steps=7),
    "ae": lambda: AEConfig(z_dim=2, hidden=(16,)),
    "vqvae": lambda: VQVAEConfig(
        conv_channels=(4, 8),
        codebook_size=8,
        code_dim=4,
        revive_every=3,
        code_prior=CodePriorConfig(channels=4, layers=1, epochs=2, batch_size=20),
    ),
    "linear": lambda: LinearGaussianConfig(z_dim=2),
    "flow": lambda: FlowVAEConfig(z_dim=2, hidden=(16,), flow_hidden=(4,), flow_context=2,
                                  prior="mog", prior_components=2),  # fmt: skip
    "hvae": lambda: HVAEConfig(z_dim=2, z2_dim=2, hidden=(16,), hidden2=(8,)),
}
TIMING = ("seconds", "images_per_s")  # the only columns two runs of the same config may differ in
SUBPROCESS_ENV = {
    **os.environ,
    "PYTHONPATH": str(REPO),
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory) -> Path:
    return write_fake_idx(tmp_path_factory.mktemp("idx"), n_train=120, n_test=40)


@pytest.fixture(scope="module")
def dataset(fake_dir) -> data.Dataset:
    return data.load(DataConfig(data_dir=fake_dir), "cpu")


def tiny(
    runs_dir: Path, name: str, fake_dir: Path, epochs: int = 1, kind: str = "vae", **train_options
) -> RunConfig:
    return RunConfig(
        name=name,
        runs_dir=runs_dir,
        model=MODELS[kind](),
        data=DataConfig(data_dir=fake_dir),
        train=TrainConfig(
            epochs=epochs, batch_size=20, device="cpu", progress=False, **train_options
        ),
        eval=EvalConfig(k=2, batch_size=100, particle_chunk=2),
    )


def tiny_flags(runs_dir: Path, name: str, fake_dir: Path, epochs: int) -> list[str]:
    """`ppl-vae train vae` flags of the same tiny VAE (without the warm-up)."""
    return [
        "--runs-dir", str(runs_dir), "--name", name, "--data.data-dir", str(fake_dir),
        "--model.z-dim", "2", "--model.hidden", "16", "--train.batch-size", "20",
        "--train.epochs", str(epochs), "--train.device", "cpu", "--no-train.progress",
        "--eval.k", "2", "--eval.particle-chunk", "2",
    ]  # fmt: skip


def cli(*argv: str) -> tuple[int, str, str]:
    """``ppl-vae ARGV`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def one_error_line(err: str, command: str = "train") -> str:
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith(f"ppl-vae {command}: error: "), err
    return err.strip()


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if files.TEMP.match(p.name))


def dead_pid() -> int:
    """The id of a process that has exited and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def assert_same_tensors(a, b, where: str) -> None:
    """``a`` and ``b`` (nested dicts/lists of tensors and plain values) are equal, tensors bit
    for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_run(a: Path, b: Path) -> None:
    """Two run folders hold the same training bit for bit: model (a VQ-VAE's code prior
    included), optimizer, step, random state; and the same metrics but for the timing."""
    state_a = runs.load_checkpoint(a, keys=runs.RESUME_KEYS)
    state_b = runs.load_checkpoint(b, keys=runs.RESUME_KEYS)
    assert state_a["model"].keys() == state_b["model"].keys()
    for key, value in state_a["model"].items():
        assert torch.equal(value, state_b["model"][key]), f"model: {key} differs"
    for key in ("optimizer", "epoch", "step", "rng"):
        assert_same_tensors(state_a[key], state_b[key], key)
    assert without_timing(state_a["history"]) == without_timing(state_b["history"])
    assert without_timing(runs.read_metrics(a)) == without_timing(runs.read_metrics(b))


def assert_consistent(run_dir: Path, killed_pid: int | None = None) -> tuple[int, int]:
    """What a kill at any moment may leave: a loadable checkpoint of epoch E holding the rows
    1..E; metrics.csv with the rows 1..E, or 1..E-1 when the kill fell between the two renames
    of ``runs.save_epoch`` (checkpoint first); no temporary file but the killed process's.
    Returns (E, rows in metrics.csv)."""
    runs.read_config(run_dir)
    state = runs.load_checkpoint(run_dir, keys=runs.RESUME_KEYS)
    epoch = state["epoch"]
    assert [row["epoch"] for row in state["history"]] == list(range(1, epoch + 1))
    rows = runs.read_metrics(run_dir)
    epochs = [int(row["epoch"]) for row in rows]
    assert epochs in (list(range(1, epoch + 1)), list(range(1, epoch))), (epoch, epochs)
    expected = [{k: float(v) for k, v in row.items()} for row in state["history"][: len(rows)]]
    assert rows == expected
    assert all(math.isfinite(v) for row in rows for v in row.values())
    left = [files.TEMP.match(name)["pid"] for name in temps(run_dir)]
    assert all(int(pid) == killed_pid for pid in left), (temps(run_dir), killed_pid)
    return epoch, len(rows)


# ----------------------------------------------------------------------------- kill -9


def spawn_train(*argv: str) -> tuple[subprocess.Popen, queue.Queue]:
    """``ppl-vae train ARGV`` in a subprocess whose output lines arrive on a queue."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ppl_vae.cli", "train", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=SUBPROCESS_ENV,
        cwd=REPO,
    )
    lines: queue.Queue = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return proc, lines


def wait_for_line(lines: queue.Queue, prefix: str, timeout: float = 120) -> bool:
    """Wait for an output line starting with ``prefix``; False when the process ended first."""
    deadline = time.monotonic() + timeout
    while True:
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        if line is None:
            return False
        if line.startswith(prefix):
            return True


def kill_resumes(run_dir: Path, epochs: int, kills: int, seed: int, longest: float) -> list:
    """Start ``--resume`` ``kills`` times and SIGKILL it at a seeded random moment of its
    training (``0 .. longest`` s after it has finished its first epoch, so that every kill
    makes progress); check the folder after every kill. Returns (checkpoint epoch, metrics
    rows, temporary files) per kill."""
    rng = random.Random(seed)
    observed = []
    last_epoch = 0
    for _ in range(kills):
        proc, lines = spawn_train("--resume", str(run_dir), "--train.epochs", str(epochs))
        try:
            training = wait_for_line(lines, "epoch ")  # no epoch line: none was left to run
            if training:
                time.sleep(rng.uniform(0, longest))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        assert proc.returncode == (-signal.SIGKILL if training else 0)
        left = temps(run_dir)
        epoch, rows = assert_consistent(run_dir, proc.pid)
        assert epoch > last_epoch or epoch == epochs  # each resume got at least one epoch on
        last_epoch = epoch
        observed.append((epoch, rows, left))
        if not training:
            assert epoch == epochs
            break
    return observed


def progress_config(cfg: RunConfig) -> RunConfig:
    """Progress on, so that the subprocess prints its "data: ..." line (bars stay off when
    output is not a terminal)."""
    return replace(cfg, train=replace(cfg.train, progress=True))


def test_kill_9_during_resume_loses_no_row_and_resumes_bit_exactly(
    tmp_path, fake_dir, dataset, single_thread, capsys
):
    """One epoch, then `--resume --train.epochs 40` SIGKILLed at 6 seeded random moments of
    its training (resumed again after each), then resumed to the end: after every kill the
    folder is consistent (assert_consistent), and the end equals an uninterrupted 40-epoch run
    bit for bit. (The bug this guards against kept 28-33 of 40 rows.)"""
    cfg = progress_config(tiny(tmp_path, "killed", fake_dir, epochs=1))
    run_dir = fit(cfg, dataset=dataset)
    observed = kill_resumes(run_dir, 40, kills=6, seed=2026, longest=0.2)
    with capsys.disabled():
        print(f"\nkill -9 during --resume: (checkpoint epoch, metrics rows, temps) {observed}")
    assert sum(epoch < 40 for epoch, _, _ in observed) >= 3  # most kills fell inside training
    proc, lines = spawn_train("--resume", str(run_dir), "--train.epochs", "40")
    assert proc.wait(timeout=300) == 0
    assert temps(run_dir) == []  # a killed process's temporary files are gone
    assert [int(r["epoch"]) for r in runs.read_metrics(run_dir)] == list(range(1, 41))
    straight = fit(
        progress_config(tiny(tmp_path, "straight", fake_dir, epochs=40)), dataset=dataset
    )
    assert_same_run(straight, run_dir)


@pytest.mark.slow
def test_kill_9_many_times(tmp_path, fake_dir, dataset, single_thread):
    """The same with 20 kills over 200 epochs."""
    run_dir = fit(progress_config(tiny(tmp_path, "killed", fake_dir, epochs=1)), dataset=dataset)
    observed = kill_resumes(run_dir, 200, kills=20, seed=7, longest=0.3)
    assert sum(epoch < 200 for epoch, _, _ in observed) >= 10
    proc, _ = spawn_train("--resume", str(run_dir), "--train.epochs", "200")
    assert proc.wait(timeout=600) == 0 and temps(run_dir) == []
    straight = fit(
        progress_config(tiny(tmp_path, "straight", fake_dir, epochs=200)), dataset=dataset
    )
    assert_same_run(straight, run_dir)


KILL_BETWEEN_RENAMES = """
import os, signal, sys
from pathlib import Path
from ppl_vae.cli import main

renames, real = [], os.replace
def replace(src, dst):
    if Path(dst).name == "metrics.csv":
        renames.append(dst)
        if len(renames) == 1:  # epoch 2: checkpoint.pt renamed, metrics.csv not yet
            os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
os.replace = replace
sys.exit(main(sys.argv[1:]))
"""


def test_kill_between_the_two_renames_loses_nothing(tmp_path, fake_dir, dataset, single_thread):
    """The one moment where the files disagree, made certain: a SIGKILL after checkpoint.pt
    of epoch 2 is renamed and before metrics.csv is. metrics.csv then ends at epoch 1, the
    checkpoint holds both rows, and a resume writes them all and removes the killed process's
    temporary metrics.csv; the result equals a straight run."""
    run_dir = fit(tiny(tmp_path, "between", fake_dir, epochs=1), dataset=dataset)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_BETWEEN_RENAMES, "train", "--resume", str(run_dir),
         "--train.epochs", "3"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=SUBPROCESS_ENV,
        cwd=REPO,
    )  # fmt: skip
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, stderr
    assert assert_consistent(run_dir, killed_pid=proc.pid) == (2, 1)
    assert temps(run_dir) == [f".metrics.{proc.pid}.tmp.csv"]
    fit(resume=run_dir, dataset=dataset)
    assert [r["epoch"] for r in runs.read_metrics(run_dir)] == [1.0, 2.0, 3.0]
    assert temps(run_dir) == []
    assert_same_run(fit(tiny(tmp_path, "straight", fake_dir, epochs=3), dataset=dataset), run_dir)


def test_stale_temporary_files_are_removed_at_the_next_start(tmp_path, fake_dir, dataset):
    """Temporary files of a dead process go at the next start (resume, evaluate); those of a
    live process and other files stay."""
    run_dir = fit(tiny(tmp_path, "stale", fake_dir, epochs=1), dataset=dataset)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        dead = dead_pid()
        stale = [
            f".checkpoint.{dead}.tmp.pt",
            f".metrics.{dead}.tmp.csv",
            f".config.{dead}.tmp.json",
        ]
        kept = [f".checkpoint.{sleeper.pid}.tmp.pt", "notes.txt", ".checkpoint.x.tmp.pt"]
        for name in stale + kept:
            (run_dir / name).write_bytes(b"half a file")
        fit(resume=run_dir, epochs=2, dataset=dataset)
        names = {p.name for p in run_dir.iterdir()}
        assert not names & set(stale) and names >= set(kept)
        assert [r["epoch"] for r in runs.read_metrics(run_dir)] == [1.0, 2.0]
        # evaluate (any command that writes into the folder) cleans up too
        (run_dir / stale[0]).write_bytes(b"half a file")
        runs.open_for_writing(run_dir, evaluate.EVAL_JSON)
        assert not (run_dir / stale[0]).exists() and (run_dir / kept[0]).exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# ----------------------------------------------------------------------------- divergence


@pytest.mark.parametrize("where", ["val", "train"])
def test_non_finite_loss_in_epoch_2_stops_with_exit_3_keeping_epoch_1(
    tmp_path, fake_dir, dataset, monkeypatch, single_thread, where
):
    """A NaN validation or training loss in epoch 2 (patched in): exit code 3, one line naming
    epoch 2, the checkpoint of epoch 1 (equal to a 1-epoch run's), only finite rows, no
    evaluation run afterwards."""
    calls = []
    if where == "val":
        real_neg_elbo = train.neg_elbo

        def neg_elbo(*args, **kwargs):
            calls.append(1)
            return math.nan if len(calls) == 2 else real_neg_elbo(*args, **kwargs)

        monkeypatch.setattr(train, "neg_elbo", neg_elbo)
    else:
        real_run_svi = train.run_svi

        def run_svi(*args, **kwargs):
            total = real_run_svi(*args, **kwargs)
            calls.append(1)
            return total * math.nan if len(calls) == 2 else total

        monkeypatch.setattr(train, "run_svi", run_svi)
    code, _, err = cli("train", "vae", *tiny_flags(tmp_path, "nan", fake_dir, epochs=4))
    assert code == 3
    line = one_error_line(err)
    assert "training diverged in epoch 2" in line and "checkpoint of epoch 1 is kept" in line
    assert f"{where} -ELBO nan" in line
    run_dir = tmp_path / "nan"
    assert runs.load_checkpoint(run_dir)["epoch"] == 1
    rows = runs.read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == [1.0]
    assert all(math.isfinite(v) for r in rows for v in r.values())
    assert not (run_dir / evaluate.EVAL_JSON).exists() and temps(run_dir) == []
    monkeypatch.undo()
    code, _, err = cli("train", "vae", *tiny_flags(tmp_path, "one", fake_dir, epochs=1))
    assert code == 0, err
    state, reference = runs.load_checkpoint(run_dir), runs.load_checkpoint(tmp_path / "one")
    for key, value in reference["model"].items():
        assert torch.equal(state["model"][key], value), key


def test_divergence_in_epoch_1_of_a_new_run_removes_its_folder(tmp_path, fake_dir, monkeypatch):
    monkeypatch.setattr(train, "neg_elbo", lambda *args, **kwargs: math.inf)
    code, _, err = cli("train", "vae", *tiny_flags(tmp_path, "gone", fake_dir, epochs=3))
    assert code == 3
    line = one_error_line(err)
    assert "diverged in epoch 1" in line and "val -ELBO inf" in line and "removed" in line
    assert not (tmp_path / "gone").exists()


@pytest.mark.parametrize("fast", ["--fast", "--no-fast"])
def test_a_real_divergence_is_exit_3_not_a_traceback(tmp_path, fake_dir, fast):
    """--train.lr 1e30, nothing patched: the weights blow up within epoch 1. Under --no-fast
    Pyro's validation meets NaN distribution arguments at every step; either way the run stops
    with the divergence error (it used to end in a ValueError traceback)."""
    flags = tiny_flags(tmp_path, "lr", fake_dir, epochs=3)
    code, _, err = cli("train", "vae", *flags, "--train.lr", "1e30", fast)
    assert code == 3, err
    line = one_error_line(err)
    assert "training diverged in epoch 1" in line and "lower --train.lr" in line
    assert not (tmp_path / "lr").exists()


# ----------------------------------------------------------------------------- racing runs


def _race(barrier, results, runs_root: str, rounds: int, name: str | None) -> None:
    """One racer: every round, claim a run folder under ``runs_root/<round>`` at the same
    moment as the others (the barrier)."""
    for r in range(rounds):
        cfg = RunConfig(name=name, runs_dir=Path(runs_root) / f"round{r}")
        barrier.wait()
        try:
            run_dir, created = runs.new_run_dir(cfg)
            results.put((r, str(run_dir), created))
        except RunDirError as err:
            results.put((r, "RunDirError", str(err)))
        except Exception as err:  # reported to the test, which fails on it
            results.put((r, "unexpected", repr(err)))


def race(tmp_path: Path, racers: int, rounds: int, name: str | None) -> dict[int, list]:
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(racers), context.Queue()
    procs = [
        context.Process(target=_race, args=(barrier, results, str(tmp_path), rounds, name))
        for _ in range(racers)
    ]
    for proc in procs:
        proc.start()
    outcomes: dict[int, list] = {}
    for _ in range(racers * rounds):
        r, *outcome = results.get(timeout=120)
        outcomes.setdefault(r, []).append(tuple(outcome))
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    return outcomes


def test_racing_default_names_get_distinct_folders(tmp_path):
    """4 processes asking for the default name at once, 50 times: 4 distinct folders each
    time, each with a complete config.json of its own and no temporary file left."""
    outcomes = race(tmp_path, racers=4, rounds=50, name=None)
    collided = 0
    for r, claimed in outcomes.items():
        expected = runs.config_text(RunConfig(runs_dir=tmp_path / f"round{r}")).encode()
        assert all(path not in ("RunDirError", "unexpected") for path, _ in claimed), claimed
        folders = [Path(path) for path, _ in claimed]
        assert len(set(folders)) == 4, claimed
        # (``created`` may be False: a racer can take the empty folder another has just made
        # and then lost the link race for; see new_run_dir)
        collided += any(f.name.endswith(("-2", "-3", "-4")) for f in folders)
        round_dir = tmp_path / f"round{r}"
        assert sorted(p.name for p in round_dir.iterdir()) == sorted(f.name for f in folders)
        for folder in folders:
            assert [p.name for p in folder.iterdir()] == [runs.CONFIG]
            assert (folder / runs.CONFIG).read_bytes() == expected
    assert collided >= 40  # the racers did ask for the same name (in the same second)


def test_racing_one_explicit_name_has_one_winner(tmp_path):
    """The same --name from 4 processes at once, 50 times: one gets the folder, the other
    three a RunDirError, and the winner's folder is whole."""
    outcomes = race(tmp_path, racers=4, rounds=50, name="same")
    for r, claimed in outcomes.items():
        winners = [c for c in claimed if c[0] not in ("RunDirError", "unexpected")]
        losers = [c for c in claimed if c[0] == "RunDirError"]
        assert len(winners) == 1 and len(losers) == 3, claimed
        assert all("already exists" in message for _, message in losers)
        folder = tmp_path / f"round{r}" / "same"
        assert winners[0][0] == str(folder)
        assert [p.name for p in folder.iterdir()] == [runs.CONFIG]
        assert runs.read_config(folder).name == "same"


# ----------------------------------------------------------------------------- full disk


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size)`` mounts a tmpfs of that size (needs root) and returns its folder; all
    are unmounted at the end. Skips when mounting is not permitted (the mocked tests below
    cover the same paths)."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()})")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def remount_read_only(where: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True, capture_output=True)


def test_disk_full_at_epoch_2_keeps_epoch_1(tmpfs, fake_dir):
    """A 600 KiB tmpfs holds one checkpoint (≈ 330 KB) but not a second beside it: the write
    of epoch 2's fails with ENOSPC. Exit 2, one line naming checkpoint.pt; epoch 1's
    checkpoint and metrics are intact; no temporary file is left."""
    runs_dir = tmpfs("600k")
    code, _, err = cli("train", "vae", *tiny_flags(runs_dir, "full", fake_dir, epochs=3))
    assert code == 2
    line = one_error_line(err)
    run_dir = runs_dir / "full"
    assert f"{run_dir / runs.CHECKPOINT}: no space left on the device" in line
    assert f"--resume {run_dir}" in line
    assert runs.load_checkpoint(run_dir, keys=runs.RESUME_KEYS)["epoch"] == 1
    assert [r["epoch"] for r in runs.read_metrics(run_dir)] == [1.0]
    assert temps(run_dir) == []


def test_disk_full_at_epoch_1_removes_the_new_run(tmpfs, fake_dir):
    runs_dir = tmpfs("200k")
    code, _, err = cli("train", "vae", *tiny_flags(runs_dir, "full", fake_dir, epochs=3))
    assert code == 2
    line = one_error_line(err)
    assert "no space left on the device" in line and "run folder is removed" in line
    assert "--resume" not in line  # there is nothing to resume
    assert list(runs_dir.iterdir()) == []


def test_read_only_run_folder_fails_before_any_work(tmpfs, fake_dir, dataset, monkeypatch):
    """evaluate and --resume on a folder remounted read-only: exit 2, one line, before any
    evaluation or training step."""
    runs_dir = tmpfs("4m")
    run_dir = fit(tiny(runs_dir, "ro", fake_dir, epochs=1), dataset=dataset)
    before = (run_dir / runs.CHECKPOINT).read_bytes()
    remount_read_only(runs_dir)
    work = []
    monkeypatch.setattr(evaluate, "evaluate_model", lambda *a, **k: work.append("evaluate"))
    monkeypatch.setattr(train, "run_svi", lambda *a, **k: work.append("train"))
    code, _, err = cli("evaluate", str(run_dir), "--device", "cpu")
    assert code == 2
    assert f"{run_dir}: read-only filesystem" in one_error_line(err, "evaluate")
    code, _, err = cli("train", "--resume", str(run_dir), "--train.epochs", "2")
    assert code == 2
    assert f"{run_dir}: read-only filesystem" in one_error_line(err)
    assert work == [] and (run_dir / runs.CHECKPOINT).read_bytes() == before


def _no_space(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.parametrize(
    ("how", "target", "epoch"),
    [
        ("write", runs.CHECKPOINT, 2),
        ("rename", runs.CHECKPOINT, 2),
        ("rename", runs.METRICS, 2),  # checkpoint.pt of epoch 2 renamed, metrics.csv not
        ("write", runs.CHECKPOINT, 1),
        ("rename", runs.CHECKPOINT, 1),
    ],
)
def test_mocked_disk_full(tmp_path, fake_dir, dataset, monkeypatch, how, target, epoch):
    """ENOSPC while epoch ``epoch``'s ``target`` is written (half of it reaches the disk) or
    renamed into place; runs everywhere (no mount needed). Exit 2 with one line naming the
    file; what the folder holds is consistent and a resume completes it."""
    real_write, real_replace = Path.write_bytes, os.replace
    seen = []

    def full(path) -> bool:
        if files.TEMP.match(Path(path).name) and Path(path).suffix == Path(target).suffix:
            seen.append(path)
            return len(seen) == epoch
        return False

    def write_bytes(self, payload):
        if full(self):
            real_write(self, payload[: len(payload) // 2])
            raise _no_space(self)
        return real_write(self, payload)

    def replace_(src, dst):
        if full(src):
            raise _no_space(dst)
        return real_replace(src, dst)

    if how == "write":
        monkeypatch.setattr(Path, "write_bytes", write_bytes)
    else:
        monkeypatch.setattr(os, "replace", replace_)
    code, _, err = cli("train", "vae", *tiny_flags(tmp_path, "full", fake_dir, epochs=3))
    monkeypatch.undo()
    assert code == 2
    line = one_error_line(err)
    run_dir = tmp_path / "full"
    assert f"{run_dir / target}: no space left on the device" in line
    if epoch == 1 and target == runs.CHECKPOINT:
        assert not run_dir.exists() and "run folder is removed" in line
        return
    assert f"--resume {run_dir}" in line
    saved = runs.load_checkpoint(run_dir)["epoch"]
    assert saved == (epoch if target == runs.METRICS else epoch - 1)
    assert assert_consistent(run_dir) == (saved, epoch - 1) and temps(run_dir) == []
    fit(resume=run_dir, dataset=dataset)
    assert [r["epoch"] for r in runs.read_metrics(run_dir)] == [1.0, 2.0, 3.0]


# ----------------------------------------------------------------------------- exact resumes


@pytest.mark.parametrize("kind", sorted(REGISTRY))
def test_resume_is_bit_exact_for_every_model(tmp_path, fake_dir, dataset, single_thread, kind):
    """2 epochs straight vs 1 epoch + --resume to 2: the same model, optimizer, step, random
    state and metrics. For a VQ-VAE the 1-epoch run is finished, its code prior fitted; the
    resumed run must refit it from the seeded fresh start, as the straight run fits it once."""
    straight = fit(tiny(tmp_path, "straight", fake_dir, epochs=2, kind=kind), dataset=dataset)
    halted = fit(tiny(tmp_path, "halted", fake_dir, epochs=1, kind=kind), dataset=dataset)
    assert runs.load_checkpoint(halted)["epoch"] == 1
    assert fit(resume=halted, epochs=2, dataset=dataset) == halted
    assert_same_run(straight, halted)


def test_every_model_kind_has_a_tiny_config():
    assert set(MODELS) == set(REGISTRY)


def test_vqvae_killed_before_its_code_prior_fit_resumes_exactly(
    tmp_path, fake_dir, dataset, monkeypatch, single_thread
):
    """A 1-epoch VQ-VAE stopped after its last epoch's checkpoint but before the code prior is
    fitted; `--resume` (no epoch left) fits it: the result equals an uninterrupted 1-epoch run.
    Resuming that finished run again changes nothing."""
    straight = fit(tiny(tmp_path, "straight", fake_dir, epochs=1, kind="vqvae"), dataset=dataset)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "fit_auxiliary", killed)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny(tmp_path, "killed", fake_dir, epochs=1, kind="vqvae"), dataset=dataset)
    monkeypatch.undo()
    run_dir = tmp_path / "killed"
    unfitted = runs.load_checkpoint(run_dir)["model"]
    fitted = runs.load_checkpoint(straight)["model"]
    prior_keys = [k for k in fitted if "prior" in k]
    assert prior_keys and any(not torch.equal(unfitted[k], fitted[k]) for k in prior_keys)
    fit(resume=run_dir, dataset=dataset)
    assert_same_run(straight, run_dir)
    fit(resume=straight, dataset=dataset)  # a finished run resumed: the prior refitted alike
    assert_same_run(run_dir, straight)


# ----------------------------------------------------------------------------- evaluation


def test_evaluation_is_reproducible_and_seeded(tmp_path, fake_dir, dataset):
    """The same checkpoint evaluated twice gives the same eval.json bit for bit; --seed 1
    changes the importance-sampled estimate; --seed 0 again gives the first file back."""
    run_dir = fit(tiny(tmp_path, "eval", fake_dir, epochs=1), dataset=dataset)
    argv = ["evaluate", str(run_dir), "--k", "8", "--device", "cpu"]
    outputs = []
    for extra in ([], [], ["--seed", "1"], ["--seed", "0"]):
        code, _, err = cli(*argv, *extra)
        assert code == 0, err
        outputs.append((run_dir / evaluate.EVAL_JSON).read_bytes())
    assert outputs[0] == outputs[1] == outputs[3]
    first, other = json.loads(outputs[0]), json.loads(outputs[2])
    assert (first["seed"], other["seed"]) == (0, 1)
    assert math.isfinite(first["nll_is"]) and first["nll_is"] != other["nll_is"]
