"""Image sources other than the IDX files: torchvision's datasets, image folders and arrays.

Each reader returns a :class:`Raw`: uint8 images ``(N, C, H, W)`` and int64 labels on the CPU,
the test images when the source has them, and the files read (recorded, with their SHA-256,
in a run's config.json). Splitting, binarization and the move to the device are
:mod:`ppl_vae.data`'s, the same for every source. Every bad input is a one-line
:class:`~ppl_vae.errors.DataError` naming the file and what to do.

* ``kmnist``, ``emnist``, ``cifar10``, ``svhn``: read with torchvision's own classes from
  their on-disk layout under ``--data.data-dir`` (``KMNIST/raw/``, ``EMNIST/raw/``,
  ``cifar-10-batches-py/``, ``train_32x32.mat`` and ``test_32x32.mat``), or downloaded into the
  cache folder. torchvision checks CIFAR-10's and SVHN's files against their published MD5
  sums. EMNIST's files store every image transposed; they are turned upright here.
* ``folder``: PNG/JPEG images, either in ``DIR/train/`` and ``DIR/test/`` or all in ``DIR``;
  inside a split folder, one sub-folder per class gives labels (sorted names → 0, 1, ...),
  images directly in it have label 0. Images are taken in the order of their sorted relative
  paths, converted to grey (all grey) or RGB (any colour), resized (shorter side) and
  centre-cropped to ``--data.image-size``. The decoded tensor is cached in
  ``DIR/.ppl_vae-cache/`` (or the user cache folder when ``DIR`` is read-only), keyed by the
  files' names, sizes and modification times and the image size: a folder is decoded once.
* ``array``: ``.npy`` (memory-mapped), ``.npz`` or ``.pt`` holding uint8 images ``N×H×W``,
  ``N×H×W×C`` or ``N×C×H×W`` (``--data.layout``, inferred where only one axis can be the
  channels). An ``.npz`` or a ``.pt`` dict may hold ``train``/``test`` images (or ``x_train``
  and ``x_test``) with ``*_labels`` / ``y_*`` labels; a plain array is all training images.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ppl_vae import files
from ppl_vae.errors import DataError, UserError, first_line, one_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CHANNEL_COUNTS = (1, 3, 4)
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")  # PIL modes read as one channel
CACHE_FOLDER = ".ppl_vae-cache"
TORCHVISION_SOURCES = {"kmnist": "KMNIST", "emnist": "EMNIST", "cifar10": "CIFAR10", "svhn": "SVHN"}


@dataclass
class Raw:
    """A source's images as read: uint8 ``(N, C, H, W)``, int64 labels, on the CPU."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor | None
    test_labels: torch.Tensor | None
    files: dict[str, Path]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])


def unlabeled(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.int64)


# ----------------------------------------------------------------------------- torchvision


def read_torchvision(name: str, root: Path | None, cache: Path, emnist_split: str) -> Raw:
    """KMNIST, EMNIST, CIFAR-10 or SVHN through torchvision's classes: from ``root`` when
    given (their on-disk layout, no download), else from ``cache``, downloading what is not
    there. A missing file is named with the folder it belongs in."""
    import torchvision

    cls = getattr(torchvision.datasets, TORCHVISION_SOURCES[name])
    folder = Path(root) if root is not None else cache
    if root is not None and not folder.is_dir():
        raise DataError(
            f"--data.data-dir {folder}: {files.folder_problem(folder)}; {_torchvision_hint(name)}"
        )
    expected = torchvision_files(folder, name, emnist_split)
    if root is not None:  # name the first file torchvision would miss, and where it goes
        for path in expected.values():
            if not path.is_file():
                names = ", ".join(p.name for p in expected.values())
                raise DataError(
                    f"{path}: file not found; {name} needs {names} in {path.parent} (its "
                    "torchvision layout), or leave --data.data-dir out to download them "
                    "(needs internet)"
                )
    parts = {}
    for train in (True, False):
        if name == "svhn":
            args = {"split": "train" if train else "test"}
        else:
            args = {"train": train, **({"split": emnist_split} if name == "emnist" else {})}
        try:
            ds = cls(root=str(folder), download=root is None, **args)
        except Exception as err:  # torchvision: RuntimeError (missing, md5), URLError, ...
            raise DataError(f"{folder}: {name} could not be read ({one_line(err)}); "
                            f"{_torchvision_hint(name)}") from None  # fmt: skip
        images = torch.as_tensor(ds.data)
        labels = torch.as_tensor(ds.labels if name == "svhn" else ds.targets).long()
        if name == "emnist":  # stored transposed (column-major) in its IDX files
            images = images.transpose(1, 2)
        if images.dim() == 3:
            images = images.unsqueeze(1)
        elif name == "cifar10":  # torchvision keeps CIFAR as N×H×W×C, SVHN as N×C×H×W
            images = images.permute(0, 3, 1, 2)
        parts[train] = images.to(torch.uint8).contiguous(), labels
    used = {key: path for key, path in expected.items() if path.is_file()}
    return Raw(*parts[True], *parts[False], files=used)


def torchvision_files(folder: Path, name: str, emnist_split: str) -> dict[str, Path]:
    """The files torchvision's class reads under its root ``folder``, by role."""
    if name == "cifar10":
        base = folder / "cifar-10-batches-py"
        batches = {f"train_batch_{i}": base / f"data_batch_{i}" for i in range(1, 6)}
        return {**batches, "test_batch": base / "test_batch", "meta": base / "batches.meta"}
    if name == "svhn":
        return {"train": folder / "train_32x32.mat", "test": folder / "test_32x32.mat"}
    stems = {
        "train_images": "train-images-idx3-ubyte",
        "train_labels": "train-labels-idx1-ubyte",
        "test_images": "t10k-images-idx3-ubyte",
        "test_labels": "t10k-labels-idx1-ubyte",
    }
    if name == "emnist":
        stems = {key: f"emnist-{emnist_split}-" + stem.replace("t10k", "test")
                 for key, stem in stems.items()}  # fmt: skip
    raw = folder / TORCHVISION_SOURCES[name] / "raw"
    return {key: raw / stem for key, stem in stems.items()}


def _torchvision_hint(name: str) -> str:
    return (
        f"pass --data.data-dir ROOT holding {name} in torchvision's layout, or leave "
        "--data.data-dir out to download it (needs internet)"
    )


# ----------------------------------------------------------------------------- folders


def read_folder(folder: Path, image_size: int, user_cache: Path) -> Raw:
    """The images of ``folder`` (see the module doc), decoded once and cached."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(
            f"--data.data-dir {folder}: {files.folder_problem(folder)}; pass a folder of "
            "PNG/JPEG images"
        )
    splits = {"train": folder / "train", "test": folder / "test"}
    if not splits["train"].is_dir():
        splits = {"train": folder}
    listing = {part: _image_files(path) for part, path in splits.items()}
    for part, (paths, _) in listing.items():
        if not paths:
            raise DataError(
                f"{splits[part]}: no PNG or JPEG images in it or in its sub-folders; "
                "pass a folder of images (.png, .jpg, .jpeg)"
            )
    key = _cache_key(folder, listing, image_size)
    places = (folder / CACHE_FOLDER, user_cache / "folders")  # beside the data, else the user's
    for where in places:
        cached = where / f"{key}.pt"
        if cached.is_file():
            try:
                saved = torch.load(cached, weights_only=True)
                return _raw_from(saved, folder, listing)
            except Exception:  # a damaged cache is decoded again
                pass
    decoded = {}
    for part, (paths, labels) in listing.items():
        decoded[part] = _decode(paths, image_size), torch.tensor(labels, dtype=torch.int64)
    shapes = {part: tuple(images.shape[1:]) for part, (images, _) in decoded.items()}
    if len(set(shapes.values())) > 1:
        raise DataError(
            f"{folder}: train/ images are {_side(shapes['train'])} but test/ images are "
            f"{_side(shapes['test'])}; pass --data.image-size N to resize both"
        )
    channels = {images.shape[1] for images, _ in decoded.values()}
    if len(channels) > 1:  # grey in one split, colour in the other: colour for both
        decoded = {p: (im.expand(-1, 3, -1, -1).contiguous() if im.shape[1] == 1 else im, lab)
                   for p, (im, lab) in decoded.items()}  # fmt: skip
    saved = {f"{part}_{what}": t for part, pair in decoded.items()
             for what, t in zip(("images", "labels"), pair, strict=True)}  # fmt: skip
    payload = files.torch_bytes(saved)
    for where in places:
        try:
            where.mkdir(parents=True, exist_ok=True)
            files.write_atomic(where / f"{key}.pt", payload, "")
            break
        except (OSError, UserError):  # read-only data: the user cache, else none
            continue
    return _raw_from(saved, folder, listing)


def _raw_from(saved: dict, folder: Path, listing: dict) -> Raw:
    test = "test" in listing
    return Raw(
        saved["train_images"],
        saved["train_labels"],
        saved["test_images"] if test else None,
        saved["test_labels"] if test else None,
        files={"image_folder": folder},
    )


def _side(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}x{shape[2]}x{shape[0]}"


def _image_files(split: Path) -> tuple[list[Path], list[int]]:
    """Image paths in sorted order and their labels: one sub-folder per class, or none."""
    subdirs = sorted(p for p in split.iterdir() if p.is_dir() and not p.name.startswith("."))
    direct = sorted(p for p in split.iterdir() if p.is_file() and not p.name.startswith("."))
    if subdirs and any(p.suffix.lower() in IMAGE_SUFFIXES for p in direct):
        raise DataError(
            f"{split}: holds both images and class sub-folders ({subdirs[0].name}, ...); put "
            "every image in a class sub-folder, or none"
        )
    groups = [(label, d) for label, d in enumerate(subdirs)] if subdirs else [(0, split)]
    paths, labels = [], []
    for label, d in groups:
        for p in sorted(d.rglob("*")):
            if not p.is_file() or any(part.startswith(".") for part in p.relative_to(d).parts):
                continue
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(
                    f"{p}: not a PNG or JPEG file; remove it from the image folder (images "
                    "must end in .png, .jpg or .jpeg)"
                )
            paths.append(p)
            labels.append(label)
    return paths, labels


def _cache_key(folder: Path, listing: dict, image_size: int) -> str:
    digest = hashlib.sha256(json.dumps({"image_size": image_size, "version": 1}).encode())
    for part, (paths, labels) in listing.items():
        for p, label in zip(paths, labels, strict=True):
            st = p.stat()
            rel = p.relative_to(folder).as_posix()
            digest.update(f"{part}\0{rel}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def _decode(paths: list[Path], image_size: int) -> torch.Tensor:
    """uint8 ``(N, C, H, W)``: grey when every image is grey, else RGB."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.functional import center_crop, pil_to_tensor, resize

    images = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im.load()
                im = im.convert("L" if im.mode in GREY_MODES else "RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise DataError(f"{p}: cannot be decoded as an image ({first_line(err)}); remove or "
                            "replace it") from None  # fmt: skip
        t = pil_to_tensor(im)
        if image_size:
            t = center_crop(resize(t, image_size, antialias=True), [image_size, image_size])
        images.append(t)
    sizes = {tuple(t.shape[1:]) for t in images}
    if len(sizes) > 1:
        a, b = sorted(sizes)[:2]
        raise DataError(
            f"{paths[0].parent}: images of different sizes ({a[0]}x{a[1]}, {b[0]}x{b[1]}, ...); "
            "pass --data.image-size N to resize and centre-crop them all to N x N"
        )
    if any(t.shape[0] == 3 for t in images):
        images = [t.expand(3, -1, -1) if t.shape[0] == 1 else t for t in images]
    return torch.stack(images).contiguous()


# ----------------------------------------------------------------------------- arrays

ARRAY_KEYS = {
    "train": (("train", "train_labels"), ("x_train", "y_train"), ("images", "labels")),
    "test": (("test", "test_labels"), ("x_test", "y_test")),
}


def read_array(path: Path, layout: str) -> Raw:
    """The images of an array file (see the module doc)."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "file not found"
        raise DataError(f"--data.file {path}: {what}; pass a .npy, .npz or .pt file of images")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz", ".pt"):
        raise DataError(
            f"--data.file {path}: unknown array format {suffix or '(no suffix)'}; pass a .npy, "
            ".npz or .pt file"
        )
    content = _load_array_file(path, suffix)
    if not isinstance(content, dict):
        content = {"train": content}
    found = {}
    for part, pairs in ARRAY_KEYS.items():
        for images_key, labels_key in pairs:
            if images_key in content:
                found[part] = (images_key, content[images_key], content.get(labels_key))
                break
    if "train" not in found:
        keys = ", ".join(sorted(map(str, content))) or "none"
        raise DataError(
            f"{path}: holds no training images (keys: {keys}); name them train (and test), "
            "x_train (and x_test), or store a single array"
        )
    parts = {}
    for part, (key, images, labels) in found.items():
        images = _as_images(images, layout, f"{path}[{key}]")
        if labels is None:
            labels = unlabeled(images.shape[0])
        else:
            labels = _as_labels(labels, images.shape[0], f"{path}[{key}] labels")
        parts[part] = images, labels
    if "test" in parts and parts["test"][0].shape[1:] != parts["train"][0].shape[1:]:
        raise DataError(
            f"{path}: test images are {tuple(parts['test'][0].shape[1:])} but training images "
            f"are {tuple(parts['train'][0].shape[1:])} (C, H, W); store images of one shape"
        )
    test = parts.get("test", (None, None))
    return Raw(*parts["train"], *test, files={"array": path})


def _load_array_file(path: Path, suffix: str):
    import numpy as np

    try:
        if suffix == ".npy":
            return np.load(path, mmap_mode="r", allow_pickle=False)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # numpy: ValueError/OSError/EOFError, torch: UnpicklingError, ...
        raise DataError(f"{path}: cannot be read as {suffix} ({first_line(err, 160)}); "
                        f"damaged or not a {suffix} file") from None  # fmt: skip


def _as_images(array, layout: str, where: str) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` from an array laid out N×H×W, N×H×W×C or N×C×H×W."""
    import numpy as np

    if isinstance(array, np.ndarray):
        if array.dtype != np.uint8:
            raise DataError(
                f"{where}: images are {array.dtype}, not uint8; store 8-bit images (values "
                "0-255) as uint8"
            )
        t = torch.from_numpy(np.array(array))  # a copy: a memory map is read, not kept
    elif isinstance(array, torch.Tensor):
        if array.dtype != torch.uint8:
            raise DataError(
                f"{where}: images are {array.dtype}, not uint8; store 8-bit images (values "
                "0-255) as torch.uint8"
            )
        t = array.contiguous()
    else:
        raise DataError(f"{where}: is a {type(array).__name__}, not an array of images")
    if t.dim() == 3:
        if layout != "auto":
            raise DataError(
                f"{where}: images are N×H×W {tuple(t.shape)}, which has no channel axis; "
                "leave --data.layout auto"
            )
        t = t.unsqueeze(1)
    elif t.dim() == 4:
        if layout == "auto":
            first, last = t.shape[1] in CHANNEL_COUNTS, t.shape[3] in CHANNEL_COUNTS
            if first == last:
                raise DataError(
                    f"{where}: cannot tell the channel axis of {tuple(t.shape)}; pass "
                    "--data.layout nhwc or --data.layout nchw"
                )
            layout = "nchw" if first else "nhwc"
        if layout == "nhwc":
            t = t.permute(0, 3, 1, 2)
        if t.shape[1] not in CHANNEL_COUNTS:
            raise DataError(
                f"{where}: {t.shape[1]} channels under --data.layout {layout}; images have "
                "1, 3 or 4 channels (check --data.layout)"
            )
        if t.shape[1] == 4:  # RGBA: the alpha channel is not part of the image model
            t = t[:, :3]
    else:
        raise DataError(
            f"{where}: images of shape {tuple(t.shape)}; store N×H×W, N×H×W×C or N×C×H×W"
        )
    if min(t.shape) == 0:
        raise DataError(f"{where}: holds no images (shape {tuple(t.shape)})")
    return t.contiguous()


def _as_labels(labels, n: int, where: str) -> torch.Tensor:
    t = torch.as_tensor(labels)
    if t.dim() != 1 or t.shape[0] != n or t.is_floating_point() or t.is_complex():
        raise DataError(
            f"{where}: {tuple(t.shape)} {t.dtype}; labels are one integer per image ({n})"
        )
    return t.long()


def default_cache() -> Path:
    return Path(os.environ.get("PPL_VAE_DATA", Path.home() / ".cache" / "ppl_vae"))

