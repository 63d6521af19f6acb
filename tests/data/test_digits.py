"""digits: scikit-learn's bundled 8x8 digits as a 10-class evaluation source."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits

from mtl_ray.components import from_dict
from mtl_ray.data import build_task_source, check_data
from mtl_ray.data.digits import load_digits_images, load_source


def _cfg(**data: object):
    return from_dict({"data": {"source": "digits", "ways": 5, "shots": 1, "queries": 5, **data}})


def test_ten_classes_in_every_split_with_the_configured_size() -> None:
    loaded = load_source(_cfg(image_size=28))
    pools, md5s = loaded.splits, loaded.md5s
    assert list(md5s) == ["sklearn.datasets.load_digits"] and len(md5s["sklearn.datasets.load_digits"]) == 32
    for split in ("train", "val", "test", "all"):
        assert pools[split].names == tuple(str(d) for d in range(10))
        assert all(x.shape[1:] == (1, 28, 28) and x.dtype == np.uint8 for x in pools[split].images)
    sk = load_digits()
    assert sum(len(x) for x in pools["all"].images) == len(sk.target)
    assert len(pools["all"].images[3]) == int((sk.target == 3).sum())


def test_scaling_to_uint8_keeps_the_pixels() -> None:
    images, _ = load_digits_images(8)  # no resize: exactly x * 255 / 16
    sk = load_digits()
    want = np.rint(sk.images[sk.target == 7] * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(images["7"][:, 0], want)
    assert int(images["0"].max()) == 255 and int(images["0"].min()) == 0


def test_five_way_tasks_sample() -> None:
    src = build_task_source(_cfg(image_size=16))
    b = src.sample("test", 0, range(3))
    assert b.support_x.shape == (3, 5, 1, 16, 16) and b.query_x.shape == (3, 25, 1, 16, 16)
    assert torch.equal(torch.bincount(b.query_y[0], minlength=5), torch.full((5,), 5))
    assert float(b.query_x.min()) >= 0.0 and float(b.query_x.max()) <= 1.0


def test_hash_split_when_fractions_set() -> None:
    pools = load_source(_cfg(val_fraction=0.3, test_fraction=0.3)).splits
    names = [set(pools[s].names) for s in ("train", "val", "test")]
    assert set().union(*names) == {str(d) for d in range(10)} and sum(map(len, names)) == 10


def test_check_data_too_many_ways_once() -> None:
    problems = check_data(_cfg(ways=12))
    assert problems == ["data.ways: got 12, expected <= 10 (classes in digits (every split holds all 10)); "
                        "lower data.ways (digits has 10 classes)"]
