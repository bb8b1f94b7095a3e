"""IDX reading and validation, source resolution, splits, binarization, batching."""

from __future__ import annotations

import gzip

import pytest
import torch
from conftest import write_fake_idx

from ppl_vae import data
from ppl_vae.config import DataConfig
from ppl_vae.errors import DataError


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("shape", [(7,), (5, 28, 28), (3, 4, 5, 2)])
def test_idx_round_trip(tmp_path, suffix, shape):
    array = torch.randint(
        0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    path = tmp_path / f"a{suffix}"
    data.write_idx(path, array)
    torch.testing.assert_close(data.read_idx(path), array, rtol=0, atol=0)


def _raw_idx(tmp_path, array):
    path = tmp_path / "x-idx3-ubyte"
    data.write_idx(path, array)
    return path, path.read_bytes()


def test_truncated_file_names_file_and_fix(tmp_path):
    path, raw = _raw_idx(tmp_path, torch.zeros(4, 28, 28, dtype=torch.uint8))
    path.write_bytes(raw[:-10])
    with pytest.raises(DataError, match=r"x-idx3-ubyte.*truncated or corrupt.*--data.data-dir"):
        data.read_idx(path)


def test_trailing_garbage_is_rejected(tmp_path):
    path, raw = _raw_idx(tmp_path, torch.zeros(4, 28, 28, dtype=torch.uint8))
    path.write_bytes(raw + b"\x00")
    with pytest.raises(DataError, match="payload is 3137 bytes"):
        data.read_idx(path)


def test_bad_magic_is_rejected(tmp_path):
    path, raw = _raw_idx(tmp_path, torch.zeros(2, 3, dtype=torch.uint8))
    path.write_bytes(b"\x00\x00\x0d\x02" + raw[4:])  # element type 0x0D (float) is not ours
    with pytest.raises(DataError, match="not an unsigned-byte IDX file"):
        data.read_idx(path)


def test_corrupt_gzip_and_missing_file(tmp_path):
    bad = tmp_path / "y-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x05abcde")[:-6])
    with pytest.raises(DataError, match="y-idx1-ubyte.gz: cannot be read"):
        data.read_idx(bad)
    with pytest.raises(DataError, match="file not found.*apt-get install dataset-fashion-mnist"):
        data.read_idx(tmp_path / "missing.gz")


def test_data_dir_without_files_names_the_directory(tmp_path):
    with pytest.raises(DataError, match=rf"--data.data-dir {tmp_path}: does not contain"):
        data.locate(DataConfig(data_dir=tmp_path))
    with pytest.raises(DataError, match="no such directory"):
        data.locate(DataConfig(data_dir=tmp_path / "nope"))


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_mnist_loader_from_data_dir(tmp_path, layout):
    """MNIST comes through --data-dir (flat or torchvision's MNIST/raw layout), plain or gzipped."""
    folder = tmp_path if layout == "flat" else tmp_path / "MNIST" / "raw"
    write_fake_idx(folder, n_train=60, n_test=20, gz=layout == "flat")
    ds = data.load(DataConfig(dataset="mnist", data_dir=tmp_path))
    assert (len(ds.train), len(ds.val), len(ds.test)) == (50, 10, 20)
    assert ds.train.images.dtype == torch.uint8 and ds.train.images.shape[1:] == (28, 28)
    # the splits partition the training file: no image is in both train and val
    train_file = data.read_idx(ds.files["train_images"]).reshape(60, -1)
    both = torch.cat([ds.train.images, ds.val.images]).reshape(60, -1)
    assert sorted(map(bytes, both.numpy())) == sorted(map(bytes, train_file.numpy()))


def test_mismatched_labels_are_rejected(fake_data_dir):
    data.write_idx(fake_data_dir / "t10k-labels-idx1-ubyte.gz", torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(DataError, match="do not match labels"):
        data.load(DataConfig(data_dir=fake_data_dir))


def test_real_fashion_mnist_splits(fashion):
    """The real dataset: 50,000 / 10,000 / 10,000 images of 28×28 uint8, labels 0..9."""
    assert (len(fashion.train), len(fashion.val), len(fashion.test)) == (50_000, 10_000, 10_000)
    assert fashion.test.images.dtype == torch.uint8
    assert set(fashion.test.labels.unique().tolist()) == set(range(10))
    assert fashion.train.fixed_binary.max() == 1


def test_binarization_modes():
    images = torch.tensor([[[0, 255], [128, 64]]], dtype=torch.uint8)
    torch.manual_seed(0)
    draws = torch.stack([data.to_input(images, "dynamic") for _ in range(4000)])
    assert draws[:, 0, 0].sum() == 0 and draws[:, 0, 1].min() == 1  # p = 0 and p = 1 exactly
    # mean of 4000 draws of p = 128/255: standard error ≈ 0.0079, tolerance 5 SE
    assert abs(draws[:, 0, 2].mean().item() - 128 / 255) < 5 * (0.25 / 4000) ** 0.5
    expected = torch.tensor([[0.0, 1.0, 128 / 255, 64 / 255]])
    torch.testing.assert_close(data.to_input(images, "none"), expected)
    with pytest.raises(ValueError, match="unknown input mode"):
        data.to_input(images, "soft")


def test_batches_cover_every_image_once_in_seeded_order():
    source = torch.arange(103)
    first = torch.cat(list(data.batches(source, 10, torch.Generator().manual_seed(3))))
    again = torch.cat(list(data.batches(source, 10, torch.Generator().manual_seed(3))))
    assert sorted(first.tolist()) == list(range(103))
    assert first.tolist() == again.tolist() and first.tolist() != list(range(103))
    assert data.num_batches(103, 10) == 11
