"""Reptile — Nichol, Achiam, Schulman. "On First-Order Meta-Learning Algorithms", arXiv:1803.02999, 2018.

Each task runs ``inner_steps`` SGD steps from the shared weights ``theta`` on its support set to
``phi``; the meta-"gradient" of a task is ``theta - phi``, so an outer SGD step with rate ``eps``
is exactly Reptile's ``theta <- theta + eps * mean(phi - theta)`` (Adam may be used instead).
"""

from __future__ import annotations

import torch
from torch.func import vmap

from mtl_ray.algorithms.base import Metrics, Params, ShardResult, _accumulate, add_into, cat_rows, split_per_class
from mtl_ray.algorithms.gradient import MAML
from mtl_ray.data.base import TaskBatch


class Reptile(MAML):
    """The meta-"gradient" ``theta - phi`` summed over tasks (vectorised, no outer differentiation)."""

    name = "reptile"
    second_order = False  # Reptile never differentiates through the inner loop
    compilable = False  # its update is not a meta-gradient: nothing for algorithm.compile to compile
    outer_backward = False  # no backward through the tasks: a chunk holds less (mtl_ray.memory)

    def meta_gradient(self, params: Params, batch: TaskBatch, per_class: bool = False) -> ShardResult:
        """``per_class``: also each task's per-class query scores (:func:`~mtl_ray.algorithms.base.class_metrics`)
        of the adapted weights, as for every learner."""
        params = {k: v.detach() for k, v in params.items()}
        steps = self.inner_steps

        def per_task(p: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor,
                     qy: torch.Tensor) -> tuple[Params, Metrics]:
            phi = self.adapt(p, sx, sy, steps)
            out = self.predict(p, phi, qx)
            delta = {k: p[k] - v for k, v in self.weights(phi).items()}
            return delta, self.query_metrics(out, qy, self.loss(out, qy), per_class)

        batched = vmap(per_task, in_dims=(None, 0, 0, 0, 0))
        total: Params | None = None
        sums: dict[str, float] = {}
        rows: list[Metrics] = []
        with torch.no_grad():
            for start, stop in self.chunks(batch, True, steps):
                part = batch.slice(start, stop)
                delta, metrics = batched(params, part.support_x, part.support_y, part.query_x, part.query_y)
                total = add_into(total, {k: d.sum(0) for k, d in delta.items()})
                metrics, per = split_per_class(metrics)
                rows.append(per)
                _accumulate(sums, metrics)
        assert total is not None, "meta_gradient needs at least one task"
        return ShardResult(grads=total, num_tasks=batch.num_tasks, metrics=sums, per_class=cat_rows(rows))
