"""Collective meta-training (``scaling.reduce=collective``): replicas all-reduce, the driver only coordinates.

A ``TorchTrainer`` (Ray Train V2) runs :func:`collective_worker` on ``scaling.num_workers`` workers joined in one
torch.distributed process group (gloo on CPU, NCCL on GPU). Every worker holds the weights and the optimiser
state and runs the same :class:`~mtl_ray.distributed.driver.MetaTrainer` loop as in-process training, on a
:class:`CollectiveExecutor`: worker ``r`` of ``W`` computes the ``r``-th contiguous share of every meta-batch
(tasks are pure functions of (seed, split, step, index), so the shares are the in-process tasks), and one
``all_reduce`` of a flat float64 buffer (gradient sums, task count, metric sums) gives every replica the same
mean meta-gradient, hence the same outer step: nothing crosses to the driver per step. Validation is split the
same way and all-gathered.

Every ``tracking.log_every`` steps (and at each validation, checkpoint and the end) all workers call
``ray.train.report`` (a barrier) with the records of the steps since the last report, and rank 0 attaches a
checkpoint when one is due. On the controller :class:`StepSink` hands every step's metrics to the run's records
and copies each checkpoint into ``<run dir>/checkpoints``. A lost worker restarts the whole group from the latest
checkpoint (up to ``scaling.max_restarts`` times); with deterministic tasks the restarted run reaches the
fault-free weights, and the steps it trains again are recorded once. ``optim.max_minutes`` is checked at reports
(every worker must agree to stop at the same one). docs/scaling.md compares the modes.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

from mtl_ray import metrics as M
from mtl_ray.algorithms import Params, ShardResult, initial_meta_params
from mtl_ray.checkpoint import (
    META_STAGE,
    Checkpoint,
    checkpoint_location,
    init_body,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from mtl_ray.components import from_dict
from mtl_ray.config import Config, UserError
from mtl_ray.distributed.driver import Callback, MetaTrainer, Summary
from mtl_ray.distributed.executor import shard
from mtl_ray.distributed.pretrain import ReportSink, _start_state
from mtl_ray.distributed.worker import ShardWorker


class CollectiveExecutor:
    """The :class:`~mtl_ray.distributed.executor.Executor` of one replica: its share of each meta-batch, summed
    across the group. The trainer hands it whole meta-batches (``num_shards = 1``)."""

    num_shards = 1

    def __init__(self, cfg: Config, rank: int, world: int, device: torch.device, faults: int = 0):
        self.worker = ShardWorker(cfg, device)
        self.rank, self.world, self.device = rank, world, device
        self.faults = faults  # group restarts after a lost worker, carried in the checkpoints

    def _mine(self, shards: Sequence[Sequence[int]]) -> list[int]:
        parts = shard([i for s in shards for i in s], self.world)
        return parts[self.rank] if self.rank < len(parts) else []

    def meta_gradients(self, params: Params, step: int, shards: Sequence[Sequence[int]],
                       classes: Sequence[Sequence[int]] | None = None) -> list[ShardResult]:
        """``[one ShardResult]``: the whole meta-batch's gradient and metric sums, on every replica."""
        if classes is not None:  # the config check refuses optim.hard_tasks here: no failure classes are exchanged
            raise ValueError("hard tasks are not supported with scaling.reduce=collective")
        t0 = time.perf_counter()
        mine = self._mine(shards)
        local = self.worker.meta_gradient(params, step, mine)
        keys, names = list(local.grads), sorted(local.metrics)
        flat = torch.cat([*(local.grads[k].detach().double().flatten() for k in keys),
                          torch.tensor([float(local.num_tasks), *(local.metrics[n] for n in names)],
                                       dtype=torch.float64)]).to(self.device)
        dist.all_reduce(flat)  # one call: every gradient, the task count and the metric sums
        flat = flat.cpu()
        grads, at = {}, 0
        for k in keys:
            g = local.grads[k]
            grads[k] = flat[at:at + g.numel()].view_as(g).to(g.dtype)
            at += g.numel()
        num_tasks = round(float(flat[at]))
        metrics = {n: float(v) for n, v in zip(names, flat[at + 1:], strict=True)}
        return [ShardResult(grads=grads, num_tasks=num_tasks, metrics=metrics, seconds=time.perf_counter() - t0)]

    def evaluate(self, params: Params, split: str, step: int, shards: Sequence[Sequence[int]],
                 inner_steps: int) -> list[dict[str, torch.Tensor]]:
        """Per-task metrics of every task of ``shards`` (in order), each replica scoring its share."""
        chunk = max(len(s) for s in shards)  # the caller's limit on tasks adapted at once
        mine = self._mine(shards)
        parts = [self.worker.evaluate(params, split, step, mine[i:i + chunk], inner_steps)
                 for i in range(0, len(mine), chunk)]
        local = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, local)  # contiguous shares in rank order: the tasks' order
        keys = next(g for g in gathered if g).keys()
        return [{k: torch.cat([g[k] for g in gathered if g]) for k in keys}]

    def close(self) -> None:
        pass


def _agree(flag: bool, device: torch.device) -> bool:
    """True on every worker when it is true on any (a report is a barrier: all must stop at the same one)."""
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


FIT_ID_FILE = "fit_id"  # in each reported checkpoint: which fit() reported it


def _reported_by(fit_id: str) -> bool:
    """Ray Train's checkpoint was reported by this fit (a restart after a lost worker), not an earlier run's (a
    resumed run, whose Ray Train storage Train V2 restores from)."""
    reported = ray.train.get_checkpoint()
    if reported is None:
        return False
    with reported.as_directory() as d:
        mark = Path(d) / FIT_ID_FILE
        return mark.is_file() and mark.read_text() == fit_id


def collective_worker(loop: dict[str, Any]) -> None:
    """Ray Train's per-worker loop (``loop``: ``{"config": json, "resume_from": path or "", "fit_id": hex}``)."""
    cfg = from_dict(json.loads(loop["config"]))
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # Ray Train logs a line per report at INFO
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    start = _start_state(loop.get("resume_from", ""))
    restarted = _reported_by(loop["fit_id"])  # this fit's group restarted after a lost worker
    faults = int((start.metrics if start else {}).get(M.META_TRAIN_WORKER_FAULTS, 0)) + int(restarted)
    executor = CollectiveExecutor(cfg, rank, world, device, faults)
    if start is not None:
        trainer = MetaTrainer(cfg, executor, params=start.params, shape=start.shape, run_dir=".",
                              optimizer_state=start.optimizer, step=start.step, skipped_steps=start.skipped_steps,
                              tasks_seen=start.tasks_seen)
        trainer.last_val = {k: v for k, v in start.metrics.items() if k.startswith("meta_val/")}
    else:  # as MetaTrainer.create: the same initial weights on every replica (seeded), model.init's body
        learner = executor.worker.learner
        params = initial_meta_params(cfg, learner, init=init_body(cfg))
        if cfg.scaling.precision == "fp64":
            params = {k: v.double() for k, v in params.items()}
        trainer = MetaTrainer(cfg, executor, params=params, shape=learner.shape, run_dir=".")
    _fit(trainer, cfg, rank, device, loop["fit_id"])


def _fit(trainer: MetaTrainer, cfg: Config, rank: int, device: torch.device, fit_id: str) -> None:
    """:meth:`MetaTrainer.fit`'s schedule on a replica, reporting every ``tracking.log_every`` steps."""
    o, t = cfg.optim, cfg.tracking
    deadline = time.monotonic() + 60 * o.max_minutes if o.max_minutes > 0 else math.inf
    records: list[tuple[int, dict[str, float]]] = []
    while trainer.step < o.steps:
        out = trainer.train_step()
        step = trainer.step
        report = step == o.steps or step % t.log_every == 0 or bool(o.val_every and step % o.val_every == 0) \
            or bool(t.checkpoint_every and step % t.checkpoint_every == 0)
        late = report and step < o.steps and _agree(time.monotonic() >= deadline, device)
        last = step == o.steps or late
        if o.val_every and (step % o.val_every == 0 or last):
            out.update(trainer.meta_validate())
        records.append((step, out))
        if not report:
            continue
        with tempfile.TemporaryDirectory() as tmp:  # every rank reports (a barrier); rank 0 attaches the checkpoint
            checkpoint = None
            if rank == 0 and (last or (t.checkpoint_every and step % t.checkpoint_every == 0)):
                metrics = {**trainer.last_val, M.META_TRAIN_WORKER_FAULTS: float(trainer.executor.faults)}
                save_checkpoint(tmp, Checkpoint(
                    step=step, params=trainer.params, optimizer=trainer.optimizer.state_dict(), config=cfg,
                    shape=trainer.shape, skipped_steps=trainer.skipped_steps, tasks_seen=trainer.tasks_seen,
                    metrics=metrics, stage=META_STAGE))
                (Path(tmp) / FIT_ID_FILE).write_text(fit_id)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({"step": step, "records": json.dumps(records), "budget_reached": float(late)},
                             checkpoint=checkpoint)
        records = []
        if last:
            break


class StepSink(ReportSink):
    """:class:`~mtl_ray.distributed.pretrain.ReportSink` for reports that carry several steps' records."""

    def _record(self, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        records = json.loads(metrics[0]["records"])  # rank 0's; every replica computed the same
        first = int(records[0][0])
        if self._callbacks is None:
            self._rebuild(self.last_step)
        elif first <= self.last_step:  # restarted from a checkpoint: forget what comes after it
            self._rebuild(first - 1)
        self.last_step = int(metrics[0]["step"])
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                found = latest_checkpoint(d)
                if found:
                    save_checkpoint(self.location, load_checkpoint(found))
        for step, out in records:
            for cb in self._callbacks or []:
                cb.on_metrics(int(step), {k: float(v) for k, v in out.items()})


def run_collective(cfg: Config, run_dir: Path, *, resume: bool = False,
                   make_callbacks: Callable[[int], Sequence[Callback]] = lambda start: []) -> Summary:
    """Meta-train ``cfg`` on a Ray Train worker group (joins or starts Ray as every mode does) into ``run_dir``."""
    from mtl_ray.ray_session import connect

    s = cfg.scaling
    location = checkpoint_location(run_dir, cfg.tracking.checkpoint_uri)
    resume_from = (latest_checkpoint(location) or "") if resume else ""
    start = load_checkpoint(resume_from) if resume_from else None
    owns = connect(cfg, min_cpus=s.num_workers * s.cpus_per_worker, dashboard=True)
    t0 = time.perf_counter()
    try:
        trainer = ray.train.torch.TorchTrainer(
            collective_worker,
            train_loop_config={"config": cfg.to_json(), "resume_from": resume_from, "fit_id": uuid.uuid4().hex},
            scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.gpus_per_worker > 0,
                                         resources_per_worker={"CPU": s.cpus_per_worker,
                                                               **({"GPU": s.gpus_per_worker}
                                                                  if s.gpus_per_worker > 0 else {})}),
            run_config=RunConfig(name="ray_train", storage_path=str(Path(run_dir).absolute()),
                                 failure_config=FailureConfig(max_failures=s.max_restarts),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 callbacks=[StepSink(location, make_callbacks, start.step if start else 0)],  # type: ignore[list-item]
                                 logging_config=LoggingConfig(log_level="WARNING")),  # type: ignore[call-arg]
        )
        try:
            result = trainer.fit()
        except ray.train.ControllerError as e:  # a failed write of the records on the controller
            if isinstance(e.controller_failure, UserError):
                raise e.controller_failure from None
            raise
    finally:
        if owns:
            ray.shutdown()
    secs = time.perf_counter() - t0
    found = latest_checkpoint(location)
    ck = load_checkpoint(found) if found else None
    steps = (ck.step if ck else 0) - (start.step if start else 0)
    tasks = (ck.tasks_seen if ck else 0) - (start.tasks_seen if start else 0)
    final = dict(result.metrics or {})
    return Summary(steps=steps, tasks=tasks, seconds=secs, tasks_per_s=tasks / max(secs, 1e-9),
                   skipped_steps=ck.skipped_steps if ck else 0,
                   worker_faults=int((ck.metrics if ck else {}).get(M.META_TRAIN_WORKER_FAULTS, 0)),
                   final_val={k: v for k, v in (ck.metrics if ck else {}).items() if k.startswith("meta_val/")},
                   checkpoint=found, step=ck.step if ck else 0,
                   budget_reached=bool(final.get("budget_reached", 0.0)) and (ck.step if ck else 0) < cfg.optim.steps)
