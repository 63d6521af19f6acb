"""Image augmentation for pretraining and for meta-training support sets: random resized crop, horizontal flip and
colour jitter, as the few-shot papers train (RandomResizedCrop + flip + ColorJitter(0.4, 0.4, 0.4): Chen et al.
2019, Tian et al. 2020 (RFS), Chen et al. 2021 (Meta-Baseline)), batched with kornia's functional ops on the
tensors' device.

Every parameter is drawn from a numpy generator seeded by coordinates, never from torch's global RNG, so an
augmented image is a pure function of where it sits: a support set's from its task ``(seed, split, step, index)``
(:func:`augment_rng`, a child of :func:`mtl_ray.data.base.task_rng`'s seed sequence: the task's episode is the
same with or without augmentation), a pretraining image's from ``(seed, step, position in the global batch)``
(:func:`pretrain_params`). Parameters are drawn per image on the CPU (a few numbers each), then applied to the
whole batch in one call per op; the ops are per-image (a bilinear crop-and-resize, a flip, per-image factors), so
an image comes out the same alone, in any batch, in any chunk and on any number of workers.

The ops, on float images ``[B, C, H, W]`` in [0, 1] (before the channel normalisation, which expects pixels):

- random resized crop (torchvision's RandomResizedCrop parameters: area ``U(0.08, 1)`` of the image, aspect ratio
  log-uniform in ``[3/4, 4/3]``, up to 10 tries, else the whole image), cropped and resized back to ``H x W`` with
  :func:`kornia.geometry.transform.crop_and_resize` (bilinear, corners aligned: the box's corner pixels land on
  the output's);
- horizontal flip with probability 1/2 (:func:`kornia.geometry.transform.hflip`);
- colour jitter: brightness (multiplicative, :func:`kornia.enhance.adjust_brightness_accumulative`), contrast
  (blend with the image's mean grey, :func:`kornia.enhance.adjust_contrast_with_mean_subtraction`) and saturation
  (blend with its greyscale, :func:`kornia.enhance.adjust_saturation_with_gray_subtraction`; RGB only), each
  factor ``U(0.6, 1.4)``, in that fixed order (torchvision shuffles the order per image), each clamped to [0, 1].

kornia is imported on first use: the served model and the Python API augment only when they fine-tune with
``algorithm.finetune_augment`` (mtl_ray/algorithms/finetune.py); otherwise they need not install it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mtl_ray.data.base import task_rng

CROP_SCALE = (0.08, 1.0)  # share of the image's area a crop covers (torchvision's RandomResizedCrop default)
CROP_RATIO = (3 / 4, 4 / 3)  # its aspect ratio, width / height
CROP_TRIES = 10
FLIP_P = 0.5
JITTER = 0.4  # brightness, contrast and saturation factors in [1 - JITTER, 1 + JITTER]
_PRETRAIN_STREAM = 0xA06  # tells pretraining's parameter stream from every other use of (seed, step)


@dataclass(frozen=True)
class AugmentParams:
    """Per-image parameters of ``B`` images: ``boxes [B, 4]`` (x0, y0, x1, y1: the crop's corner pixels,
    inclusive), ``flip [B]`` bool, ``brightness``/``contrast``/``saturation [B]`` factors (1: unchanged)."""

    boxes: np.ndarray
    flip: np.ndarray
    brightness: np.ndarray
    contrast: np.ndarray
    saturation: np.ndarray

    def __len__(self) -> int:
        return int(self.flip.shape[0])

    def __getitem__(self, idx: slice | np.ndarray) -> AugmentParams:
        return AugmentParams(self.boxes[idx], self.flip[idx], self.brightness[idx], self.contrast[idx],
                             self.saturation[idx])

    @staticmethod
    def cat(parts: Sequence[AugmentParams]) -> AugmentParams:
        return AugmentParams(*(np.concatenate([getattr(p, f) for p in parts])
                               for f in ("boxes", "flip", "brightness", "contrast", "saturation")))


def augment_rng(seed: int, split: str, step: int, index: int) -> np.random.Generator:
    """The augmentation stream of task ``(seed, split, step, index)``: the first child of its
    :func:`~mtl_ray.data.base.task_rng` seed sequence, independent of the stream that picks its episode."""
    seq = task_rng(seed, split, step, index).bit_generator.seed_seq
    assert isinstance(seq, np.random.SeedSequence)  # task_rng seeds from one
    return np.random.default_rng(seq.spawn(1)[0])


def draw(rng: np.random.Generator, n: int, height: int, width: int) -> AugmentParams:
    """Parameters of ``n`` images ``height x width``; always the same number of draws per image, so the stream
    does not depend on which crop tries were accepted."""
    area = height * width
    target = area * rng.uniform(*CROP_SCALE, size=(n, CROP_TRIES))
    aspect = np.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), size=(n, CROP_TRIES)))
    w = np.rint(np.sqrt(target * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w >= 2) & (w <= width) & (h >= 2) & (h <= height)  # >= 2: a box needs two distinct corners to resize
    first = np.argmax(fits, axis=1)
    rows = np.arange(n)
    ok = fits[rows, first]
    w = np.where(ok, w[rows, first], width)  # no try fits: the whole image (a square image has no better crop)
    h = np.where(ok, h[rows, first], height)
    u = rng.random((n, 2))
    y0 = np.floor(u[:, 0] * (height - h + 1)).astype(np.int64)
    x0 = np.floor(u[:, 1] * (width - w + 1)).astype(np.int64)
    boxes = np.stack([x0, y0, x0 + w - 1, y0 + h - 1], axis=1).astype(np.float64)
    flip = rng.random(n) < FLIP_P
    factors = rng.uniform(1 - JITTER, 1 + JITTER, size=(3, n))
    return AugmentParams(boxes, flip, factors[0], factors[1], factors[2])


def apply(x: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    """``x [B, C, H, W]`` float in [0, 1] -> augmented ``[B, C, H, W]`` in [0, 1], same dtype and device."""
    from kornia.enhance import (
        adjust_brightness_accumulative,
        adjust_contrast_with_mean_subtraction,
        adjust_saturation_with_gray_subtraction,
    )
    from kornia.geometry.transform import crop_and_resize, hflip

    b, c, height, width = x.shape
    if len(p) != b:
        raise ValueError(f"augment: got parameters for {len(p)} images, expected {b}")
    if b == 0:
        return x
    bx = torch.as_tensor(p.boxes, dtype=x.dtype, device=x.device)
    x0, y0, x1, y1 = bx.unbind(1)
    corners = torch.stack([torch.stack([x0, y0], 1), torch.stack([x1, y0], 1),
                           torch.stack([x1, y1], 1), torch.stack([x0, y1], 1)], 1)  # [B, 4, 2]: TL, TR, BR, BL
    out = crop_and_resize(x, corners, (height, width), mode="bilinear", align_corners=True)
    flip = torch.as_tensor(p.flip, device=x.device).reshape(b, 1, 1, 1)
    out = torch.where(flip, hflip(out), out)

    def factor(v: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(v, dtype=x.dtype, device=x.device)

    out = adjust_brightness_accumulative(out, factor(p.brightness))
    out = adjust_contrast_with_mean_subtraction(out, factor(p.contrast))
    if c == 3:
        out = adjust_saturation_with_gray_subtraction(out, factor(p.saturation))
    return out.contiguous()


class Augment:
    """``data.augment=support``: what :class:`mtl_ray.data.base.PoolTaskSource` calls on meta-training's support
    sets (see the module docstring)."""

    def support(self, x: torch.Tensor, seed: int, split: str, step: int, indices: Sequence[int]) -> torch.Tensor:
        """``x [T * S, C, H, W]``, task ``j``'s ``S`` support images at rows ``j*S .. j*S+S-1`` -> augmented, each
        task's images with parameters from :func:`augment_rng` of its coordinates."""
        t = len(indices)
        if t == 0:
            return x
        per_task = x.shape[0] // t
        h, w = int(x.shape[-2]), int(x.shape[-1])
        params = AugmentParams.cat([draw(augment_rng(seed, split, step, int(i)), per_task, h, w) for i in indices])
        return apply(x, params)


def pretrain_params(seed: int, step: int, batch_size: int, height: int, width: int) -> AugmentParams:
    """Parameters of pretraining step ``step``'s whole global batch (``batch_size`` images, in the order of
    :func:`mtl_ray.data.supervised.batch_indices`); worker ``r`` of ``W`` takes ``[r::W]``, as it takes the images,
    so an image's augmentation depends on the seed, the step and its place in the batch, not on the workers."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _PRETRAIN_STREAM, step]))
    return draw(rng, batch_size, height, width)


def build_augment(name: str) -> Augment | None:
    """``data.augment``'s augmentation (:data:`mtl_ray.config.DATA_AUGMENTS`): None for "" (off)."""
    return Augment() if name == "support" else None
