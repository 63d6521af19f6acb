"""The meta-trainer in-process: determinism over shards, resume == uninterrupted, NaN steps skipped."""

from __future__ import annotations

import math

import pytest
import torch

from mtl_ray.algorithms import ShardResult
from mtl_ray.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from mtl_ray.components import from_dict
from mtl_ray.distributed.driver import MetaTrainer, reduce_results
from mtl_ray.distributed.executor import LocalExecutor, shard


def _cfg(**over):
    base = {"data": {"source": "sinusoid", "shots": 5, "queries": 5}, "model": {"name": "mlp"},
            "algorithm": {"name": "maml", "inner_lr": 0.01},
            "optim": {"meta_batch_size": 6, "steps": 6, "val_every": 3, "val_tasks": 8},
            "tracking": {"checkpoint_every": 3, "progress": False}}
    return from_dict(base, [f"{k}={v}" for k, v in over.items()])


def test_shards_of_a_meta_batch_reduce_to_the_whole_batch():
    """1, 2 and 3 shards give the same mean meta-gradient: tasks depend on (seed, step, index) only."""
    cfg = _cfg()
    ex = LocalExecutor(cfg)
    trainer = MetaTrainer.create(cfg, "/nonexistent-not-written", executor=ex)
    means = []
    for n in (1, 2, 3):
        parts = shard(range(6), n)
        assert sorted(i for p in parts for i in p) == list(range(6))
        grads, total, _ = reduce_results(ex.meta_gradients(trainer.params, 4, parts))
        assert total == 6
        means.append(grads)
    for other in means[1:]:
        for k in means[0]:
            assert torch.allclose(means[0][k], other[k], atol=1e-6, rtol=1e-5)


def test_reduce_is_task_weighted():
    a = ShardResult({"w": torch.tensor([2.0])}, 1, {"loss": 1.0})
    b = ShardResult({"w": torch.tensor([9.0])}, 3, {"loss": 6.0})
    grads, n, sums = reduce_results([a, b])
    assert n == 4 and torch.allclose(grads["w"], torch.tensor([11.0 / 4])) and sums["loss"] == 7.0


def test_outer_step_is_param_minus_lr_times_mean_grad(tmp_path):
    cfg = _cfg(**{"optim.optimizer": "sgd", "optim.outer_lr": 0.5})
    trainer = MetaTrainer.create(cfg, tmp_path)
    before = {k: v.clone() for k, v in trainer.params.items()}
    grads, _, _ = reduce_results(trainer.executor.meta_gradients(trainer.params, 0, [list(range(6))]))
    trainer.train_step()
    for k in before:
        assert torch.allclose(trainer.params[k], before[k] - 0.5 * grads[k], atol=1e-7)


def test_resumed_run_ends_with_the_same_weights(tmp_path):
    cfg = _cfg()
    full = MetaTrainer.create(cfg, tmp_path / "full")
    full.fit()
    part = MetaTrainer.create(cfg, tmp_path / "part")
    part.fit(until=3)
    assert latest_checkpoint(tmp_path / "part").endswith("/checkpoints/step_00000003.pt")
    resumed = MetaTrainer.create(cfg, tmp_path / "part", resume=True)
    assert resumed.step == 3 and resumed.tasks_seen == 18
    resumed.fit()
    for k in full.params:
        assert torch.equal(full.params[k], resumed.params[k]), k
    ck = load_checkpoint(tmp_path / "part")
    assert ck.step == 6 and ck.config == cfg and "meta_val/loss" in ck.metrics


def test_non_finite_meta_gradient_skips_the_step(tmp_path):
    trainer = MetaTrainer.create(_cfg(), tmp_path)
    before = {k: v.clone() for k, v in trainer.params.items()}
    norm = trainer.outer_step({k: torch.full_like(v, float("nan")) for k, v in trainer.params.items()})
    assert math.isnan(norm) and trainer.skipped_steps == 1
    assert all(torch.equal(before[k], trainer.params[k]) for k in before)
    # a poisoned weight makes every later gradient NaN: steps are skipped and counted, weights kept
    trainer.params["head.bias"].fill_(float("inf"))
    out = trainer.train_step()
    assert out["meta_train/skipped_steps"] == 2.0


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "checkpoints" / "step_00000001.pt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable mtl-ray checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        (tmp_path / "empty").mkdir()
        load_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "missing.pt")


def test_time_budget_stops_early_with_a_validated_checkpoint(tmp_path):
    """``optim.max_minutes``: the step that crosses the budget is the last, and it is checkpointed."""
    cfg = _cfg(**{"optim.steps": 1000, "optim.max_minutes": 1e-9, "optim.val_every": 500,
                  "tracking.checkpoint_every": 500})
    trainer = MetaTrainer.create(cfg, tmp_path)
    summary = trainer.fit()
    assert summary.steps == 1 and trainer.step == 1
    assert set(summary.final_val) == {"meta_val/loss"}
    assert load_checkpoint(latest_checkpoint(tmp_path)).step == 1


def test_checkpoints_to_a_pyarrow_uri_and_resume_from_it(tmp_path):
    """``tracking.checkpoint_uri`` takes any pyarrow.fs URI (file:// here); resume reads it back."""
    uri = f"file://{tmp_path}/remote/ck"
    cfg = _cfg(**{"tracking.checkpoint_uri": uri})
    first = MetaTrainer.create(cfg, tmp_path / "run")
    first.fit(until=3)
    assert first.last_checkpoint == f"{uri}/step_00000003.pt"
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert sorted(p.name for p in (tmp_path / "remote" / "ck").iterdir()) == ["step_00000003.pt"]  # no temp left
    resumed = MetaTrainer.create(cfg, tmp_path / "run", resume=True)
    assert resumed.step == 3
    resumed.fit()
    whole = MetaTrainer.create(_cfg(), tmp_path / "whole")
    whole.fit()
    for k in whole.params:
        assert torch.equal(whole.params[k], resumed.params[k])
    with pytest.raises(CheckpointError, match=r"pyarrow\.fs cannot open it"):
        load_checkpoint("nosuchscheme://bucket/x.pt")


class _RecordingExecutor(LocalExecutor):
    """The in-process executor, remembering the size of every evaluation shard it was given."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.sizes: list[int] = []

    def evaluate(self, params, split, step, shards, inner_steps):
        self.sizes += [len(s) for s in shards]
        return super().evaluate(params, split, step, shards, inner_steps)


def test_evaluation_shards_are_bounded_and_do_not_change_any_result():
    """600 episodes at once ran a 24 GB machine out of memory; pieces of a meta-batch give the same numbers."""
    from mtl_ray.algorithms import build_learner, initial_meta_params
    from mtl_ray.distributed.evaluate import evaluate_tasks

    cfg = from_dict({"data": {"source": "sinusoid"}, "model": {"name": "mlp"},
                     "algorithm": {"inner_steps": 2, "inner_lr": 0.01}, "optim": {"meta_batch_size": 16}})
    params = initial_meta_params(cfg, build_learner(cfg))
    whole, pieces = _RecordingExecutor(cfg), _RecordingExecutor(cfg)
    a = evaluate_tasks(whole, params, "test", 50, 2)
    b = evaluate_tasks(pieces, params, "test", 50, 2, max_shard_tasks=16)
    assert whole.sizes == [50] and pieces.sizes == [16, 16, 16, 2]
    assert torch.allclose(a["loss"], b["loss"], rtol=1e-5)  # batched matmuls may round differently


def test_chunks_sized_by_the_memory_budget_change_no_result(tmp_path):
    """algorithm.chunk_memory_mb=1 (one task per vmap call by mtl_ray.memory's estimate of a 0.8 MB task) trains to
    the weights of one vmap call per shard: chunking changes nothing but memory (and float rounding)."""
    from mtl_ray.distributed.worker import ShardWorker

    raw = {"data": {"source": "digits", "image_size": 16, "ways": 3, "shots": 1, "queries": 3},
           "model": {"name": "conv4", "channels": 8}, "algorithm": {"name": "maml", "inner_lr": 0.1},
           "optim": {"optimizer": "sgd", "outer_lr": 0.1, "meta_batch_size": 6, "steps": 3, "val_every": 0},
           "tracking": {"checkpoint_every": 0, "progress": False}}
    small, whole = from_dict(raw, ["algorithm.chunk_memory_mb=1"]), from_dict(raw, ["algorithm.task_chunk_size=6"])
    worker = ShardWorker(small)
    batch = worker.learner.source.sample("train", 0, range(6))
    assert worker.learner.algorithm.chunks(batch, True, 1) == [(i, i + 1) for i in range(6)]
    assert worker.learner.algorithm.chunks(batch, False, 1) == [(0, 2), (2, 4), (4, 6)]  # no outer graph: 2 fit
    a, b = MetaTrainer.create(small, tmp_path / "a"), MetaTrainer.create(whole, tmp_path / "b")
    a.fit()
    b.fit()
    for k in b.params:
        assert torch.allclose(a.params[k], b.params[k], rtol=1e-5, atol=1e-6), k
