"""Task sources: what a config's ``data`` section turns into, and the data-dependent config checks.

``build_task_source(cfg)`` dispatches on ``cfg.data.source``:
  sinusoid -> :class:`SinusoidTaskSource`;
  omniglot / parquet / digits -> :class:`PoolTaskSource` over per-split :class:`ClassPool` s.
``check_data(cfg)`` lists every problem that needs the data to see (too many ways for a split, too
few examples per class, unknown alphabets, missing or corrupt files), each naming the value got,
the value expected and the fix. Decoded sources are cached per process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from mtl_ray.config import Config, DataConfig
from mtl_ray.data import digits, omniglot
from mtl_ray.data.base import SPLITS, ClassPool, PoolTaskSource, TaskBatch, TaskSource, stable_fraction, task_rng
from mtl_ray.data.fetch import DataError, data_root, md5sum
from mtl_ray.data.imagetable import hash_split, read_pools
from mtl_ray.data.sinusoid import SinusoidTaskSource

__all__ = [
    "SPLITS",
    "ClassPool",
    "DataError",
    "PoolTaskSource",
    "SinusoidTaskSource",
    "TaskBatch",
    "TaskSource",
    "build_task_source",
    "check_data",
    "check_pretrain_data",
    "clear_caches",
    "load_pools",
    "stable_fraction",
    "task_rng",
]


@dataclass
class LoadedPools:
    """Per-split pools of an image source plus what check messages need to explain them."""

    pools: dict[str, ClassPool]
    md5s: dict[str, str]
    name: str
    describe: Callable[[str], str]  # split -> "classes in the 'val' split of ...: ..."
    fix: Callable[[str], str]  # split -> how to get more classes into that split
    problems: list[str] = field(default_factory=list)  # problems found while loading (e.g. unknown alphabets)


# --------------------------------------------------------------------------- per-source loading


def _load_omniglot(cfg: Config) -> LoadedPools:
    d = cfg.data
    table = omniglot.load_omniglot_table(d)
    alphabets = omniglot.alphabets_of(table.domains)
    by_split = omniglot.split_alphabets(d, alphabets)
    pools = omniglot.make_pools(table, d)

    def describe(split: str) -> str:
        alphas = ", ".join(by_split[split]) or "none"
        rot = f", x{pools[split].rotations} rotations" if pools[split].rotations > 1 else ""
        return f"classes in the {split!r} split of omniglot: alphabets {alphas}{rot}"

    def fix(split: str) -> str:
        if split == "train":
            return "lower data.ways or move alphabets out of data.val_alphabets/data.test_alphabets"
        return f"lower data.ways or move alphabets into that split (data.{split}_alphabets)"

    return LoadedPools(pools, dict(table.md5s), "omniglot", describe, fix,
                       omniglot.alphabet_problems(d, alphabets))


def _resolve_table_path(d: DataConfig) -> Path:
    """``data.path`` as given, or relative to the data root when it is not found as given."""
    p = Path(d.path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    alt = data_root(d.root) / p
    return alt if alt.exists() else p


@lru_cache(maxsize=4)
def _read_table_cached(path: str, mtime_ns: int, size: int, image_size: int) -> tuple[
        dict[str, np.ndarray], dict[str, str], dict[str, str]]:
    table = read_pools(path, image_size)
    md5s = dict(table.source_md5)
    md5s[Path(path).name] = md5sum(path)
    return table.images, table.domains, md5s


def _load_parquet(cfg: Config) -> LoadedPools:
    d = cfg.data
    path = _resolve_table_path(d)
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

    return LoadedPools(pools, md5s, f"parquet:{path.name}", describe, fix)


def _load_digits(cfg: Config) -> LoadedPools:
    pools, md5s = digits.load_digits_pools(cfg)
    d = cfg.data
    hashed = d.val_fraction > 0 or d.test_fraction > 0

    def describe(split: str) -> str:
        if hashed:
            return (f"classes in the {split!r} split of digits (val_fraction={d.val_fraction}, "
                    f"test_fraction={d.test_fraction})")
        return "classes in digits (every split holds all 10)"

    def fix(split: str) -> str:
        if hashed:
            return "lower data.ways or set data.val_fraction=0 and data.test_fraction=0 (all 10 digits per split)"
        return "lower data.ways (digits has 10 classes)"

    return LoadedPools(pools, md5s, "digits", describe, fix)


_LOADERS: dict[str, Callable[[Config], LoadedPools]] = {
    "omniglot": _load_omniglot,
    "parquet": _load_parquet,
    "digits": _load_digits,
}


def load_pools(cfg: Config) -> LoadedPools:
    """Per-split class pools of an image source (``cfg.data.source`` omniglot, parquet or digits)."""
    loader = _LOADERS.get(cfg.data.source)
    if loader is None:
        raise DataError(f"data.source: got {cfg.data.source!r}, expected one of {', '.join(_LOADERS)} for "
                        "image pools")
    return loader(cfg)


# --------------------------------------------------------------------------- public API


def build_task_source(cfg: Config) -> TaskSource:
    """The :class:`TaskSource` for ``cfg.data`` (raises :class:`DataError` when the data is unusable)."""
    d = cfg.data
    if d.source == "sinusoid":
        return SinusoidTaskSource(seed=cfg.seed, shots=d.shots, queries=d.queries)
    loaded = load_pools(cfg)
    if loaded.problems:
        raise DataError("; ".join(loaded.problems), loaded.problems)
    return PoolTaskSource(loaded.pools, seed=cfg.seed, ways=d.ways, shots=d.shots, queries=d.queries,
                          md5s=loaded.md5s, name=loaded.name)


def splits_used(cfg: Config) -> list[str]:
    """Splits a training run samples from: train, and val when ``optim.val_every > 0``.

    The test split is checked when it is used (``mtl-ray eval``), so a run may leave it empty on
    purpose, e.g. when it is scored on Lake's runs instead.
    """
    return ["train", *(["val"] if cfg.optim.val_every > 0 else [])]


def check_data(cfg: Config, splits: Sequence[str] | None = None) -> list[str]:
    """Data-dependent problems of ``splits`` (default: those training uses); empty when fine.

    Missing or corrupt files come back as messages too.
    """
    d = cfg.data
    splits = splits_used(cfg) if splits is None else list(splits)
    if d.source == "sinusoid":
        return []
    try:
        loaded = load_pools(cfg)
    except DataError as e:
        return list(e.problems)
    problems = list(loaded.problems)
    fewest: tuple[int, str, str] | None = None  # (examples, split, class)
    for split in splits:
        pool = loaded.pools[split]
        n = pool.num_classes
        if n == 0:
            problems.append(f"split {split!r}: got 0 classes, expected >= data.ways={d.ways} "
                            f"({loaded.describe(split)}); {loaded.fix(split)}")
            continue
        if d.ways > n:
            problems.append(f"data.ways: got {d.ways}, expected <= {n} ({loaded.describe(split)}); "
                            f"{loaded.fix(split)}")
        counts = [len(x) for x in pool.images]
        i = int(np.argmin(counts))
        if fewest is None or counts[i] < fewest[0]:
            fewest = (counts[i], split, pool.names[i])
    need = d.shots + d.queries
    if fewest is not None and need > fewest[0]:
        m, split, name = fewest
        uniform = all(len(x) == m for s in splits for x in loaded.pools[s].images)
        where = (f"examples per class in {loaded.name}" if uniform
                 else f"examples per class in {loaded.name}: class {name!r} of the {split!r} split has {m}")
        problems.append(f"data.shots + data.queries: got {need} ({d.shots} + {d.queries}), expected <= {m} "
                        f"({where}); lower data.shots or data.queries")
    return list(dict.fromkeys(problems))  # splits sharing one pool (digits) give identical messages once


def check_pretrain_data(cfg: Config) -> list[str]:
    """Why ``cfg`` cannot be pretrained on (empty when it can): it needs an image source whose train split
    has two or more classes, each with more than ``pretrain.holdout`` examples."""
    if cfg.data.source == "sinusoid":
        return [f"data.source: got {cfg.data.source!r}, expected an image source (omniglot, parquet, digits); "
                "pretraining classifies the train split's images among all its classes"]
    try:
        loaded = load_pools(cfg)
    except DataError as e:
        return list(e.problems)
    problems = list(loaded.problems)
    pool = loaded.pools["train"]
    if pool.num_classes < 2:
        problems.append(f"split 'train': got {pool.num_classes} classes, expected >= 2 to pretrain a classifier "
                        f"({loaded.describe('train')}); {loaded.fix('train')}")
    elif cfg.pretrain.holdout >= pool.min_examples:
        problems.append(f"pretrain.holdout: got {cfg.pretrain.holdout}, expected < {pool.min_examples} (the fewest "
                        "examples of a train class); lower pretrain.holdout")
    return problems


def clear_caches() -> None:
    """Forget every source decoded or read in this process (on-disk caches stay)."""
    omniglot.clear_cache()
    digits.load_digits_images.cache_clear()
    _read_table_cached.cache_clear()
