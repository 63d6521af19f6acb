"""The meta-trainer: the outer loop, identical for in-process and Ray execution.

One step: sample task indices -> shard them -> workers compute task meta-gradients on the current
(broadcast) weights -> reduce to the task-weighted mean -> outer optimiser step -> metrics. A
non-finite meta-gradient skips the step (counted, reported) and never touches the weights. With
``optim.hard_tasks`` the step then takes one more outer step on hard tasks (:meth:`MetaTrainer.hard_task_step`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from mtl_ray import metrics as M
from mtl_ray.algorithms import ACC, LOSS, Params, ShardResult, TaskShape, build_learner, initial_meta_params
from mtl_ray.checkpoint import (
    META_STAGE,
    Checkpoint,
    check_fits,
    check_resume,
    checkpoint_location,
    init_body,
    resume_point,
    save_checkpoint,
    set_aside,
)
from mtl_ray.config import Config
from mtl_ray.data.hard_tasks import hard_task_classes
from mtl_ray.distributed.evaluate import evaluate_tasks
from mtl_ray.distributed.executor import Executor, build_executor, shard


class Callback(Protocol):
    def on_metrics(self, step: int, metrics: dict[str, float]) -> None: ...


@dataclass(frozen=True)
class Summary:
    steps: int
    tasks: int
    seconds: float
    tasks_per_s: float
    skipped_steps: int
    worker_faults: int
    final_val: dict[str, float]
    checkpoint: str | None
    step: int = 0  # the step the run ended at (``steps`` counts this call's only)
    budget_reached: bool = False  # stopped by optim.max_minutes before optim.steps

    def lines(self) -> list[str]:
        val = ", ".join(f"{k}={v:.4f}" for k, v in self.final_val.items()) or "none"
        return [f"steps: {self.steps}  tasks: {self.tasks}  tasks/s: {self.tasks_per_s:.1f}  "
                f"time: {self.seconds:.1f}s  skipped steps: {self.skipped_steps}  worker faults: {self.worker_faults}",
                f"final meta-validation: {val}", f"checkpoint: {self.checkpoint}"]


def reduce_results(results: Sequence[ShardResult]) -> tuple[Params, int, dict[str, float]]:
    """Task-weighted mean of shard sums: ``sum_i grads_i / sum_i n_i`` (and the same for metrics)."""
    total = sum(r.num_tasks for r in results)
    keys = results[0].grads.keys()
    if len(results) == 1:  # one shard (in-process): nothing to stack; the same values as stacking one
        grads = {k: results[0].grads[k] / total for k in keys}
    else:
        grads = {k: torch.stack([r.grads[k] for r in results]).sum(0) / total for k in keys}
    sums: dict[str, float] = {}
    for r in results:
        for k, v in r.metrics.items():
            sums[k] = sums.get(k, 0.0) + v
    return grads, total, sums


def grad_norm(grads: Params) -> float:
    """The global L2 norm of ``grads``, in float64, with one device-to-host read (not one per tensor)."""
    if not grads:
        return 0.0
    norms = torch._foreach_norm([g.double() for g in grads.values()])
    return float(torch.linalg.vector_norm(torch.stack(norms)))


def failure_rankings(results: Sequence[ShardResult], num_tasks: int) -> list[tuple[int, ...]]:
    """Every task's classes ranked worst first (``ShardResult.failures``), in task-index order ``0 .. num_tasks-1``:
    the same whatever the shards, their order or how a node merged them."""
    merged = {i: f for r in results for i, f in r.failures.items()}
    missing = [i for i in range(num_tasks) if i not in merged]
    if missing:
        raise RuntimeError(f"hard tasks: no failure classes came back for tasks {missing} of {num_tasks}; expected "
                           "every worker to rank its tasks' classes (optim.hard_tasks > 0)")
    return [merged[i] for i in range(num_tasks)]


def build_optimizer(cfg: Config, params: Iterable[torch.Tensor]) -> torch.optim.Optimizer:
    o = cfg.optim
    # foreach: one multi-tensor kernel per update op instead of a Python loop over the tensors (torch's default
    # only on CUDA); the sinusoid MLP's step spent more in the per-tensor loop than in its meta-gradient
    if o.optimizer == "adam":
        return torch.optim.Adam(list(params), lr=o.outer_lr, foreach=True)
    return torch.optim.SGD(list(params), lr=o.outer_lr, foreach=True)


class MetaTrainer:
    def __init__(self, cfg: Config, executor: Executor, *, params: Params, shape: TaskShape, run_dir: str | Path,
                 optimizer_state: dict | None = None, step: int = 0, skipped_steps: int = 0,
                 tasks_seen: int = 0, callbacks: Sequence[Callback] = ()):
        self.cfg = cfg
        self.executor = executor
        self.run_dir = Path(run_dir)
        self.shape = shape
        self.params: Params = {k: v.detach().clone().float() for k, v in params.items()}
        self.optimizer = build_optimizer(cfg, self.params.values())
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)
        self.step = step
        self.skipped_steps = skipped_steps
        self.tasks_seen = tasks_seen
        self.callbacks = list(callbacks)
        self.last_val: dict[str, float] = {}
        self.last_checkpoint: str | None = None
        self.last_hard_classes: list[tuple[int, ...]] = []  # the last step's hard tasks' classes (optim.hard_tasks)

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, cfg: Config, run_dir: str | Path, *, resume: bool = False,
               callbacks: Sequence[Callback] = (), executor: Executor | None = None) -> MetaTrainer:
        """A trainer at step 0, or at the latest intact checkpoint in ``run_dir`` when ``resume``.

        Resuming checks first that ``cfg`` may continue that checkpoint (``checkpoint.check_resume``:
        only ``RESUME_MAY_CHANGE`` keys may differ) and that its weights fit the model ``cfg`` builds.
        """
        point = resume_point(checkpoint_location(run_dir, cfg.tracking.checkpoint_uri)) if resume else None
        if point is not None:  # the newest intact checkpoint, written with a config this one may continue
            check_resume(point, cfg, META_STAGE)
            check_fits(point, cfg)
        executor = executor or build_executor(cfg)  # placed before anything is renamed: a failure here writes nothing
        if point is not None:
            set_aside(point)
            ck = point.checkpoint
            return cls(cfg, executor, params=ck.params, shape=ck.shape, run_dir=run_dir, optimizer_state=ck.optimizer,
                       step=ck.step, skipped_steps=ck.skipped_steps, tasks_seen=ck.tasks_seen, callbacks=callbacks)
        learner = build_learner(cfg)
        params = initial_meta_params(cfg, learner, init=init_body(cfg))  # model.init: start from pretrained weights
        if cfg.scaling.precision == "fp64":  # the optimiser's state follows the weights' dtype
            params = {k: v.double() for k, v in params.items()}
        return cls(cfg, executor, params=params, shape=learner.shape, run_dir=run_dir, callbacks=callbacks)

    # ------------------------------------------------------------------ the algorithm
    def train_step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        indices = range(self.cfg.optim.meta_batch_size)  # tasks are (seed, "train", step, index)
        shards = shard(indices, self.executor.num_shards)
        results = self.executor.meta_gradients(self.params, self.step, shards)  # broadcast + inner loops
        grads, num_tasks, sums = reduce_results(results)
        grad_norm = self.outer_step(grads)
        hard, hard_s = self.hard_task_step(results) if self.cfg.optim.hard_tasks else ({}, 0.0)
        self.step += 1
        self.tasks_seen += num_tasks + self.cfg.optim.hard_tasks
        step_s = max(time.perf_counter() - t0, 1e-9)
        out = M.prefixed("meta_train", sums, num_tasks)
        out.update(hard)
        num_tasks += self.cfg.optim.hard_tasks  # tasks_per_s counts every task the step trained on
        # Broadcast, gather, reduce and the optimiser step, as a share of the step (0 when compute-bound).
        out[M.META_TRAIN_OVERHEAD] = max(0.0, 1.0 - (max(r.seconds for r in results) + hard_s) / step_s)
        out[M.META_TRAIN_GRAD_NORM] = grad_norm
        out[M.META_TRAIN_SKIPPED_STEPS] = float(self.skipped_steps)
        out[M.META_TRAIN_WORKER_FAULTS] = float(self.executor.faults)
        out[M.META_TRAIN_SHARDS] = float(len(shards))
        out[M.META_TRAIN_TASKS_PER_S] = num_tasks / step_s
        return out

    def hard_task_step(self, results: Sequence[ShardResult]) -> tuple[dict[str, float], float]:
        """MTL's hard-task meta-batch (Sun et al., CVPR 2019, Sec. 4.2), after the step's ordinary update.

        The step's results carry each task's classes ranked worst query accuracy first (its failure class first);
        taken in task-index order, they give ``optim.hard_tasks`` hard tasks over the failure classes
        (mtl_ray/data/hard_tasks.py: distinct failure classes, topped up with next-worst ones when fewer than
        ``data.ways``; hard task ``h``'s classes and examples a pure function of (seed, "train", step, h, those
        classes)). Their mean meta-gradient, at the weights the ordinary update gave, is an additional outer step
        (the paper's "additional update", not a term of the ordinary one); a non-finite one is skipped and counted
        like any step. Everything comes from this step: resume needs no state of it. Returns its metrics and the
        slowest hard shard's seconds.
        """
        o, step = self.cfg.optim, self.step
        ranked = failure_rankings(results, o.meta_batch_size)
        classes = hard_task_classes(self.cfg.seed, "train", step, ranked, o.hard_tasks, self.cfg.data.ways)
        self.last_hard_classes = classes
        shards = shard(range(o.hard_tasks), self.executor.num_shards)
        hard = self.executor.meta_gradients(self.params, step, shards, classes=classes)
        grads, n, sums = reduce_results(hard)
        out = {M.META_TRAIN_HARD_LOSS: sums[LOSS] / n, M.META_TRAIN_HARD_ACC: sums[ACC] / n,
               M.META_TRAIN_HARD_GRAD_NORM: self.outer_step(grads),
               M.META_TRAIN_HARD_CLASSES: float(len({r[0] for r in ranked}))}
        return out, max(r.seconds for r in hard)

    def outer_step(self, grads: Params) -> float:
        """Apply the mean meta-gradient; skip (and count) the step when it is not finite."""
        norm = grad_norm(grads)
        if not math.isfinite(norm):
            self.skipped_steps += 1
            return norm
        clip = self.cfg.optim.grad_clip
        scale = min(1.0, clip / (norm + 1e-12)) if clip > 0 else 1.0
        for k, g in grads.items():  # frozen parameters get no meta-gradient: Adam leaves them untouched
            self.params[k].grad = g.to(self.params[k].dtype) * scale
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def meta_validate(self) -> dict[str, float]:
        """Mean metrics on ``optim.val_tasks`` fixed validation tasks (the same tasks every time)."""
        per_task = evaluate_tasks(self.executor, self.params, "val", self.cfg.optim.val_tasks,
                                  self.cfg.eval_inner_steps, max_shard_tasks=self.cfg.optim.meta_batch_size)
        self.last_val = {f"meta_val/{k}": float(v.mean()) for k, v in per_task.items()}
        return self.last_val

    # ------------------------------------------------------------------ the loop
    def checkpoint(self) -> str:
        ck = Checkpoint(step=self.step, params=self.params, optimizer=self.optimizer.state_dict(), config=self.cfg,
                        shape=self.shape, skipped_steps=self.skipped_steps, tasks_seen=self.tasks_seen,
                        metrics=self.last_val)
        self.last_checkpoint = save_checkpoint(checkpoint_location(self.run_dir, self.cfg.tracking.checkpoint_uri), ck)
        return self.last_checkpoint

    def fit(self, until: int | None = None) -> Summary:
        """Train to step ``until`` (default ``optim.steps``), validating and checkpointing on schedule.

        With ``optim.max_minutes`` the first step that ends past the budget is treated as the last one
        (validated and checkpointed), so a budgeted run can be resumed like any other.
        """
        until = self.cfg.optim.steps if until is None else until
        o, t = self.cfg.optim, self.cfg.tracking
        start_step, start_tasks, t0 = self.step, self.tasks_seen, time.perf_counter()
        deadline = t0 + 60 * o.max_minutes if o.max_minutes > 0 else math.inf
        budget_reached = False
        while self.step < until:
            out = self.train_step()
            budget_reached = self.step < until and time.perf_counter() >= deadline
            last = self.step == until or budget_reached
            if o.val_every and (self.step % o.val_every == 0 or last):
                out.update(self.meta_validate())
            if last or (t.checkpoint_every and self.step % t.checkpoint_every == 0):  # always keep the final one
                self.checkpoint()
            for cb in self.callbacks:
                cb.on_metrics(self.step, out)
            if last:
                break
        secs = time.perf_counter() - t0
        tasks = self.tasks_seen - start_tasks
        return Summary(steps=self.step - start_step, tasks=tasks, seconds=secs, tasks_per_s=tasks / max(secs, 1e-9),
                       skipped_steps=self.skipped_steps, worker_faults=self.executor.faults, final_val=self.last_val,
                       checkpoint=self.last_checkpoint, step=self.step, budget_reached=budget_reached)

    def close(self) -> None:
        self.executor.close()
