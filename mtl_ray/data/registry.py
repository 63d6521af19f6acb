"""The task sources a config may name (``data.source``): one line each, name -> :class:`SourceSpec`.

Adding a source: its module (a ``SOURCE = SourceSpec(...)`` with its loader and capabilities), its test and one
line in :data:`SOURCES`. The config checks (:mod:`mtl_ray.components`), the data checks and
:func:`build_task_source` read everything else from the spec.
"""

from __future__ import annotations

from mtl_ray.config import Config
from mtl_ray.data import digits, omniglot, parquet, sinusoid
from mtl_ray.data.base import LoadedSource, PoolTaskSource, SourceSpec, TaskSource
from mtl_ray.data.fetch import DataError

SOURCES: dict[str, SourceSpec] = {
    "omniglot": omniglot.SOURCE,
    "sinusoid": sinusoid.SOURCE,
    "parquet": parquet.SOURCE,
    "digits": digits.SOURCE,
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
    return PoolTaskSource(loaded.splits, seed=cfg.seed, ways=d.ways, shots=d.shots, queries=d.queries,
                          md5s=loaded.md5s, name=loaded.name)


def clear_caches() -> None:
    """Forget every source decoded or read in this process (on-disk caches stay)."""
    for spec in SOURCES.values():
        spec.clear_cache()
