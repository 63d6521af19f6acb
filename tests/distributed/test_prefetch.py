"""ShardWorker's prefetch: the next step's tasks sampled while this one computes change no result, bit for bit.

In-process (sinusoid, and augmented digits images), across a resume, and on real Ray worker actors.
"""

from __future__ import annotations

import torch

from mtl_ray.components import from_dict
from mtl_ray.distributed.driver import MetaTrainer
from mtl_ray.distributed.executor import LocalExecutor
from mtl_ray.distributed.worker import ShardWorker


def _sinusoid(workers: int = 0, steps: int = 6):
    return from_dict({"data": {"source": "sinusoid", "shots": 5, "queries": 5}, "model": {"name": "mlp"},
                      "algorithm": {"name": "maml", "inner_lr": 0.01},
                      "optim": {"meta_batch_size": 6, "steps": steps, "val_every": 3, "val_tasks": 4},
                      "scaling": {"num_workers": workers, "torch_threads": 1, "cpus_per_worker": 1},
                      "tracking": {"checkpoint_every": 3, "progress": False, "mlflow": False}})


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _trainer(cfg, run_dir, prefetch: bool, resume: bool = False, shards: int = 1) -> MetaTrainer:
    executor = LocalExecutor(cfg)
    executor.worker.prefetch = prefetch
    executor.num_shards = shards
    return MetaTrainer.create(cfg, run_dir, resume=resume, executor=executor)


def _digits(workers: int = 0):
    """An image source: its workers prefetch by default (a regression source's do not)."""
    return from_dict({"data": {"source": "digits", "image_size": 8, "ways": 3, "shots": 1, "queries": 2},
                      "model": {"channels": 4, "blocks": 2}, "algorithm": {"name": "maml", "inner_steps": 1},
                      "optim": {"meta_batch_size": 6, "steps": 6, "val_every": 3, "val_tasks": 4},
                      "scaling": {"num_workers": workers, "torch_threads": 1, "cpus_per_worker": 1},
                      "tracking": {"checkpoint_every": 3, "progress": False, "mlflow": False}})


def _reference(tmp_path, shards: int = 1, cfg=None) -> MetaTrainer:
    ref = _trainer(cfg or _sinusoid(), tmp_path / "off", prefetch=False, shards=shards)
    ref.fit()
    ref.close()
    assert ref.executor.worker.prefetch_hits == 0
    return ref


def test_prefetch_and_resume_give_the_same_weights_bit_for_bit(tmp_path):
    ref = _reference(tmp_path)
    first = _trainer(_sinusoid(), tmp_path / "on", prefetch=True)
    first.fit(until=3)
    first.close()
    assert first.executor.worker.prefetch_hits == 2  # steps 1 and 2 came from the background sample
    second = _trainer(_sinusoid(), tmp_path / "on", prefetch=True, resume=True)
    second.fit()
    second.close()
    assert second.step == 6 and second.executor.worker.prefetch_hits == 2
    _equal(second.params, ref.params)
    assert second.last_val == ref.last_val


def test_augmented_tasks_prefetched_equal_fresh_ones_and_other_requests_sample_afresh():
    cfg = from_dict({"data": {"source": "digits", "image_size": 8, "ways": 3, "shots": 1, "queries": 2,
                              "augment": "support"}, "model": {"channels": 4, "blocks": 2},
                     "algorithm": {"name": "maml", "inner_steps": 1}, "scaling": {"torch_threads": 1}})
    on, off = ShardWorker(cfg), ShardWorker(cfg, prefetch=False)
    from mtl_ray.algorithms import initial_meta_params

    params = initial_meta_params(cfg, on.learner)
    # step 1 and 2 match the prefetch; step 4 (a jump, as after a resume) and other indices do not
    calls = [(0, [0, 1, 2]), (1, [0, 1, 2]), (2, [0, 1, 2]), (4, [0, 1, 2]), (5, [1, 2])]
    for step, idx in calls:
        got, want = on.meta_gradient(params, step, idx), off.meta_gradient(params, step, idx)
        _equal(got.grads, want.grads)
        assert got.metrics == want.metrics
    # evaluation between training calls waits for the prefetch and leaves it usable
    val = on.evaluate(params, "val", 0, [0, 1], 1)
    _equal(val, off.evaluate(params, "val", 0, [0, 1], 1))
    _equal(on.meta_gradient(params, 6, [1, 2]).grads, off.meta_gradient(params, 6, [1, 2]).grads)
    assert on.prefetch_hits == 3 and off.prefetch_hits == 0  # on by default for an image source
    on.close()
    assert not ShardWorker(_sinusoid()).prefetch  # and off for a regression source (its sampling holds the GIL)


def test_ray_workers_prefetch_and_match_in_process_bit_for_bit(ray_cluster, tmp_path):
    """2 actors (prefetch on) against the same two shards in-process with prefetch off: the same bits."""
    import ray

    ref = _reference(tmp_path, shards=2, cfg=_digits())
    trainer = MetaTrainer.create(_digits(workers=2), tmp_path / "ray")
    try:
        trainer.fit()
        hits = ray.get([a.prefetch_hits.remote() for a in trainer.executor.actors])
    finally:
        trainer.close()
    assert sum(hits) > 0
    _equal(trainer.params, ref.params)
    assert trainer.last_val == ref.last_val
