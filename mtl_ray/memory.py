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
    + one chunk          the tasks of one vmap call (algorithm.task_chunk_size, or the auto size of
                         mtl_ray.algorithms.base.chunks) x (examples x activation floats per example x 4 B x
                         graph factor + parameters x 4 B x copies per task)
    + bookkeeping        TASK_BYTES per task index of the meta-batch / validation / --episodes

*Activation floats per example* come from the model's shape alone (:func:`activation_floats`): for Conv4 each block
keeps about two maps at conv resolution and two at its output resolution (plus the 3x3 patches of an unfolded
block); an MLP two per hidden unit. The *graph factor* says how many such forward passes' worth of tensors a chunk
holds at its peak. Both were fitted to the resident set sizes of runs on a 2-core CPU (docs/benchmarks.md,
"Memory estimate", has the measurements). So it is within about 30% of what a process really takes, more often
below than above: good enough to refuse what cannot run (a meta-batch or a task thousands of times too big), not
a promise that what passes fits.
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
from pathlib import Path

from mtl_ray.config import Config
from mtl_ray.data import is_regression

MEMORY_CHECK_ENV = "MTL_RAY_MEMORY_CHECK"
BASE_BYTES = 450 * 2**20  # a compute process: Python, torch, mtl_ray (0.27-0.36 GB) and its first call (0.1 GB)
RAY_WORKER_BYTES = 200 * 2**20  # a Ray worker actor's own core worker, beyond BASE_BYTES (measured 0.2 GB)
RAY_LOCAL_BYTES = 500 * 2**20  # the processes of a local Ray that mtl-ray starts (raylet, GCS, ...: 0.55 GB)
FLOAT_BYTES = 4
# Sampling a shard: uint8 picks, their concatenation and stack, then the float32 batch (images); numpy float64
# draws, their stack and the float32 tensors (sinusoid, plus small per-task arrays).
SAMPLE_BYTES = {"images": 8, "sinusoid": 48}
SINUSOID_TASK_BYTES = 300
LABEL_BYTES = 16  # int64 labels, numpy and torch
TASK_BYTES = 100  # per task index: Python ints in the shard lists, per-task metrics
# Tensors a chunk holds at its peak, in forward passes' worth of activations (see the module docstring).
GRAPH_FACTOR = {"train": 1.85, "reptile": 0.75, "eval": 1.0}
UNFOLDED_BN_FACTOR = 2.0  # conv_impl native / im2col: the batch norm of the first block is not folded away
# Per-task parameter-sized tensors (adapted weights, their gradients) per inner step, and besides them.
PARAM_COPIES_PER_STEP, PARAM_COPIES = 2, 2
# Omniglot archives' image counts (the md5-pinned files of mtl_ray.data.omniglot.ARCHIVE_MD5).
OMNIGLOT_IMAGES = {"images_background": 19280, "images_evaluation": 13180, "images_background_small1": 2720,
                   "images_background_small2": 3120}
DIGITS_IMAGES = 1797
METRIC_LEARNERS = ("protonet", "relationnet")


# --------------------------------------------------------------------------- sizes


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
    """One input's shape as the task source will give it, without loading the data."""
    d = cfg.data
    if is_regression(cfg):
        return (1,)
    return (_parquet_channels(cfg) if d.source == "parquet" else 1, d.image_size, d.image_size)


def _table(cfg: Config) -> Path | None:
    from mtl_ray.data.parquet import resolve_table_path as _resolve_table_path

    p = _resolve_table_path(cfg.data)
    return p if p.is_file() else None


def _parquet_channels(cfg: Config) -> int:
    import pyarrow.parquet as pq

    from mtl_ray.data.imagetable import META_ENCODING, META_SHAPE, RAW

    path = _table(cfg)
    try:
        meta = pq.read_schema(path).metadata or {} if path else {}
        if meta.get(META_ENCODING) == RAW:
            return int(meta[META_SHAPE].decode().split(",")[0])
    except Exception:  # unreadable: check_data says why; estimate with one channel
        pass
    return 1


def dataset_images(cfg: Config) -> int:
    """How many images the source loads (each process holds them all as uint8); 0 for sinusoid."""
    d = cfg.data
    if d.source == "omniglot":
        return sum(OMNIGLOT_IMAGES.get(a, 0) for a in d.archives)
    if d.source == "digits":
        return DIGITS_IMAGES
    if d.source == "parquet":
        import pyarrow.parquet as pq

        path = _table(cfg)
        try:
            return pq.read_metadata(path).num_rows if path else 0
        except Exception:  # check_data reports an unreadable table
            return 0
    return 0


def _conv_blocks(c_in: int, size: int, channels: int, blocks: int, downsample: str, impl: str,
                 pooled: int | None = None) -> tuple[float, int, int]:
    """(activation floats per example, output side, parameters) of Conv4-style blocks."""
    pooled = blocks if pooled is None else pooled
    floats, params = 0.0, 0
    for i in range(blocks):
        cin = c_in if i == 0 else channels
        down = i < pooled
        conv_side = size if (downsample == "pool" or not down) else (size + 1) // 2
        out_side = size // 2 if (downsample == "pool" and down) else conv_side
        if impl == "im2col" or (impl == "folded" and cin * 9 <= 27):
            floats += 9 * cin * conv_side**2  # the unfolded 3x3 patches
        floats += channels * (2 * conv_side**2 + 2 * out_side**2)
        params += cin * 9 * channels + 3 * channels
        size = out_side
    return floats, size, params


def activation_floats(cfg: Config, x_shape: tuple[int, ...], ways: int) -> tuple[float, float, int]:
    """(activation floats per example of one forward pass, extra floats per task, parameters) of cfg's model."""
    m, a = cfg.model, cfg.algorithm
    out = 0 if a.name in METRIC_LEARNERS else ways
    if a.name == "relationnet":  # Conv4 body (2 pooled blocks) + relation blocks on (example, class) pairs
        body, side, params = _conv_blocks(x_shape[0], x_shape[-1], m.channels, 4, m.downsample, m.conv_impl, 2)
        rel, rside, rparams = _conv_blocks(2 * m.channels, side, m.channels, 2, m.downsample, m.conv_impl)
        pairs = ways * ways * (cfg.data.shots + cfg.data.queries)
        return body, pairs * (rel + 2 * m.channels * side**2), params + rparams + m.channels * rside**2 * 8 + 17
    if m.name == "mlp":
        width, floats, params = math.prod(x_shape), 0.0, 0
        for h in m.hidden_sizes:
            floats += 2 * h
            params += width * h + h
            width = h
        return floats + out, 0.0, params + width * out + out
    floats, side, params = _conv_blocks(x_shape[0], x_shape[-1], m.channels, m.blocks, m.downsample, m.conv_impl)
    if m.conv_impl != "folded":
        floats *= UNFOLDED_BN_FACTOR
    features = m.channels * side**2
    return floats + out, 0.0, params + features * out + out


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


def _chunk_tasks(cfg: Config, shard_tasks: int, elements_per_task: int, on_gpu: bool) -> int:
    """Tasks per vmap call, as mtl_ray.algorithms.base.chunks sizes them."""
    from mtl_ray.algorithms.base import AUTO_CHUNK_ELEMENTS

    if cfg.algorithm.task_chunk_size > 0:
        return min(cfg.algorithm.task_chunk_size, shard_tasks)
    if on_gpu or shard_tasks == 0:
        return shard_tasks
    parts = math.ceil(shard_tasks / max(1, AUTO_CHUNK_ELEMENTS // max(elements_per_task, 1)))
    return math.ceil(shard_tasks / parts)


def _layout(cfg: Config, workers: int) -> tuple[int, bool]:
    """(worker processes on this machine besides the driver, whether the driver computes itself)."""
    if workers == 0:
        return 0, True
    external = bool(cfg.scaling.address or os.environ.get("RAY_ADDRESS"))
    return (0 if external else workers), False


def _estimate(cfg: Config, *, what: str, total_tasks: int, shard_cap: int, mode: str, steps: int,
              workers: int) -> Estimate:
    """``total_tasks`` tasks (images, for pretraining) split over ``workers`` processes (0: in-process)."""
    d, a = cfg.data, cfg.algorithm
    x_shape = x_shape_of(cfg)
    regression = is_regression(cfg)
    ways = 1 if regression else d.ways
    per_example, per_task, params = activation_floats(cfg, x_shape, ways)
    if mode == "pretrain":  # a "task" is one image; one forward/backward over the worker's share
        examples, per_task, copies, factor = 1, 0.0, 0, GRAPH_FACTOR["train"]
    else:
        examples = (d.shots + d.queries) * (1 if regression else d.ways)
        factor = GRAPH_FACTOR["reptile" if (a.name == "reptile" and mode == "train") else mode]
        copies = 0 if a.name in METRIC_LEARNERS else PARAM_COPIES + PARAM_COPIES_PER_STEP * max(steps, 1)
    elements = examples * math.prod(x_shape)
    shard_tasks = min(math.ceil(total_tasks / max(1, workers)), shard_cap)
    on_gpu = cfg.scaling.gpus_per_worker > 0
    chunk_tasks = shard_tasks if mode == "pretrain" else _chunk_tasks(cfg, shard_tasks, elements, on_gpu)
    sample = SAMPLE_BYTES["sinusoid" if regression else "images"]
    task_inputs = elements * sample + examples * LABEL_BYTES + (SINUSOID_TASK_BYTES if regression else 0)
    task_chunk = 0 if on_gpu else FLOAT_BYTES * ((examples * per_example + per_task) * factor + params * copies)
    inputs, chunk = shard_tasks * task_inputs, int(chunk_tasks * task_chunk)
    dataset = 0 if regression else dataset_images(cfg) * math.prod(x_shape)
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
                    one_task=int(per_process - inputs - chunk + task_inputs + task_chunk), what=what)


def estimate_training(cfg: Config) -> list[Estimate]:
    """A training step and (when optim.val_every > 0) a validation, as run by ``mtl-ray train``."""
    o, n = cfg.optim, cfg.scaling.num_workers
    out = [_estimate(cfg, what="a training step", total_tasks=o.meta_batch_size, shard_cap=o.meta_batch_size,
                     mode="train", steps=cfg.algorithm.inner_steps, workers=n)]
    if o.val_every > 0:
        out.append(_estimate(cfg, what="validation", total_tasks=o.val_tasks, shard_cap=o.meta_batch_size,
                             mode="eval", steps=cfg.eval_inner_steps, workers=n))
    return out


def estimate_evaluation(cfg: Config, episodes: int) -> Estimate:
    """``mtl-ray eval``: in-process, shards of at most optim.meta_batch_size episodes."""
    return _estimate(cfg, what="evaluation", total_tasks=episodes,
                     shard_cap=cfg.optim.meta_batch_size, mode="eval", steps=cfg.eval_inner_steps, workers=0)


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
                    available: Callable[[], tuple[int, str] | None] = available_memory) -> list[str]:
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
        estimates = [estimate_evaluation(cfg, episodes)]
    else:
        estimates = estimate_training(cfg)
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
