"""Parquet image tables (``data.source=parquet``, made by ``mtl-ray data convert``) as one :class:`ClassPool` per
split: classes split by a deterministic hash of the label (``data.val_fraction``, ``data.test_fraction``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from mtl_ray.config import Config, DataConfig
from mtl_ray.data.base import IMAGE_KEYS, ClassPool, LoadedSource, SourceSpec
from mtl_ray.data.fetch import DataError, data_root, md5sum
from mtl_ray.data.imagetable import hash_split, read_image_table


def resolve_table_path(d: DataConfig) -> Path:
    """``data.path`` as given, or relative to the data root when it is not found as given."""
    p = Path(d.path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    alt = data_root(d.root) / p
    return alt if alt.exists() else p


@lru_cache(maxsize=4)
def _read_table_cached(path: str, mtime_ns: int, size: int, image_size: int) -> tuple[
        dict[str, np.ndarray], dict[str, str], dict[str, str]]:
    table = read_image_table(path, image_size)
    md5s = dict(table.source_md5)
    md5s[Path(path).name] = md5sum(path)
    return table.images, table.domains, md5s


def load_source(cfg: Config) -> LoadedSource:
    """The table's classes per split; a missing file raises :class:`DataError` naming where it looked."""
    d = cfg.data
    path = resolve_table_path(d)
    if not path.is_file():
        raise DataError(f"data.path: got {d.path!r}, expected an existing Parquet image table (looked at "
                        f"{str(path)!r}); make one with `mtl-ray data convert IMAGE_DIR OUT.parquet` and point "
                        "data.path at it")
    st = path.stat()
    images, _domains, md5s = _read_table_cached(str(path.resolve()), st.st_mtime_ns, st.st_size, d.image_size)
    split_labels = hash_split(images, d.val_fraction, d.test_fraction)
    pools = {s: ClassPool(names=tuple(labs), images=tuple(images[lab] for lab in labs))
             for s, labs in split_labels.items()}

    def describe(split: str) -> str:
        frac = {"val": f"data.val_fraction={d.val_fraction}", "test": f"data.test_fraction={d.test_fraction}",
                "train": f"the rest after val_fraction={d.val_fraction}, test_fraction={d.test_fraction}",
                "all": "every class"}[split]
        return f"classes in the {split!r} split of {path.name} ({len(images)} classes, {frac})"

    def fix(split: str) -> str:
        if split == "train":
            return "lower data.ways or lower data.val_fraction/data.test_fraction"
        return f"lower data.ways or raise data.{split}_fraction (or add classes to the table)"

    return LoadedSource(pools, md5s, f"parquet:{path.name}", describe, fix)


SOURCE = SourceSpec(kind="classification", images=True, load=load_source,
                    path="the Parquet file to read (make one with `mtl-ray data convert IMAGE_DIR OUT.parquet`)",
                    clear_cache=_read_table_cached.cache_clear,
                    config_keys=IMAGE_KEYS | {"root", "path", "val_fraction", "test_fraction"})
