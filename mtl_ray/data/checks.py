"""The data-dependent config checks: problems only the data shows (too many ways for a split, too few examples
per class, unknown alphabets, missing or corrupt files), each naming the value got, the value expected and the fix."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mtl_ray.config import Config
from mtl_ray.data.fetch import DataError
from mtl_ray.data.registry import SOURCES, image_sources, load_source


def splits_used(cfg: Config) -> list[str]:
    """Splits a training run samples from: train, and val when ``optim.val_every > 0``.

    The test split is checked when it is used (``mtl-ray eval``), so a run may leave it empty on
    purpose, e.g. when it is scored on Lake's runs instead.
    """
    return ["train", *(["val"] if cfg.optim.val_every > 0 else [])]


def check_data(cfg: Config, splits: Sequence[str] | None = None) -> list[str]:
    """Data-dependent problems of ``splits`` (default: those training uses); empty when fine.

    Missing or corrupt files come back as messages too. Sources that generate their tasks have no classes to check.
    """
    d = cfg.data
    splits = splits_used(cfg) if splits is None else list(splits)
    spec = SOURCES.get(d.source)
    if spec is None or spec.load is None:
        return []
    try:
        loaded = load_source(cfg)
    except DataError as e:
        return list(e.problems)
    problems = list(loaded.problems)
    fewest: tuple[int, str, str] | None = None  # (examples, split, class)
    for split in splits:
        pool = loaded.splits[split]
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
        uniform = all(len(x) == m for s in splits for x in loaded.splits[s].images)
        where = (f"examples per class in {loaded.name}" if uniform
                 else f"examples per class in {loaded.name}: class {name!r} of the {split!r} split has {m}")
        problems.append(f"data.shots + data.queries: got {need} ({d.shots} + {d.queries}), expected <= {m} "
                        f"({where}); lower data.shots or data.queries")
    return list(dict.fromkeys(problems))  # splits sharing one pool (digits) give identical messages once


def check_pretrain_data(cfg: Config) -> list[str]:
    """Why ``cfg`` cannot be pretrained on (empty when it can): it needs an image source whose train split
    has two or more classes, each with more than ``pretrain.holdout`` examples."""
    spec = SOURCES.get(cfg.data.source)
    if spec is None or spec.load is None:
        return [f"data.source: got {cfg.data.source!r}, expected an image source ({', '.join(image_sources())}); "
                "pretraining classifies the train split's images among all its classes"]
    try:
        loaded = load_source(cfg)
    except DataError as e:
        return list(e.problems)
    problems = list(loaded.problems)
    pool = loaded.splits["train"]
    if pool.num_classes < 2:
        problems.append(f"split 'train': got {pool.num_classes} classes, expected >= 2 to pretrain a classifier "
                        f"({loaded.describe('train')}); {loaded.fix('train')}")
    elif cfg.pretrain.holdout >= pool.min_examples:
        problems.append(f"pretrain.holdout: got {cfg.pretrain.holdout}, expected < {pool.min_examples} (the fewest "
                        "examples of a train class); lower pretrain.holdout")
    return problems
