"""The task sources a config may name (``data.source``): one line each, name -> :class:`SourceSpec`.

Adding a source: its module (a ``SOURCE = SourceSpec(...)`` with its loader and capabilities), its test and one
line in :data:`SOURCES`. The config checks (:mod:`mtl_ray.components`), the data checks and
:func:`build_task_source` read everything else from the spec.
"""

from __future__ import annotations

from mtl_ray.config import Config
from mtl_ray.data import digits, fashion_mnist, glyphs, multidomain, omniglot, parquet, sinusoid
from mtl_ray.data.augment import build_augment
from mtl_ray.data.base import LoadedSource, PoolTaskSource, SourceSpec, TaskSource
from mtl_ray.data.fetch import DataError
from mtl_ray.data.normalise import IDENTITY, stats_problems

SOURCES: dict[str, SourceSpec] = {
    "omniglot": omniglot.SOURCE,
    "sinusoid": sinusoid.SOURCE,
    "parquet": parquet.SOURCE,
    "digits": digits.SOURCE,
    "glyphs": glyphs.SOURCE,
    "fashion_mnist": fashion_mnist.SOURCE,
    "multidomain": multidomain.SOURCE,
}


def source_spec(cfg: Config) -> SourceSpec:
    """The spec of ``cfg.data.source`` (:class:`DataError` naming the known ones when there is none)."""
    spec = SOURCES.get(cfg.data.source)
    if spec is None:
        raise DataError(f"data.source: got {cfg.data.source!r}, expected one of: {', '.join(SOURCES)}")
    return spec


def is_regression(cfg: Config) -> bool:
    """Whether ``cfg.data.source`` makes regression tasks (an unknown source: False; the config check names it)."""
    spec = SOURCES.get(cfg.data.source)
    return spec is not None and spec.kind == "regression"


def image_sources() -> list[str]:
    """The sources with classes per split (what pretraining and the data checks need)."""
    return [name for name, spec in SOURCES.items() if spec.load is not None]


def load_source(cfg: Config) -> LoadedSource:
    """The classes per split of an image source (``cfg.data.source`` one of :func:`image_sources`)."""
    spec = source_spec(cfg)
    if spec.load is None:
        raise DataError(f"data.source: got {cfg.data.source!r}, expected one of {', '.join(image_sources())} "
                        "for classes per split")
    return spec.load(cfg)


def build_task_source(cfg: Config) -> TaskSource:
    """The :class:`TaskSource` for ``cfg.data`` (raises :class:`DataError` when the data is unusable)."""
    spec = source_spec(cfg)
    if spec.build is not None:
        return spec.build(cfg)
    loaded = load_source(cfg)
    if loaded.problems:
        raise DataError("; ".join(loaded.problems), loaded.problems)
    d = cfg.data
    mean, std = channel_stats(cfg)
    channels = next(p.images[0].shape[1] for p in loaded.splits.values() if p.images)
    if problems := stats_problems(mean, std, channels, "data.channel_mean/data.channel_std"):
        raise DataError("; ".join(problems), problems)
    return PoolTaskSource(loaded.splits, seed=cfg.seed, ways=d.ways, shots=d.shots, queries=d.queries,
                          md5s=loaded.md5s, name=loaded.name, channel_mean=mean, channel_std=std,
                          augment=build_augment(d.augment))


def channel_stats(cfg: Config) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel (mean, std) inputs are normalised with: ``data.channel_mean``/``data.channel_std`` when set,
    else what the source's data records (a converted table's), else the identity ``((0.0,), (1.0,))``."""
    d = cfg.data
    if d.channel_mean or d.channel_std:
        return tuple(d.channel_mean), tuple(d.channel_std)
    spec = SOURCES.get(d.source)
    mean, std = spec.channel_stats(cfg) if spec is not None else ((), ())
    return (mean, std) if mean and std else IDENTITY


def with_channel_stats(cfg: Config) -> Config:
    """``cfg`` with the normalisation it will train with written into ``data.channel_mean``/``data.channel_std``
    (:func:`channel_stats`), so config.yaml and every checkpoint carry it and evaluation, the Python API and the
    served model apply the same numbers without the table (``[0.0]``/``[1.0]``: none). Sources that generate their
    tasks (no classes to normalise) keep them empty."""
    spec = SOURCES.get(cfg.data.source)
    if spec is None or spec.load is None:
        return cfg
    mean, std = channel_stats(cfg)
    if (tuple(cfg.data.channel_mean), tuple(cfg.data.channel_std)) == (mean, std):
        return cfg
    return cfg.replace(**{"data.channel_mean": mean, "data.channel_std": std})


def clear_caches() -> None:
    """Forget every source decoded or read in this process (on-disk caches stay)."""
    for spec in SOURCES.values():
        spec.clear_cache()
