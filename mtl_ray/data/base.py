"""Task batches, the task-source protocol and deterministic per-task randomness.

A task is a pure function of ``(seed, split, step, index)``: :func:`task_rng` derives an
independent generator for each task, so a batch sampled whole, in chunks, or in shards spread over
any number of workers contains bit-identical tasks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch

from mtl_ray.config import Config, DataConfig
from mtl_ray.data.normalise import normalise

Split = Literal["train", "val", "test", "all"]
SPLITS: tuple[str, ...] = ("train", "val", "test", "all")
_SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}

TaskKind = Literal["classification", "regression"]


@dataclass(frozen=True)
class TaskBatch:
    """``T`` tasks stacked on dim 0.

    Classification (N ways, K shots, Q queries per class, images ``C x H x W``):
      ``support_x [T, N*K, C, H, W]``, ``support_y [T, N*K]`` (int64 in ``[0, N)``),
      ``query_x [T, N*Q, C, H, W]``, ``query_y [T, N*Q]``.
    Regression (K support points, Q query points, ``D`` input features):
      ``support_x [T, K, D]``, ``support_y [T, K, 1]``, ``query_x [T, Q, D]``, ``query_y [T, Q, 1]``.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    @property
    def num_tasks(self) -> int:
        return int(self.support_x.shape[0])

    def slice(self, start: int, stop: int) -> TaskBatch:
        return TaskBatch(self.support_x[start:stop], self.support_y[start:stop],
                         self.query_x[start:stop], self.query_y[start:stop])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TaskBatch:
        def mv(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return TaskBatch(mv(self.support_x), mv(self.support_y), mv(self.query_x), mv(self.query_y))

    @staticmethod
    def stack(tasks: Sequence[TaskBatch]) -> TaskBatch:
        return TaskBatch(*(torch.cat([getattr(t, f) for t in tasks])
                           for f in ("support_x", "support_y", "query_x", "query_y")))


@runtime_checkable
class TaskSource(Protocol):
    """Something that turns ``(split, step, indices)`` into a :class:`TaskBatch`.

    ``kind`` is "classification" or "regression"; ``x_shape`` is one input's shape
    (``(C, H, W)`` for images, ``(D,)`` for vectors); ``ways`` the outputs a model needs.
    """

    kind: TaskKind
    x_shape: tuple[int, ...]
    ways: int
    md5s: dict[str, str]

    def sample(self, split: str, step: int, indices: Sequence[int]) -> TaskBatch: ...

    def num_classes(self, split: str) -> int: ...


def task_rng(seed: int, split: str, step: int, index: int) -> np.random.Generator:
    """An independent generator for one task, a pure function of its coordinates."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"split: got {split!r}, expected one of {SPLITS}")
    if min(seed, step, index) < 0:
        raise ValueError(f"task coordinates must be >= 0, got seed={seed} step={step} index={index}")
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_IDS[split], step, index]))


def stable_fraction(text: str) -> float:
    """A deterministic value in [0, 1) for a string (used to split classes by label)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0**64


@dataclass(frozen=True)
class ClassPool:
    """Images of one split grouped by class: ``images[c]`` is ``[n_c, C, H, W]`` uint8.

    ``rotations`` > 1 adds each class rotated by 90°·r as a new class (Santoro et al. 2016),
    so the pool has ``len(images) * rotations`` classes.
    """

    names: tuple[str, ...]
    images: tuple[np.ndarray, ...]
    rotations: int = 1

    @property
    def num_classes(self) -> int:
        return len(self.images) * self.rotations

    @property
    def min_examples(self) -> int:
        return min((len(x) for x in self.images), default=0)

    def draw_classes(self, rng: np.random.Generator, ways: int) -> np.ndarray:
        """An episode's classes ``[N]`` (class ``classes[j]`` is its label ``j``): the first thing it draws."""
        return rng.choice(self.num_classes, size=ways, replace=False)

    def episode(self, rng: np.random.Generator, ways: int, shots: int, queries: int,
                classes: Sequence[int] | None = None) -> tuple[np.ndarray, ...]:
        """One N-way episode: (support_x [N*K,C,H,W] uint8, support_y [N*K], query_x, query_y).

        ``classes``: the episode's classes, label ``j`` being ``classes[j]`` (``ways`` of them, distinct), instead
        of drawing them (:meth:`draw_classes`); the examples are then the first draws of ``rng``.
        """
        picked = self.draw_classes(rng, ways) if classes is None else classes
        sx, sy, qx, qy = [], [], [], []
        for label, cls in enumerate(picked):
            base, rot = divmod(int(cls), self.rotations)
            pool = self.images[base]
            pick = rng.choice(len(pool), size=shots + queries, replace=False)
            imgs = pool[pick]
            if rot:
                imgs = np.rot90(imgs, k=rot, axes=(-2, -1))
            sx.append(imgs[:shots])
            qx.append(imgs[shots:])
            sy.append(np.full(shots, label))
            qy.append(np.full(queries, label))
        return np.concatenate(sx), np.concatenate(sy), np.concatenate(qx), np.concatenate(qy)


def to_float_images(x: np.ndarray) -> torch.Tensor:
    """uint8 images (ink = 255) -> float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(x)).float().div_(255.0)


class PoolTaskSource:
    """A :class:`TaskSource` over per-split :class:`ClassPool` s (Omniglot, Parquet, digits).

    Images leave it as ``(x / 255 - mean[c]) / std[c]`` (``channel_mean`` / ``channel_std``, the run's
    ``data.channel_mean`` / ``data.channel_std``; empty: pixels in [0, 1]). ``augment`` (a
    :class:`mtl_ray.data.augment.Augment`, ``data.augment=support``) transforms the support sets of the tasks that
    :meth:`sample` is asked to augment (meta-training's, ``augment=True``), before the normalisation, with
    parameters drawn from each task's own coordinates. ``device``: where the uint8 episodes are copied to and made
    float (the worker sets its own, so augmentation runs batched there).
    """

    kind: TaskKind = "classification"

    def __init__(self, pools: dict[str, ClassPool], *, seed: int, ways: int, shots: int, queries: int,
                 md5s: dict[str, str] | None = None, name: str = "images",
                 channel_mean: Sequence[float] = (), channel_std: Sequence[float] = (),
                 augment: Augmenter | None = None, device: torch.device | str = "cpu"):
        self.pools = pools
        self.seed = seed
        self.ways = ways
        self.shots = shots
        self.queries = queries
        self.md5s = dict(md5s or {})
        self.name = name
        any_pool = next(p for p in pools.values() if p.images)
        self.x_shape = tuple(int(s) for s in any_pool.images[0].shape[1:])
        self.channel_mean = tuple(float(v) for v in channel_mean)
        self.channel_std = tuple(float(v) for v in channel_std)
        self.augment = augment
        self.device = torch.device(device)

    def num_classes(self, split: str) -> int:
        return self.pools[split].num_classes

    def min_examples(self, split: str) -> int:
        return self.pools[split].min_examples

    def sample(self, split: str, step: int, indices: Sequence[int], *, augment: bool = False) -> TaskBatch:
        """Tasks ``(seed, split, step, i)`` for ``i`` in ``indices``; ``augment``: transform their support sets with
        :attr:`augment` (when set), each task's from its own coordinates, so a task is the same alone, in any batch
        and on any worker."""
        pool = self.pools[split]
        parts = [pool.episode(task_rng(self.seed, split, step, int(i)), self.ways, self.shots, self.queries)
                 for i in indices]
        return self._batch(parts, split, step, indices, augment)

    def task_classes(self, split: str, step: int, indices: Sequence[int]) -> list[tuple[int, ...]]:
        """The classes of tasks ``(seed, split, step, i)`` as :meth:`sample` draws them: ``out[k][j]`` is the class
        (its index in the split's :class:`ClassPool`, rotations included) of task ``indices[k]``'s label ``j``."""
        pool = self.pools[split]
        return [tuple(int(c) for c in pool.draw_classes(task_rng(self.seed, split, step, int(i)), self.ways))
                for i in indices]

    def sample_classes(self, split: str, step: int, indices: Sequence[int], classes: Sequence[Sequence[int]], *,
                       augment: bool = False) -> TaskBatch:
        """Tasks at coordinates ``(seed, split, step, i)`` for ``i`` in ``indices`` over the classes given, not drawn:
        task ``indices[k]``'s label ``j`` is class ``classes[k][j]`` of the split (``data.ways`` distinct classes
        each; as :meth:`task_classes` numbers them). Its support and query examples (and, with ``augment``, its
        augmentation) come from its coordinates as :meth:`sample`'s do, so a task is the same alone, in any batch
        and on any worker (what optim.hard_tasks samples, mtl_ray/data/hard_tasks.py)."""
        pool = self.pools[split]
        if len(classes) != len(indices):
            raise ValueError(f"sample_classes: got {len(classes)} class lists for {len(indices)} tasks, expected one "
                             "per task")
        for cls in classes:
            if len(cls) != self.ways or len(set(cls)) != self.ways or not all(
                    0 <= int(c) < pool.num_classes for c in cls):
                raise ValueError(f"sample_classes: got classes {list(cls)}, expected {self.ways} distinct classes of "
                                 f"split {split!r} (0 .. {pool.num_classes - 1})")
        parts = [pool.episode(task_rng(self.seed, split, step, int(i)), self.ways, self.shots, self.queries,
                              [int(c) for c in cls]) for i, cls in zip(indices, classes, strict=True)]
        return self._batch(parts, split, step, indices, augment)

    def _batch(self, parts: Sequence[tuple[np.ndarray, ...]], split: str, step: int, indices: Sequence[int],
               augment: bool) -> TaskBatch:
        """Episodes (uint8, as :meth:`ClassPool.episode` gives them) -> a :class:`TaskBatch`: made float on
        :attr:`device`, support sets augmented when asked, then normalised."""
        sx, sy, qx, qy = (np.stack([p[k] for p in parts]) for k in range(4))
        support, query = self._floats(sx), self._floats(qx)
        if augment and self.augment is not None:
            t, n = support.shape[:2]
            flat = support.reshape(t * n, *support.shape[2:])
            support = self.augment.support(flat, self.seed, split, step, [int(i) for i in indices]).reshape(
                support.shape)
        mean, std = self.channel_mean, self.channel_std  # support and query are fresh tensors: normalised in place
        return TaskBatch(normalise(support, mean, std, inplace=True), torch.from_numpy(sy).long(),
                         normalise(query, mean, std, inplace=True), torch.from_numpy(qy).long())

    def _floats(self, x: np.ndarray) -> torch.Tensor:
        """uint8 episodes -> float32 in [0, 1] on :attr:`device` (copied as uint8: a quarter of the bytes)."""
        if self.device.type == "cpu":
            return to_float_images(x)
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.device).float().div_(255.0)


@dataclass(frozen=True)
class LoadedSource:
    """An image source, loaded: its :class:`ClassPool` per split plus what check messages need to explain them."""

    splits: dict[str, ClassPool]  # split -> the classes of that split
    md5s: dict[str, str]  # file (or upstream source) -> md5, logged with a run
    name: str  # e.g. "omniglot", "parquet:<file name>"
    describe: Callable[[str], str]  # split -> "classes in the 'val' split of ...: ..."
    fix: Callable[[str], str]  # split -> how to get more classes into that split
    problems: list[str] = field(default_factory=list)  # problems found while loading (e.g. unknown alphabets)


def no_problems(data: DataConfig) -> list[str]:
    return []


def no_cache() -> None:
    pass


def gray_images(cfg: Config) -> tuple[int, ...]:
    """One grayscale ``data.image_size`` image's shape ``(1, S, S)`` (a source's input shape unless it says)."""
    return (1, cfg.data.image_size, cfg.data.image_size)


def no_images(cfg: Config) -> int:
    return 0


def no_stats(cfg: Config) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return (), ()


class AugmentingSource(Protocol):
    """A task source whose ``sample`` takes ``augment=True``: the image sources (a :class:`PoolTaskSource`, or one
    composed of them), the only ones ``data.augment`` may be set for (mtl_ray.components refuses it elsewhere)."""

    def sample(self, split: str, step: int, indices: Sequence[int], *, augment: bool = False) -> TaskBatch: ...


class ClassSampling(Protocol):
    """A task source that names its tasks' classes and samples tasks over classes it is given: a
    :class:`PoolTaskSource` (what ``optim.hard_tasks`` needs: :meth:`SourceSpec.samples_classes`)."""

    def task_classes(self, split: str, step: int, indices: Sequence[int]) -> list[tuple[int, ...]]: ...

    def sample_classes(self, split: str, step: int, indices: Sequence[int], classes: Sequence[Sequence[int]], *,
                       augment: bool = False) -> TaskBatch: ...


class Augmenter(Protocol):
    """What :class:`PoolTaskSource` needs of an augmentation (:class:`mtl_ray.data.augment.Augment`)."""

    def support(self, x: torch.Tensor, seed: int, split: str, step: int, indices: Sequence[int]) -> torch.Tensor:
        """``x [T * S, C, H, W]`` (``T = len(indices)`` tasks of ``S`` support images, float in [0, 1]) -> the same
        shape, task ``j``'s images transformed with parameters drawn from ``(seed, split, step, indices[j])``."""
        ...


# what every episode source reads
IMAGE_KEYS = frozenset({"source", "ways", "shots", "queries", "image_size", "channel_mean", "channel_std", "augment"})


@dataclass(frozen=True)
class SourceSpec:
    """What one ``data.source`` is and can do: its entry in :data:`mtl_ray.data.registry.SOURCES`.

    An image source gives ``load`` (its classes per split; tasks are N-way episodes over them); a source that
    generates its tasks gives ``build`` instead (and has no classes for the data checks to count).
    """

    kind: TaskKind
    images: bool  # inputs are images ``[C, S, S]`` (what image models, e.g. conv4, need); else vectors ``[D]``
    load: Callable[[Config], LoadedSource] | None = None
    build: Callable[[Config], TaskSource] | None = None
    # What data.path must name (and how to make one) when the source reads it; "": data.path is unused
    path: str = ""
    check: Callable[[DataConfig], list[str]] = no_problems  # static checks of the source's own data.* fields
    config_keys: frozenset[str] = frozenset()  # the data.* keys it reads (the others are not logged as MLflow params)
    clear_cache: Callable[[], None] = no_cache  # forget what this process decoded or read
    # What the memory estimate (mtl_ray.memory) needs before anything loads: one input's shape ``(C, S, S)`` or
    # ``(D,)``, and how many images of that shape each process holds (uint8); 0 when none or unknown.
    input_shape: Callable[[Config], tuple[int, ...]] = gray_images
    count_images: Callable[[Config], int] = no_images
    # The per-channel (mean, std) the source's data records (a Parquet table's mtl_ray.channel_mean/std), read
    # without loading images; ((), ()) when it records none. A run records what it uses (data.channel_mean/std).
    channel_stats: Callable[[Config], tuple[tuple[float, ...], tuple[float, ...]]] = no_stats

    @property
    def samples_classes(self) -> bool:
        """Whether its tasks are :class:`PoolTaskSource` episodes (a ``load`` and no ``build``), whose classes it
        names and which it samples over given classes (:class:`ClassSampling`: what ``optim.hard_tasks`` needs)."""
        return self.load is not None and self.build is None
