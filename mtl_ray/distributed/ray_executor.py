"""Shards of a meta-batch on a group of Ray worker actors, with fault tolerance.

Each actor wraps one :class:`ShardWorker` (loads its task source once, holds the learner). Per call
the driver puts the current weights in the object store once (as numpy: zero-copy for actors on the
same node) and passes that one reference to every actor with its shard of task indices.

Faults: a shard whose actor dies (process killed, node lost) comes back as ``RayActorError``; it is
re-run on the next worker slot (restarted by Ray, or replaced when its restarts are spent) within
the same call. Shards are pure functions of (seed, split, step, indices) and each shard's result is
kept exactly once, so a re-run neither loses nor double-counts a task. A call whose shards are not
all back within ``scaling.step_timeout_s`` raises :class:`StepTimeoutError` instead of hanging.
Exceptions raised by the worker's own code (bad data, a bug) are not faults and propagate at once.

Reduction (``scaling.reduce``): ``flat`` brings every shard's gradient sum to the driver. ``node`` keeps each
shard's gradients in the object store of the node that computed them (the driver fetches only the shard's task
count and metric sums), adds the shards of one node there (:func:`node_sum`, in one of its workers) and brings one
sum per node to the driver: what crosses the network grows with nodes, not workers (docs/scaling.md). The sum
runs in one of that node's worker actors (after its own shard: an actor runs one call at a time), not in a new
task, which would start a Python process on a node whose CPUs the workers hold. A node whose sum cannot be made
(its actor or its objects were lost) has its shards re-run as flat ones: still each exactly once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError, RayError

from mtl_ray.algorithms import Params, ShardResult
from mtl_ray.config import REDUCE_NODE, Config, UserError
from mtl_ray.distributed.worker import ShardWorker, resolve_device
from mtl_ray.ray_session import connect

log = logging.getLogger(__name__)
GROW_EVERY_S = 5.0  # scaling.max_workers: how often a step looks for free resources (a GCS call)


class StepTimeoutError(RuntimeError):
    pass


class WorkerPlacementError(StepTimeoutError, UserError):
    """The worker actors could not be placed (the cluster lacks the resources asked for): a config to change, so
    the CLI prints it as one line and exits 2."""


class WorkerActor:
    """The Ray actor: a :class:`ShardWorker` that takes numpy weights (see :func:`to_numpy`)."""

    def __init__(self, cfg_json: str, gpus: float):
        self.worker = ShardWorker(cfg_json, resolve_device(gpus))

    def meta_gradient(self, params: dict[str, np.ndarray], step: int, indices: Sequence[int],
                      classes: Sequence[Sequence[int]] | None = None) -> ShardResult:
        """The shard's result; with ``classes`` (one per index) hard tasks (``ShardWorker.hard_meta_gradient``)."""
        if classes is not None:
            return self.worker.hard_meta_gradient(from_numpy(params), step, indices, classes)
        return self.worker.meta_gradient(from_numpy(params), step, indices)

    def meta_gradient_parts(self, params: dict[str, np.ndarray], step: int, indices: Sequence[int],
                            classes: Sequence[Sequence[int]] | None = None) -> tuple[ShardResult, Params]:
        """:meth:`meta_gradient` as two objects (called with ``num_returns=2``): the result without its gradients,
        which the driver fetches, and the gradients, which stay in this node's object store for :func:`node_sum`."""
        result = self.meta_gradient(params, step, indices, classes)
        return dataclasses.replace(result, grads={}), result.grads

    def evaluate(self, params: dict[str, np.ndarray], split: str, step: int, indices: Sequence[int],
                 inner_steps: int) -> dict[str, torch.Tensor]:
        return self.worker.evaluate(from_numpy(params), split, step, indices, inner_steps)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def prefetch_hits(self) -> int:
        """Shards this actor served from the batch it sampled ahead (:class:`ShardWorker`'s ``prefetch``)."""
        return self.worker.prefetch_hits

    def sum_grads(self, *grads: Params) -> Params:
        """:func:`node_sum` in this actor's process, on its node (``scaling.reduce=node``)."""
        return node_sum(*grads)


def node_sum(*grads: Params) -> Params:
    """The sum of shard gradients, in the order given (run on the node that holds them: ``scaling.reduce=node``)."""
    return {k: torch.stack([g[k] for g in grads]).sum(0) for k in grads[0]}


def to_numpy(params: Params) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in params.items()}


def from_numpy(params: dict[str, np.ndarray]) -> Params:
    # Object-store arrays are read-only views; one small copy gives the worker tensors it may own.
    return {k: torch.tensor(v) for k, v in params.items()}


class RayExecutor:
    """``num_workers`` actors; shards go to workers that are up and are re-run elsewhere when one dies.

    Each slot keeps a readiness probe (a cheap call that returns once the actor is up): shards are
    given to ready slots, so a worker that is restarting or being replaced is not waited on while
    others can do the work.
    """

    def __init__(self, cfg: Config, actor_cls: type = WorkerActor):
        """``actor_cls``: the worker actor's class (:class:`WorkerActor`; bench/scaling_sim.py passes a stand-in)."""
        s = cfg.scaling
        self.cfg = cfg
        self.num_shards = s.num_workers
        self.timeout_s = s.step_timeout_s
        self.owns_ray = connect(cfg)
        self.actors: list[Any] = []
        total = ray.cluster_resources()
        if self.owns_ray and (s.num_workers * s.cpus_per_worker > total.get("CPU", 0)
                              or s.num_workers * s.gpus_per_worker > total.get("GPU", 0)):
            # The local Ray started here has all it will ever have: say so now, not after step_timeout_s.
            error = WorkerPlacementError(
                f"scaling.num_workers={s.num_workers}: got {s.num_workers} x ({s.cpus_per_worker:g} CPU, "
                f"{s.gpus_per_worker:g} GPU) asked of the local Ray started here, which has {_resources()}; expected "
                "no more than that. Lower scaling.num_workers or scaling.cpus_per_worker/gpus_per_worker, or join a "
                "cluster that has them (scaling.address)")
            self.close()
            raise error
        self.faults = 0  # shards re-run because their actor died
        self.replaced = 0  # actors replaced because they will not come back by themselves
        self._cfg_json = cfg.to_json()
        self._nodes: dict[int, str] = {}  # slot -> the node its actor was on when last seen up
        self._deadline = 0.0  # when the call in flight times out (time.monotonic())
        self.reduce = s.reduce  # scaling.reduce
        self.broadcast_s = 0.0  # the last meta_gradients call's ray.put of the weights, in seconds
        self._actor_cls: Any = ray.remote(actor_cls).options(
            num_cpus=s.cpus_per_worker, num_gpus=s.gpus_per_worker, max_restarts=s.max_restarts,
            max_task_retries=0,  # this executor re-runs shards itself, so nothing runs twice unseen
            # Inside a Tune trial the actors must land in the trial's placement group (the default
            # strategy captures them); elsewhere spread them over the nodes.
            **({} if ray.util.get_current_placement_group() else {"scheduling_strategy": "SPREAD"}))
        self.actors = [self._new_actor() for _ in range(s.num_workers)]
        self._probes = [_probe(a) for a in self.actors]
        # scaling.max_workers: grow into resources that become free (not inside a Tune trial's placement group,
        # whose resources are fixed); checked at most every grow_every_s, at the start of a step
        self.max_workers = 0 if ray.util.get_current_placement_group() else s.max_workers
        self.grow_every_s = GROW_EVERY_S
        self.joined = 0  # workers added while training
        self._next_grow = 0.0
        # Every worker loads its data before the first step, so start-up errors surface here.
        try:
            ray.get(self._probes, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            # The message names the cluster's resources: read them before close() shuts down a Ray this started.
            error = WorkerPlacementError(
                f"scaling.num_workers={s.num_workers}: the workers did not start within scaling.step_timeout_s="
                f"{self.timeout_s:g}s; expected {s.num_workers} x ({s.cpus_per_worker:g} CPU, {s.gpus_per_worker:g} "
                f"GPU) free in the cluster, which has {_resources()}. Lower scaling.num_workers or "
                "scaling.cpus_per_worker/gpus_per_worker, or add nodes")
            self.close()
            raise error from None

    def grow(self) -> int:
        """``scaling.max_workers``: start workers on resources free now (a node that joined), up to max_workers;
        returns how many. Workers still starting (or replacing lost ones) are counted first: they take free
        resources before new ones would. Shards go to a new worker once it is up (:meth:`_ready_slots`)."""
        room = self.max_workers - len(self.actors)
        now = time.monotonic()
        if room <= 0 or now < self._next_grow:
            return 0
        self._next_grow = now + self.grow_every_s
        s, free = self.cfg.scaling, ray.available_resources()
        fits = [math.floor(free.get(r, 0.0) / need + 1e-9) for r, need in
                (("CPU", s.cpus_per_worker), ("GPU", s.gpus_per_worker)) if need > 0]
        up, _ = ray.wait(self._probes, num_returns=len(self._probes), timeout=0)
        n = min(room, *fits) - (len(self._probes) - len(up)) if fits else room
        for _ in range(max(n, 0)):
            self.actors.append(self._new_actor())
            self._probes.append(_probe(self.actors[-1]))
        if n > 0:
            self.joined += n
            self.num_shards = len(self.actors)
            log.info("%d worker(s) joined: %d of scaling.max_workers=%d (cluster: %s)", n, len(self.actors),
                     self.max_workers, _resources())
        return max(n, 0)

    def _new_actor(self) -> Any:
        return self._actor_cls.remote(self._cfg_json, self.cfg.scaling.gpus_per_worker)

    def node_ids(self) -> list[str]:
        return ray.get([a.node_id.remote() for a in self.actors], timeout=self.timeout_s)

    # ------------------------------------------------------------------ the Executor protocol
    def meta_gradients(self, params: Params, step: int, shards: Sequence[Sequence[int]],
                       classes: Sequence[Sequence[int]] | None = None) -> list[ShardResult]:
        """Flat: every shard's result. Node: one result per node, the sum of its shards' (and flat results for
        shards re-run after their node's sum was lost); the driver's task-weighted mean is the same either way.
        ``classes``: the shards hold hard-task indices ``h``, each actor gets its shard's ``classes[h]``."""
        t0 = time.perf_counter()
        ref = ray.put(to_numpy(params))  # one broadcast per step: every actor reads the same object
        self.broadcast_s = time.perf_counter() - t0
        if classes is None:
            self.grow()  # new workers take shards from the next step on (the driver has sharded this one)

        def args(s: Sequence[int]) -> tuple:
            return (ref, step, list(s)) if classes is None else (ref, step, list(s), [list(classes[h]) for h in s])

        what = f"step {step}" if classes is None else f"step {step}'s hard tasks"
        if self.reduce != REDUCE_NODE:
            return self._run(lambda a, s: a.meta_gradient.remote(*args(s)), shards, what)
        parts = self._run(lambda a, s: a.meta_gradient_parts.options(num_returns=2).remote(*args(s)), shards, what)
        by_node: dict[str, list[int]] = {}
        adder: dict[str, int] = {}  # node -> the slot that adds its shards: one that computed one of them
        for i, (_, _, node, slot) in enumerate(parts):
            by_node.setdefault(node, []).append(i)
            adder.setdefault(node, slot)
        sums = {node: self.actors[adder[node]].sum_grads.remote(*[parts[i][1] for i in idx])
                for node, idx in by_node.items()}
        out: list[ShardResult] = []
        lost: list[int] = []
        for node, idx in by_node.items():
            try:
                grads = ray.get(sums[node], timeout=max(self._deadline - time.monotonic(), 0.0))
            except ray.exceptions.GetTimeoutError:
                self._timeout(what, idx, len(shards))
            except RayError as e:  # the node (and the gradients it held) went away: run its shards again
                self.faults += len(idx)
                log.warning("%s: the sum of node %s's shards %s failed (%s); re-running them", what, node[:8], idx,
                            type(e).__name__)
                if isinstance(e, RayActorError):  # its adder died: probe or replace it like any lost worker
                    self._heal(adder[node], e)
                lost += idx
                continue
            metas = [parts[i][0] for i in idx]
            metrics: dict[str, float] = {}
            for m in metas:
                for k, v in m.metrics.items():
                    metrics[k] = metrics.get(k, 0.0) + v
            out.append(ShardResult(grads=grads, num_tasks=sum(m.num_tasks for m in metas), metrics=metrics,
                                   seconds=max(m.seconds for m in metas),
                                   failures={i: f for m in metas for i, f in m.failures.items()}))
        if lost:
            out += self._run(lambda a, s: a.meta_gradient.remote(*args(s)), [shards[i] for i in lost], what)
        return out

    def evaluate(self, params: Params, split: str, step: int, shards: Sequence[Sequence[int]],
                 inner_steps: int) -> list[dict[str, torch.Tensor]]:
        ref = ray.put(to_numpy(params))
        return self._run(lambda a, s: a.evaluate.remote(ref, split, step, list(s), inner_steps), shards,
                         f"evaluation on {split!r} at step {step}")

    def close(self) -> None:
        for a in self.actors:
            with contextlib.suppress(Exception):  # already dead
                ray.kill(a)
        self.actors = []
        if self.owns_ray:
            ray.shutdown()
            self.owns_ray = False

    # ------------------------------------------------------------------ scheduling and faults
    def submit(self, slot: int, call: Callable[[Any, Sequence[int]], Any], indices: Sequence[int]) -> Any:
        """Start ``call`` for one shard on the actor in ``slot`` (a seam for fault-injection tests)."""
        return call(self.actors[slot], indices)

    def _ready_slots(self, deadline: float) -> list[int]:
        """Slots whose actor is up; waits (until ``deadline``) for at least one."""
        while True:
            ready, _ = ray.wait(self._probes, num_returns=len(self._probes), timeout=0)
            done = {r.hex() for r in ready}
            slots = []
            for i, probe in enumerate(self._probes):
                if probe.hex() not in done:
                    continue
                try:
                    self._nodes[i] = ray.get(probe)
                    slots.append(i)
                except RayActorError as e:  # it died again while coming up
                    self._heal(i, e)
            if slots:
                return slots
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            ray.wait(self._probes, num_returns=1, timeout=min(left, 1.0))

    def _run(self, call: Callable[[Any, Sequence[int]], Any], shards: Sequence[Sequence[int]], what: str) -> list:
        """Each shard's result, in shard order. A ``call`` that returns two refs (``num_returns=2``) gives
        ``(first's value, second ref, node id and slot of the actor that made them)`` per shard: the second is not
        fetched."""
        deadline = self._deadline = time.monotonic() + self.timeout_s
        results: list[Any] = [None] * len(shards)
        pending: dict[Any, tuple[int, int, Any]] = {}  # ref -> (shard, slot, the call's second ref or None)
        todo = list(range(len(shards)))
        while todo or pending:
            if todo:
                slots = self._ready_slots(deadline)
                if not slots:
                    self._timeout(what, sorted(todo + [i for i, _, _ in pending.values()]), len(shards))
                for k, i in enumerate(todo):
                    slot = slots[k % len(slots)]
                    out = self.submit(slot, call, shards[i])
                    first, second = (out[0], out[1]) if isinstance(out, list) else (out, None)
                    pending[first] = (i, slot, second)
                todo = []
            left = deadline - time.monotonic()
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(left, 0.0))
            if not ready:
                self._timeout(what, sorted(i for i, _, _ in pending.values()), len(shards))
            i, slot, second = pending.pop(ready[0])
            try:
                value = ray.get(ready[0])
                results[i] = value if second is None else (value, second, self._nodes[slot], slot)
            except RayActorError as e:
                self.faults += 1
                log.warning("%s: worker %d failed (%s); re-running its shard %d on a live worker", what, slot,
                            type(e).__name__, i)
                self._heal(slot, e)
                todo.append(i)
        return results

    def _timeout(self, what: str, lost: list[int], total: int) -> None:
        s = self.cfg.scaling
        raise StepTimeoutError(
            f"{what}: shards {lost} of {total} not back after scaling.step_timeout_s={self.timeout_s:g}s "
            f"({self.faults} re-run(s) after worker failures); expected {s.num_workers} worker(s) of "
            f"{s.cpus_per_worker:g} CPU, {s.gpus_per_worker:g} GPU to answer (cluster: {_resources()}). "
            "Add resources or raise scaling.step_timeout_s")

    def _heal(self, slot: int, err: RayActorError) -> None:
        """Probe the slot again; replace its actor when it will not come back (restarts spent, node gone)."""
        if isinstance(err, ray.exceptions.ActorDiedError):
            with contextlib.suppress(Exception):
                ray.kill(self.actors[slot])
            self.actors[slot] = self._new_actor()
            self.replaced += 1
        self._probes[slot] = _probe(self.actors[slot])


def _probe(actor: Any) -> Any:
    """A call that returns once ``actor`` is up (retried through restarts; fails if it is dead)."""
    return actor.node_id.options(max_task_retries=-1).remote()


def _resources() -> str:
    total = ray.cluster_resources()
    return f"{total.get('CPU', 0):g} CPU, {total.get('GPU', 0):g} GPU in all"
