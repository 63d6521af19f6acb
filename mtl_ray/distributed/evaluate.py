"""Meta-testing on the executor: adapt on each task's support set, score its query set, per task.

Used for validation during training and by ``mtl-ray eval`` (:mod:`mtl_ray.recipes.evaluate` reports it)."""

from __future__ import annotations

import torch

from mtl_ray.algorithms import Params
from mtl_ray.distributed.executor import Executor, shard


def evaluate_tasks(executor: Executor, params: Params, split: str, num_tasks: int, inner_steps: int,
                   step: int = 0, max_shard_tasks: int = 0) -> dict[str, torch.Tensor]:
    """Per-task metrics ``{name: [num_tasks]}`` on the fixed tasks ``(split, step, 0..num_tasks-1)``.

    Shards hold at most ``max_shard_tasks`` tasks (0: no limit): a whole evaluation adapted at once can need
    far more memory than a training meta-batch, whose size is known to fit (docs/benchmarks.md, "Memory estimate").
    Tasks are pure functions of their index, so the split does not change any result.
    """
    pieces = shard(range(num_tasks), executor.num_shards)
    if max_shard_tasks > 0:
        pieces = [p[i:i + max_shard_tasks] for p in pieces for i in range(0, len(p), max_shard_tasks)]
    parts = executor.evaluate(params, split, step, pieces, inner_steps)
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
