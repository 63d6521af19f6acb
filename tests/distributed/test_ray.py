"""Ray worker actors: same result as in-process for 1/2/3 workers, faults re-run exactly once, resume.

All tests share the session's Ray instance (``ray_cluster``); the multi-node test adds a node and
removes it mid-run.
"""

from __future__ import annotations

import pytest
import ray
import torch

from mtl_ray import metrics as M
from mtl_ray.components import from_dict
from mtl_ray.config import ConfigError
from mtl_ray.distributed.driver import MetaTrainer, reduce_results
from mtl_ray.distributed.executor import shard
from mtl_ray.distributed.ray_executor import RayExecutor, StepTimeoutError

STEPS, META_BATCH = 10, 6


def _cfg(workers: int, **over):
    base = {"data": {"source": "sinusoid", "shots": 5, "queries": 5}, "model": {"name": "mlp"},
            "algorithm": {"name": "maml", "inner_lr": 0.01},
            "optim": {"meta_batch_size": META_BATCH, "steps": STEPS, "val_every": 5, "val_tasks": 8},
            "scaling": {"num_workers": workers, "torch_threads": 1, "cpus_per_worker": 1, "step_timeout_s": 120},
            "tracking": {"checkpoint_every": 5, "progress": False}}
    return from_dict(base, [f"{k}={v}" for k, v in over.items()])


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k


def _assert_fault_free_run(trainer, summary, reference) -> None:
    """Every task once, no fault, and the in-process run's weights and final meta-validation."""
    assert summary.tasks == STEPS * META_BATCH and summary.worker_faults == 0
    _assert_same(trainer.params, reference["params"])
    assert summary.final_val == pytest.approx(reference["val"], rel=1e-5)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The in-process run: weights after STEPS steps and the step-0 meta-gradient."""
    cfg = _cfg(0)
    trainer = MetaTrainer.create(cfg, tmp_path_factory.mktemp("ref"))
    grads, _, _ = reduce_results(trainer.executor.meta_gradients(trainer.params, 0, [list(range(META_BATCH))]))
    summary = trainer.fit()
    return {"grads": grads, "params": trainer.params, "val": summary.final_val}


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_n_workers_match_in_process(ray_cluster, reference, workers, tmp_path):
    """Same meta-gradient, same weights after 10 steps and same meta-validation as num_workers=0."""
    trainer = MetaTrainer.create(_cfg(workers), tmp_path)
    try:
        assert trainer.executor.num_shards == workers
        parts = shard(range(META_BATCH), workers)
        grads, n, _ = reduce_results(trainer.executor.meta_gradients(trainer.params, 0, parts))
        assert n == META_BATCH
        _assert_same(grads, reference["grads"])
        summary = trainer.fit()
    finally:
        trainer.close()
    _assert_fault_free_run(trainer, summary, reference)


@pytest.fixture
def second_node(ray_cluster):
    """A second node (2 CPUs) beside the session's head, removed after the test."""
    node = ray_cluster.add_node(num_cpus=2)
    ray_cluster.wait_for_nodes()
    yield node
    if node in ray_cluster.worker_nodes:
        ray_cluster.remove_node(node)


@pytest.mark.cluster
def test_node_reduce_sums_on_each_node_and_matches_in_process(ray_cluster, second_node, reference, tmp_path):
    """scaling.reduce=node: one result per node reaches the driver (3 workers, 2 nodes), with the sum of that
    node's shards; the meta-gradient and the weights after 10 steps are those of the in-process run."""
    trainer = MetaTrainer.create(_cfg(3, **{"scaling.reduce": "node"}), tmp_path)
    try:
        nodes = trainer.executor.node_ids()
        assert len(set(nodes)) == 2  # SPREAD: workers on both nodes, two on one of them
        parts = shard(range(META_BATCH), 3)
        results = trainer.executor.meta_gradients(trainer.params, 0, parts)
        assert len(results) == 2 and sorted(r.num_tasks for r in results) == [2, 4]
        grads, n, _ = reduce_results(results)
        assert n == META_BATCH
        _assert_same(grads, reference["grads"])
        summary = trainer.fit()
    finally:
        trainer.close()
    _assert_fault_free_run(trainer, summary, reference)


class KillOnce(RayExecutor):
    """Kills the worker that was just given a shard, once, at ``kill_step``: a fault with a step in flight."""

    kill_step = 3

    def __init__(self, cfg, *, no_restart: bool):
        super().__init__(cfg)
        self.no_restart = no_restart
        self.step_now = -1
        self.killed: list[int] = []

    def meta_gradients(self, params, step, shards):
        self.step_now = step
        return super().meta_gradients(params, step, shards)

    def submit(self, slot, call, indices):
        ref = super().submit(slot, call, indices)
        if self.step_now == self.kill_step and not self.killed:
            self.killed.append(slot)
            ray.kill(self.actors[slot], no_restart=self.no_restart)
        return ref


@pytest.mark.parametrize("no_restart,reduce", [(False, "flat"), (True, "flat"), (True, "node")],
                         ids=["restarted", "replaced", "replaced-node-reduce"])
def test_worker_killed_mid_step(ray_cluster, reference, no_restart, reduce, tmp_path):
    """The killed shard is re-run within the step: every task counted once, weights as fault-free."""
    cfg = _cfg(2, **{"scaling.reduce": reduce})
    executor = KillOnce(cfg, no_restart=no_restart)
    trainer = MetaTrainer.create(cfg, tmp_path, executor=executor)
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    assert executor.killed and summary.worker_faults >= 1
    assert (executor.replaced >= 1) == no_restart
    assert summary.tasks == trainer.tasks_seen == STEPS * META_BATCH
    _assert_same(trainer.params, reference["params"])


class KillAdder(RayExecutor):
    """scaling.reduce=node: kills, once, the actor about to add its node's shards (after they were computed)."""

    killed = False

    def _run(self, call, shards, what):
        out = super()._run(call, shards, what)
        if not self.killed and out and isinstance(out[0], tuple):  # (meta, grads ref, node, slot) per shard
            self.killed = True
            ray.kill(self.actors[out[0][3]], no_restart=True)
        return out


def test_node_sum_lost_reruns_its_shards_once(ray_cluster, reference, tmp_path):
    """The actor that adds a node's shards dies before it does: the node's shards are re-run flat, counted once."""
    cfg = _cfg(2, **{"scaling.reduce": "node"})
    executor = KillAdder(cfg)
    trainer = MetaTrainer.create(cfg, tmp_path, executor=executor)
    try:
        grads, n, _ = reduce_results(executor.meta_gradients(trainer.params, 0, shard(range(META_BATCH), 2)))
        assert executor.killed and executor.faults == 2 and n == META_BATCH  # both shards were on the one node
        _assert_same(grads, reference["grads"])
        summary = trainer.fit()
    finally:
        trainer.close()
    assert summary.tasks == STEPS * META_BATCH
    _assert_same(trainer.params, reference["params"])


def test_resume_on_workers_equals_uninterrupted(ray_cluster, reference, tmp_path):
    """10 steps run as 5, stop, resume to 10 on 2 workers: the same weights as the uninterrupted run."""
    cfg = _cfg(2)
    first = MetaTrainer.create(cfg, tmp_path)
    try:
        first.fit(until=5)
    finally:
        first.close()
    second = MetaTrainer.create(cfg, tmp_path, resume=True)
    try:
        assert second.step == 5
        second.fit()
    finally:
        second.close()
    assert second.tasks_seen == STEPS * META_BATCH
    _assert_same(second.params, reference["params"])


def test_workers_that_cannot_start_fail_clearly(ray_cluster):
    with pytest.raises(StepTimeoutError, match=r"scaling.num_workers=2: the workers did not start within "
                                                r"scaling.step_timeout_s=3s; expected 2 x \(64 CPU"):
        RayExecutor(_cfg(2, **{"scaling.cpus_per_worker": 64, "scaling.step_timeout_s": 3}))


@pytest.mark.cluster
@pytest.mark.parametrize("reduce", ["flat", "node"])
def test_node_lost_mid_run(ray_cluster, reference, reduce, tmp_path):
    """Two nodes, workers on both; the second node is removed mid-run and training still finishes (with
    scaling.reduce=node the lost node's shards, or its sum, are re-run: every task counted once)."""
    node = ray_cluster.add_node(num_cpus=1)
    ray_cluster.wait_for_nodes()
    cfg = _cfg(2, **{"scaling.max_restarts": 0, "scaling.reduce": reduce})

    class RemoveNode:
        def on_metrics(self, step, metrics):
            if step == 4:
                ray_cluster.remove_node(node, allow_graceful=False)

    trainer = MetaTrainer.create(cfg, tmp_path, callbacks=[RemoveNode()])
    try:
        assert len(set(trainer.executor.node_ids())) == 2  # SPREAD put one worker on each node
        summary = trainer.fit()
        assert trainer.executor.faults >= 1  # the lost node's shard was re-run on the head's worker
    finally:
        trainer.close()
    assert summary.tasks == STEPS * META_BATCH
    _assert_same(trainer.params, reference["params"])


@pytest.mark.cluster
def test_a_node_added_mid_run_gets_workers_and_the_weights_stay(ray_cluster, reference, tmp_path):
    """scaling.max_workers: a run that starts with the one worker the head holds (3 of its 4 CPUs) grows onto a
    node added mid-run; every task is trained once and the weights are the fixed-size (in-process) run's."""
    added: list = []
    shards: list[float] = []

    class AddNode:
        def on_metrics(self, step, metrics):
            shards.append(metrics[M.META_TRAIN_SHARDS])
            if step == 3 and not added:
                added.append(ray_cluster.add_node(num_cpus=3))
                ray_cluster.wait_for_nodes()

    trainer = MetaTrainer.create(_cfg(1, **{"scaling.cpus_per_worker": 3, "scaling.max_workers": 2}), tmp_path,
                                 callbacks=[AddNode()])
    trainer.executor.grow_every_s = 0.0  # look for free resources every step
    try:
        summary = trainer.fit()
        nodes = set(trainer.executor.node_ids())
    finally:
        trainer.close()
        for node in added:
            ray_cluster.remove_node(node)
    assert trainer.executor.joined == 1 and len(nodes) == 2
    assert shards[:3] == [1, 1, 1] and shards[-1] == 2, shards  # one worker until the node came, then two
    _assert_fault_free_run(trainer, summary, reference)


def test_bad_max_workers_is_one_clear_config_error():
    for over, message in [({"scaling.num_workers": 2, "scaling.max_workers": 1},
                           "scaling.max_workers: got 1 with scaling.num_workers=2 and scaling.reduce=flat, expected 0 "
                           "or at least scaling.num_workers=2"),
                          ({"scaling.num_workers": 2, "scaling.max_workers": 4, "scaling.reduce": "collective"},
                           "a Ray Train group's size is fixed when it starts"),
                          ({"scaling.num_workers": 0, "scaling.max_workers": 2}, "in-process training has no workers"),
                          ({"scaling.max_workers": -1}, "scaling.max_workers: got -1, expected 0")]:
        with pytest.raises(ConfigError) as err:
            _cfg(over.pop("scaling.num_workers", 1), **over)
        assert message in str(err.value), str(err.value)


_SECOND_RAY = """
import subprocess, sys
import ray
from ray._private.services import find_gcs_addresses
from mtl_ray.components import from_dict
from mtl_ray.ray_session import connect

assert connect(from_dict({"scaling": {"num_workers": 1}}), dashboard=True)

@ray.remote(num_cpus=0)
class Mine:
    def ready(self):
        return True

mine = Mine.options(name="mtl-ray-test-mine").remote()
ray.get(mine.ready.remote())
# another Ray started on this machine after ours: the one Ray's "latest cluster" guess would pick
later = subprocess.Popen([sys.executable, "-c", "import ray, time; ray.init(address='local', num_cpus=1); "
                          "print('up', flush=True); time.sleep(300)"], stdout=subprocess.PIPE, text=True)
assert later.stdout.readline().strip() == "up"
others = len(find_gcs_addresses())

@ray.remote(num_cpus=0)
def actors():  # Ray's state API, as Ray Train's placement-group cleaner calls it: address=None, "the" local Ray
    from ray.util.state import list_actors
    try:
        return len(list_actors(filters=[("name", "=", "mtl-ray-test-mine")]))
    except ConnectionError:  # "Found multiple active Ray instances"
        return -1

try:
    print(others, ray.get(actors.remote()), flush=True)
finally:
    later.kill()
    ray.shutdown()
"""


def test_a_local_ray_started_beside_another_tells_its_processes_which_it_is():
    """With another Ray on the machine (started after ours: the one Ray's "latest cluster" guess picks), a command
    that started its own local Ray (a second training run on the same machine) still has Ray's own address lookups
    inside its workers find it, rather than fail with "Found multiple active Ray instances" (the traceback Ray
    Train's placement-group cleaner printed) or ask the other Ray."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}  # as a user's shell
    out = subprocess.run([sys.executable, "-c", _SECOND_RAY], capture_output=True, text=True, env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    gcs_running, actors = (int(x) for x in out.stdout.split()[-2:])
    assert gcs_running >= 2 and actors == 1, out.stdout  # two Rays here, and the state API asked ours
