"""Pretraining examples: every class of the train split, disjoint held-out examples, deterministic batches."""

from __future__ import annotations

import numpy as np
import pytest

from mtl_ray.data import check_pretrain_data, load_source
from mtl_ray.data.base import ClassPool
from mtl_ray.data.supervised import batch_indices, supervised_split


def _pool(rotations: int = 1) -> ClassPool:
    # class c, example i: every pixel = 10 * c + i, with one marked corner so rotations are visible
    imgs = []
    for c in range(3):
        x = np.repeat((10 * c + np.arange(5, dtype=np.uint8))[:, None, None, None], 16, axis=2).reshape(5, 1, 4, 4)
        x = x.copy()
        x[:, :, 0, 0] = 255
        imgs.append(x)
    return ClassPool(names=("a", "b", "c"), images=tuple(imgs), rotations=rotations)


def test_held_out_examples_are_disjoint_and_every_rotation_is_a_class():
    train, held = supervised_split(_pool(rotations=4), holdout=2, seed=0)
    assert train.num_classes == held.num_classes == 12
    assert (len(train), len(held)) == (3 * 3 * 4, 3 * 2 * 4)
    assert set(np.unique(train.y)) == set(range(12)) == set(np.unique(held.y))
    for label in range(12):
        c, r = divmod(label, 4)
        for data in (train, held):
            x = data.x[data.y == label]
            assert np.all(x[:, 0, 1, 1] // 10 == c)  # every example of the label is from base class c
            corner = {0: (0, 0), 1: (3, 0), 2: (3, 3), 3: (0, 3)}[r]  # np.rot90 moves the marked corner
            assert np.all(x[:, 0, corner[0], corner[1]] == 255)
        kept = set(train.x[train.y == label][:, 0, 1, 1]) & set(held.x[held.y == label][:, 0, 1, 1])
        assert not kept  # no held-out example is also a training one
    again = supervised_split(_pool(rotations=4), holdout=2, seed=0)
    assert np.array_equal(again[1].x, held.x)
    other = supervised_split(_pool(rotations=4), holdout=2, seed=1)
    assert not np.array_equal(other[1].x, held.x)


def test_batches_depend_on_seed_and_step_only_and_shard_across_workers():
    a = batch_indices(0, 5, 100, 16)
    assert np.array_equal(a, batch_indices(0, 5, 100, 16)) and len(set(a.tolist())) == 16
    assert not np.array_equal(a, batch_indices(0, 6, 100, 16))
    shards = [a[r::4] for r in range(4)]
    assert sorted(np.concatenate(shards).tolist()) == sorted(a.tolist())


def test_too_large_a_holdout_is_rejected_with_the_fix():
    with pytest.raises(ValueError, match=r"pretrain.holdout: got 5, expected < 5"):
        supervised_split(_pool(), holdout=5, seed=0)


def test_pretrain_data_checks(omniglot_cfg):
    cfg = omniglot_cfg()
    assert check_pretrain_data(cfg) == []
    fewest = load_source(cfg).splits["train"].min_examples
    bad = cfg.replace(**{"pretrain.holdout": fewest})
    assert any(f"pretrain.holdout: got {fewest}, expected < {fewest}" in p for p in check_pretrain_data(bad))
    sine = cfg.replace(**{"data.source": "sinusoid", "model.name": "mlp"})
    assert "expected an image source" in check_pretrain_data(sine)[0]
