"""Hard tasks (``optim.hard_tasks``): new episodes over the classes that the step's tasks got most wrong.

Sun, Liu, Chua, Schiele. "Meta-Transfer Learning for Few-Shot Learning", CVPR 2019, Sec. 4.2 ("hard task
meta-batch"): during a meta-batch, each task's *failure class* (the class of its lowest query accuracy) is
recorded; hard tasks are then re-sampled from the set of failure classes (fresh support and query examples) and the
learner takes an additional meta-step on them (:meth:`mtl_ray.distributed.driver.MetaTrainer.hard_task_step`).

What this module decides, each a pure function of its arguments, so the hard tasks of a step do not depend on how
the step's tasks were sharded, chunked or resumed:

- :func:`failure_pool`: from each task's classes ranked worst first (task-index order), the classes hard tasks are
  drawn from: every task's failure class, distinct, in task order; when fewer than ``ways`` distinct ones, topped up
  with the next-worst classes (each task's second-worst in task order, then third-worst, ...) until ``ways``.
- :func:`hard_task_classes`: hard task ``h``'s ``ways`` classes, drawn without replacement from that pool by a
  generator of ``(seed, split, step, h)`` (a child of its coordinates' :func:`~mtl_ray.data.base.task_rng` seed
  sequence, so it is independent of the stream that draws its examples); label ``j`` is the ``j``-th class drawn,
  so labels are in random order as in any episode.
- :func:`hard_task_index`: hard task ``h``'s task coordinate, ``HARD_TASK_BASE + h``, far above any ordinary task's
  index: its examples and its ``data.augment`` transforms come from ``(seed, split, step, HARD_TASK_BASE + h)``
  through :meth:`~mtl_ray.data.base.PoolTaskSource.sample_classes`, never shared with an ordinary task's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mtl_ray.data.base import task_rng

HARD_TASK_BASE = 1 << 32  # hard task h is task (seed, split, step, HARD_TASK_BASE + h); ordinary tasks are below
_CLASS_CHILD = 2  # its class draw: the third child of its seed sequence (data.augment's is the first, fine-tuning's
# the second: mtl_ray/data/augment.py, mtl_ray/algorithms/finetune.py)


def hard_task_index(h: int) -> int:
    """The task coordinate (``index`` of ``task_rng``) of the step's hard task ``h``."""
    if h < 0:
        raise ValueError(f"hard task: got {h}, expected an index >= 0")
    return HARD_TASK_BASE + int(h)


def failure_pool(ranked: Sequence[Sequence[int]], ways: int) -> list[int]:
    """The classes hard tasks are drawn from (see the module docstring).

    ``ranked[i]``: task ``i``'s classes (global class ids), worst query accuracy first (``ranked[i][0]`` its failure
    class). Returns the distinct failure classes in task order, topped up to ``ways`` with next-worst classes when
    there are fewer; ``ValueError`` when even all the classes given are fewer than ``ways``.
    """
    pool = list(dict.fromkeys(int(r[0]) for r in ranked if len(r)))
    depth = 1
    deepest = max((len(r) for r in ranked), default=0)
    while len(pool) < ways and depth < deepest:
        seen = set(pool)
        for r in ranked:
            if len(pool) == ways:
                break
            if depth < len(r) and int(r[depth]) not in seen:
                pool.append(int(r[depth]))
                seen.add(int(r[depth]))
        depth += 1
    if len(pool) < ways:
        raise ValueError(f"hard tasks: got {len(pool)} distinct classes in the step's tasks, expected at least "
                         f"data.ways={ways}")
    return pool


def hard_class_rng(seed: int, split: str, step: int, h: int) -> np.random.Generator:
    """The generator that draws hard task ``h``'s classes (a child of its coordinates' seed sequence)."""
    seq = task_rng(seed, split, step, hard_task_index(h)).bit_generator.seed_seq
    assert isinstance(seq, np.random.SeedSequence)  # task_rng seeds from one
    return np.random.default_rng(seq.spawn(_CLASS_CHILD + 1)[_CLASS_CHILD])


def hard_task_classes(seed: int, split: str, step: int, ranked: Sequence[Sequence[int]], count: int,
                      ways: int) -> list[tuple[int, ...]]:
    """The classes of the step's ``count`` hard tasks: ``out[h][j]`` is hard task ``h``'s label ``j``, drawn
    without replacement from :func:`failure_pool` ``(ranked, ways)`` by :func:`hard_class_rng`."""
    pool = failure_pool(ranked, ways)
    out = []
    for h in range(count):
        pick = hard_class_rng(seed, split, step, h).choice(len(pool), size=ways, replace=False)
        out.append(tuple(pool[int(j)] for j in pick))
    return out
