"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, arXiv:1708.07747) as a 10-class cross-domain *evaluation* source.

Files: the four IDX files ``<data root>/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` as
Zalando publishes them (github.com/zalandoresearch/fashion-mnist, ``data/fashion/``). Each is checked by the md5
of its *decompressed* bytes: repackagers (Debian's ``dataset-fashion-mnist``) recompress the gzips, so the
``.gz`` md5s differ while the content is Zalando's. A missing file is downloaded from upstream only when
``data.download`` is true (its upstream ``.gz`` md5 checked, :func:`mtl_ray.data.fetch.ensure_file`).

Images: the 60,000 training and 10,000 test images together (7,000 per class), 28x28 uint8, light objects on a
black background: already the project's ink-high convention (like Omniglot after inverting), so they are used
as they are; resized to ``data.image_size`` with Pillow BILINEAR (anti-aliased when shrinking), 1 channel.
Classes are the 10 clothing categories (:data:`CLASSES`). As a few-shot domain it supports 5-way tasks: by
default every split holds all 10 classes (the source is for evaluating a model trained elsewhere, e.g. on
Omniglot or glyphs); with ``data.val_fraction``/``data.test_fraction`` > 0 the classes are split by the same
label hash as Parquet tables (:func:`imagetable.hash_split`).
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from mtl_ray.config import Config, DataConfig
from mtl_ray.data.base import IMAGE_KEYS, ClassPool, LoadedSource, SourceSpec
from mtl_ray.data.fetch import DataError, data_root, ensure_file
from mtl_ray.data.imagetable import hash_split

URL_TEMPLATE = "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/{name}"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# md5 of each file's decompressed bytes (the same under any gzip recompression)
RAW_MD5: dict[str, str] = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
# md5 of the .gz files upstream publishes: what a download is checked against
UPSTREAM_GZ_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
PARTS = (("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))
IMAGES = 70_000
IDX_IMAGES, IDX_LABELS = 2051, 2049  # the IDX magic numbers (uint8 data, 3 and 1 dimensions)


def fashion_dir(cfg_root: str) -> Path:
    return data_root(cfg_root) / "fashion-mnist"


def _gz_path(cfg_root: str, name: str) -> Path:
    return fashion_dir(cfg_root) / f"{name}.gz"


def read_idx(path: Path, name: str) -> np.ndarray:
    """The array in one IDX ``.gz`` file, its decompressed bytes md5-checked: images ``[n, 28, 28]`` or labels
    ``[n]`` uint8. Raises :class:`DataError` naming the file and the fix."""
    url = URL_TEMPLATE.format(name=path.name)
    fix = f"delete it and re-download it from {url} (or delete it and set data.download=true)"
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a readable gzip file ({e.__class__.__name__}: {e}); expected Fashion-MNIST's "
                        f"{path.name}; {fix}") from e
    got = hashlib.md5(raw).hexdigest()
    if got != RAW_MD5[name]:
        raise DataError(f"{path}: md5 of the decompressed bytes got {got}, expected {RAW_MD5[name]} (Fashion-MNIST's "
                        f"{name}); the file is corrupt or a different version: {fix}")
    magic, n = struct.unpack_from(">II", raw, 0)  # the md5 matched: Zalando's layout, no need to distrust it
    if magic == IDX_IMAGES:
        rows, cols = struct.unpack_from(">II", raw, 8)
        return np.frombuffer(raw, np.uint8, offset=16).reshape(n, rows, cols)
    return np.frombuffer(raw, np.uint8, offset=8)


def ensure_files(data: DataConfig) -> dict[str, Path]:
    """``{name: .gz path}`` of the four files, downloading missing ones when ``data.download`` (every problem
    found together in one :class:`DataError`)."""
    paths: dict[str, Path] = {}
    errors: list[str] = []
    for name in RAW_MD5:
        path = _gz_path(data.root, name)
        if path.is_file():  # present: checked by its decompressed md5 (repackagers recompress the gzip)
            paths[name] = path
            continue
        try:
            paths[name] = ensure_file(path, UPSTREAM_GZ_MD5[path.name], URL_TEMPLATE.format(name=path.name),
                                      data.download)
        except DataError as e:
            errors.extend(e.problems)
    if errors:
        raise DataError("; ".join(errors), errors)
    return paths


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    if size == x.shape[-1]:
        return x
    return np.stack([np.asarray(Image.fromarray(im, mode="L").resize((size, size), Image.Resampling.BILINEAR))
                     for im in x])


@lru_cache(maxsize=4)
def _load(paths: tuple[tuple[str, str, int, int], ...], image_size: int) -> tuple[dict[str, np.ndarray],
                                                                                   dict[str, str]]:
    """Keyed by each file's (name, path, size, mtime): a replaced file is read again."""
    by_name = {name: Path(p) for name, p, _, _ in paths}
    xs, ys = [], []
    for images, labels in PARTS:
        xs.append(read_idx(by_name[images], images))
        ys.append(read_idx(by_name[labels], labels))
    x, y = _resize(np.concatenate(xs), image_size), np.concatenate(ys)
    out: dict[str, np.ndarray] = {}
    for k, cls in enumerate(CLASSES):
        arr = np.ascontiguousarray(x[y == k][:, None])  # [7000, 1, S, S]
        arr.flags.writeable = False
        out[cls] = arr
    return out, dict(RAW_MD5)


def load_fashion_images(data: DataConfig) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``({class: [7000, 1, S, S] uint8 (read-only)}, {file: md5 of its decompressed bytes})``."""
    paths = ensure_files(data)
    key = tuple((name, str(p), p.stat().st_size, p.stat().st_mtime_ns) for name, p in sorted(paths.items()))
    return _load(key, data.image_size)


def load_source(cfg: Config) -> LoadedSource:
    """Fashion-MNIST's classes per split (see the module docstring); missing or corrupt files raise
    :class:`DataError`."""
    d = cfg.data
    images, md5s = load_fashion_images(d)
    hashed = d.val_fraction > 0 or d.test_fraction > 0
    if hashed:
        split_labels = hash_split(images, d.val_fraction, d.test_fraction)
    else:
        split_labels = {s: list(CLASSES) for s in ("train", "val", "test", "all")}
    pools = {s: ClassPool(names=tuple(labs), images=tuple(images[lab] for lab in labs))
             for s, labs in split_labels.items()}

    def describe(split: str) -> str:
        if hashed:
            return (f"classes in the {split!r} split of fashion_mnist (val_fraction={d.val_fraction}, "
                    f"test_fraction={d.test_fraction})")
        return "classes in fashion_mnist (every split holds all 10)"

    def fix(split: str) -> str:
        if hashed:
            return ("lower data.ways or set data.val_fraction=0 and data.test_fraction=0 (all 10 classes per split)")
        return "lower data.ways (fashion_mnist has 10 classes)"

    return LoadedSource(pools, md5s, "fashion_mnist", describe, fix)


SOURCE = SourceSpec(kind="classification", images=True, load=load_source, clear_cache=_load.cache_clear,
                    count_images=lambda cfg: IMAGES,
                    config_keys=IMAGE_KEYS | {"root", "download", "val_fraction", "test_fraction"})
