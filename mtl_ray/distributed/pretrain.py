"""Supervised pretraining on Ray Train: the first stage of meta-transfer learning.

A ``TorchTrainer`` (Train V2) runs :func:`pretrain_worker` on ``pretrain.num_workers`` data-parallel
workers (DDP; gloo on CPU, NCCL on GPU). The model is the config's body with a head over *every*
class of the train split; each step's global batch is a pure function of (seed, step) and worker
``r`` of ``W`` takes every ``W``-th example of it. Every ``tracking.log_every`` steps all workers
call ``ray.train.report`` (a barrier) with the window's mean loss and accuracy, averaged across
workers; every ``tracking.checkpoint_every`` steps and at the end rank 0 attaches a checkpoint (the
project's own format, ``stage="pretrain"``). A worker failure restarts the group from the latest
checkpoint (``pretrain.max_failures``); ``--resume`` starts from the run directory's latest one.

On the controller (the driver's node) :class:`ReportSink` hands each report to the caller's
callbacks (metrics.jsonl, MLflow, progress) and copies each checkpoint into
``<run dir>/checkpoints``, so the run directory looks like a meta-training one: ``model.init``,
``mtl-ray eval`` and ``--resume`` all take it.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig, UserCallback

from mtl_ray import metrics as M
from mtl_ray.algorithms import TaskShape
from mtl_ray.checkpoint import (
    PRETRAIN_STAGE,
    Checkpoint,
    checkpoint_location,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from mtl_ray.components import from_dict
from mtl_ray.config import Config, PretrainConfig, UserError
from mtl_ray.data import load_source
from mtl_ray.data.augment import pretrain_params
from mtl_ray.data.registry import channel_stats
from mtl_ray.data.supervised import LabelledImages, batch_indices, supervised_split
from mtl_ray.distributed.driver import Callback
from mtl_ray.models import build_pretrain_model, initial_params
from mtl_ray.models.resnet import pretrain_drop_keys
from mtl_ray.runtime import fp32_precision, tune_allocator

EVAL_CHUNK = 512  # held-out images per forward pass (batch statistics over a mixed-class chunk, as in training)


@dataclass(frozen=True)
class PretrainSummary:
    steps: int
    seconds: float
    metrics: dict[str, float]
    checkpoint: str | None

    def lines(self) -> list[str]:
        shown = ", ".join(f"{k}={v:.4f}" for k, v in self.metrics.items() if k.startswith("pretrain/"))
        return [f"pretrained to step {self.steps} in {self.seconds:.1f}s: {shown}", f"checkpoint: {self.checkpoint}"]


def pretrain_data(cfg: Config) -> tuple[LabelledImages, LabelledImages]:
    """(training, held-out) examples over every class of the config's train split, normalised as the run's
    meta-training tasks are (``data.channel_mean``/``channel_std``)."""
    mean, std = channel_stats(cfg)
    return supervised_split(load_source(cfg).splits["train"], cfg.pretrain.holdout, cfg.seed, channel_mean=mean,
                            channel_std=std)


def build_optimizer(cfg: Config, params: Sequence[torch.Tensor]) -> torch.optim.Optimizer:
    p = cfg.pretrain
    if p.optimizer == "adam":
        return torch.optim.AdamW(list(params), lr=p.lr, weight_decay=p.weight_decay)
    return torch.optim.SGD(list(params), lr=p.lr, momentum=0.9, weight_decay=p.weight_decay)


def pretrain_lr(p: PretrainConfig, step: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based: the step that takes the weights from ``step`` to
    ``step + 1``), a function of the step alone, so a resumed run follows the schedule an uninterrupted one does.

    Warm-up (``pretrain.warmup_steps = w > 0``): ``lr * (step + 1) / w`` for ``step < w`` (Goyal et al. 2017).
    Then ``pretrain.schedule``: "constant" keeps ``lr``; "cosine" anneals it to 0 over the remaining steps,
    ``lr * (1 + cos(pi * (step - w) / (pretrain.steps - w))) / 2`` (SGDR without restarts: Loshchilov & Hutter,
    ICLR 2017; the pretraining of Tian et al., "Rethinking Few-Shot Image Classification", ECCV 2020, which
    decays in steps instead, and of Chen et al. 2021's Classifier-Baseline).
    """
    w = p.warmup_steps
    if step < w:
        return p.lr * (step + 1) / w
    if p.schedule == "cosine":
        return p.lr * 0.5 * (1.0 + math.cos(math.pi * min(step - w, p.steps - w) / max(p.steps - w, 1)))
    return p.lr


def _mean_across(values: Sequence[float], device: torch.device) -> list[float]:
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def _held_out(model: torch.nn.Module, data: LabelledImages, rank: int, world: int,
              device: torch.device) -> dict[str, float]:
    """Loss and accuracy on the held-out examples (each worker scores its share; summed across workers)."""
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    idx = torch.arange(len(data))[rank::world].numpy()
    with torch.no_grad():
        for i in range(0, len(idx), EVAL_CHUNK):
            x, y = data.batch(idx[i:i + EVAL_CHUNK])
            out = model(x.to(device))
            y = y.to(device)
            sums += torch.stack([F.cross_entropy(out, y, reduction="sum").double(),
                                 (out.argmax(-1) == y).sum().double(), torch.tensor(len(y), device=device).double()])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    n = max(float(sums[2]), 1.0)
    return {M.PRETRAIN_VAL_LOSS: float(sums[0]) / n, M.PRETRAIN_VAL_ACC: float(sums[1]) / n}


def train_forward(model: torch.nn.Module, cfg: Config, step: int, idx: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """The training forward pass of examples ``idx`` (indices into the train split) at ``step``: ``[B, classes]``.

    With ``model.dropblock`` it hands the model one DropBlock key per example, from (seed, step, example index),
    so an example's mask is the same for any number of workers (mtl_ray/models/resnet.py).
    """
    if cfg.model.dropblock > 0:
        return model(x, drop_keys=pretrain_drop_keys(cfg.seed, step, idx).to(x.device))
    return model(x)


def _start_state(resume_from: str) -> Checkpoint | None:
    """Ray Train's checkpoint after a worker failure, else the run dir's (``--resume``), else None."""
    reported = ray.train.get_checkpoint()
    if reported is not None:
        with reported.as_directory() as d:
            found = latest_checkpoint(d)
            return load_checkpoint(found) if found else None
    return load_checkpoint(resume_from) if resume_from else None


def pretrain_worker(loop: dict[str, Any]) -> None:
    """Ray Train's per-worker loop (``loop``: ``{"config": json, "resume_from": path or ""}``)."""
    cfg = from_dict(json.loads(loop["config"]))
    with fp32_precision(cfg.scaling.precision):
        _pretrain(cfg, loop.get("resume_from", ""))


def _pretrain(cfg: Config, resume_from: str) -> None:
    p, t = cfg.pretrain, cfg.tracking
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # Ray Train logs a line per report at INFO
    tune_allocator()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    train, held = pretrain_data(cfg)
    x_shape = tuple(int(s) for s in train.x.shape[1:])
    model = build_pretrain_model(cfg, x_shape, train.num_classes)  # pretrain.head: linear or cosine
    start = _start_state(resume_from)
    weights = start.params if start is not None else initial_params(model, cfg.seed)
    model.load_state_dict(weights)  # every parameter; the skeleton holds no buffers
    step = start.step if start is not None else 0
    model = ray.train.torch.prepare_model(model)  # DDP: gradients averaged across workers each step
    net = getattr(model, "module", model)
    optimizer = build_optimizer(cfg, list(net.parameters()))
    if start is not None:
        optimizer.load_state_dict(start.optimizer)
    deadline = time.monotonic() + 60 * p.max_minutes if p.max_minutes > 0 else math.inf
    window: list[tuple[float, float]] = []
    t0, images = time.perf_counter(), 0
    last: dict[str, float] = dict(start.metrics) if start is not None else {}
    while step < p.steps:
        batch = batch_indices(cfg.seed, step, len(train), p.batch_size)
        idx = batch[rank::world]
        # pretrain.augment: the global batch's parameters, this worker's share, applied on its device
        aug = pretrain_params(cfg.seed, step, len(batch), *x_shape[1:])[rank::world] if p.augment else None
        x, y = train.batch(idx, device=device, augment=aug)
        out = train_forward(model, cfg, step, idx, x)
        loss = F.cross_entropy(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:  # pretrain.schedule/warmup_steps: set from the step, every step
            group["lr"] = pretrain_lr(p, step)
        optimizer.step()
        step += 1
        images += len(y) * world
        window.append((float(loss.detach()), float((out.detach().argmax(-1) == y).float().mean())))
        due = step % t.log_every == 0 or step == p.steps
        if not due:
            continue
        # Every worker must agree to stop at the same report (report is a barrier): stop if any is past the budget.
        loss_mean, acc_mean, late = _mean_across(
            [sum(w[0] for w in window) / len(window), sum(w[1] for w in window) / len(window),
             float(time.monotonic() >= deadline)], device)
        final = step == p.steps or late > 0
        secs = max(time.perf_counter() - t0, 1e-9)
        metrics = {M.PRETRAIN_LOSS: loss_mean, M.PRETRAIN_ACC: acc_mean, M.PRETRAIN_IMAGES_PER_S: images / secs,
                   M.PRETRAIN_WORKERS: float(world), M.PRETRAIN_LR: pretrain_lr(p, step - 1), "step": float(step)}
        window, t0, images = [], time.perf_counter(), 0
        if len(held) and (final or (p.val_every and step % p.val_every == 0)):
            metrics.update(_held_out(model, held, rank, world, device))
        last.update({k: v for k, v in metrics.items() if k != "step"})
        with tempfile.TemporaryDirectory() as tmp:  # every rank reports (a barrier); rank 0 attaches the checkpoint
            checkpoint = None
            if rank == 0 and (final or (t.checkpoint_every and step % t.checkpoint_every == 0)):
                save_checkpoint(tmp, Checkpoint(
                    step=step, params={k: v.detach().cpu() for k, v in net.named_parameters()},
                    optimizer=optimizer.state_dict(), config=cfg, metrics=last, stage=PRETRAIN_STAGE,
                    shape=TaskShape("classification", x_shape, train.num_classes)))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
        if final:
            break


class ReportSink(UserCallback):
    """Runs on the Ray Train controller: every report goes to the callbacks ``make_callbacks(start_step)``
    builds there, and every checkpoint is copied into ``location`` (``<run dir>/checkpoints``).

    After a worker failure the group restarts from its latest checkpoint and reports steps again; the
    callbacks are then rebuilt from that step, so metrics.jsonl keeps every step once.
    """

    def __init__(self, location: str, make_callbacks: Callable[[int], Sequence[Callback]], start_step: int = 0):
        self.location = location
        self.make_callbacks = make_callbacks
        self.last_step = start_step
        self._callbacks: list[Callback] | None = None

    def _rebuild(self, start_step: int) -> list[Callback]:
        for cb in self._callbacks or []:
            close = getattr(cb, "close", None)
            if close is not None:
                close()
        self._callbacks = list(self.make_callbacks(start_step))
        return self._callbacks

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        try:
            self._record(metrics, checkpoint)
        except UserError:  # e.g. a full disk: run_pretrain reports it as one line; Ray need not log its traceback
            logging.getLogger("ray.train.v2._internal.execution.controller.controller").setLevel(logging.CRITICAL)
            raise

    def _record(self, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        first = dict(metrics[0])  # rank 0's; the values are already averaged across workers
        step = int(first.pop("step"))
        if self._callbacks is None:
            self._rebuild(self.last_step)
        elif step <= self.last_step:  # restarted from a checkpoint: forget what comes after it
            self._rebuild(step - 1)
        self.last_step = step
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                found = latest_checkpoint(d)
                if found:
                    save_checkpoint(self.location, load_checkpoint(found))
        for cb in self._callbacks or []:
            cb.on_metrics(step, {k: float(v) for k, v in first.items()})

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for rank, exc in worker_exceptions.items():
            print(f"pretrain worker {rank} failed: {exc.__class__.__name__}: {str(exc)[:300]}", flush=True)


def run_pretrain(cfg: Config, run_dir: Path, *, resume: bool = False,
                 make_callbacks: Callable[[int], Sequence[Callback]] = lambda start: []) -> PretrainSummary:
    """Pretrain on Ray Train (joins or starts Ray as meta-training does) into ``run_dir``."""
    from mtl_ray.ray_session import connect

    s, p = cfg.scaling, cfg.pretrain
    location = checkpoint_location(run_dir, cfg.tracking.checkpoint_uri)
    resume_from = (latest_checkpoint(location) or "") if resume else ""
    start_step = load_checkpoint(resume_from).step if resume_from else 0
    owns = connect(cfg, min_cpus=p.num_workers * s.cpus_per_worker, dashboard=True)
    t0 = time.perf_counter()
    try:
        trainer = ray.train.torch.TorchTrainer(
            pretrain_worker,
            train_loop_config={"config": cfg.to_json(), "resume_from": resume_from},
            scaling_config=ScalingConfig(num_workers=p.num_workers, use_gpu=s.gpus_per_worker > 0,
                                         resources_per_worker={"CPU": s.cpus_per_worker,
                                                               **({"GPU": s.gpus_per_worker}
                                                                  if s.gpus_per_worker > 0 else {})}),
            run_config=RunConfig(name="ray_train", storage_path=str(Path(run_dir).absolute()),
                                 failure_config=FailureConfig(max_failures=p.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 callbacks=[ReportSink(location, make_callbacks, start_step)],  # type: ignore[list-item]
                                 # no line per report; RunConfig's stub lacks the field, Ray 2.60 takes it
                                 logging_config=LoggingConfig(log_level="WARNING")),  # type: ignore[call-arg]
        )
        try:
            result = trainer.fit()
        except ray.train.ControllerError as e:  # a failed write of the records on the controller (ReportSink)
            if isinstance(e.controller_failure, UserError):
                raise e.controller_failure from None
            raise
    finally:
        if owns:
            ray.shutdown()
    found = latest_checkpoint(location)
    ck = load_checkpoint(found) if found else None
    return PretrainSummary(steps=ck.step if ck else 0, seconds=time.perf_counter() - t0,
                           metrics=dict(result.metrics or {}), checkpoint=found)
