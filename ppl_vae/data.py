"""Datasets as uint8 tensors on the training device.

Sources are tried in this order:

1. ``--data.data-dir DIR`` holding the four IDX files (``.gz`` or uncompressed), either
   directly or in torchvision's layout ``DIR/<FashionMNIST|MNIST>/raw/``;
2. Debian's package location (``/usr/share/datasets/fashion-mnist``, package
   ``dataset-fashion-mnist``; Fashion-MNIST only);
3. torchvision's download into a cache folder (``$PPL_VAE_DATA`` or ``~/.cache/ppl_vae``).

Every split is read once, validated, and moved to the device as a ``uint8`` tensor of shape
``(N, 28, 28)``; training batches are index slices of a seeded permutation, taken on the device.
Pixels become model inputs in :func:`to_input`: dynamically binarized (a fresh Bernoulli draw
per batch, the default for Bernoulli likelihoods), statically binarized (one fixed draw per
image, made at load time), or scaled to [0, 1].

The validation split is the last :data:`VAL_SIZE` (10,000) images of a fixed, seeded
permutation of the 60,000 training images; the remaining 50,000 are used for training.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ppl_vae.errors import ConfigError, DataError, check

VAL_SIZE = 10_000
SPLIT_SEED = 20151101  # fixes the train/validation split; independent of the run seed
EVAL_BINARIZE_SEED = 1234  # fixes the binarization of validation/test images for evaluation
DEBIAN_DIRS = {"fashion-mnist": Path("/usr/share/datasets/fashion-mnist")}
TORCHVISION_CLASS = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}
IMAGE_SHAPE = {"fashion-mnist": (1, 28, 28), "mnist": (1, 28, 28)}  # channels, height, width
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_UBYTE = 0x08  # the only element type these datasets use


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["fashion-mnist", "mnist"] = "fashion-mnist"
    """Which dataset to train on."""
    data_dir: Path | None = None
    """Folder with the four IDX files (.gz or not); default: Debian's copy, else a download."""
    binarization: Literal["dynamic", "static", "none"] = "dynamic"
    """dynamic: a fresh Bernoulli draw per batch; static: one fixed draw; none: intensities."""
    train_subset: int = 0
    """Train on the first N training images only (0 = all 50,000)."""

    def __post_init__(self) -> None:
        check(self.train_subset >= 0, "--data.train-subset", ">= 0", self.train_subset)


def how_to_get(dataset: str) -> str:
    hint = "pass --data.data-dir DIR with the four IDX files"
    if dataset == "fashion-mnist":
        hint += ", or install them with `apt-get install dataset-fashion-mnist` (Debian)"
    return hint + ", or let torchvision download them (needs internet)"


# ----------------------------------------------------------------------------- IDX files


def read_idx(path: str | Path, dataset: str = "fashion-mnist") -> torch.Tensor:
    """Read an IDX file (optionally gzip-compressed) into a uint8 tensor.

    Validates the magic number (two zero bytes, element type 0x08 = unsigned byte, number of
    dimensions), that every dimension is positive, and that the payload is exactly the
    product of the dimensions. Any violation raises :class:`DataError` naming the file.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; {how_to_get(dataset)}") from None
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: cannot be read ({err}); {how_to_get(dataset)}") from None
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX file ({len(raw)} bytes); {how_to_get(dataset)}")
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != IDX_UBYTE or not 1 <= ndim <= 4:
        raise DataError(
            f"{path}: not an unsigned-byte IDX file (magic 0x{raw[:4].hex()}); "
            f"{how_to_get(dataset)}"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header; {how_to_get(dataset)}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if min(dims) == 0:
        raise DataError(f"{path}: IDX dimension of size 0 in {dims}; {how_to_get(dataset)}")
    expected = 1
    for d in dims:
        expected *= d
    if len(raw) - header != expected:
        raise DataError(
            f"{path}: IDX payload is {len(raw) - header} bytes but dimensions {dims} need "
            f"{expected} (truncated or corrupt); {how_to_get(dataset)}"
        )
    data = torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8)
    return data.reshape(dims)


def write_idx(path: str | Path, array: torch.Tensor) -> None:
    """Write a uint8 tensor as an IDX file (gzip-compressed when the name ends in ``.gz``)."""
    path = Path(path)
    array = array.to(torch.uint8).contiguous().cpu()
    header = struct.pack(">HBB", 0, IDX_UBYTE, array.dim())
    header += struct.pack(f">{array.dim()}I", *array.shape)
    payload = header + array.numpy().tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def find_idx_files(folder: Path) -> dict[str, Path] | None:
    """The four IDX files in ``folder`` (plain or ``.gz``), or None if any is missing."""
    found = {}
    for key, stem in FILES.items():
        candidates = [folder / stem, folder / f"{stem}.gz"]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            return None
        found[key] = hit
    return found


def locate(cfg: DataConfig) -> dict[str, Path]:
    """Resolve the four IDX files for ``cfg.dataset`` from the sources listed in the module doc."""
    tv_name = TORCHVISION_CLASS[cfg.dataset]
    if cfg.data_dir is not None:
        folder = Path(cfg.data_dir).expanduser()
        if not folder.is_dir():
            raise DataError(
                f"--data.data-dir {folder}: no such directory; {how_to_get(cfg.dataset)}"
            )
        for sub in (folder, folder / tv_name / "raw"):
            files = find_idx_files(sub)
            if files is not None:
                return files
        names = ", ".join(f"{s}[.gz]" for s in FILES.values())
        raise DataError(
            f"--data.data-dir {folder}: does not contain the four IDX files ({names}); "
            f"{how_to_get(cfg.dataset)}"
        )
    debian = DEBIAN_DIRS.get(cfg.dataset)
    if debian is not None and (files := find_idx_files(debian)) is not None:
        return files
    return download(cfg.dataset)


def cache_dir() -> Path:
    return Path(os.environ.get("PPL_VAE_DATA", Path.home() / ".cache" / "ppl_vae"))


def download(dataset: str) -> dict[str, Path]:
    """Fetch the IDX files with torchvision into :func:`cache_dir` and return their paths."""
    import torchvision

    root = cache_dir()
    cls = getattr(torchvision.datasets, TORCHVISION_CLASS[dataset])
    raw = root / TORCHVISION_CLASS[dataset] / "raw"
    if find_idx_files(raw) is None:
        try:
            for train in (True, False):
                cls(root=str(root), train=train, download=True)
        except Exception as err:  # torchvision raises RuntimeError/URLError/OSError
            raise DataError(
                f"{dataset}: not found locally and the download into {root} failed ({err}); "
                f"{how_to_get(dataset)}"
            ) from None
    files = find_idx_files(raw)
    if files is None:
        raise DataError(
            f"{raw}: download finished but IDX files are missing; {how_to_get(dataset)}"
        )
    return files


# ----------------------------------------------------------------------------- splits


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda when available, else cpu; ``cuda`` without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible; use auto or cpu")
    return torch.device(name)


@dataclass
class Split:
    """Images ``(N, 28, 28)`` uint8 and labels ``(N,)`` int64, both on one device."""

    images: torch.Tensor
    labels: torch.Tensor
    fixed_binary: torch.Tensor | None = None  # one fixed Bernoulli draw per image, uint8

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_pixels(self) -> int:
        return self.images[0].numel()


@dataclass
class Dataset:
    train: Split
    val: Split
    test: Split
    name: str
    files: dict[str, Path]


def load(cfg: DataConfig, device: torch.device | str = "cpu") -> Dataset:
    """Read, validate and split the dataset; every tensor ends on ``device``."""
    files = locate(cfg)
    arrays = {key: read_idx(path, cfg.dataset) for key, path in files.items()}
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{files[part + '_images']}: images {tuple(images.shape)} do not match labels "
                f"{tuple(labels.shape)} in {files[part + '_labels']}; {how_to_get(cfg.dataset)}"
            )
    train_images, train_labels = arrays["train_images"], arrays["train_labels"].long()
    n = train_images.shape[0]
    val_size = min(VAL_SIZE, n // 6)  # small test files keep a proportionate validation split
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    train_idx, val_idx = perm[: n - val_size].sort().values, perm[n - val_size :].sort().values
    splits = {
        "train": Split(train_images[train_idx], train_labels[train_idx]),
        "val": Split(train_images[val_idx], train_labels[val_idx]),
        "test": Split(arrays["test_images"], arrays["test_labels"].long()),
    }
    for offset, split in enumerate(splits.values()):
        gen = torch.Generator().manual_seed(EVAL_BINARIZE_SEED + offset)
        split.fixed_binary = binarize(split.images, gen)
    device = torch.device(device)
    for split in splits.values():
        split.images = split.images.to(device)
        split.labels = split.labels.to(device)
        split.fixed_binary = split.fixed_binary.to(device)
    return Dataset(name=cfg.dataset, files=files, **splits)


def binarize(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One Bernoulli draw per pixel with probability = intensity / 255, as uint8 {0, 1}."""
    probs = images.float().div_(255)
    return torch.bernoulli(probs, generator=generator).to(torch.uint8)


def to_input(images: torch.Tensor, mode: str) -> torch.Tensor:
    """Turn uint8 images ``(B, 28, 28)`` into flat float model inputs ``(B, 784)``.

    ``mode``: ``"dynamic"`` draws a fresh binarization, ``"static"`` expects images that are
    already {0, 1} (a split's ``fixed_binary``), ``"none"`` scales to [0, 1].
    """
    flat = images.reshape(images.shape[0], -1)
    if mode == "dynamic":
        return torch.bernoulli(flat.float().div_(255))
    if mode == "static":
        return flat.float()
    if mode == "none":
        return flat.float().div_(255)
    raise ValueError(f"unknown input mode {mode!r}; use 'dynamic', 'static' or 'none'")


def train_source(cfg: DataConfig, split: Split) -> tuple[torch.Tensor, str]:
    """The uint8 tensor training batches are sliced from (the first ``cfg.train_subset``
    images when set), and the :func:`to_input` mode that turns them into model inputs."""
    if cfg.binarization == "static":
        source, mode = split.fixed_binary, "static"
    else:
        source, mode = split.images, cfg.binarization
    return (source[: cfg.train_subset] if cfg.train_subset else source), mode


def eval_inputs(split: Split, binarization: str) -> torch.Tensor:
    """Deterministic float inputs for evaluation: the split's fixed binarization, or intensities."""
    if binarization == "none":
        return to_input(split.images, "none")
    return to_input(split.fixed_binary, "static")


def batches(
    source: torch.Tensor, batch_size: int, generator: torch.Generator | None = None
) -> Iterator[torch.Tensor]:
    """Slices of ``source`` in a seeded random order (sequential when ``generator`` is None).

    The permutation is drawn on the CPU generator (reproducible across devices) and moved to the
    data's device once per epoch; every batch is then an index gather on the device.
    """
    n = source.shape[0]
    if generator is None:
        for start in range(0, n, batch_size):
            yield source[start : start + batch_size]
        return
    perm = torch.randperm(n, generator=generator).to(source.device, non_blocking=True)
    for start in range(0, n, batch_size):
        yield source[perm[start : start + batch_size]]


def num_batches(n: int, batch_size: int) -> int:
    return -(-n // batch_size)
