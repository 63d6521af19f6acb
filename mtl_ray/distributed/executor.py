"""Executors run shards of a meta-batch somewhere: in this process, or on Ray worker actors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from mtl_ray.algorithms import Params, ShardResult
from mtl_ray.config import Config, UserError
from mtl_ray.distributed.worker import ShardWorker, resolve_device


class Executor(Protocol):
    num_shards: int

    def meta_gradients(self, params: Params, step: int, shards: Sequence[Sequence[int]]) -> list[ShardResult]: ...

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

    def __init__(self, cfg: Config):
        self.worker = ShardWorker(cfg, resolve_device(cfg.scaling.gpus_per_worker))

    def meta_gradients(self, params: Params, step: int, shards: Sequence[Sequence[int]]) -> list[ShardResult]:
        return [self.worker.meta_gradient(params, step, s) for s in shards]

    def evaluate(self, params: Params, split: str, step: int, shards: Sequence[Sequence[int]],
                 inner_steps: int) -> list[dict[str, torch.Tensor]]:
        return [self.worker.evaluate(params, split, step, s, inner_steps) for s in shards]

    def close(self) -> None:
        pass


def build_executor(cfg: Config) -> Executor:
    if cfg.scaling.num_workers == 0:
        return LocalExecutor(cfg)
    # Ray worker actors land with the distributed issue; until then say so instead of failing later.
    raise UserError(f"scaling.num_workers: got {cfg.scaling.num_workers}, expected 0 (in-process); "
                    "Ray worker actors are not in this version yet, set scaling.num_workers=0")
