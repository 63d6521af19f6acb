"""Labelled examples for supervised pretraining: every class of a split, some examples held out.

Pretraining classifies each image among *all* classes of the train split (with rotations as extra
classes when the pool has them). Which examples are held out, and every batch, are pure functions of
the seed (and the step), so a run gives the same batches on 1 or N workers and after a restart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mtl_ray.data.augment import AugmentParams, apply
from mtl_ray.data.base import ClassPool, task_rng, to_float_images
from mtl_ray.data.normalise import normalise


@dataclass(frozen=True)
class LabelledImages:
    """``x [N, C, H, W]`` uint8 images and ``y [N]`` int64 labels in ``[0, num_classes)``; batches are normalised
    with ``channel_mean``/``channel_std`` (the run's ``data.channel_mean``/``channel_std``; empty: none), as
    meta-training's tasks are."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    channel_mean: tuple[float, ...] = ()
    channel_std: tuple[float, ...] = ()

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def batch(self, indices: np.ndarray, *, device: torch.device | str = "cpu",
              augment: AugmentParams | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x [B, C, H, W] float, y [B] int64)`` for the given example indices, on ``device``: pixels in [0, 1],
        augmented with ``augment`` (one set of parameters per index, ``pretrain.augment``) there, then normalised."""
        dev = torch.device(device)
        if dev.type == "cpu":
            x = to_float_images(self.x[indices])
        else:  # copied as uint8 (a quarter of the bytes), made float on the device
            x = torch.from_numpy(np.ascontiguousarray(self.x[indices])).to(dev).float().div_(255.0)
        if augment is not None:
            x = apply(x, augment)
        x = normalise(x, self.channel_mean, self.channel_std, inplace=True)  # x is this call's own tensor
        return x, torch.from_numpy(self.y[indices]).long().to(dev)


def supervised_split(pool: ClassPool, holdout: int, seed: int, *, channel_mean: Sequence[float] = (),
                     channel_std: Sequence[float] = ()) -> tuple[LabelledImages, LabelledImages]:
    """All of ``pool``'s classes as (training, held-out) examples; ``holdout`` examples per class held out.

    Class ``c * rotations + r`` is base class ``c`` rotated by ``90° * r``; the held-out examples of
    a base class are held out in every rotation, so no training image is a rotated held-out one.
    """
    if pool.num_classes == 0:
        raise ValueError("supervised_split: the pool has no classes")
    parts: dict[bool, tuple[list[np.ndarray], list[np.ndarray]]] = {False: ([], []), True: ([], [])}
    for c, images in enumerate(pool.images):
        if holdout >= len(images):
            raise ValueError(f"pretrain.holdout: got {holdout}, expected < {len(images)} (the examples of class "
                             f"{pool.names[c]!r}); lower pretrain.holdout")
        order = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED, c])).permutation(len(images))
        for held, pick in ((True, order[:holdout]), (False, order[holdout:])):
            for r in range(pool.rotations):
                imgs = images[np.sort(pick)]
                parts[held][0].append(np.rot90(imgs, k=r, axes=(-2, -1)) if r else imgs)
                parts[held][1].append(np.full(len(pick), c * pool.rotations + r, dtype=np.int64))

    def stack(held: bool) -> LabelledImages:
        xs, ys = parts[held]  # one (possibly empty) array per class and rotation
        return LabelledImages(np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys), pool.num_classes,
                              tuple(channel_mean), tuple(channel_std))

    return stack(False), stack(True)


def batch_indices(seed: int, step: int, num_examples: int, batch_size: int) -> np.ndarray:
    """The global batch of ``step``: ``batch_size`` distinct example indices, a pure function of (seed, step).

    Data-parallel worker ``r`` of ``W`` takes ``indices[r::W]``.
    """
    return task_rng(seed, "train", step, 0).choice(num_examples, size=min(batch_size, num_examples), replace=False)
