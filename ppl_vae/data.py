"""Datasets as uint8 tensors on the training device.

Fashion-MNIST and MNIST come from the first of:

1. ``--data.data-dir DIR`` holding the four IDX files (``.gz`` or uncompressed), either
   directly or in torchvision's layout ``DIR/<FashionMNIST|MNIST>/raw/``;
2. Debian's package location (``/usr/share/datasets/fashion-mnist``, package
   ``dataset-fashion-mnist``; Fashion-MNIST only);
3. torchvision's download into a cache folder (``$PPL_VAE_DATA`` or ``~/.cache/ppl_vae``).

The other sources (torchvision's KMNIST, EMNIST, CIFAR-10 and SVHN, image folders, arrays) are
read by :mod:`ppl_vae.sources`; what follows is the same for every source.

Every split is read once, validated, and moved to the device as a ``uint8`` tensor (``(N, 28,
28)`` for the IDX files, ``(N, C, H, W)`` otherwise; :attr:`Dataset.shape` is (C, H, W));
training batches are index slices of a seeded permutation, taken on the device, or gathered in
host memory and copied over for training images above ``--data.device-limit-mb``. Pixels become
model inputs in :func:`to_input`: dynamically binarized (a fresh Bernoulli draw per batch, the
default for Bernoulli likelihoods), statically binarized (one fixed draw per image, made at
load time), scaled to [0, 1], or uniformly dequantized.

A source without a test split first holds out ``--data.test-size`` images of a fixed, seeded
permutation. The validation split is the last ``--data.val-size`` images (default
:data:`VAL_SIZE`, 10,000, or a sixth of a smaller training file) of a fixed, seeded permutation
of the training images; the rest are used for training. The sizes, the image shape, the files'
absolute paths and their SHA-256 are recorded in the run's config.json (:func:`source_record`).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ppl_vae import sources
from ppl_vae.distributed import device_for
from ppl_vae.errors import ConfigError, DataError, check, first_line, one_line
from ppl_vae.files import folder_problem

VAL_SIZE = 10_000
SPLIT_SEED = 20151101  # fixes the train/validation split; independent of the run seed
TEST_SPLIT_SEED = 20171102  # fixes the test images held out of a source without a test split
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


Source = Literal[
    "fashion-mnist", "mnist", "kmnist", "emnist", "cifar10", "svhn", "folder", "array"
]
Layout = Literal["auto", "nhwc", "nchw"]


@dataclass(frozen=True)
class DataConfig:
    dataset: Source = "fashion-mnist"
    """Which data: fashion-mnist, mnist (IDX files); kmnist, emnist, cifar10, svhn
    (torchvision's layout under --data.data-dir, or a download); folder (PNG/JPEG images in
    --data.data-dir); array (a .npy/.npz/.pt file of uint8 images, --data.file)."""
    data_dir: Path | None = None
    """Folder with the four IDX files (.gz or not), torchvision's root for kmnist/emnist, or
    the image folder (folder); default: Debian's copy of Fashion-MNIST, else a download."""
    file: Path | None = None
    """The array file of --data.dataset array: .npy (memory-mapped), .npz or .pt."""
    layout: Layout = "auto"
    """How an array's 4-d images are laid out: nhwc, nchw, or auto (inferred when only one
    axis can be the channels: 1, 3 or 4 values)."""
    image_size: int = 0
    """folder: resize (shorter side) and centre-crop every image to this side (0: keep the
    images' own size, which must then be the same for all)."""
    emnist_split: Literal["balanced", "byclass", "bymerge", "digits", "letters", "mnist"] = (
        "balanced"
    )
    """Which EMNIST split (--data.dataset emnist)."""
    test_size: int = 0
    """Sources without a test split (a folder without test/, an array without test images):
    test images held out of the training images (0: 10,000, or a seventh of fewer than
    70,000)."""
    binarization: Literal["dynamic", "static", "none", "dequantize"] = "dynamic"
    """dynamic: a fresh Bernoulli draw per batch; static: one fixed draw; none: the 8-bit values
    k/255; dequantize: (k + u)/256 with u ~ U[0, 1) per value, drawn afresh per batch (validation
    and test: one fixed seeded draw), for the continuous likelihoods."""
    train_subset: int = 0
    """Train on the first N training images only (0 = all of the training split)."""
    val_size: int = 0
    """Validation images held out of the training file (0: 10,000, or a sixth of a training
    file of fewer than 60,000 images)."""
    device_limit_mb: int = 0
    """Training images larger than this many MiB stay in host memory (pinned on CUDA) and are
    streamed: each batch is gathered there and copied to the device one batch ahead of its
    step, giving the same batches as resident data (0: on CUDA, half the free device memory;
    on the CPU, no limit)."""

    def __post_init__(self) -> None:
        check(self.train_subset >= 0, "--data.train-subset", ">= 0", self.train_subset)
        check(self.val_size >= 0, "--data.val-size", ">= 0", self.val_size)
        check(self.test_size >= 0, "--data.test-size", ">= 0", self.test_size)
        check(self.image_size >= 0, "--data.image-size", ">= 0", self.image_size)
        check(self.device_limit_mb >= 0, "--data.device-limit-mb", ">= 0", self.device_limit_mb)
        for name in ("data_dir", "file"):  # stored absolute: evaluate works from any folder
            value = getattr(self, name)
            if value is None:
                continue
            try:
                path = Path(value).expanduser()
            except RuntimeError:  # ~user of a user this system does not know
                flag = "--data." + name.replace("_", "-")
                raise ConfigError(
                    f"{flag} {value}: unknown user's home folder; pass a path"
                ) from None
            object.__setattr__(self, name, path.absolute())
        if self.dataset == "array" and self.file is None:
            raise ConfigError(
                "--data.dataset array: needs --data.file FILE (a .npy, .npz or .pt of uint8 "
                "images)"
            )
        if self.dataset == "folder" and self.data_dir is None:
            raise ConfigError(
                "--data.dataset folder: needs --data.data-dir DIR (a folder of PNG/JPEG images)"
            )
        if self.image_size and self.dataset != "folder":
            raise ConfigError(
                f"--data.image-size {self.image_size}: only used with --data.dataset folder "
                f"(it is {self.dataset}); leave it out"
            )
        if self.layout != "auto" and self.dataset != "array":
            raise ConfigError(
                f"--data.layout {self.layout}: only used with --data.dataset array (it is "
                f"{self.dataset}); leave it out"
            )
        if self.file is not None and self.dataset != "array":
            raise ConfigError(
                f"--data.file {self.file}: only read with --data.dataset array (it is "
                f"{self.dataset}); add --data.dataset array or leave --data.file out"
            )

    def val_size_of(self, n: int, source: Path | str) -> int:
        """Validation images out of a training file of ``n``; a split that leaves either part
        empty is a user error."""
        return held_out(n, self.val_size, VAL_SIZE, 6, "--data.val-size", source, "validation")


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
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not an IDX file; {how_to_get(dataset)}") from None
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise DataError(
            f"{path}: cannot be read ({first_line(err)}; damaged or not a gzip file); "
            f"{how_to_get(dataset)}"
        ) from None
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
                f"--data.data-dir {folder}: {folder_problem(folder)}; "
                f"{how_to_get(cfg.dataset)}"
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
        # what this download creates is removed again when it fails
        created = [p for p in (root, root / TORCHVISION_CLASS[dataset]) if not p.exists()]
        try:
            for train in (True, False):
                cls(root=str(root), train=train, download=True)
        except Exception as err:  # torchvision raises RuntimeError/URLError/OSError
            if created:  # the topmost folder this call made
                shutil.rmtree(created[0], ignore_errors=True)
            raise DataError(
                f"{dataset}: not found locally and the download into {root} failed "
                f"({one_line(err)}); "
                f"{how_to_get(dataset)}"
            ) from None
    files = find_idx_files(raw)
    if files is None:
        raise DataError(
            f"{raw}: download finished but IDX files are missing; {how_to_get(dataset)}"
        )
    return files


# ----------------------------------------------------------------------------- splits


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    """``auto`` → cuda when available, else cpu; ``cuda`` without a GPU is a user error naming
    ``flag``, the option that chose it."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{flag} cuda: no CUDA device is visible; use auto or cpu")
    return torch.device(device_for(name))  # each process of a distributed job: its own GPU


@dataclass
class Split:
    """Images uint8 ``(N, 28, 28)`` (IDX files) or ``(N, C, H, W)`` (other sources) and labels
    ``(N,)`` int64, all on one device."""

    images: torch.Tensor
    labels: torch.Tensor
    fixed_binary: torch.Tensor | None = None  # one fixed Bernoulli draw per image, uint8
    streamed_to: torch.device | None = None
    """Set when the images stay in host memory and batches are copied to this device."""

    def __len__(self) -> int:
        return self.images.shape[0]

    def head(self, n: int) -> Split:
        """The first ``n`` images, with their labels and fixed binarization, where they are."""
        return Split(self.images[:n], self.labels[:n], self.fixed_binary[:n], self.streamed_to)

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
    shape: tuple[int, int, int] = (1, 28, 28)
    """Channels, height and width of every image."""

    @property
    def source(self) -> Path | str:
        """What names the data in messages (:func:`source_of`)."""
        return source_of(self.files, self.name)


def source_of(files: dict[str, Path], name: str) -> Path | str:
    """The training images' file, else the first file or folder read, else the dataset name."""
    return files.get("train_images") or next(iter(files.values()), name)


# Label counts of the 60,000 training images, which tell the two datasets apart whatever their
# compression: Fashion-MNIST has 6,000 of each class, MNIST's digits are uneven.
TRAIN_LABEL_COUNTS = {
    "fashion-mnist": (6000,) * 10,
    "mnist": (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
}


def identify(train_labels: torch.Tensor) -> str | None:
    """Which known dataset a training label file is, from its class counts (None: unknown)."""
    if train_labels.dim() != 1 or train_labels.numel() != 60_000:
        return None
    counts = tuple(torch.bincount(train_labels.long(), minlength=10).tolist())
    return next((name for name, known in TRAIN_LABEL_COUNTS.items() if known == counts), None)


def read_source(cfg: DataConfig) -> sources.Raw:
    """The images of ``cfg.dataset`` as read from its source, validated, on the CPU."""
    if cfg.dataset in TORCHVISION_CLASS:
        return read_idx_source(cfg)
    if cfg.dataset in sources.TORCHVISION_SOURCES:
        return sources.read_torchvision(cfg.dataset, cfg.data_dir, cache_dir(), cfg.emnist_split)
    if cfg.dataset == "folder":
        return sources.read_folder(cfg.data_dir, cfg.image_size, cache_dir())
    return sources.read_array(cfg.file, cfg.layout)


def read_idx_source(cfg: DataConfig) -> sources.Raw:
    """Fashion-MNIST or MNIST from their four IDX files; images stay ``(N, 28, 28)``."""
    files = locate(cfg)
    arrays = {key: read_idx(path, cfg.dataset) for key, path in files.items()}
    shape = IMAGE_SHAPE[cfg.dataset][1:]
    for part in ("train", "test"):
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        path = files[f"{part}_images"]
        if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{path}: images {tuple(images.shape)} do not match labels "
                f"{tuple(labels.shape)} in {files[part + '_labels']}; {how_to_get(cfg.dataset)}"
            )
        if tuple(images.shape[1:]) != shape:
            raise DataError(
                f"{path}: images are {images.shape[1]}x{images.shape[2]} but {cfg.dataset} "
                f"images are {shape[0]}x{shape[1]}; {how_to_get(cfg.dataset)}"
            )
    found = identify(arrays["train_labels"])
    if found is not None and found != cfg.dataset:
        raise DataError(
            f"{files['train_labels']}: these files are {found} (their label counts), but "
            f"--data.dataset is {cfg.dataset}; pass --data.dataset {found}"
        )
    return sources.Raw(arrays["train_images"], arrays["train_labels"].long(),
                       arrays["test_images"], arrays["test_labels"].long(), files)  # fmt: skip


def held_out(n: int, size: int, default: int, share: int, flag: str, source, what: str) -> int:
    """How many of ``n`` images a split holds out for ``what`` (validation, test): ``size``,
    or when 0 ``default`` capped at ``n // share``; a split that leaves either part empty is a
    user error naming ``flag``."""
    noun = "training images" if what == "validation" else "images"
    if n < 2:
        raise DataError(
            f"{source}: holds {n} {noun[:-1]}(s); at least 2 are needed (one for training, "
            f"one for {what})"
        )
    k = size or max(1, min(default, n // share))
    if k >= n:
        raise ConfigError(
            f"{flag} {k}: {source} holds {n} {noun}, so no training images are left; pass "
            f"{flag} between 1 and {n - 1}"
        )
    return k


def load(cfg: DataConfig, device: torch.device | str = "cpu") -> Dataset:
    """Read, validate and split the dataset; every tensor ends on ``device``."""
    raw = read_source(cfg)
    files = raw.files
    source = source_of(files, cfg.dataset)
    train_images, train_labels = raw.train_images, raw.train_labels
    test_images, test_labels = raw.test_images, raw.test_labels
    if test_images is None:  # no test split of its own: the last images of a seeded order
        n = train_images.shape[0]
        test_size = held_out(n, cfg.test_size, VAL_SIZE, 7, "--data.test-size", source, "test")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(TEST_SPLIT_SEED))
        keep, test = perm[: n - test_size].sort().values, perm[n - test_size :].sort().values
        test_images, test_labels = train_images[test], train_labels[test]
        train_images, train_labels = train_images[keep], train_labels[keep]
    elif cfg.test_size:
        raise ConfigError(
            f"--data.test-size {cfg.test_size}: {source} has a test split of its own "
            f"({test_images.shape[0]} images); leave --data.test-size out"
        )
    n = train_images.shape[0]
    val_size = cfg.val_size_of(n, source)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    train_idx, val_idx = perm[: n - val_size].sort().values, perm[n - val_size :].sort().values
    splits = {
        "train": Split(train_images[train_idx], train_labels[train_idx]),
        "val": Split(train_images[val_idx], train_labels[val_idx]),
        "test": Split(test_images, test_labels),
    }
    for offset, split in enumerate(splits.values()):
        gen = torch.Generator().manual_seed(EVAL_BINARIZE_SEED + offset)
        split.fixed_binary = binarize(split.images, gen)
    device = torch.device(device)
    streamed = streams(splits["train"], cfg, device)
    for name, split in splits.items():
        if name == "train" and streamed:  # host memory, pinned for asynchronous copies
            split.streamed_to = device
            if device.type == "cuda":
                split.images, split.fixed_binary = (
                    split.images.pin_memory(), split.fixed_binary.pin_memory()
                )
            continue
        split.images = split.images.to(device)
        split.labels = split.labels.to(device)
        split.fixed_binary = split.fixed_binary.to(device)
    shape = raw.shape if train_images.dim() == 4 else (1, *train_images.shape[1:])
    return Dataset(name=cfg.dataset, files=files, shape=shape, **splits)


def streams(split: Split, cfg: DataConfig, device: torch.device) -> bool:
    """Whether the training images stay in host memory (``--data.device-limit-mb``)."""
    size = split.images.numel() + split.fixed_binary.numel()  # both uint8
    if cfg.device_limit_mb:
        return size > cfg.device_limit_mb * 2**20
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return size > free // 2
    return False


def fingerprint(path: Path) -> str:
    """SHA-256 of a file's bytes (as stored, compressed or not)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_record(dataset: Dataset, cfg: DataConfig) -> dict:
    """What config.json records of the data a run read: the split sizes, each file's absolute
    path and SHA-256."""
    return {
        "dataset": dataset.name,
        "sizes": {
            "train": len(dataset.train) if not cfg.train_subset else cfg.train_subset,
            "val": len(dataset.val),
            "test": len(dataset.test),
            "train_split": len(dataset.train),
        },
        "shape": list(dataset.shape),
        "files": {
            key: {"path": str(Path(path).absolute()), "sha256": fingerprint_of(path, dataset)}
            for key, path in dataset.files.items()
        },
    }


def fingerprint_of(path: Path, dataset: Dataset) -> str:
    """A file's SHA-256; for an image folder, the SHA-256 of its decoded images and labels
    (train, validation, test), the content every run of it trains and is tested on."""
    if not Path(path).is_dir():
        return fingerprint(path)
    digest = hashlib.sha256()
    for split in (dataset.train, dataset.val, dataset.test):
        for t in (split.images, split.labels):
            digest.update(t.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def image_shape(cfg: DataConfig, record: dict | None = None) -> tuple[int, int, int]:
    """(C, H, W) of a run's images: from its config.json's data record, else the dataset's."""
    if record and "shape" in record:
        return tuple(int(v) for v in record["shape"])
    if cfg.dataset in IMAGE_SHAPE:
        return IMAGE_SHAPE[cfg.dataset]
    raise DataError(f"the image shape of this {cfg.dataset} run is not recorded in config.json")


def binarize(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One Bernoulli draw per pixel with probability = intensity / 255, as uint8 {0, 1}."""
    probs = images.float().div_(255)
    return torch.bernoulli(probs, generator=generator).to(torch.uint8)


def to_input(
    images: torch.Tensor, mode: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Turn uint8 images ``(B, ...)`` into flat float model inputs ``(B, values per image)``.

    ``mode``: ``"dynamic"`` draws a fresh binarization, ``"static"`` expects images that are
    already {0, 1} (a split's ``fixed_binary``), ``"none"`` gives the 8-bit values k/255 in
    [0, 1], ``"dequantize"`` gives (k + u)/256 with u ~ U[0, 1) per value (uniform
    dequantization, Theis et al. 2016), drawn from ``generator`` when given (on its device,
    then moved to the images'), else from torch's global stream on the images' device.
    """
    flat = images.reshape(images.shape[0], -1)
    if mode == "dynamic":
        return torch.bernoulli(flat.float().div_(255))
    if mode == "static":
        return flat.float()
    if mode == "none":
        return flat.float().div_(255)
    if mode == "dequantize":
        if generator is None:
            noise = torch.rand(flat.shape, device=flat.device)
        else:
            noise = torch.rand(flat.shape, generator=generator, device=generator.device)
        return flat.float().add_(noise.to(flat.device)).div_(256)
    raise ValueError(
        f"unknown input mode {mode!r}; use 'dynamic', 'static', 'none' or 'dequantize'"
    )


def train_source(cfg: DataConfig, split: Split, val_size: int = 0) -> tuple[torch.Tensor, str]:
    """The uint8 tensor training batches are sliced from (the first ``cfg.train_subset``
    images when set), and the :func:`to_input` mode that turns them into model inputs."""
    if cfg.train_subset > len(split):
        raise ConfigError(
            f"--data.train-subset {cfg.train_subset}: the training split holds only "
            f"{len(split)} images (the training file minus {val_size} validation images, "
            f"--data.val-size); pass at most {len(split)}, or 0 for all"
        )
    if cfg.binarization == "static":
        source, mode = split.fixed_binary, "static"
    else:
        source, mode = split.images, cfg.binarization
    return (source[: cfg.train_subset] if cfg.train_subset else source), mode


def eval_inputs(split: Split, binarization: str) -> torch.Tensor:
    """Deterministic float inputs for evaluation: the split's fixed binarization, the 8-bit
    values, or one fixed dequantization (the noise u of a CPU stream seeded with
    :data:`EVAL_BINARIZE_SEED`, the same for every split and device: it is independent of the
    images, so one draw per value is an unbiased estimate of E_u for each split)."""
    if binarization == "none":
        inputs = to_input(split.images, "none")
    elif binarization == "dequantize":
        generator = torch.Generator().manual_seed(EVAL_BINARIZE_SEED)
        inputs = to_input(split.images, "dequantize", generator)
    else:
        inputs = to_input(split.fixed_binary, "static")
    return inputs if split.streamed_to is None else inputs.to(split.streamed_to)


def batches(
    source: torch.Tensor,
    batch_size: int,
    generator: torch.Generator | None = None,
    to: torch.device | None = None,
) -> Iterator[torch.Tensor]:
    """Slices of ``source`` in a seeded random order (sequential when ``generator`` is None).

    The permutation is drawn on the CPU generator (reproducible across devices). Resident data
    (``to`` None): the permutation is moved to the data's device once per epoch and every batch
    is an index gather there. Streamed data (``to`` a device): every batch is gathered in host
    memory (pinned when ``to`` is CUDA) and copied to ``to`` without blocking, one batch ahead
    of the one handed out, so the copy overlaps the step; the batches are the same.
    """
    n = source.shape[0]
    if to is not None:
        yield from _streamed(source, batch_size, generator, torch.device(to))
        return
    if generator is None:
        for start in range(0, n, batch_size):
            yield source[start : start + batch_size]
        return
    perm = torch.randperm(n, generator=generator).to(source.device, non_blocking=True)
    for start in range(0, n, batch_size):
        yield source[perm[start : start + batch_size]]


def _streamed(source, batch_size, generator, to: torch.device) -> Iterator[torch.Tensor]:
    n = source.shape[0]
    order = torch.randperm(n, generator=generator) if generator is not None else None
    pin = to.type == "cuda"

    def copy(start: int) -> torch.Tensor:
        part = source[start : start + batch_size] if order is None else (
            source[order[start : start + batch_size]])  # fmt: skip
        if pin:
            part = part.pin_memory()
        return part.to(to, non_blocking=pin)

    starts = range(0, n, batch_size)
    ahead = copy(starts[0]) if starts else None
    for i in range(len(starts)):
        current = ahead
        ahead = copy(starts[i + 1]) if i + 1 < len(starts) else None
        yield current


def num_batches(n: int, batch_size: int) -> int:
    return -(-n // batch_size)
