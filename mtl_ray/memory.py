"""A rough estimate of the memory a run needs on this machine, checked before anything starts.

``mtl-ray train``/``tune``/``pretrain``/``validate`` (:func:`mtl_ray.recipes.train.check_config`) and ``mtl-ray eval``
refuse a config whose estimate exceeds the memory available here, naming the estimate, the memory available
and what to lower. Without it a meta-batch of 10**8 Omniglot tasks dies in a multi-TB allocation traceback
(or, for sinusoid, grows until the kernel kills it).

The estimate, per compute process (the in-process trainer, or each Ray worker actor)::

    BASE_BYTES                                   Python, torch, mtl_ray
  + dataset images       uint8, images x C x S x S (each process loads its own pools)
  + max(training step, validation) where each is
      shard inputs       tasks in the process's shard x input elements per task x SAMPLE_BYTES (+ labels)
    + one chunk          the tasks of one vmap call (algorithm.task_chunk_size, or with 0 as many as
                         chunk_budget holds) x (examples x activation floats per example x 4 B x
                         graph factor + parameters x 4 B x copies per task)
    + bookkeeping        TASK_BYTES per task index of the meta-batch / validation / --episodes

The estimate names no component: *activation floats per example* come from the model class's own
``activation_floats`` (mtl_ray.models.registry.ModelClass; e.g. Conv4: each block keeps about two maps at conv
resolution and two at its output resolution, plus the 3x3 patches of an unfolded block; an MLP two per hidden
unit), the parameters from a skeleton built on the meta device, the input shape and image count from the task
source's ``SourceSpec`` (``input_shape``, ``count_images``), and what the algorithm holds from its capabilities
(``uses_head``, ``has_inner_loop``, ``outer_backward``). The *graph factor* says how many such forward passes'
worth of tensors a chunk holds at its peak. Both were fitted to the resident set sizes of runs on a 2-core CPU
(docs/benchmarks.md, "Memory estimate", has the measurements). So it is within about 30% of what a process
really takes, more often below than above: good enough to refuse what cannot run (a meta-batch or a task
thousands of times too big), not a promise that what passes fits.

The same per-task figure sizes the automatic chunks (``algorithm.task_chunk_size=0``): a ShardWorker gives its
algorithm :func:`chunk_limit`, the most tasks whose chunk fits :func:`chunk_budget`
(``algorithm.chunk_memory_mb``, or one derived from this machine's memory or the GPU's).
The memory available is the kernel's ``MemAvailable`` (``/proc/meminfo``), or less when a cgroup limit leaves
less. Workers on an external Ray cluster (``scaling.address`` or ``$RAY_ADDRESS``) are not checked (their nodes'
memory is not known here), nor GPU memory (CUDA reports its own out-of-memory); the driver's own share is.
``MTL_RAY_MEMORY_CHECK=0`` skips the check.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import cast

import torch

from mtl_ray.algorithms.base import ChunkLimit, tasks_within
from mtl_ray.algorithms.registry import algorithm_class
from mtl_ray.config import Config, ModelConfig
from mtl_ray.data.base import gray_images
from mtl_ray.data.registry import SOURCES, is_regression
from mtl_ray.models import MODELS, ModelClass

MEMORY_CHECK_ENV = "MTL_RAY_MEMORY_CHECK"
BASE_BYTES = 450 * 2**20  # a compute process: Python, torch, mtl_ray (0.27-0.36 GB) and its first call (0.1 GB)
RAY_WORKER_BYTES = 200 * 2**20  # a Ray worker actor's own core worker, beyond BASE_BYTES (measured 0.2 GB)
RAY_LOCAL_BYTES = 500 * 2**20  # the processes of a local Ray that mtl-ray starts (raylet, GCS, ...: 0.55 GB)
FLOAT_BYTES = 4
# Sampling a shard: uint8 picks, their concatenation and stack, then the float32 batch (images); numpy float64
# draws, their stack and the float32 tensors (sinusoid, plus small per-task arrays).
SAMPLE_BYTES = {"classification": 8, "regression": 48}
REGRESSION_TASK_BYTES = 300
LABEL_BYTES = 16  # int64 labels, numpy and torch
TASK_BYTES = 100  # per task index: Python ints in the shard lists, per-task metrics
# Tensors a chunk holds at its peak, in forward passes' worth of activations (see the module docstring).
# "forward": a training step whose update needs no backward through the tasks (outer_backward False, e.g. Reptile's).
GRAPH_FACTOR = {"train": 1.85, "forward": 0.75, "eval": 1.0}
# Each second-order inner step past the first keeps another SECOND_ORDER_STEP support passes' worth of tensors
# (Conv4 0.9-1.6, ResNet-12 1.05; docs/benchmarks.md, "Backbones: speed and memory"). First order keeps neither those
# nor each step's adapted weights (its inner gradients are constants): one step's worth, like one step.
SECOND_ORDER_STEP = 1.0
# Per-task parameter-sized tensors (adapted weights, their gradients) per inner step, and besides them.
PARAM_COPIES_PER_STEP, PARAM_COPIES = 2, 2
# algorithm.task_chunk_size=0 with algorithm.chunk_memory_mb=0 (chunk_budget): one vmap call's tensors on CPU take
# at most CPU_CHUNK_BYTES (the main job: 8 tasks a chunk, as the input-size rule gave) and at most AVAILABLE_SHARE of
# the memory available per process; on a GPU GPU_SHARE of its memory.
CPU_CHUNK_BYTES = 2**30
AVAILABLE_SHARE = 0.25
GPU_SHARE = 0.5


# --------------------------------------------------------------------------- sizes


Available = Callable[[], "tuple[int, str] | None"]  # () -> (bytes, where the number comes from), or None


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def available_memory() -> tuple[int, str] | None:
    """(bytes, where the number comes from) of memory a new process can use here; None when unknown."""
    found: list[tuple[int, str]] = []
    try:
        with open("/proc/meminfo") as f:
            info = {k: v for k, _, v in (line.partition(":") for line in f)}
        found.append((int(info["MemAvailable"].split()[0]) * 1024, "MemAvailable in /proc/meminfo"))
    except (OSError, KeyError, ValueError, IndexError):
        with contextlib.suppress(ValueError, OSError, AttributeError):
            found.append((os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory"))
    for limit, usage in _cgroup_files():
        try:
            cap, used = limit.read_text().strip(), int(usage.read_text().strip())
        except (OSError, ValueError):
            continue
        if cap.isdigit() and int(cap) < 2**60:  # "max" or a huge number: no limit
            found.append((max(0, int(cap) - used), f"cgroup limit {fmt_bytes(int(cap))} less its usage"))
    return min(found) if found else None


def _cgroup_files() -> list[tuple[Path, Path]]:
    """(limit, usage) files of this process's memory cgroup (v2 and v1), and of the cgroup root seen here."""
    root = Path("/sys/fs/cgroup")
    out = [(root / "memory.max", root / "memory.current"),
           (root / "memory" / "memory.limit_in_bytes", root / "memory" / "memory.usage_in_bytes")]
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        rel = path.strip().lstrip("/")
        if not rel:
            continue
        if controllers == "":
            out.append((root / rel / "memory.max", root / rel / "memory.current"))
        elif "memory" in controllers.split(","):
            v1 = root / "memory" / rel
            out.append((v1 / "memory.limit_in_bytes", v1 / "memory.usage_in_bytes"))
    return out


def x_shape_of(cfg: Config) -> tuple[int, ...]:
    """One input's shape as the task source will give it, without loading the data (its ``SourceSpec``)."""
    spec = SOURCES.get(cfg.data.source)
    return spec.input_shape(cfg) if spec is not None else gray_images(cfg)


def dataset_images(cfg: Config) -> int:
    """How many images the source loads (each process holds them all as uint8); 0 for generated tasks."""
    spec = SOURCES.get(cfg.data.source)
    return spec.count_images(cfg) if spec is not None else 0


@lru_cache(maxsize=64)
def _parameters(cfg_model: ModelConfig, cls: type[ModelClass], x_shape: tuple[int, ...], out_features: int) -> int:
    """Parameters of the model, counted on a skeleton built on the meta device (no memory, any size)."""
    with torch.device("meta"):
        model = cls.from_config(cfg_model, x_shape, out_features)
    return sum(p.numel() for p in model.parameters())


def activation_floats(cfg: Config, x_shape: tuple[int, ...], ways: int) -> tuple[float, float, int]:
    """(activation floats per example of one forward pass, extra floats per task, parameters) of cfg's model:
    the model class's own ``activation_floats`` (mtl_ray.models.registry.ModelClass), for the model the algorithm
    builds (its ``model_class``, else ``model.name``'s)."""
    alg = algorithm_class(cfg.algorithm.name)
    cls = cast("type[ModelClass]", alg.model_class or MODELS[cfg.model.name])
    out = ways if alg.uses_head else 0
    per_example, per_task = cls.activation_floats(cfg, x_shape, out)
    return per_example, per_task, _parameters(cfg.model, cls, tuple(x_shape), out)


def chunk_budget(cfg: Config, device: str = "cpu",
                 available: Available = available_memory) -> int:
    """Bytes one ``vmap`` call's tensors may take when ``algorithm.task_chunk_size`` is 0 (auto).

    ``algorithm.chunk_memory_mb`` when set; else on CPU :data:`CPU_CHUNK_BYTES`, or :data:`AVAILABLE_SHARE` of the
    memory available per compute process here when that is less; on a GPU :data:`GPU_SHARE` of the device's memory
    (times ``scaling.gpus_per_worker`` when a worker has a fraction of one). The CPU cap keeps chunks the same size
    on any machine with enough memory (a float32 sum over other chunks rounds differently), and bigger chunks do not
    run faster on CPU (docs/benchmarks.md, "The main job: glibc's heap and task chunks").
    """
    a, sc = cfg.algorithm, cfg.scaling
    if a.chunk_memory_mb > 0:
        return a.chunk_memory_mb * 2**20
    if device.startswith("cuda"):
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        return int(GPU_SHARE * total * min(1.0, sc.gpus_per_worker or 1.0))
    have = available()
    if have is None:
        return CPU_CHUNK_BYTES
    return min(CPU_CHUNK_BYTES, int(AVAILABLE_SHARE * have[0] / max(1, sc.num_workers)))


# --------------------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class Estimate:
    """Bytes on this machine, and what dominates them (for the message)."""

    total: int
    processes: int  # compute processes on this machine
    per_process: int
    dataset: int  # per process
    inputs: int  # shard inputs, per process
    chunk: int  # one chunk's tensors, per process
    bookkeeping: int  # the driver's
    chunk_tasks: int
    shard_tasks: int
    one_task: int  # what a process would need for a shard (and a chunk) of one task
    what: str  # "a training step", "validation", "evaluation", "a pretraining step"


@dataclass(frozen=True)
class TaskCost:
    """What one task takes in a compute process (bytes): its sampled inputs, and its share of a chunk's tensors."""

    examples: int  # support + query examples
    inputs: int  # sampled inputs and labels, held for the whole shard
    chunk: int  # its share of one vmap call's tensors at their peak (activations, their graph, adapted weights)


def task_cost(cfg: Config, mode: str, steps: int, x_shape: tuple[int, ...] | None = None) -> TaskCost:
    """One task of ``cfg`` in ``mode`` ("train", "eval"; "pretrain": one image) with ``steps`` inner steps."""
    d, a = cfg.data, cfg.algorithm
    x_shape = x_shape_of(cfg) if x_shape is None else tuple(x_shape)
    regression = is_regression(cfg)
    ways = 1 if regression else d.ways
    per_example, per_task, params = activation_floats(cfg, x_shape, ways)
    alg = algorithm_class(a.name)
    views = 0  # floats of test-time fine-tuning's augmented support copies (algorithm.finetune_augment)
    if mode == "pretrain":  # a "task" is one image; one forward/backward over the worker's share
        examples, per_task, copies, factor = 1, 0.0, 0, GRAPH_FACTOR["train"]
    else:
        support = d.shots * (1 if regression else d.ways)
        examples = (d.shots + d.queries) * (1 if regression else d.ways)
        factor = GRAPH_FACTOR["forward" if (not alg.outer_backward and mode == "train") else mode]
        second_order = mode == "train" and alg.outer_backward and not (a.first_order or not alg.second_order)
        kept = max(steps, 1) if second_order else 1  # inner steps whose adapted weights stay for the outer backward
        copies = PARAM_COPIES + PARAM_COPIES_PER_STEP * kept if alg.has_inner_loop else 0
        if second_order and alg.has_inner_loop:  # every inner step's graph stays for the outer backward
            factor *= 1 + SECOND_ORDER_STEP * max(steps - 1, 0) * support / max(examples, 1)
        if mode == "eval" and a.finetune_steps > 0:  # test-time fine-tuning: a backward through the body each step,
            factor = max(factor, GRAPH_FACTOR["train"])  # per-task copies of the body, and augmented support copies
            copies = PARAM_COPIES + PARAM_COPIES_PER_STEP
            views = a.finetune_steps * support * math.prod(x_shape) * 2 if a.finetune_augment else 0
    elements = examples * math.prod(x_shape)
    wide = 2 if cfg.scaling.precision == "fp64" else 1  # float64 inputs, weights and activations
    sample = SAMPLE_BYTES["regression" if regression else "classification"] + (wide - 1) * FLOAT_BYTES
    inputs = elements * sample + examples * LABEL_BYTES + (REGRESSION_TASK_BYTES if regression else 0)
    chunk = wide * FLOAT_BYTES * ((examples * per_example + per_task) * factor + params * copies + views)
    return TaskCost(examples=examples, inputs=int(inputs), chunk=int(chunk))


def chunk_limit(cfg: Config, device: str = "cpu", x_shape: tuple[int, ...] | None = None) -> ChunkLimit:
    """``(training, inner steps) -> most tasks per vmap call`` within :func:`chunk_budget`: what a ShardWorker hands
    its algorithm (``FunctionalAlgorithm.chunk_limit``) for ``algorithm.task_chunk_size=0``."""
    budget = chunk_budget(cfg, device)

    @lru_cache(maxsize=16)
    def limit(training: bool, steps: int) -> int:
        return tasks_within(budget, task_cost(cfg, "train" if training else "eval", steps, x_shape).chunk)

    return limit


def _chunk_tasks(cfg: Config, shard_tasks: int, task_chunk: int, on_gpu: bool,
                 available: Callable[[], tuple[int, str] | None]) -> int:
    """Tasks per vmap call, as the workers size them (:func:`chunk_limit`, mtl_ray.algorithms.base.chunks)."""
    if cfg.algorithm.task_chunk_size > 0:
        return min(cfg.algorithm.task_chunk_size, shard_tasks)
    if on_gpu or shard_tasks == 0:  # sized by the GPU's memory, which is not known here
        return shard_tasks
    parts = math.ceil(shard_tasks / tasks_within(chunk_budget(cfg, "cpu", available), task_chunk))
    return math.ceil(shard_tasks / parts)


def _layout(cfg: Config, workers: int) -> tuple[int, bool]:
    """(worker processes on this machine besides the driver, whether the driver computes itself)."""
    if workers == 0:
        return 0, True
    external = bool(cfg.scaling.address or os.environ.get("RAY_ADDRESS"))
    return (0 if external else workers), False


def _estimate(cfg: Config, *, what: str, total_tasks: int, shard_cap: int, mode: str, steps: int,
              workers: int, available: Available = available_memory,
              x_shape: tuple[int, ...] | None = None) -> Estimate:
    """``total_tasks`` tasks (images, for pretraining) split over ``workers`` processes (0: in-process)."""
    x_shape = x_shape_of(cfg) if x_shape is None else tuple(x_shape)
    cost = task_cost(cfg, mode, steps, x_shape)
    shard_tasks = min(math.ceil(total_tasks / max(1, workers)), shard_cap)
    on_gpu = cfg.scaling.gpus_per_worker > 0
    chunk_tasks = shard_tasks if mode == "pretrain" else _chunk_tasks(cfg, shard_tasks, cost.chunk, on_gpu, available)
    task_chunk = 0 if on_gpu else cost.chunk
    inputs, chunk = shard_tasks * cost.inputs, int(chunk_tasks * task_chunk)
    dataset = 0 if is_regression(cfg) else dataset_images(cfg) * math.prod(x_shape)
    per_process = BASE_BYTES + dataset + inputs + chunk
    bookkeeping = 0 if mode == "pretrain" else total_tasks * TASK_BYTES  # pretraining samples batches as tensors
    here, in_process = _layout(cfg, workers)
    if not in_process:
        per_process += RAY_WORKER_BYTES
    driver = bookkeeping if in_process else BASE_BYTES + dataset + bookkeeping  # it builds the task source too
    if here:
        driver += RAY_LOCAL_BYTES
    total = per_process * (1 if in_process else here) + driver
    return Estimate(total=int(total), processes=1 if in_process else here, per_process=int(per_process),
                    dataset=int(dataset), inputs=int(inputs), chunk=chunk, bookkeeping=int(bookkeeping),
                    chunk_tasks=int(chunk_tasks), shard_tasks=int(shard_tasks),
                    one_task=int(per_process - inputs - chunk + cost.inputs + task_chunk), what=what)


def estimate_shard(cfg: Config, tasks: int, *, mode: str = "train", steps: int | None = None,
                   available: Available = available_memory, x_shape: tuple[int, ...] | None = None) -> Estimate:
    """One in-process shard of ``tasks`` tasks of inputs ``x_shape`` (default: the source's), as bench/backbones.py
    measures it."""
    steps = (cfg.algorithm.inner_steps if mode == "train" else cfg.eval_inner_steps) if steps is None else steps
    return _estimate(cfg, what="a training step" if mode == "train" else "evaluation", total_tasks=tasks,
                     shard_cap=tasks, mode=mode, steps=steps, workers=0, available=available, x_shape=x_shape)


def estimate_training(cfg: Config, available: Available = available_memory) -> list[Estimate]:
    """A training step and (when optim.val_every > 0) a validation, as run by ``mtl-ray train``."""
    o, n = cfg.optim, cfg.scaling.num_workers
    out = [_estimate(cfg, what="a training step", total_tasks=o.meta_batch_size, shard_cap=o.meta_batch_size,
                     mode="train", steps=cfg.algorithm.inner_steps, workers=n, available=available)]
    if o.val_every > 0:
        out.append(_estimate(cfg, what="validation", total_tasks=o.val_tasks, shard_cap=o.meta_batch_size,
                             mode="eval", steps=cfg.eval_inner_steps, workers=n, available=available))
    return out


def estimate_evaluation(cfg: Config, episodes: int, available: Available = available_memory) -> Estimate:
    """``mtl-ray eval``: in-process, shards of at most optim.meta_batch_size episodes."""
    return _estimate(cfg, what="evaluation", total_tasks=episodes,
                     shard_cap=cfg.optim.meta_batch_size, mode="eval", steps=cfg.eval_inner_steps, workers=0,
                     available=available)


def estimate_pretraining(cfg: Config) -> Estimate:
    """``mtl-ray pretrain``: pretrain.num_workers Ray Train workers, each with its share of pretrain.batch_size."""
    p = cfg.pretrain
    return _estimate(cfg, what="a pretraining step", total_tasks=p.batch_size, shard_cap=p.batch_size,
                     mode="pretrain", steps=0, workers=p.num_workers)


# --------------------------------------------------------------------------- the check


def _fix(cfg: Config, e: Estimate, free: int, count_key: str, shard_key: str) -> str:
    task = ("data.queries or data.shots" if is_regression(cfg)
            else "data.ways, data.shots, data.queries or data.image_size")
    if e.what == "a pretraining step":
        task = "data.image_size"
    if e.dataset >= max(e.inputs, e.chunk, e.bookkeeping):
        return f"lower data.image_size (the dataset's images alone take {fmt_bytes(e.dataset)} per process)"
    if e.bookkeeping >= max(e.inputs, e.chunk):
        return f"lower {count_key}"
    driver = e.total - e.per_process * e.processes if e.processes > 1 else 0
    if e.one_task * max(e.processes, 1) + driver > free:
        one = "one image" if e.what == "a pretraining step" else "one task"
        workers = f" per worker ({e.processes} here; or lower scaling.num_workers)" if e.processes > 1 else ""
        return f"{one} alone needs about {fmt_bytes(e.one_task)}{workers}: lower {task}, or use a smaller model"
    if e.what == "a pretraining step":
        return f"lower {shard_key}"
    if e.inputs >= e.chunk or e.chunk_tasks <= 1:
        return f"lower {shard_key} (or {task})"
    return f"set algorithm.task_chunk_size below {e.chunk_tasks} (fewer tasks per vmap call), or lower {shard_key}"


def _describe(cfg: Config, e: Estimate, episodes: int | None) -> tuple[str, str, str]:
    """(the values that size ``e``; the key to lower for fewer tasks in all; the key for smaller shards)."""
    d, o, a = cfg.data, cfg.optim, cfg.algorithm
    if e.what == "a pretraining step":
        return (f"pretrain.batch_size={cfg.pretrain.batch_size} ({e.shard_tasks} {d.image_size}x{d.image_size} "
                "images per worker)", "pretrain.batch_size", "pretrain.batch_size")
    key, value = (("--episodes", episodes) if episodes is not None else
                  ("optim.val_tasks", o.val_tasks) if e.what == "validation" else
                  ("optim.meta_batch_size", o.meta_batch_size))
    task = (f"{d.shots}+{d.queries} points" if is_regression(cfg)
            else f"{d.ways}-way {d.shots}+{d.queries} {d.image_size}x{d.image_size} images")
    per_call = f"{e.chunk_tasks} task{'s' * (e.chunk_tasks != 1)} per vmap call"
    chunk = f"algorithm.task_chunk_size={a.task_chunk_size}" + ("" if a.task_chunk_size else " (auto)")
    capped = key != "optim.meta_batch_size" and e.shard_tasks == o.meta_batch_size  # shards of at most that
    shard_key = "optim.meta_batch_size" if capped else key
    return f"{key}={value} ({e.shard_tasks} per shard of {task}; {chunk}: {per_call})", key, shard_key


def memory_problems(cfg: Config, *, episodes: int | None = None, pretrain: bool = False,
                    available: Available = available_memory) -> list[str]:
    """Why ``cfg`` cannot run in the memory available here (empty when it may, or when that is unknown).

    ``episodes``: check ``mtl-ray eval --episodes`` instead of training; ``pretrain``: ``mtl-ray pretrain``.
    """
    if os.environ.get(MEMORY_CHECK_ENV, "1") == "0":
        return []
    have = available()
    if have is None:
        return []
    free, source = have
    if pretrain:
        estimates = [estimate_pretraining(cfg)]
    elif episodes is not None:
        estimates = [estimate_evaluation(cfg, episodes, available)]
    else:
        estimates = estimate_training(cfg, available)
    problems: dict[str, str] = {}  # fix -> message: one message per fix (training and validation often share it)
    for e in estimates:
        if e.total <= free:
            continue
        sizes, count_key, shard_key = _describe(cfg, e, episodes)
        fix = _fix(cfg, e, free, count_key, shard_key)
        where = (f"{e.processes} workers and the driver, {fmt_bytes(e.per_process)} per worker" if e.processes > 1
                 else "in one process" if e.processes == 1 else "in the driver")
        parts = {"dataset images": e.dataset, "shard inputs": e.inputs, "one chunk's activations": e.chunk,
                 "task indices": e.bookkeeping}
        biggest = max(parts, key=parts.__getitem__)
        problems.setdefault(fix, (
            f"memory: {e.what} with {sizes} needs about {fmt_bytes(e.total)} here ({where}; most of it "
            f"{biggest}, {fmt_bytes(parts[biggest])}), expected at most the {fmt_bytes(free)} available "
            f"({source}); {fix}. The estimate is rough (mtl_ray/memory.py); {MEMORY_CHECK_ENV}=0 skips it"))
    return list(problems.values())
