"""Augmentation (mtl_ray/data/augment.py): each op equals a hand computation on a small tensor; a task's augmented
support set is a pure function of (seed, split, step, index), the same alone, in a batch or in chunks; it changes
the images and keeps their shape, dtype and range; pretraining's parameters do not depend on the workers; only
meta-training's support sets are augmented."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtl_ray.components import from_dict
from mtl_ray.config import ConfigError
from mtl_ray.data import build_task_source
from mtl_ray.data.augment import CROP_SCALE, Augment, AugmentParams, apply, augment_rng, draw, pretrain_params
from mtl_ray.data.base import ClassPool, PoolTaskSource, task_rng
from mtl_ray.data.supervised import supervised_split
from mtl_ray.distributed.worker import ShardWorker


def _params(n: int, box=(0, 0, 4, 4), flip=False, b=1.0, c=1.0, s=1.0) -> AugmentParams:
    return AugmentParams(np.tile(np.array(box, np.float64), (n, 1)), np.full(n, flip), np.full(n, b), np.full(n, c),
                         np.full(n, s))


def _bilinear(img: np.ndarray, y: float, x: float) -> float:
    y0, x0 = int(np.floor(y)), int(np.floor(x))
    y1, x1 = min(y0 + 1, img.shape[0] - 1), min(x0 + 1, img.shape[1] - 1)
    dy, dx = y - y0, x - x0
    return ((1 - dy) * (1 - dx) * img[y0, x0] + (1 - dy) * dx * img[y0, x1] + dy * (1 - dx) * img[y1, x0]
            + dy * dx * img[y1, x1])


def test_each_op_equals_a_hand_computation():
    x = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(apply(x, _params(2)), x)  # the whole image, no flip, factors 1: unchanged
    assert torch.allclose(apply(x, _params(2, flip=True)), x.flip(-1), atol=1e-12)
    # crop the top-left 3x3 (corner pixels 0..2) back to 5x5: output (i, j) samples the input at (i/2, j/2)
    out = apply(x, _params(2, box=(0, 0, 2, 2))).numpy()
    want = np.array([[[[_bilinear(x[n, ch].numpy(), i / 2, j / 2) for j in range(5)] for i in range(5)]
                      for ch in range(3)] for n in range(2)])
    assert np.allclose(out, want, atol=1e-12)
    # an offset crop: columns 2..4, rows 1..3
    out = apply(x, _params(2, box=(2, 1, 4, 3))).numpy()
    assert np.allclose(out[:, :, 0, 0], x[:, :, 1, 2].numpy()) and np.allclose(out[:, :, 4, 4], x[:, :, 3, 4].numpy())
    assert np.allclose(out[:, :, 2, 1], x[:, :, 2, 2:4].numpy().mean(-1))  # (2, 2.5): between columns 2 and 3
    # colour: brightness multiplies, contrast blends with the mean grey, saturation with the greyscale
    assert torch.allclose(apply(x, _params(2, b=0.5)), x * 0.5, atol=1e-12)
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    mean = grey.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(apply(x, _params(2, c=0.7)), (0.7 * x + 0.3 * mean).clamp(0, 1), atol=1e-6)
    assert torch.allclose(apply(x, _params(2, s=0.2)), (0.2 * x + 0.8 * grey).clamp(0, 1), atol=1e-6)
    assert torch.equal(apply(x, _params(2, b=3.0)), (x * 3).clamp(0, 1))  # clamped to the pixel range
    gray = x[:, :1]
    assert torch.equal(apply(gray, _params(2, s=0.0)), gray)  # saturation leaves a 1-channel image alone


def test_drawn_crops_are_torchvisions_random_resized_crops():
    p = draw(np.random.default_rng(0), 4000, 84, 84)
    w = p.boxes[:, 2] - p.boxes[:, 0] + 1
    h = p.boxes[:, 3] - p.boxes[:, 1] + 1
    assert (p.boxes[:, :2] >= 0).all() and (p.boxes[:, 2] <= 83).all() and (p.boxes[:, 3] <= 83).all()
    area = w * h / 84 ** 2
    assert area.min() >= CROP_SCALE[0] * 0.9 and area.max() <= 1.0
    assert 0.45 < p.flip.mean() < 0.55 and p.brightness.min() >= 0.6 and p.saturation.max() <= 1.4
    tiny = draw(np.random.default_rng(0), 50, 2, 2)  # no try fits a 2x2 image but the whole one
    assert (tiny.boxes == [0, 0, 1, 1]).all()


def _source(seed: int = 3) -> PoolTaskSource:
    rng = np.random.default_rng(0)
    pools = {s: ClassPool(names=tuple(f"{s}{c}" for c in range(4)),
                          images=tuple(rng.integers(0, 256, (6, 3, 16, 16), dtype=np.uint8) for _ in range(4)))
             for s in ("train", "val", "test", "all")}
    return PoolTaskSource(pools, seed=seed, ways=3, shots=2, queries=2, channel_mean=(0.4, 0.5, 0.6),
                          channel_std=(0.2, 0.25, 0.3), augment=Augment())


def test_a_tasks_augmentation_is_the_same_alone_in_a_batch_and_in_chunks():
    src = _source()
    whole = src.sample("train", 7, range(6), augment=True)
    alone = [src.sample("train", 7, [i], augment=True) for i in range(6)]
    chunks = [src.sample("train", 7, range(0, 2), augment=True), src.sample("train", 7, range(2, 6), augment=True)]
    for parts in (alone, chunks):
        assert torch.equal(torch.cat([b.support_x for b in parts]), whole.support_x)
        assert torch.equal(torch.cat([b.query_x for b in parts]), whole.query_x)
    again = _source().sample("train", 7, range(6), augment=True)
    assert torch.equal(again.support_x, whole.support_x)  # a fresh source (another worker): the same bits
    other = _source(seed=4).sample("train", 7, range(6), augment=True)
    assert not torch.equal(other.support_x, whole.support_x)


def test_augmentation_changes_only_the_support_images_and_keeps_shape_dtype_range():
    src = _source()
    plain = src.sample("train", 1, range(4))
    aug = src.sample("train", 1, range(4), augment=True)
    assert aug.support_x.shape == plain.support_x.shape and aug.support_x.dtype == torch.float32
    assert torch.equal(aug.support_y, plain.support_y) and torch.equal(aug.query_x, plain.query_x)  # same episode
    per_image = (aug.support_x - plain.support_x).abs().flatten(2).amax(-1)
    assert (per_image > 0.05).all()  # every support image changed
    m = torch.tensor((0.4, 0.5, 0.6)).reshape(3, 1, 1)
    s = torch.tensor((0.2, 0.25, 0.3)).reshape(3, 1, 1)
    pixels = aug.support_x * s + m  # undo the normalisation that follows the augmentation
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    assert torch.equal(src.sample("val", 1, range(4), augment=False).support_x,
                       PoolTaskSource(src.pools, seed=3, ways=3, shots=2, queries=2, channel_mean=(0.4, 0.5, 0.6),
                                      channel_std=(0.2, 0.25, 0.3)).sample("val", 1, range(4)).support_x)


def test_augment_stream_is_the_tasks_own_and_independent_of_its_episode():
    a, b = augment_rng(0, "train", 5, 2).random(4), augment_rng(0, "train", 5, 2).random(4)
    assert np.array_equal(a, b) and not np.array_equal(a, augment_rng(0, "train", 5, 3).random(4))
    assert not np.array_equal(a, task_rng(0, "train", 5, 2).random(4))


def test_pretraining_parameters_do_not_depend_on_the_workers():
    whole = pretrain_params(1, 9, 12, 16, 16)
    for world in (1, 2, 3):
        parts = [pretrain_params(1, 9, 12, 16, 16)[r::world] for r in range(world)]
        order = np.concatenate([np.arange(12)[r::world] for r in range(world)])
        assert np.array_equal(AugmentParams.cat(parts).boxes, whole.boxes[order])
    pool = _source().pools["train"]
    train, _ = supervised_split(pool, holdout=1, seed=0, channel_mean=(0.5,), channel_std=(0.25,))
    idx = np.arange(12)
    x, _ = train.batch(idx, augment=whole)
    x2, _ = train.batch(idx[::2], augment=whole[::2])
    assert torch.equal(x[::2], x2)
    plain, _ = train.batch(idx)
    assert not torch.equal(x, plain) and torch.equal(plain, (torch.from_numpy(train.x[idx]).float() / 255 - 0.5) / 0.25)


def test_only_meta_trainings_support_sets_are_augmented():
    cfg = from_dict({"data": {"source": "digits", "image_size": 8, "ways": 3, "shots": 1, "queries": 2,
                              "augment": "support"}, "model": {"channels": 4, "blocks": 2},
                     "algorithm": {"name": "protonet"}})
    worker = ShardWorker(cfg)
    train_aug = worker._sample("train", 0, [0, 1], augment=True)
    plain = build_task_source(cfg.replace(**{"data.augment": ""})).sample("train", 0, [0, 1])
    assert not torch.equal(train_aug.support_x, plain.support_x) and torch.equal(train_aug.query_x, plain.query_x)
    assert torch.equal(worker._sample("val", 0, [0, 1]).support_x,
                       build_task_source(cfg.replace(**{"data.augment": ""})).sample("val", 0, [0, 1]).support_x)


def test_config_refuses_what_it_cannot_augment():
    with pytest.raises(ConfigError, match=r"data.augment: got 'crop', expected 'support'"):
        from_dict({"data": {"augment": "crop"}})
    with pytest.raises(ConfigError, match=r"with data.source=sinusoid, expected ''/\[\]/\[\]"):
        from_dict({"data": {"source": "sinusoid", "augment": "support"}, "model": {"name": "mlp"}})
