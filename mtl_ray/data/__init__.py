"""Task sources: what a config's ``data`` section turns into, and the data-dependent config checks.

``build_task_source(cfg)`` builds the source :data:`~mtl_ray.data.registry.SOURCES` names for
``cfg.data.source``: a :class:`SinusoidTaskSource`, or a :class:`PoolTaskSource` over an image source's
:class:`ClassPool` per split (Omniglot, Parquet tables, digits). ``check_data(cfg)``
(:mod:`mtl_ray.data.checks`) lists every problem that needs the data to see. Decoded sources are cached per process.

Words: a *pool* (:class:`ClassPool`) is the classes of one split; a *source* is what ``data.source`` names
(:class:`SourceSpec` in the registry, :class:`LoadedSource` once its classes are read, :class:`TaskSource`
when it samples tasks); an *image table* is a Parquet file of labelled images (:mod:`mtl_ray.data.imagetable`).
"""

from __future__ import annotations

from mtl_ray.data.base import (
    SPLITS,
    ClassPool,
    LoadedSource,
    PoolTaskSource,
    SourceSpec,
    TaskBatch,
    TaskSource,
    stable_fraction,
    task_rng,
)
from mtl_ray.data.checks import check_data, check_pretrain_data, splits_used
from mtl_ray.data.fetch import DataError
from mtl_ray.data.registry import SOURCES, build_task_source, clear_caches, is_regression, load_source
from mtl_ray.data.sinusoid import SinusoidTaskSource

__all__ = [
    "SOURCES",
    "SPLITS",
    "ClassPool",
    "DataError",
    "LoadedSource",
    "PoolTaskSource",
    "SinusoidTaskSource",
    "SourceSpec",
    "TaskBatch",
    "TaskSource",
    "build_task_source",
    "check_data",
    "check_pretrain_data",
    "clear_caches",
    "is_regression",
    "load_source",
    "splits_used",
    "stable_fraction",
    "task_rng",
]
