"""Executors run shards of a meta-batch somewhere: in this process, or on Ray worker actors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from mtl_ray.algorithms import Params, ShardResult
from mtl_ray.config import Config
from mtl_ray.distributed.worker import ShardWorker, resolve_device


class Executor(Protocol):
    num_shards: int
    faults: int  # shards re-run because their worker died (always 0 in-process)

    def meta_gradients(self, params: Params, step: int, shards: Sequence[Sequence[int]],
                       classes: Sequence[Sequence[int]] | None = None) -> list[ShardResult]:
        """The shards' results; with ``classes`` the shards hold hard-task indices ``h`` and hard task ``h`` is over
        ``classes[h]`` (``ShardWorker.hard_meta_gradient``)."""
        ...

    def evaluate(self, params: Params, split: str, step: int, shards: Sequence[Sequence[int]],
                 inner_steps: int) -> list[dict[str, torch.Tensor]]: ...

    def close(self) -> None: ...


def shard(indices: Sequence[int], num_shards: int) -> list[list[int]]:
    """Contiguous, near-equal shards (non-empty ones only)."""
    parts = np.array_split(np.asarray(list(indices), dtype=np.int64), max(num_shards, 1))
    return [p.tolist() for p in parts if len(p)]


class LocalExecutor:
    """``num_workers = 0``: every shard runs here, one after another, on one :class:`ShardWorker`."""

    num_shards = 1
    faults = 0

    def __init__(self, cfg: Config):
        self.worker = ShardWorker(cfg, resolve_device(cfg.scaling.gpus_per_worker))

    def meta_gradients(self, params: Params, step: int, shards: Sequence[Sequence[int]],
                       classes: Sequence[Sequence[int]] | None = None) -> list[ShardResult]:
        if classes is not None:
            return [self.worker.hard_meta_gradient(params, step, s, [classes[h] for h in s]) for s in shards]
        return [self.worker.meta_gradient(params, step, s) for s in shards]

    def evaluate(self, params: Params, split: str, step: int, shards: Sequence[Sequence[int]],
                 inner_steps: int) -> list[dict[str, torch.Tensor]]:
        return [self.worker.evaluate(params, split, step, s, inner_steps) for s in shards]

    def close(self) -> None:
        self.worker.close()


def build_executor(cfg: Config) -> Executor:
    """In-process for ``scaling.num_workers = 0``, else a group of Ray worker actors."""
    if cfg.scaling.num_workers == 0:
        return LocalExecutor(cfg)
    from mtl_ray.distributed.ray_executor import RayExecutor  # imports ray only when it is used

    return RayExecutor(cfg)
