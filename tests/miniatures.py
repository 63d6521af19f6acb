"""Miniatures of datasets that cannot be had here, written in their exact published layout (shared by tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def mini_imagenet_table(work: Path, size: int) -> Path:
    """A mini-ImageNet miniature (Ravi & Larochelle's ``{train,val,test}.csv`` + ``images/``: 5 classes a split, 16
    seeded JPEGs a class, each class its own colour), converted with ``mtl-ray data convert --format mini-imagenet``'s
    code into ``work/mini-imagenet.parquet`` (once)."""
    from mtl_ray.data.converters import convert

    src, out = work / "mini-imagenet", work / "mini-imagenet.parquet"
    if out.exists():
        return out
    (src / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for s, split in enumerate(("train", "val", "test")):
        rows = ["filename,label"]
        for c in range(5):
            synset = f"n{s:02d}{c:06d}"
            colour = rng.uniform(0, 255, 3)
            for i in range(16):
                pixels = np.clip(colour + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                name = f"{synset}{i + 1:08d}.jpg"
                Image.fromarray(pixels).save(src / "images" / name, quality=90)
                rows.append(f"{name},{synset}")
        (src / f"{split}.csv").write_text("\n".join(rows) + "\n")
    convert("mini-imagenet", src, out, image_size=size, workers=1)
    return out
