"""optim.hard_tasks (MTL's hard-task meta-batch, Sun et al. 2019 Sec. 4.2): the failure class of hand-made logits,
the failure pool and its top-up, episodes over given classes, and in the trainer: hard tasks only of failure
classes, the same for any shards, chunks, resume or Ray workers; off, training is what it was."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import vmap

from mtl_ray import metrics as M
from mtl_ray.algorithms import build_learner, initial_meta_params
from mtl_ray.algorithms.base import CLASS_ACC, CLASS_PROB, class_metrics, rank_classes
from mtl_ray.components import from_dict
from mtl_ray.config import ConfigError
from mtl_ray.data.base import ClassPool, PoolTaskSource
from mtl_ray.data.hard_tasks import HARD_TASK_BASE, failure_pool, hard_task_classes
from mtl_ray.distributed.driver import MetaTrainer
from mtl_ray.distributed.executor import LocalExecutor

WAYS, BATCH, HARD = 3, 6, 2


def test_failure_class_of_hand_made_logits_float64():
    """Per-class accuracy and mean true-class probability by hand; the worst class is the lowest accuracy, then the
    lowest probability, then the lowest label."""
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    a, b = 2.0, 1.0
    logits = torch.tensor([[a, 0, 0], [0, a, 0],  # class 0: one right, one wrong (to class 1)
                           [0, a, 0], [a, 0, 0],  # class 1: the same
                           [0, 0, b], [0, 0, b]], dtype=torch.float64)  # class 2: both right, less sure
    got = class_metrics(logits, y)
    e = np.exp
    p_hi, p_lo = e(a) / (e(a) + 2), 1 / (e(a) + 2)
    assert got[CLASS_ACC].dtype == torch.float64
    torch.testing.assert_close(got[CLASS_ACC], torch.tensor([0.5, 0.5, 1.0], dtype=torch.float64), rtol=0, atol=0)
    want_prob = [(p_hi + p_lo) / 2, (p_hi + p_lo) / 2, e(b) / (e(b) + 2)]
    torch.testing.assert_close(got[CLASS_PROB], torch.tensor(want_prob, dtype=torch.float64), rtol=1e-15, atol=0)
    # classes 0 and 1 tie on both: the lower label first; class 2 (all right) last
    ranks = rank_classes(got[CLASS_ACC][None], got[CLASS_PROB][None])
    assert ranks.tolist() == [[0, 1, 2]]
    # vectorised over tasks: a second task where accuracy ties and the probability decides
    acc = torch.tensor([[0.5, 0.5, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    prob = torch.tensor([[0.4, 0.3, 0.9], [0.9, 0.2, 0.1]], dtype=torch.float64)
    assert rank_classes(acc, prob).tolist() == [[1, 0, 2], [2, 1, 0]]
    # vmapped, as the meta-gradient computes them
    batched = vmap(class_metrics)(logits[None].expand(2, -1, -1), y[None].expand(2, -1))
    torch.testing.assert_close(batched[CLASS_PROB][1], got[CLASS_PROB], rtol=0, atol=0)


def test_failure_pool_tops_up_with_next_worst_classes_and_hard_classes_are_pure():
    ranked = [(7, 1, 2), (7, 2, 9), (7, 9, 1)]  # one distinct failure class, 3 ways
    assert failure_pool(ranked, 3) == [7, 1, 2]  # second-worst of task 0, then of task 1
    assert failure_pool([(4, 1, 2), (5, 2, 9), (6, 9, 1), (4, 0, 3)], 3) == [4, 5, 6]  # enough: failure classes only
    assert failure_pool(ranked, 4) == [7, 1, 2, 9]  # third-worst of task 1
    with pytest.raises(ValueError, match=r"got 4 distinct classes in the step's tasks, expected at least data\.ways=5"):
        failure_pool(ranked, 5)
    ranked = [(4, 1, 2), (5, 2, 9), (6, 9, 1), (8, 0, 3)]
    classes = hard_task_classes(0, "train", 3, ranked, 5, 3)
    assert len(classes) == 5 and all(len(set(c)) == 3 and set(c) <= {4, 5, 6, 8} for c in classes)
    assert classes == hard_task_classes(0, "train", 3, ranked, 5, 3)  # a pure function of its arguments
    assert classes[:2] == hard_task_classes(0, "train", 3, ranked, 2, 3)  # task h does not depend on the count
    assert classes != hard_task_classes(0, "train", 4, ranked, 5, 3)  # another step draws others


def _marked_source(seed: int = 0) -> PoolTaskSource:
    """5 classes of 6 images 4x4; every pixel of class c's images is 10*c + (image index): label -> class readable."""
    images = tuple(np.stack([np.full((1, 4, 4), 10 * c + i, np.uint8) for i in range(6)]) for c in range(5))
    return PoolTaskSource({"train": ClassPool(("a", "b", "c", "d", "e"), images)}, seed=seed, ways=3, shots=1,
                          queries=2)


def test_episodes_over_given_classes_and_the_classes_of_drawn_ones():
    src = _marked_source()

    def class_of_labels(batch, t):  # label j -> the class its support and query images come from
        px = (batch.support_x[t, :, 0, 0, 0] * 255).round().long() // 10
        qx = (batch.query_x[t, :, 0, 0, 0] * 255).round().long() // 10
        sy, qy = batch.support_y[t], batch.query_y[t]
        return {int(j): {int(c) for c in px[sy == j]} | {int(c) for c in qx[qy == j]} for j in range(3)}

    drawn = src.sample("train", 2, [0, 5])
    named = src.task_classes("train", 2, [0, 5])
    for t in range(2):
        assert class_of_labels(drawn, t) == {j: {named[t][j]} for j in range(3)}
    given = [(4, 0, 2), (1, 3, 4)]
    hard = src.sample_classes("train", 2, [HARD_TASK_BASE, HARD_TASK_BASE + 1], given)
    for t in range(2):
        assert class_of_labels(hard, t) == {j: {given[t][j]} for j in range(3)}
    alone = src.sample_classes("train", 2, [HARD_TASK_BASE + 1], given[1:])  # the same alone as in a batch
    assert torch.equal(alone.query_x[0], hard.query_x[1]) and torch.equal(alone.support_x[0], hard.support_x[1])
    for bad in ([(0, 0, 1)], [(0, 1)], [(0, 1, 5)]):
        with pytest.raises(ValueError, match="expected 3 distinct classes"):
            src.sample_classes("train", 2, [0], bad)


def _cfg(algorithm: str = "protonet", **over):
    raw = {"data": {"source": "digits", "image_size": 16, "ways": WAYS, "shots": 1, "queries": 2},
           "model": {"name": "conv4", "channels": 4}, "algorithm": {"name": algorithm, "inner_lr": 0.1},
           "optim": {"optimizer": "sgd", "outer_lr": 0.1, "meta_batch_size": BATCH, "steps": 4, "val_every": 0,
                     "hard_tasks": HARD},
           "scaling": {"precision": "fp64"}, "tracking": {"checkpoint_every": 2, "progress": False}}
    return from_dict(raw, [f"{k}={v}" for k, v in over.items()])


@pytest.mark.parametrize("name", ["protonet", "reptile"])
def test_per_class_scores_leave_the_meta_gradient_unchanged(name):
    """per_class=True returns each task's class_metrics of its query outputs (a per-task loop here) and the very
    same meta-gradient bits as per_class=False."""
    cfg = _cfg(name, **{"algorithm.inner_steps": 1})
    learner = build_learner(cfg)
    alg = learner.algorithm
    params = {k: v.double() for k, v in initial_meta_params(cfg, learner).items()}
    batch = learner.source.sample("train", 0, range(4)).to("cpu", torch.float64)
    plain, scored = alg.meta_gradient(params, batch), alg.meta_gradient(params, batch, per_class=True)
    assert not plain.per_class and all(torch.equal(plain.grads[k], scored.grads[k]) for k in plain.grads)
    assert plain.metrics == scored.metrics
    for t in range(4):
        sx, sy, qx, qy = batch.support_x[t], batch.support_y[t], batch.query_x[t], batch.query_y[t]
        want = class_metrics(alg.predict(params, alg.adapt(params, sx, sy, 1), qx), qy)
        for k in (CLASS_ACC, CLASS_PROB):
            torch.testing.assert_close(scored.per_class[k][t], want[k], rtol=1e-12, atol=1e-12)


def _expected_hard_classes(cfg) -> tuple[list[tuple[int, ...]], set[int], list[tuple[int, ...]]]:
    """Step 0's hard tasks from scratch: each task's classes ranked by a per-task loop over its query logits at the
    initial weights (lowest accuracy, then mean true-class probability, then label), then the documented draw."""
    learner = build_learner(cfg)
    alg, src = learner.algorithm, learner.source
    params = {k: v.double() for k, v in initial_meta_params(cfg, learner).items()}
    batch = src.sample("train", 0, range(BATCH)).to("cpu", torch.float64)
    ranked = []
    for t, classes in enumerate(src.task_classes("train", 0, range(BATCH))):
        logits = alg.predict(params, alg.adapt(params, batch.support_x[t], batch.support_y[t], 0), batch.query_x[t])
        y = batch.query_y[t]
        p = logits.softmax(-1)
        key = [(float((logits[y == j].argmax(-1) == j).double().mean()), float(p[y == j, j].mean()), j)
               for j in range(WAYS)]
        ranked.append(tuple(classes[j] for _, _, j in sorted(key)))
    return hard_task_classes(cfg.seed, "train", 0, ranked, HARD, WAYS), {r[0] for r in ranked}, ranked


def test_hard_tasks_are_of_failure_classes_and_the_same_for_any_shards_and_chunks(tmp_path):
    cfg = _cfg()
    want, failures, ranked = _expected_hard_classes(cfg)
    runs = []
    for i, (shards, chunk) in enumerate([(1, 0), (3, 1)]):
        c = cfg.replace(**{"algorithm.task_chunk_size": chunk})
        ex = LocalExecutor(c)
        ex.num_shards = shards  # LocalExecutor runs them one after another: 1 shard of 6 tasks or 3 of 2
        trainer = MetaTrainer.create(c, tmp_path / str(i), executor=ex)
        out = trainer.train_step()
        assert trainer.last_hard_classes == want
        pool = failure_pool(ranked, WAYS)
        assert all(set(h) <= set(pool) for h in want)
        if len(failures) >= WAYS:
            assert set(pool) == failures  # only failure classes
        assert out[M.META_TRAIN_HARD_CLASSES] == len(failures)
        assert {M.META_TRAIN_HARD_LOSS, M.META_TRAIN_HARD_ACC, M.META_TRAIN_HARD_GRAD_NORM} <= out.keys()
        runs.append((trainer.params, trainer.tasks_seen))
    for params, seen in runs[1:]:
        assert seen == BATCH + HARD
        for k in params:
            torch.testing.assert_close(params[k], runs[0][0][k], rtol=1e-6, atol=1e-7)


def test_the_hard_step_is_an_additional_update(tmp_path):
    """Weights after a step = ordinary SGD update, then a second one with the hard tasks' mean meta-gradient."""
    cfg = _cfg()
    trainer = MetaTrainer.create(cfg, tmp_path)
    ex = trainer.executor
    before = {k: v.clone() for k, v in trainer.params.items()}
    from mtl_ray.distributed.driver import reduce_results

    g1, _, _ = reduce_results(ex.meta_gradients(before, 0, [list(range(BATCH))]))
    mid = {k: before[k] - 0.1 * g1[k] for k in before}
    classes, _, _ = _expected_hard_classes(cfg)
    g2, n, _ = reduce_results(ex.meta_gradients(mid, 0, [list(range(HARD))], classes=classes))
    trainer.train_step()
    assert n == HARD
    for k in before:
        # the trainer keeps float32 weights (fp64 computes in float64): equal up to float32 rounding
        torch.testing.assert_close(trainer.params[k].double(), mid[k] - 0.1 * g2[k], rtol=1e-6, atol=1e-7)


def test_resume_with_hard_tasks_ends_with_the_uninterrupted_weights(tmp_path):
    cfg = _cfg()
    full = MetaTrainer.create(cfg, tmp_path / "full")
    full.fit()
    part = MetaTrainer.create(cfg, tmp_path / "part")
    part.fit(until=2)
    resumed = MetaTrainer.create(cfg, tmp_path / "part", resume=True)
    assert resumed.step == 2
    resumed.fit()
    assert resumed.last_hard_classes == full.last_hard_classes
    assert all(torch.equal(full.params[k], resumed.params[k]) for k in full.params)
    # off: no ranking is computed and no hard metric is logged
    off = MetaTrainer.create(cfg.replace(**{"optim.hard_tasks": 0}), tmp_path / "off")
    out = off.train_step()
    assert not any(k.startswith("meta_train/hard_") for k in out) and off.last_hard_classes == []
    assert all(not r.failures for r in off.executor.meta_gradients(off.params, 0, [[0, 1]]))


def test_bad_hard_task_settings_are_one_clear_config_error():
    sinusoid = {"data": {"source": "sinusoid"}, "model": {"name": "mlp"}}
    cases = [({"optim": {"hard_tasks": -1}}, "optim.hard_tasks: got -1, expected a whole number >= 0"),
             ({**sinusoid, "optim": {"hard_tasks": 2}},
              "optim.hard_tasks: got 2 with data.source=sinusoid, expected 0: hard tasks are re-sampled from each "
              "task's failure class (its lowest query accuracy) and regression tasks have no classes; set "
              "optim.hard_tasks=0"),
             ({"data": {"source": "multidomain"}, "optim": {"hard_tasks": 1}},
              "multidomain's episodes cannot be sampled over given classes"),
             ({"optim": {"hard_tasks": 2}, "scaling": {"reduce": "collective", "num_workers": 2}},
              "optim.hard_tasks: got 2 with scaling.reduce=collective, expected 0")]
    for raw, message in cases:
        with pytest.raises(ConfigError) as err:
            from_dict(raw)
        assert message in str(err.value), str(err.value)
    from_dict(sinusoid)  # the default (0) is valid everywhere


def test_ray_workers_with_node_reduce_give_the_in_process_hard_tasks(ray_cluster, tmp_path):
    """2 Ray worker actors (scaling.reduce=node: one merged result per node) train to the in-process weights with
    the same hard tasks."""
    local = MetaTrainer.create(_cfg(**{"optim.steps": 1}), tmp_path / "local")
    local.fit()
    cfg = _cfg(**{"optim.steps": 1, "scaling.num_workers": 2, "scaling.reduce": "node", "scaling.torch_threads": 1,
                  "scaling.step_timeout_s": 120})
    remote = MetaTrainer.create(cfg, tmp_path / "ray")
    try:
        remote.fit()
    finally:
        remote.close()
    assert remote.last_hard_classes == local.last_hard_classes and remote.executor.faults == 0
    for k in local.params:
        torch.testing.assert_close(remote.params[k], local.params[k], rtol=1e-6, atol=1e-7)
