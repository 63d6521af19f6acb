"""Chunks sized by a memory budget (``FunctionalAlgorithm.chunk_limit``, what a ShardWorker sets from
mtl_ray.memory): near-equal vmap calls of at most the limit, on any device, and the same meta-gradient and
evaluation as one vmap call over the whole batch (float64)."""

from __future__ import annotations

import pytest
from test_exact_math import _float64_learners, _image_batch, _rel_err, _zeros_batch

from mtl_ray.algorithms.base import chunks, tasks_within


def test_a_task_limit_gives_the_fewest_near_equal_chunks_within_it():
    batch = _zeros_batch(20, 5, 75)
    assert chunks(batch, 0, 6) == [(0, 5), (5, 10), (10, 15), (15, 20)]  # 4 calls of 5, never one of 6 and a rest
    assert chunks(batch, 0, 1) == [(i, i + 1) for i in range(20)]
    assert chunks(batch, 0, 100) == [(0, 20)]
    assert chunks(batch, 4, 1) == [(i, i + 4) for i in range(0, 20, 4)]  # an explicit task_chunk_size wins
    # the budget holds on every device (GPUs too: second-order ResNet-12 needs ~8 GB a task)
    assert chunks(_zeros_batch(8, 5, 75, device="meta"), 0, 3) == [(0, 2), (2, 5), (5, 8)]


def test_tasks_within_a_budget_is_at_least_one():
    assert tasks_within(10 * 2**20, 3 * 2**20) == 3
    assert tasks_within(2**20, 8 * 2**30) == 1  # a task bigger than the budget still runs, alone
    assert tasks_within(0, 0) == 1


@pytest.mark.parametrize("name", ["maml", "reptile"])
def test_chunk_limit_sizes_the_vmap_calls_and_changes_no_result(name):
    (limited, whole), params = _float64_learners(name, 2, 0, 5)
    asked: list[tuple[bool, int]] = []

    def limit(training: bool, steps: int) -> int:
        asked.append((training, steps))
        return 2 if training else 1

    limited.algorithm.chunk_limit = limit
    batch = _image_batch(5, 3, 1, 2, 16)
    assert limited.algorithm.chunks(batch, True, 2) == [(0, 1), (1, 3), (3, 5)]
    assert limited.algorithm.chunks(batch, False, 3) == [(i, i + 1) for i in range(5)]
    asked.clear()
    a, b = limited.algorithm.meta_gradient(params, batch), whole.algorithm.meta_gradient(params, batch)
    assert asked == [(True, 2)]  # training, with the algorithm's inner steps
    assert _rel_err(a.grads, b.grads) < 1e-12
    assert a.metrics["loss"] == pytest.approx(b.metrics["loss"])
    ea, eb = limited.algorithm.evaluate(params, batch, 3), whole.algorithm.evaluate(params, batch, 3)
    assert asked[-1] == (False, 3)  # evaluation, with its own inner steps
    for k in eb:
        assert ea[k].shape == (5,) and ((ea[k] - eb[k]).abs() < 1e-12).all()


def test_an_explicit_chunk_size_ignores_the_limit():
    (fixed,), _ = _float64_learners("maml", 1, 2)
    fixed.algorithm.chunk_limit = lambda training, steps: 1
    assert fixed.algorithm.chunks(_image_batch(5, 3, 1, 2, 16), True, 1) == [(0, 2), (2, 4), (4, 5)]
