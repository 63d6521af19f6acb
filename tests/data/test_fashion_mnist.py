"""fashion_mnist: the real IDX files (Debian's recompressed gzips), md5 of their decompressed bytes, errors."""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mtl_ray.components import from_dict
from mtl_ray.config import Config
from mtl_ray.data import build_task_source, check_data, fashion_mnist
from mtl_ray.data.fetch import DataError, md5sum


def _cfg(root: Path, **data: Any) -> Config:
    return from_dict({"data": {"source": "fashion_mnist", "root": str(root), "ways": 5, "shots": 1, "queries": 5,
                               **data}})


def _copy_root(fashion_dir: Path, tmp_path: Path, replace: dict[str, bytes]) -> Path:
    """A data root whose fashion-mnist/ links the real files but for ``replace`` {file name: its bytes}."""
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for name in fashion_mnist.UPSTREAM_GZ_MD5:  # the four file names
        if name in replace:
            (folder / name).write_bytes(replace[name])
        else:
            os.symlink(fashion_dir / name, folder / name)
    return tmp_path


def test_seventy_thousand_images_of_ten_classes(fashion_dir: Path) -> None:
    loaded = fashion_mnist.load_source(_cfg(fashion_dir.parent))
    assert loaded.md5s == fashion_mnist.RAW_MD5
    for split in ("train", "val", "test", "all"):
        assert loaded.splits[split].names == fashion_mnist.CLASSES
    images = loaded.splits["all"].images
    assert [len(x) for x in images] == [7000] * 10 and sum(map(len, images)) == fashion_mnist.IMAGES
    assert all(x.shape[1:] == (1, 28, 28) and x.dtype == np.uint8 and not x.flags.writeable for x in images)
    # light objects on black: already ink high (the border is background, the centre is the object)
    x = np.concatenate(images)[:, 0].astype(np.float64)
    assert x[:, :, 0].mean() < 10 and x[:, :3, :3].mean() < 5 and x[:, 10:18, 10:18].mean() > 100
    # the Debian gzips differ from upstream's, the content does not
    assert md5sum(fashion_dir / "t10k-labels-idx1-ubyte.gz") != fashion_mnist.UPSTREAM_GZ_MD5[
        "t10k-labels-idx1-ubyte.gz"]


def test_labels_follow_the_idx_files(fashion_dir: Path) -> None:
    labels = fashion_mnist.read_idx(fashion_dir / "t10k-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte")
    images = fashion_mnist.read_idx(fashion_dir / "t10k-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte")
    assert labels.shape == (10000,) and images.shape == (10000, 28, 28) and np.bincount(labels).tolist() == [1000] * 10
    pool = fashion_mnist.load_source(_cfg(fashion_dir.parent)).splits["all"]
    # class k holds the training images labelled k, then the test images labelled k, in file order
    assert np.array_equal(pool.images[9][6000:, 0], images[labels == 9])


def test_resized_to_the_image_size(fashion_dir: Path) -> None:
    pool = fashion_mnist.load_source(_cfg(fashion_dir.parent, image_size=32)).splits["test"]
    assert all(x.shape == (7000, 1, 32, 32) for x in pool.images)


def test_a_corrupt_file_names_its_md5_and_nothing_loads(fashion_dir: Path, tmp_path: Path) -> None:
    raw = bytearray(gzip.decompress((fashion_dir / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    raw[100] = (raw[100] + 1) % 10  # one label changed: a valid gzip of the wrong content
    root = _copy_root(fashion_dir, tmp_path, {"t10k-labels-idx1-ubyte.gz": gzip.compress(bytes(raw))})
    with pytest.raises(DataError) as e:
        fashion_mnist.load_source(_cfg(root))
    msg = str(e.value)
    assert "t10k-labels-idx1-ubyte.gz: md5 of the decompressed bytes got" in msg
    assert "expected 15d484375f8d13e6eb1aabb0c3f46965" in msg and "data.download=true" in msg
    assert check_data(_cfg(root)) == [msg]


def test_a_file_that_is_no_gzip(fashion_dir: Path, tmp_path: Path) -> None:
    root = _copy_root(fashion_dir, tmp_path, {"train-labels-idx1-ubyte.gz": b"not a gzip file"})
    with pytest.raises(DataError, match=re.escape("train-labels-idx1-ubyte.gz: not a readable gzip file")):
        fashion_mnist.load_source(_cfg(root))


def test_missing_files_name_the_download(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        fashion_mnist.load_source(_cfg(tmp_path))
    assert len(e.value.problems) == 4
    assert all("data.download=true" in p and "zalandoresearch/fashion-mnist" in p for p in e.value.problems)


def test_five_way_tasks_and_too_many_ways(fashion_dir: Path) -> None:
    src = build_task_source(_cfg(fashion_dir.parent))
    b = src.sample("test", 0, range(4))
    assert b.support_x.shape == (4, 5, 1, 28, 28) and b.query_x.shape == (4, 25, 1, 28, 28)
    assert torch.equal(torch.bincount(b.query_y[0], minlength=5), torch.full((5,), 5))
    assert check_data(_cfg(fashion_dir.parent, ways=12)) == [
        "data.ways: got 12, expected <= 10 (classes in fashion_mnist (every split holds all 10)); lower data.ways "
        "(fashion_mnist has 10 classes)"]


def test_hash_split_when_fractions_set(fashion_dir: Path) -> None:
    pools = fashion_mnist.load_source(_cfg(fashion_dir.parent, val_fraction=0.3, test_fraction=0.3)).splits
    names = [set(pools[s].names) for s in ("train", "val", "test")]
    assert set().union(*names) == set(fashion_mnist.CLASSES) and sum(map(len, names)) == 10
