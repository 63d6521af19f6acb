"""The unit of work on one process: sample a task shard, run the vectorised inner loop, return sums.

A :class:`ShardWorker` loads its task source once and holds the algorithm. In-process training
calls it directly; each Ray worker actor wraps one. It never names a specific algorithm.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import cast

import torch

from mtl_ray.algorithms import Params, ShardResult, build_learner
from mtl_ray.algorithms.base import CLASS_ACC, CLASS_PROB, rank_classes
from mtl_ray.algorithms.finetune import finetune_seed
from mtl_ray.components import from_dict
from mtl_ray.config import Config
from mtl_ray.data.base import AugmentingSource, ClassSampling, PoolTaskSource, TaskBatch
from mtl_ray.data.hard_tasks import hard_task_index
from mtl_ray.memory import chunk_limit
from mtl_ray.runtime import fp32_precision, tune_allocator


def resolve_device(gpus: float) -> torch.device:
    """``cuda`` when this process was given a GPU and one is visible, else ``cpu``."""
    return torch.device("cuda" if gpus > 0 and torch.cuda.is_available() else "cpu")


class _Prefetch:
    """One batch sampled on the worker's background thread: ``key`` says which, :meth:`wait` returns it (None if it
    failed). One long-lived thread, not one per step: starting a thread waits for it to run, which cost a fast
    config's step (sinusoid) about 2 ms on a busy 2-core machine."""

    def __init__(self, key: tuple, draw: Callable[[], TaskBatch], pool: ThreadPoolExecutor):
        self.key = key
        self.future = pool.submit(draw)

    def wait(self) -> TaskBatch | None:
        try:
            return self.future.result()
        except Exception:  # a failure is the main thread's to raise: it samples afresh
            return None


class ShardWorker:
    """``prefetch``: while a meta-training shard computes, sample the same indices' tasks of the next step in a
    background thread; the next call uses them only when it asks for exactly those (step, indices), else samples
    afresh. Tasks are a pure function of their coordinates, so results are bit-identical either way; the source is
    never used by two threads at once (every other sample waits for the one in flight)."""

    def __init__(self, cfg: Config | str, device: str | torch.device = "cpu", *, prefetch: bool | None = None):
        self.cfg = from_dict(json.loads(cfg)) if isinstance(cfg, str) else cfg
        tune_allocator()
        if self.cfg.scaling.torch_threads:
            torch.set_num_threads(self.cfg.scaling.torch_threads)
        self.device = torch.device(device)
        self.learner = build_learner(self.cfg)
        if isinstance(self.learner.source, PoolTaskSource):  # episodes go to the device as uint8, float (and
            self.learner.source.device = self.device        # data.augment's transforms) happen there, batched
        # algorithm.task_chunk_size=0: as many tasks per vmap call as the chunk memory budget holds by the estimate
        self.learner.algorithm.chunk_limit = chunk_limit(self.cfg, str(self.device), self.learner.shape.x_shape)
        self.bf16 = self.cfg.scaling.precision == "bf16"
        # fp64: inputs and weights in float64 (None: as they come, float32)
        self.dtype = torch.float64 if self.cfg.scaling.precision == "fp64" else None
        # None: for image sources, whose sampling (decoding, stacking, augmenting) is numpy and torch work that
        # releases the GIL; not for regression sources, whose sampling is Python-bound and would take the GIL from
        # the step's own dispatch (sinusoid: fit/kernel 0.77 without, 0.65 with, docs/benchmarks.md)
        self.prefetch = isinstance(self.learner.source, PoolTaskSource) if prefetch is None else prefetch
        self._next: _Prefetch | None = None  # the next step's training tasks, being sampled
        self._pool: ThreadPoolExecutor | None = None  # its thread, started with the first prefetch
        self.prefetch_hits = 0  # meta-training shards served by the prefetched batch

    @contextlib.contextmanager
    def _numerics(self) -> Iterator[None]:
        """``scaling.precision``: IEEE fp32 (or TF32) CUDA arithmetic, and bf16 autocast of the forward passes
        (inner and outer) when asked; params and meta-gradients stay fp32."""
        with fp32_precision(self.cfg.scaling.precision), contextlib.ExitStack() as stack:
            if self.bf16:
                stack.enter_context(torch.autocast(device_type=self.device.type, dtype=torch.bfloat16))
            yield

    def _sample(self, split: str, step: int, indices: Sequence[int], *, augment: bool = False) -> TaskBatch:
        """``augment``: meta-training's tasks, whose support sets data.augment transforms (validation's never)."""
        self._settle()  # the task source is not shared between threads
        return self._draw(split, step, indices, augment=augment)

    def _draw(self, split: str, step: int, indices: Sequence[int], *, augment: bool = False) -> TaskBatch:
        source = self.learner.source
        assert source is not None, "a ShardWorker's learner is built with its task source"
        if augment and self.cfg.data.augment:  # set only for image sources, whose sample takes augment=
            return cast(AugmentingSource, source).sample(split, step, indices, augment=True).to(self.device, self.dtype)
        return source.sample(split, step, indices).to(self.device, self.dtype)

    def _params(self, params: Params) -> Params:
        return {k: torch.as_tensor(v).to(self.device, self.dtype) for k, v in params.items()}

    def _settle(self) -> TaskBatch | None:
        """Wait for the prefetch in flight (if any) and return its batch, keeping it for a later matching call."""
        return self._next.wait() if self._next is not None else None

    def _train_batch(self, step: int, indices: Sequence[int]) -> TaskBatch:
        """Meta-training's tasks ``indices`` at ``step``: the prefetched batch when it is exactly these, else sampled
        now; then (``prefetch``) the same indices at ``step + 1`` start sampling in the background."""
        key = (step, tuple(int(i) for i in indices))
        pending, self._next = self._next, None
        batch = pending.wait() if pending is not None and pending.key == key else None
        if batch is None:
            if pending is not None:
                pending.wait()  # a stale one still in flight must not use the source alongside this sample
            batch = self._draw("train", step, indices, augment=True)
        else:
            self.prefetch_hits += 1
        if self.prefetch:
            nxt = (step + 1, key[1])
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtl-ray-prefetch")
            self._next = _Prefetch(nxt, lambda: self._draw("train", nxt[0], nxt[1], augment=True), self._pool)
        return batch

    def close(self) -> None:
        """Let the prefetch in flight finish and drop it (and its thread)."""
        self._settle()
        self._next = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def meta_gradient(self, params: Params, step: int, indices: Sequence[int]) -> ShardResult:
        """Sum of meta-gradients of training tasks ``indices`` at ``step`` (grads returned on CPU)."""
        t0 = time.perf_counter()
        batch = self._train_batch(step, indices)
        hard = self.cfg.optim.hard_tasks > 0  # then also each task's classes ranked worst first (hard_meta_gradient)
        with self._numerics():
            result = self.learner.algorithm.meta_gradient(self._params(params), batch, per_class=hard)
        grads = {k: v.detach().cpu() for k, v in result.grads.items()}
        return ShardResult(grads=grads, num_tasks=result.num_tasks, metrics=result.metrics,
                           seconds=time.perf_counter() - t0,
                           failures=self._failures(result, step, indices) if hard else {})

    def _failures(self, result: ShardResult, step: int, indices: Sequence[int]) -> dict[int, tuple[int, ...]]:
        """Task index -> its classes (the source's class ids) ranked worst query accuracy first, from the
        meta-gradient's per-class scores (:func:`~mtl_ray.algorithms.base.rank_classes`)."""
        ranks = rank_classes(result.per_class[CLASS_ACC], result.per_class[CLASS_PROB]).tolist()
        self._settle()  # the task source is not shared with the prefetch thread
        classes = cast(ClassSampling, self.learner.source).task_classes("train", step, indices)
        return {int(i): tuple(cls[j] for j in rank) for i, cls, rank in zip(indices, classes, ranks, strict=True)}

    def hard_meta_gradient(self, params: Params, step: int, indices: Sequence[int],
                           classes: Sequence[Sequence[int]]) -> ShardResult:
        """Sum of meta-gradients of the step's hard tasks ``indices`` (``optim.hard_tasks``): hard task ``h`` is an
        episode over ``classes[k]`` (for ``h = indices[k]``) at coordinates ``(seed, "train", step,
        hard_task_index(h))`` (mtl_ray/data/hard_tasks.py), support sets augmented as the step's other tasks'."""
        t0 = time.perf_counter()
        source = cast(ClassSampling, self.learner.source)  # optim.hard_tasks is refused for other sources
        self._settle()  # the task source is not shared with the prefetch thread
        batch = source.sample_classes("train", step, [hard_task_index(h) for h in indices], classes,
                                      augment=bool(self.cfg.data.augment)).to(self.device, self.dtype)
        with self._numerics():
            result = self.learner.algorithm.meta_gradient(self._params(params), batch)
        grads = {k: v.detach().cpu() for k, v in result.grads.items()}
        return ShardResult(grads=grads, num_tasks=result.num_tasks, metrics=result.metrics,
                           seconds=time.perf_counter() - t0)

    def evaluate(self, params: Params, split: str, step: int, indices: Sequence[int],
                 inner_steps: int) -> dict[str, torch.Tensor]:
        """Per-task metrics ``{name: [len(indices)]}`` after adaptation with ``inner_steps`` steps."""
        batch = self._sample(split, step, indices)
        finetune = self.learner.finetune  # algorithm.finetune_steps > 0: test-time fine-tuning instead
        with self._numerics():
            if finetune is None:
                out = self.learner.algorithm.evaluate(self._params(params), batch, inner_steps)
            else:  # each task's augmentation from its own coordinates: the same in any shard or chunk
                seeds = [finetune_seed(self.cfg.seed, split, step, int(i)) for i in indices] if finetune.augment \
                    else None
                out = finetune.evaluate(self.learner.algorithm, self._params(params), batch, seeds)
        return {k: v.cpu() for k, v in out.items()}
