"""Parquet image tables (``data.source=parquet``, made by ``mtl-ray data convert``) as one :class:`ClassPool` per
split.

Splits: a table with a ``split`` column (the converters of published benchmarks write one) is split as it says,
the published classes used as published; then ``data.val_fraction``/``data.test_fraction`` must stay 0 (a value
would silently mean nothing, so it is refused with the fix). A table without one is split by a deterministic
hash of the label (``data.val_fraction``, ``data.test_fraction``).
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from pathlib import Path

from mtl_ray.config import Config, DataConfig
from mtl_ray.data.base import IMAGE_KEYS, ClassPool, LoadedSource, SourceSpec
from mtl_ray.data.fetch import DataError, data_root, md5sum
from mtl_ray.data.imagetable import TABLE_SPLITS, ImageTable, hash_split, read_image_table


def resolve_table_path(d: DataConfig) -> Path:
    """``data.path`` as given, or relative to the data root when it is not found as given."""
    p = Path(d.path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    alt = data_root(d.root) / p
    return alt if alt.exists() else p


@lru_cache(maxsize=4)
def _read_table_cached(path: str, mtime_ns: int, size: int, image_size: int) -> ImageTable:
    table = read_image_table(path, image_size)
    md5s = dict(table.source_md5)
    md5s[Path(path).name] = md5sum(path)
    return dataclasses.replace(table, source_md5=md5s)


def load_source(cfg: Config) -> LoadedSource:
    """The table's classes per split; a missing file raises :class:`DataError` naming where it looked."""
    d = cfg.data
    path = resolve_table_path(d)
    if not path.is_file():
        raise DataError(f"data.path: got {d.path!r}, expected an existing Parquet image table (looked at "
                        f"{str(path)!r}); make one with `mtl-ray data convert IMAGE_DIR OUT.parquet` and point "
                        "data.path at it")
    st = path.stat()
    table = _read_table_cached(str(path.resolve()), st.st_mtime_ns, st.st_size, d.image_size)
    images, md5s = table.images, table.source_md5
    if table.splits:
        return _published_splits(cfg, path, table)
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


def _published_splits(cfg: Config, path: Path, table: ImageTable) -> LoadedSource:
    """The classes of a table with a ``split`` column, per that column (``all``: every class)."""
    d = cfg.data
    split_labels = {s: sorted(lab for lab, sp in table.splits.items() if sp == s) for s in TABLE_SPLITS}
    split_labels["all"] = sorted(table.images)
    pools = {s: ClassPool(names=tuple(labs), images=tuple(table.images[lab] for lab in labs))
             for s, labs in split_labels.items()}
    counts = ", ".join(f"{len(split_labels[s])} {s}" for s in TABLE_SPLITS)
    problems = []
    if d.val_fraction or d.test_fraction:
        problems.append(f"data.val_fraction/data.test_fraction: got {d.val_fraction}/{d.test_fraction}, expected 0/0 "
                        f"for {path.name}, whose 'split' column gives each class's split ({counts} classes, as "
                        "converted); remove data.val_fraction and data.test_fraction: the table's splits are used")

    def describe(split: str) -> str:
        what = "every class" if split == "all" else f"its 'split' column: {counts} classes"
        return f"classes in the {split!r} split of {path.name} ({what})"

    def fix(split: str) -> str:
        return f"lower data.ways (the {split!r} split of {path.name} is the one its 'split' column gives)"

    return LoadedSource(pools, table.source_md5, f"parquet:{path.name}", describe, fix, problems)


def _metadata(cfg: Config) -> tuple[int, int]:
    """(rows, channels) from the table's Parquet footer alone (no image is read); (0, 1) when there is no
    readable table (the data checks say why)."""
    import pyarrow.parquet as pq

    from mtl_ray.data.imagetable import META_ENCODING, META_SHAPE, RAW

    path = resolve_table_path(cfg.data)
    try:
        meta = pq.read_metadata(path)
        kv = meta.metadata or {}
        channels = int(kv[META_SHAPE].decode().split(",")[0]) if kv.get(META_ENCODING) == RAW else 1
        return meta.num_rows, channels
    except Exception:  # missing or unreadable: estimate an empty, one-channel table
        return 0, 1


def input_shape(cfg: Config) -> tuple[int, ...]:
    return (_metadata(cfg)[1], cfg.data.image_size, cfg.data.image_size)


def channel_stats(cfg: Config) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The table's recorded ``mtl_ray.channel_mean``/``channel_std`` from its footer (no image is read); ((), ())
    when it records none or cannot be read (the data checks say why)."""
    import pyarrow.parquet as pq

    from mtl_ray.data.imagetable import META_MEAN, META_STD, metadata_floats

    path = resolve_table_path(cfg.data)
    try:
        kv = pq.read_metadata(path).metadata or {}
        return metadata_floats(kv, META_MEAN, str(path)), metadata_floats(kv, META_STD, str(path))
    except Exception:  # missing, unreadable or malformed: loading the table reports it
        return (), ()


SOURCE = SourceSpec(kind="classification", images=True, load=load_source,
                    input_shape=input_shape, count_images=lambda cfg: _metadata(cfg)[0], channel_stats=channel_stats,
                    path="the Parquet file to read (make one with `mtl-ray data convert IMAGE_DIR OUT.parquet`)",
                    clear_cache=_read_table_cached.cache_clear,
                    config_keys=IMAGE_KEYS | {"root", "path", "val_fraction", "test_fraction"})
