"""Every user error of every command, as one table: the command prints one line on stderr that
names the flag or file involved, exits with code 2, and leaves every file it found as it was
(and creates nothing: no new run folder, no half-written output).

The commands run in-process (``ppl_vae.cli.main``) for speed; a few go through the real entry
point in a subprocess. Each test works on its own copy of one small trained run folder.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import json
import math
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_fake_idx

from ppl_vae import data
from ppl_vae.cli import main

# A tiny model on tiny data: each new-run train case gets these first; its own flags follow and
# win (argparse keeps the last value of a flag).
TRAIN = (
    "--runs-dir", "{runs}", "--data.data-dir", "{data}", "--model.z-dim", "2",
    "--model.hidden", "16", "--train.epochs", "1", "--train.batch-size", "64", "--eval.k", "5",
    "--eval.batch-size", "40", "--no-train.progress", "--train.device", "cpu",
)  # fmt: skip
MNIST_COUNTS = data.TRAIN_LABEL_COUNTS["mnist"]


class NotATensor:
    """What a foreign checkpoint may hold: an object that only full unpickling could build."""

    def __init__(self):
        self.payload = [1, 2, 3]


# ----------------------------------------------------------------------------- the shared runs


@dataclass
class World:
    root: Path
    data: Path  # the good fake IDX files (never modified: the snapshots cover them)
    run: Path  # a trained VAE run folder: z 2, hidden 16, one epoch, eval.json, report.md
    other: Path  # the same with z 3: a checkpoint of another architecture
    ae: Path  # a plain autoencoder: a point-mass guide
    cache: dict = field(default_factory=dict)

    def big_data(self, counts: tuple[int, ...]) -> Path:
        """60,000 blank training images whose labels have the class ``counts`` (compressed,
        they take a few kilobytes), with the small test split of :attr:`data`."""
        if counts not in self.cache:
            folder = self.root / f"big-{len(self.cache)}"
            folder.mkdir()
            data.write_idx(folder / "train-images-idx3-ubyte.gz", torch.zeros(60_000, 28, 28))
            labels = torch.repeat_interleave(torch.arange(10), torch.tensor(counts))
            data.write_idx(folder / "train-labels-idx1-ubyte.gz", labels)
            for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
                shutil.copy(self.data / name, folder / name)
            self.cache[counts] = folder
        return self.cache[counts]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("user-errors")
    fake = write_fake_idx(root / "idx", n_train=120, n_test=40)
    runs_dir = root / "runs"
    for name, flags in (("base", []), ("other", ["--model.z-dim", "3"]),
                        ("ae", ["--no-model.prior", "--eval.k", "1"])):  # fmt: skip
        argv = [arg.format(runs=runs_dir, data=fake) for arg in TRAIN]
        kind = ["ae"] if name == "ae" else []
        assert main(["train", *kind, *argv, "--name", name, *flags]) == 0
    return World(root, fake, runs_dir / "base", runs_dir / "other", runs_dir / "ae")


# ----------------------------------------------------------------------------- a case's context


@dataclass
class Ctx:
    world: World
    tmp: Path
    runs: Path  # tmp/runs: holds `run`, a copy of the shared run folder
    run: Path
    monkeypatch: pytest.MonkeyPatch
    request: pytest.FixtureRequest

    @property
    def values(self) -> dict[str, Path]:
        return {
            "tmp": self.tmp,
            "runs": self.runs,
            "run": self.run,
            "data": self.world.data,
            "other": self.world.other,
            "ae": self.world.ae,
        }

    def fill(self, text: str) -> str:
        return text.format(**self.values)

    def data_copy(self, name: str = "bad") -> Path:
        """A copy of the good data folder to damage."""
        return Path(shutil.copytree(self.world.data, self.tmp / name))

    def read_only(self, folder: Path, contents: Path | None = None) -> Path:
        """``folder`` on a read-only filesystem (a tmpfs, remounted read-only), holding a copy of
        ``contents`` when given. You are root in the test container, so permissions alone do
        not stop writes."""
        folder.mkdir(parents=True, exist_ok=True)
        try:
            mount = ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)]
            mounted = subprocess.run(mount, capture_output=True).returncode == 0
        except OSError:  # no mount(8)
            mounted = False
        if mounted:
            self.request.addfinalizer(lambda: subprocess.run(["umount", "-l", str(folder)]))
            if contents is not None:
                shutil.copytree(contents, folder, dirs_exist_ok=True)
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
            return folder
        # No permission to mount: writes under `folder` fail with EROFS through a patched
        # os.open/os.mkdir instead (what the kernel would answer on a read-only mount).
        if contents is not None:
            shutil.copytree(contents, folder, dirs_exist_ok=True)
        real_open, real_mkdir = os.open, os.mkdir

        def inside(path) -> bool:
            return Path(os.path.abspath(path)).is_relative_to(folder)

        def fake_open(path, flags, *args, **kwargs):
            if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR) and inside(path):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real_open(path, flags, *args, **kwargs)

        def fake_mkdir(path, *args, **kwargs):
            if inside(path):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real_mkdir(path, *args, **kwargs)

        self.monkeypatch.setattr(os, "open", fake_open)
        self.monkeypatch.setattr(os, "mkdir", fake_mkdir)
        return folder


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # with {tmp} {runs} {run} {data} {other} {ae} filled in
    names: str  # what the one line must contain (the flag or the file), filled in too
    prepare: Callable[[Ctx], object] | None = None
    early: bool = True  # refused before any data is read (data.load must not run)
    forbid: tuple[str, ...] = ()  # "module.function"s that must not run either (computing)
    absent: tuple[str, ...] = ()  # what the line must not say
    subprocess: bool = False  # also through the real entry point

    def __repr__(self) -> str:
        return self.id


def new_run(*flags: str, kind: str | None = None) -> tuple[str, ...]:
    """``train [KIND]`` of a new tiny run in {runs} on the fake data, then ``flags``."""
    return ("train", *([kind] if kind else []), *TRAIN, *flags)


# ----------------------------------------------------------------------------- damaging things


def write(path: str, payload: bytes | str | object) -> Callable[[Ctx], None]:
    """A prepare step that replaces ``path`` (relative to the run folder) by ``payload``:
    bytes or text as they are, anything else as JSON."""

    def prepare(ctx: Ctx) -> None:
        target = ctx.run / path
        if isinstance(payload, bytes):
            target.write_bytes(payload)
        elif isinstance(payload, str):
            target.write_text(payload)
        else:
            target.write_text(json.dumps(payload))

    return prepare


def remove(path: str) -> Callable[[Ctx], None]:
    return lambda ctx: (ctx.run / path).unlink()


def edit_config(change: Callable[[dict], object]) -> Callable[[Ctx], None]:
    def prepare(ctx: Ctx) -> None:
        cfg = json.loads((ctx.run / "config.json").read_text())
        change(cfg)
        (ctx.run / "config.json").write_text(json.dumps(cfg, indent=2))

    return prepare


def truncate(path: str, keep: float = 0.5) -> Callable[[Ctx], None]:
    def prepare(ctx: Ctx) -> None:
        target = ctx.run / path
        payload = target.read_bytes()
        target.write_bytes(payload[: int(len(payload) * keep)])

    return prepare


def other_checkpoint(ctx: Ctx) -> None:
    shutil.copy(ctx.world.other / "checkpoint.pt", ctx.run / "checkpoint.pt")


def checkpoint_of(state: Callable[[], object]) -> Callable[[Ctx], None]:
    return lambda ctx: torch.save(state(), ctx.run / "checkpoint.pt")


def checkpoint_with(change: Callable[[dict, Ctx], object]) -> Callable[[Ctx], None]:
    """The run's own checkpoint, changed in place by ``change(state, ctx)``."""

    def prepare(ctx: Ctx) -> None:
        state = torch.load(ctx.run / "checkpoint.pt", weights_only=True)
        change(state, ctx)
        torch.save(state, ctx.run / "checkpoint.pt")

    return prepare


def other_optimizer(state: dict, ctx: Ctx) -> None:
    other = torch.load(ctx.world.other / "checkpoint.pt", weights_only=True)
    state["optimizer"] = other["optimizer"]


def a_file(ctx: Ctx) -> None:
    (ctx.tmp / "afile").write_text("not a folder\n")


def fresh_data(ctx: Ctx, **sizes) -> Path:
    return write_fake_idx(ctx.tmp / "bad", **sizes)


def idx(name: str, tensor: torch.Tensor, gz: bool = True) -> Callable[[Ctx], None]:
    """A copy of the good data in tmp/bad with ``name`` replaced by ``tensor``."""

    def prepare(ctx: Ctx) -> None:
        folder = ctx.data_copy()
        data.write_idx(folder / (name + (".gz" if gz else "")), tensor)

    return prepare


def raw_data(name: str, damage: Callable[[bytes], bytes], gz: bool = True):
    """tmp/bad: the good data (uncompressed when not ``gz``) with ``name``'s bytes damaged."""

    def prepare(ctx: Ctx) -> None:
        folder = ctx.data_copy()
        if not gz:
            for path in list(folder.iterdir()):
                path.with_suffix("").write_bytes(gzip.decompress(path.read_bytes()))
                path.unlink()
        target = folder / (name + (".gz" if gz else ""))
        target.write_bytes(damage(target.read_bytes()))

    return prepare


def flip_bits(payload: bytes) -> bytes:
    damaged = bytearray(payload)
    for i in range(len(damaged) // 3, len(damaged) // 3 + 64):
        damaged[i] ^= 0x5A
    return bytes(damaged)


def big_labels(counts: tuple[int, ...]) -> Callable[[Ctx], None]:
    def prepare(ctx: Ctx) -> None:
        shutil.copytree(ctx.world.big_data(counts), ctx.tmp / "bad")

    return prepare


def read_only_run(ctx: Ctx) -> None:
    ctx.read_only(ctx.tmp / "ro", ctx.run)


def read_only_runs_dir(ctx: Ctx) -> None:
    ctx.read_only(ctx.tmp / "ro")


def reference_binarized_statically(ctx: Ctx) -> None:
    shutil.copytree(ctx.world.other, ctx.tmp / "ref")
    path = ctx.tmp / "ref" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["data"]["binarization"] = "static"
    path.write_text(json.dumps(cfg))


def no_cuda(ctx: Ctx) -> None:
    ctx.monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def rng_bytes(n: int) -> bytes:
    return bytes(torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(7)).tolist())


# ----------------------------------------------------------------------------- the table

RUN_FOLDER_DAMAGE: list[tuple[str, Callable[[Ctx], object] | None, str, str]] = [
    # (id, prepare, RUN_DIR as given, what the line names)
    ("checkpoint-of-other-model", other_checkpoint, "{run}", "{run}/checkpoint.pt: does not fit"),
    (
        "checkpoint-without-model",
        checkpoint_of(lambda: {"weights": {"w": torch.zeros(2)}, "epoch": 1}),
        "{run}",
        "{run}/checkpoint.pt: not a ppl-vae checkpoint (no model",
    ),
    (
        "checkpoint-random-bytes",
        write("checkpoint.pt", rng_bytes(4096)),
        "{run}",
        "{run}/checkpoint.pt: not a readable checkpoint",
    ),
    (
        "checkpoint-with-object",
        checkpoint_of(lambda: {"model": {"w": NotATensor()}, "epoch": 1}),
        "{run}",
        "{run}/checkpoint.pt: refused",
    ),
    (
        "checkpoint-truncated",
        truncate("checkpoint.pt"),
        "{run}",
        "{run}/checkpoint.pt: not a readable checkpoint",
    ),
    (
        "checkpoint-nan-weights",
        checkpoint_with(lambda state, _: state["model"]["decoder.0.weight"].fill_(math.nan)),
        "{run}",
        "{run}/checkpoint.pt: its decoder.0.weight holds NaN or infinite values",
    ),
    ("checkpoint-missing", remove("checkpoint.pt"), "{run}", "{run}/checkpoint.pt: not found"),
    (
        "config-not-utf8",
        write("config.json", b'{"name": "\xff\xfe"}'),
        "{run}",
        "{run}/config.json: not UTF-8",
    ),
    ("config-a-list", write("config.json", []), "{run}", "{run}/config.json: not a run config"),
    (
        "config-unknown-dataset",
        write("config.json", {"data": {"dataset": "cifar"}}),
        "{run}",
        "{run}/config.json: not a valid run config (data.dataset: 'cifar'",
    ),
    (
        "config-model-without-kind",
        edit_config(lambda cfg: cfg["model"].pop("kind")),
        "{run}",
        "{run}/config.json: not a valid run config (model.kind: missing; one of vae",
    ),
    ("config-truncated", truncate("config.json"), "{run}", "{run}/config.json: not valid JSON"),
    (
        "config-wrong-type",
        edit_config(lambda cfg: cfg["train"].update(epochs="ten")),
        "{run}",
        "{run}/config.json: not a valid run config (train.epochs: 'ten' is not an integer",
    ),
    ("config-missing", remove("config.json"), "{run}", "{run}/config.json: not found"),
    ("run-dir-is-a-file", a_file, "{tmp}/afile", "{tmp}/afile: is a file"),
    ("run-dir-missing", None, "{tmp}/nowhere", "{tmp}/nowhere/config.json: not found"),
]

RUN_COMMANDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # command: (argv before RUN_DIR, argv after it)
    "evaluate": (("evaluate",), ("--k", "3", "--device", "cpu")),
    "sample": (("sample",), ("-n", "4", "-o", "{tmp}/grid.png", "--device", "cpu")),
    "report": (("report",), ("--device", "cpu")),
    "diagnose": (("diagnose",), ("--images", "5", "--k", "5", "--device", "cpu")),
    "resume": (("train", "--resume"), ("--train.epochs", "3")),
}

CASES: list[Case] = [
    # --- the bare command
    Case("bare", (), "no command given; choose one of train, evaluate", subprocess=True),
    Case("unknown-command", ("frobnicate",), "unknown command 'frobnicate'"),
    Case("unknown-option-as-command", ("--verbose",), "unknown command '--verbose'"),
    # --- train: flags out of range, of the wrong type, unknown
    Case("lr-inf", new_run("--train.lr", "inf"), "argument --train.lr: must be a finite number"),
    Case("lr-nan", new_run("--train.lr", "nan"), "argument --train.lr: must be a finite number"),
    Case("lr-negative", new_run("--train.lr", "-1"), "--train.lr must be positive and finite"),
    Case("lr-not-a-number", new_run("--train.lr", "abc"), "argument --train.lr: 'abc' is not a"),
    Case("adam-eps-zero", new_run("--train.adam-eps", "0"), "--train.adam-eps must be positive"),
    Case("epochs-zero", new_run("--train.epochs", "0"), "--train.epochs must be a positive"),
    Case("epochs-float", new_run("--train.epochs", "1.5"), "argument --train.epochs: invalid int"),
    Case("batch-size-zero", new_run("--train.batch-size", "0"), "--train.batch-size must be"),
    Case("eval-k-zero", new_run("--eval.k", "0"), "--eval.k must be a positive integer"),
    Case("z-dim-zero", new_run("--model.z-dim", "0"), "--model.z-dim must be a positive"),
    Case("hidden-zero", new_run("--model.hidden", "16", "0"), "--model.hidden must be positive"),
    Case("val-size-negative", new_run("--data.val-size", "-3"), "--data.val-size must be >= 0"),
    Case("unknown-choice", new_run("--model.activation", "swish"), "argument --model.activation"),
    Case("unknown-objective", new_run("--objective", "elbo"), "argument --objective: invalid"),
    Case("unknown-flag", new_run("--frobnicate", "3"), "unrecognized arguments: --frobnicate"),
    Case("flag-tail", new_run("--epochs", "3"), "did you mean --train.epochs?"),
    Case("unknown-model", new_run(kind="mnist"), "unknown model 'mnist'"),
    Case("unknown-preset", new_run("--preset", "huge"), "argument --preset: invalid choice"),
    Case("name-parent", new_run("--name", "../x"), "--name must be one folder name"),
    Case("name-absolute", new_run("--name", "/abs"), "--name must be one folder name"),
    Case("name-nested", new_run("--name", "a/b"), "--name must be one folder name"),
    Case("name-empty", new_run("--name", ""), "--name must be one folder name"),
    Case("hidden-no-values", new_run("--model.hidden"), "argument --model.hidden: expected"),
    Case("train-subset-negative", new_run("--data.train-subset", "-1"), "--data.train-subset"),
    Case("particles-zero", new_run("--objective.num-particles", "0"), "--objective.num-particles"),
    Case(
        "renyi-alpha-one",
        new_run("--objective", "renyi", "--objective.alpha", "1"),
        "--objective.alpha must be different from 1",
    ),
    Case("ae-z-dim-zero", new_run("--model.z-dim", "0", kind="ae"), "--model.z-dim must be"),
    Case(
        "vqvae-codebook-one",
        ("train", "vqvae", "--runs-dir", "{runs}", "--model.codebook-size", "1"),
        "--model.codebook-size must be >= 2",
    ),
    Case(
        "vqvae-flag-of-vae",
        ("train", "vqvae", "--runs-dir", "{runs}", "--model.z-dim", "2"),
        "unrecognized arguments: --model.z-dim",
    ),
    Case("name-taken", new_run("--name", "run"), "{runs}/run already exists", early=False),
    Case(
        "x-scale-below-floor",
        new_run(
            "--model.x-scale",
            "0.0005",
            "--model.likelihood",
            "gaussian",
            "--model.x-scale-mode",
            "shared",
            "--data.binarization",
            "none",
        ),
        "--model.x-scale",
        subprocess=True,
    ),
    Case(
        "x-scale-pixel-at-floor",
        new_run(
            "--model.x-scale",
            "0.001",
            "--model.likelihood",
            "gaussian",
            "--model.x-scale-mode",
            "pixel",
            "--data.binarization",
            "none",
        ),
        "--model.x-scale",
    ),
    Case("gaussian-on-binary", new_run("--model.likelihood", "gaussian"), "--model.likelihood"),
    Case("bernoulli-on-intensities", new_run("--data.binarization", "none"), "--model.likelihood"),
    Case(
        "device-cuda-without-gpu",
        new_run("--train.device", "cuda"),
        "--train.device cuda",
        prepare=no_cuda,
    ),
    # --- train: data that does not fit the model, damaged data files, data folders
    Case("x-dim", new_run("--model.x-dim", "100"), "--model.x-dim 100", early=False),
    Case(
        "images-32x32",
        new_run("--data.data-dir", "{tmp}/bad"),
        "{tmp}/bad/train-images-idx3-ubyte.gz: images are 32x32",
        prepare=idx("train-images-idx3-ubyte", torch.zeros(120, 32, 32)),
        early=False,
    ),
    Case(
        "test-images-28x27",
        new_run("--data.data-dir", "{tmp}/bad"),
        "{tmp}/bad/t10k-images-idx3-ubyte.gz: images are 28x27",
        prepare=idx("t10k-images-idx3-ubyte", torch.zeros(40, 28, 27)),
        early=False,
    ),
    Case(
        "labels-do-not-match-images",
        new_run("--data.data-dir", "{tmp}/bad"),
        "{tmp}/bad/train-images-idx3-ubyte.gz: images (120, 28, 28) do not match labels (100,)",
        prepare=idx("train-labels-idx1-ubyte", torch.zeros(100)),
        early=False,
    ),
    Case(
        "images-one-dimensional",
        new_run("--data.data-dir", "{tmp}/bad"),
        "{tmp}/bad/t10k-images-idx3-ubyte.gz",
        prepare=idx("t10k-images-idx3-ubyte", torch.zeros(40 * 784)),
        early=False,
    ),
    Case(
        "gzip-flipped-bits",
        new_run("--data.data-dir", "{tmp}/bad"),
        "{tmp}/bad/train-images-idx3-ubyte.gz: cannot be read",
        prepare=raw_data("train-images-idx3-ubyte", flip_bits),
        early=False,
    ),
    Case(
        "gzip-truncated",
        new_run("--data.data-dir", "{tmp}/bad"),
        "{tmp}/bad/train-images-idx3-ubyte.gz: cannot be read",
        prepare=raw_data("train-images-idx3-ubyte", lambda b: b[: len(b) // 2]),
        early=False,
    ),
    Case(
        "idx-truncated",
        new_run("--data.data-dir", "{tmp}/bad"),
        "{tmp}/bad/train-images-idx3-ubyte: IDX payload is",
        prepare=raw_data("train-images-idx3-ubyte", lambda b: b[: len(b) - 100], gz=False),
        early=False,
    ),
    Case(
        "idx-header-truncated",
        new_run("--data.data-dir", "{tmp}/bad"),
        "{tmp}/bad/t10k-labels-idx1-ubyte: truncated IDX",
        prepare=raw_data("t10k-labels-idx1-ubyte", lambda b: b[:6], gz=False),
        early=False,
    ),
    Case(
        "idx-wrong-magic",
        new_run("--data.data-dir", "{tmp}/bad"),
        "{tmp}/bad/train-labels-idx1-ubyte: not an unsigned-byte IDX file (magic 0x504b0304)",
        prepare=raw_data("train-labels-idx1-ubyte", lambda b: b"PK\x03\x04" + b[4:], gz=False),
        early=False,
    ),
    Case(
        "idx-empty-gz",
        new_run("--data.data-dir", "{tmp}/bad"),
        "{tmp}/bad/t10k-labels-idx1-ubyte.gz",
        prepare=raw_data("t10k-labels-idx1-ubyte", lambda b: b""),
        early=False,
    ),
    Case(
        "three-training-images-all-held-out",  # (three alone are enough: see the test below)
        new_run("--data.data-dir", "{tmp}/bad", "--data.val-size", "3"),
        "--data.val-size 3: {tmp}/bad/train-images-idx3-ubyte.gz holds 3 training images",
        prepare=lambda ctx: fresh_data(ctx, n_train=3, n_test=40),
        early=False,
    ),
    Case(
        "one-training-image",
        new_run("--data.data-dir", "{tmp}/bad"),
        "{tmp}/bad/train-images-idx3-ubyte.gz: holds 1 training image",
        prepare=lambda ctx: fresh_data(ctx, n_train=1, n_test=40),
        early=False,
    ),
    Case(
        "val-size-too-large", new_run("--data.val-size", "120"), "--data.val-size 120", early=False
    ),
    Case(
        "train-subset-too-large",
        new_run("--data.train-subset", "500"),
        "--data.train-subset 500",
        early=False,
    ),
    Case(
        "data-dir-missing",
        new_run("--data.data-dir", "{tmp}/nowhere"),
        "--data.data-dir {tmp}/nowhere: no such directory",
        early=False,
    ),
    Case(
        "data-dir-a-file",
        new_run("--data.data-dir", "{tmp}/afile"),
        "--data.data-dir {tmp}/afile: is a file",
        prepare=a_file,
        early=False,
    ),
    Case(
        "data-dir-lacks-files",
        new_run("--data.data-dir", "{tmp}/bad"),
        "--data.data-dir {tmp}/bad: does not contain the four IDX files",
        prepare=lambda ctx: (ctx.data_copy() / "t10k-labels-idx1-ubyte.gz").unlink(),
        early=False,
    ),
    Case(
        "mnist-labels-as-fashion",
        new_run("--data.data-dir", "{tmp}/bad"),
        "these files are mnist (their label counts), but --data.dataset is fashion-mnist",
        prepare=big_labels(MNIST_COUNTS),
        early=False,
    ),
    Case(
        "fashion-labels-as-mnist",
        new_run("--data.data-dir", "{tmp}/bad", "--data.dataset", "mnist"),
        "these files are fashion-mnist (their label counts), but --data.dataset is mnist",
        prepare=big_labels((6000,) * 10),
        early=False,
    ),
    # --- train: where the run folder would go (nothing is created before the checks)
    Case(
        "fresh-runs-dir-x-dim",
        new_run("--runs-dir", "{tmp}/fresh/runs", "--model.x-dim", "99"),
        "--model.x-dim 99",
        early=False,
    ),
    Case(
        "fresh-runs-dir-subset",
        new_run("--runs-dir", "{tmp}/fresh/runs", "--data.train-subset", "101"),
        "--data.train-subset 101",
        early=False,
    ),
    Case(
        "fresh-runs-dir-bad-data",
        new_run("--runs-dir", "{tmp}/fresh/runs", "--data.data-dir", "{tmp}/bad"),
        "{tmp}/bad/train-images-idx3-ubyte.gz: cannot be read",
        early=False,
        prepare=raw_data("train-images-idx3-ubyte", flip_bits),
    ),
    Case(
        "runs-dir-a-file",
        new_run("--runs-dir", "{tmp}/afile"),
        "--runs-dir {tmp}/afile: is a",
        prepare=a_file,
        early=False,
    ),
    Case(
        "runs-dir-under-a-file",
        new_run("--runs-dir", "{tmp}/afile/runs"),
        "{tmp}/afile",
        prepare=a_file,
        early=False,
    ),
    Case(
        "runs-dir-in-proc",
        new_run("--runs-dir", "/proc/ppl_vae_runs"),
        "/proc/ppl_vae_runs",
        early=False,
    ),
    Case(
        "runs-dir-read-only",
        new_run("--runs-dir", "{tmp}/ro"),
        "{tmp}/ro: read-only filesystem",
        prepare=read_only_runs_dir,
        early=False,
    ),
    Case(
        "runs-dir-below-read-only",
        new_run("--runs-dir", "{tmp}/ro/runs"),
        "{tmp}/ro/runs",
        prepare=read_only_runs_dir,
        early=False,
    ),
    # --- train --resume: what it refuses
    Case(
        "resume-with-preset",
        ("train", "--resume", "{run}", "--preset", "pyro-example"),
        "drop --preset pyro-example",
    ),
    Case("resume-with-kind", ("train", "vqvae", "--resume", "{run}"), "drop the model vqvae"),
    Case(
        "resume-with-data-flag",
        ("train", "--resume", "{run}", "--data.val-size", "7"),
        "drop --data.val-size",
    ),
    Case(
        "resume-with-model-flag",
        ("train", "--resume", "{run}", "--model.z-dim", "3"),
        "drop --model.z-dim",
    ),
    Case(
        "resume-epochs-zero",
        ("train", "--resume", "{run}", "--train.epochs", "0"),
        "--train.epochs must be a positive integer",
    ),
    Case(
        "resume-config-edited",  # the checkpoint no longer fits config.json
        ("train", "--resume", "{run}", "--train.epochs", "2"),
        "{run}/checkpoint.pt: does not fit the model of config.json",
        prepare=edit_config(lambda cfg: cfg["model"].update(hidden=[8])),
        early=False,
    ),
    Case(
        "resume-without-optimizer",
        ("train", "--resume", "{run}", "--train.epochs", "2"),
        "{run}/checkpoint.pt: not a ppl-vae checkpoint (no optimizer",
        prepare=checkpoint_with(lambda state, _: state.pop("optimizer")),
        early=False,
    ),
    Case(
        "resume-optimizer-of-other-model",  # Adam's load_state_dict does not check shapes
        ("train", "--resume", "{run}", "--train.epochs", "2"),
        "{run}/checkpoint.pt: does not fit the optimizer of config.json (its exp_avg has shape",
        prepare=checkpoint_with(other_optimizer),
        early=False,
        forbid=("ppl_vae.train._train",),
    ),
    Case(
        "resume-history-damaged",
        ("train", "--resume", "{run}", "--train.epochs", "2"),
        "{run}/checkpoint.pt: its history is damaged",
        prepare=checkpoint_with(lambda state, _: state.update(history=[{"epoch": "one"}])),
        early=False,
        forbid=("ppl_vae.train._train",),
    ),
    Case(
        "resume-rng-damaged",
        ("train", "--resume", "{run}", "--train.epochs", "2"),
        "{run}/checkpoint.pt: its epoch, step or random state is damaged",
        prepare=checkpoint_with(lambda state, _: state.update(rng={"torch": torch.zeros(3)})),
        early=False,
        forbid=("ppl_vae.train._train",),
    ),
    Case(
        "resume-read-only",
        ("train", "--resume", "{tmp}/ro", "--train.epochs", "2"),
        "{tmp}/ro: read-only filesystem",
        prepare=read_only_run,
        early=False,
    ),
    Case(
        "resume-data-moved",
        ("train", "--resume", "{run}", "--train.epochs", "2"),
        "--data.data-dir {tmp}/moved: no such directory",
        prepare=lambda ctx: edit_config(
            lambda cfg: cfg["data"].update(data_dir=str(ctx.tmp / "moved"))
        )(ctx),
        early=False,
    ),
    # --- evaluate
    Case("evaluate-k-zero", ("evaluate", "{run}", "--k", "0"), "--k must be a positive integer"),
    Case("evaluate-batch-size-zero", ("evaluate", "{run}", "--batch-size", "0"), "--batch-size"),
    Case("evaluate-images-negative", ("evaluate", "{run}", "--images", "-1"), "--images"),
    Case("evaluate-split", ("evaluate", "{run}", "--split", "train"), "argument --split"),
    Case("evaluate-k-not-int", ("evaluate", "{run}", "--k", "many"), "argument --k"),
    Case(
        "evaluate-reference-missing",
        ("evaluate", "{run}", "--reference-vae", "{tmp}/no"),
        "{tmp}/no/config.json: not found",
    ),
    Case(
        "evaluate-device-cuda",
        ("evaluate", "{run}", "--device", "cuda"),
        "--device cuda",
        prepare=no_cuda,
    ),
    Case(
        "evaluate-read-only",
        ("evaluate", "{tmp}/ro", "--k", "3", "--device", "cpu"),
        "{tmp}/ro: read-only filesystem",
        prepare=read_only_run,
        forbid=("ppl_vae.runs.load_model",),
    ),
    Case(
        "evaluate-reference-point-mass",
        ("evaluate", "{run}", "--k", "3", "--device", "cpu", "--reference-vae", "{ae}"),
        "--reference-vae {ae}: needs",
        early=False,
        forbid=("ppl_vae.evaluate.evaluate_model",),
    ),
    Case(
        "evaluate-reference-binarization",
        ("evaluate", "{run}", "--k", "3", "--device", "cpu", "--reference-vae", "{tmp}/ref"),
        "--reference-vae {tmp}/ref: the reference was trained with --data.binarization static",
        prepare=reference_binarized_statically,
        early=False,
        forbid=("ppl_vae.evaluate.evaluate_model",),
    ),
    Case(
        "evaluate-data-moved",
        ("evaluate", "{run}", "--k", "3", "--device", "cpu"),
        "--data.data-dir {tmp}/moved: no such directory",
        prepare=lambda ctx: edit_config(
            lambda cfg: cfg["data"].update(data_dir=str(ctx.tmp / "moved"))
        )(ctx),
        early=False,
    ),
    # --- diagnose
    Case("diagnose-images-zero", ("diagnose", "{run}", "--images", "0"), "--images must be >= 1"),
    Case("diagnose-k-zero", ("diagnose", "{run}", "--k", "0"), "--k must be >= 1"),
    Case("diagnose-local-lr", ("diagnose", "{run}", "--local-lr", "-0.1"), "--local-lr"),
    Case(
        "diagnose-read-only",
        ("diagnose", "{tmp}/ro", "--images", "5", "--device", "cpu"),
        "{tmp}/ro: read-only filesystem",
        prepare=read_only_run,
        forbid=("ppl_vae.runs.load_model",),
    ),
    Case(
        "diagnose-point-mass-guide",
        ("diagnose", "{ae}", "--images", "5", "--k", "5"),
        "{ae}: AE: q(z|x) is a point mass",
        early=False,
        forbid=("ppl_vae.diagnostics.importance_weights",),
    ),
    # --- report
    Case(
        "report-metrics-not-numbers",
        ("report", "{run}"),
        "{run}/metrics.csv: not a metrics",
        prepare=write("metrics.csv", "epoch,train_neg_elbo\none,two\n"),
    ),
    Case(
        "report-metrics-not-utf8",
        ("report", "{run}"),
        "{run}/metrics.csv",
        prepare=write("metrics.csv", b"epoch,lr\n\xff\xfe,1\n"),
    ),
    Case(
        "report-eval-truncated",
        ("report", "{run}"),
        "{run}/eval.json: not valid JSON",
        prepare=truncate("eval.json"),
    ),
    Case(
        "report-eval-a-list",
        ("report", "{run}"),
        "{run}/eval.json: not a table of results",
        prepare=write("eval.json", []),
    ),
    Case(
        "report-eval-mangled",
        ("report", "{run}"),
        "{run}: eval.json or diagnostics.json",
        prepare=write("eval.json", {"split": "test"}),
    ),
    Case(
        "report-diagnostics-a-list",
        ("report", "{run}"),
        "{run}/diagnostics.json",
        prepare=write("diagnostics.json", [1]),
    ),
    Case(
        "report-read-only",
        ("report", "{tmp}/ro", "--device", "cpu"),
        "{tmp}/ro: read-only filesystem",
        prepare=read_only_run,
        forbid=("ppl_vae.runs.load_model",),
    ),
    # --- sample
    Case(
        "sample-onto-folder",
        ("sample", "{run}", "-o", "{tmp}/out.png"),
        "argument -o",
        prepare=lambda ctx: (ctx.tmp / "out.png").mkdir(),
        subprocess=True,
    ),
    Case("sample-jpg", ("sample", "{run}", "-o", "{tmp}/grid.jpg"), "argument -o"),
    Case("sample-txt", ("sample", "{run}", "-o", "{tmp}/grid.txt"), "argument -o"),
    Case(
        "sample-missing-folder",
        ("sample", "{run}", "-o", "{tmp}/no/grid.png"),
        "argument -o: folder {tmp}/no does not exist",
    ),
    Case("sample-nrow-zero", ("sample", "{run}", "--nrow", "0", "-o", "{tmp}/g.png"), "--nrow"),
    Case("sample-n-zero", ("sample", "{run}", "-n", "0", "-o", "{tmp}/g.png"), "argument -n"),
    Case(
        "sample-read-only-output",
        ("sample", "{run}", "-o", "{tmp}/ro/grid.png"),
        "{tmp}/ro: read-only filesystem",
        prepare=read_only_runs_dir,
    ),
]

for damage, prepare, run_dir, names in RUN_FOLDER_DAMAGE:
    for command, (before, after) in RUN_COMMANDS.items():
        CASES.append(
            Case(
                f"{command}-{damage}",
                (*before, run_dir, *after),
                names,
                prepare=prepare,
                # train.fit reads the data before it reads the checkpoint it then checks
                early=not (command == "resume" and damage.startswith("checkpoint")),
                absent=("weights_only=False", "will likely succeed"),
                subprocess=(command, damage) == ("evaluate", "checkpoint-with-object"),
            )
        )


# ----------------------------------------------------------------------------- the checks


def snapshot(*roots: Path) -> dict[str, object]:
    """Every file and folder under ``roots``: relative path → (size, SHA-256), or "folder"."""
    seen: dict[str, object] = {}
    for root in roots:
        for path in sorted([root, *root.rglob("*")]) if root.exists() else []:
            key = f"{root.name}/{path.relative_to(root)}"
            if path.is_dir():
                seen[key] = "folder"
            else:
                payload = path.read_bytes()
                seen[key] = (len(payload), hashlib.sha256(payload).hexdigest())
    return seen


def watched(ctx: Ctx) -> tuple[Path, ...]:
    """What a case may not change: its own folder, and the shared data and run folders."""
    return ctx.tmp, ctx.world.data, ctx.world.run, ctx.world.other, ctx.world.ae


def forbid(monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    """Make ``module.function`` fail the test: it must not run before the refusal."""

    def refused(*args, **kwargs):
        raise AssertionError(f"{target} ran before the bad input was refused")

    monkeypatch.setattr(target, refused)


def runs_dir_of(argv: list[str]) -> Path | None:
    if argv[:1] != ["train"] or "--resume" in argv:
        return None
    given = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--runs-dir"]
    return Path(given[-1]) if given else None


def listing(folder: Path | None) -> list[str] | None:
    with contextlib.suppress(OSError):
        return sorted(p.name for p in folder.iterdir()) if folder is not None else None
    return None


@pytest.fixture
def ctx(world, tmp_path, monkeypatch, request) -> Ctx:
    runs_dir = tmp_path / "runs"
    shutil.copytree(world.run, runs_dir / "run")
    return Ctx(world, tmp_path, runs_dir, runs_dir / "run", monkeypatch, request)


def prepared(case: Case, ctx: Ctx) -> list[str]:
    if case.prepare is not None:
        case.prepare(ctx)
    return [ctx.fill(arg) for arg in case.argv]


def check_outcome(case: Case, ctx: Ctx, code: int, stderr: str, before, runs_before) -> None:
    argv = [ctx.fill(arg) for arg in case.argv]
    lines = stderr.splitlines()
    assert code == 2, f"exit code {code}: {stderr}"
    assert len(lines) == 1 and lines[0].strip(), f"not one line: {stderr!r}"
    line = lines[0]
    assert line.startswith("ppl-vae"), line
    assert ctx.fill(case.names) in line, line
    for text in case.absent:
        assert text not in line, line
    assert snapshot(*watched(ctx)) == before, "files changed"
    assert listing(runs_dir_of(argv)) == runs_before, "a run folder appeared"


def test_cases_cover_the_classes():
    assert len(CASES) >= 65
    assert len({case.id for case in CASES}) == len(CASES)
    assert sum(case.subprocess for case in CASES) >= 3


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_user_error(case: Case, ctx: Ctx, capfd):
    argv = prepared(case, ctx)
    before = snapshot(*watched(ctx))
    runs_before = listing(runs_dir_of(argv))
    for target in (("ppl_vae.data.load",) if case.early else ()) + case.forbid:
        forbid(ctx.monkeypatch, target)
    capfd.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's errors
        code = exit.code
    _, stderr = capfd.readouterr()
    check_outcome(case, ctx, code, stderr, before, runs_before)


SUBPROCESS = [case for case in CASES if case.subprocess]


@pytest.mark.parametrize("case", SUBPROCESS, ids=[case.id for case in SUBPROCESS])
def test_user_error_through_the_entry_point(case: Case, ctx: Ctx):
    argv = prepared(case, ctx)
    before = snapshot(*watched(ctx))
    runs_before = listing(runs_dir_of(argv))
    result = run_cli(*argv)
    assert "Traceback" not in result.stderr
    check_outcome(case, ctx, result.returncode, result.stderr, before, runs_before)


def test_tiny_splits_are_not_user_errors(tmp_path, capfd):
    """Three training images (two to train on, one to validate) and three test images are
    enough: the report draws the one interpolation pair they allow."""
    folder = write_fake_idx(tmp_path / "idx", n_train=3, n_test=3)
    argv = [arg.format(runs=tmp_path / "runs", data=folder) for arg in TRAIN]
    assert main(["train", *argv, "--name", "tiny"]) == 0, capfd.readouterr().err
    run_dir = tmp_path / "runs" / "tiny"
    assert json.loads((run_dir / "config.json").read_text())["data_source"]["sizes"] == {
        "train": 2, "val": 1, "test": 3, "train_split": 2,
    }  # fmt: skip
    assert (run_dir / "interpolations.png").is_file() and (run_dir / "report.md").is_file()
