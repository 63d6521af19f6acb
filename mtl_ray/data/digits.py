"""scikit-learn's bundled handwritten digits (UCI optdigits test set, 1797 images of 8x8, values 0..16)
as a small cross-domain *evaluation* source: 10 classes ("0".."9"), about 180 images each.

Images are scaled to uint8 0..255 (ink high, as in the project's convention), resized to
``data.image_size`` with Pillow BILINEAR, 1 channel, domain "digits". By default every split holds
all 10 classes (the source is meant for evaluating a model trained elsewhere); with
``data.val_fraction``/``data.test_fraction`` > 0 the classes are split by the same label hash as
Parquet tables (:func:`imagetable.hash_split`).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np
from PIL import Image

from mtl_ray.config import Config
from mtl_ray.data.base import IMAGE_KEYS, ClassPool, LoadedSource, SourceSpec
from mtl_ray.data.imagetable import hash_split

SOURCE_NAME = "sklearn.datasets.load_digits"
IMAGES = 1797


@lru_cache(maxsize=4)
def load_digits_images(image_size: int) -> tuple[dict[str, np.ndarray], str]:
    """``({"0".."9": [n, 1, S, S] uint8 (read-only)}, md5 of the 8x8 source pixels)``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    raw = np.asarray(bunch.images, dtype=np.float64)  # [1797, 8, 8] in 0..16
    target = np.asarray(bunch.target)
    md5 = hashlib.md5(np.ascontiguousarray(raw).tobytes() + np.ascontiguousarray(target).tobytes()).hexdigest()
    x8 = np.clip(np.rint(raw * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    if image_size != x8.shape[-1]:
        x = np.stack([np.asarray(Image.fromarray(im, mode="L").resize((image_size, image_size),
                                                                       Image.Resampling.BILINEAR))
                      for im in x8])
    else:
        x = x8
    x = x[:, None]  # [N, 1, S, S]
    images: dict[str, np.ndarray] = {}
    for digit in range(10):
        arr = np.ascontiguousarray(x[target == digit])
        arr.flags.writeable = False
        images[str(digit)] = arr
    return images, md5


def load_source(cfg: Config) -> LoadedSource:
    """The digits' classes per split (see the module docstring); md5s ``{"sklearn.datasets.load_digits": md5}``."""
    images, md5 = load_digits_images(cfg.data.image_size)
    d = cfg.data
    hashed = d.val_fraction > 0 or d.test_fraction > 0
    if hashed:
        split_labels = hash_split(images, d.val_fraction, d.test_fraction)
    else:
        everything = sorted(images)
        split_labels = {s: everything for s in ("train", "val", "test", "all")}
    pools = {s: ClassPool(names=tuple(labs), images=tuple(images[lab] for lab in labs))
             for s, labs in split_labels.items()}

    def describe(split: str) -> str:
        if hashed:
            return (f"classes in the {split!r} split of digits (val_fraction={d.val_fraction}, "
                    f"test_fraction={d.test_fraction})")
        return "classes in digits (every split holds all 10)"

    def fix(split: str) -> str:
        if hashed:
            return "lower data.ways or set data.val_fraction=0 and data.test_fraction=0 (all 10 digits per split)"
        return "lower data.ways (digits has 10 classes)"

    return LoadedSource(pools, {SOURCE_NAME: md5}, "digits", describe, fix)


SOURCE = SourceSpec(kind="classification", images=True, load=load_source, clear_cache=load_digits_images.cache_clear,
                    count_images=lambda cfg: IMAGES,
                    config_keys=IMAGE_KEYS | {"val_fraction", "test_fraction"})
