"""A scaling simulation on one machine: N worker actors on a multi-node ``ray.cluster_utils.Cluster``.

Each worker is a stand-in for a GPU: it reads the broadcast weights as a real worker does (``from_numpy``),
waits ``compute`` seconds (the per-task GPU time times its tasks), and returns a meta-gradient of the real size
(Conv4 113k parameters, 0.45 MB; ResNet-12 12.4M, 50 MB, in one tensor per layer). Everything else is the real
runtime: :class:`~mtl_ray.distributed.ray_executor.RayExecutor` (its broadcast, scheduling, gather and
``scaling.reduce`` mode), the driver's :func:`~mtl_ray.distributed.driver.reduce_results` and an Adam step on
weights of that size. Weak scaling: every worker keeps its share of tasks as N grows, nodes hold
``--workers-per-node`` workers each. Printed per model, mode and N: the step's time split (compute, broadcast,
gather = the rest of the executor call, reduce, optimiser) and the efficiency compute / step; then the per-node
and per-worker costs fitted to those rows and the extrapolation to 128 and 512 GPUs (docs/scaling.md).

    python bench/scaling_sim.py                          # both models, flat and node, N = 1..32
    python bench/scaling_sim.py --models conv4 --max-workers 8 --steps 5
    python bench/scaling_sim.py --out bench/out/scaling_sim.json

On this machine every "node" shares the same cores and memory and the network is loopback: the stand-ins'
(de)serialisation competes for the CPU, and cross-node copies are memory copies. Both are stated where the
numbers are used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from mtl_ray.algorithms import ShardResult
from mtl_ray.atomic import atomic_write
from mtl_ray.components import from_dict, load_config
from mtl_ray.config import REDUCE_MODES
from mtl_ray.distributed.driver import reduce_results
from mtl_ray.distributed.executor import shard
from mtl_ray.distributed.ray_executor import RayExecutor, from_numpy, node_sum
from mtl_ray.models import build_model


@dataclass(frozen=True)
class Model:
    """A gradient of a real model's size, and the GPU compute behind one worker's share of a step."""

    name: str
    overrides: tuple[str, ...]  # the config whose model's parameter tensors the gradient has
    x_shape: tuple[int, ...]
    tasks_per_worker: int
    task_ms: float  # GPU time per task
    source: str  # where task_ms comes from

    def layers(self) -> tuple[int, ...]:
        """Elements per parameter tensor of the real model (5-way head)."""
        cfg = load_config(None, list(self.overrides))
        return tuple(p.numel() for p in build_model(cfg, self.x_shape, 5).parameters())


# Conv4: 2nd-order MAML 5-way 1-shot, meta-batch 128 on one H100, fp32: 1,376 tasks/s (docs/benchmarks.md, "GPU").
# ResNet-12: never run on a GPU here: 26 ms per task is docs/scaling.md's FLOP-based assumption.
MODELS = {
    "conv4": Model("conv4", ("model.name=conv4",), (1, 28, 28), 256, 1000 / 1376, "measured: one H100"),
    "resnet12": Model("resnet12", ("model.name=resnet12", "data.image_size=84"), (3, 84, 84), 32, 26.0,
                      "assumed (FLOPs)"),
}


class StandInWorker:
    """A worker actor whose inner loops take ``compute_s`` and whose meta-gradient has ``layers`` tensors."""

    def __init__(self, cfg_json: str, gpus: float, layers: tuple[int, ...] = (), compute_s: float = 0.0):
        self.grads = {f"layer{i}": torch.full((n,), 1e-3 * (i + 1)) for i, n in enumerate(layers)}
        self.compute_s = compute_s

    def _result(self, params: dict[str, np.ndarray], indices: list[int]) -> ShardResult:
        t0 = time.perf_counter()
        from_numpy(params)  # what a real worker does with the broadcast weights
        time.sleep(max(self.compute_s - (time.perf_counter() - t0), 0.0))
        return ShardResult(grads=self.grads, num_tasks=len(indices), metrics={"loss": float(len(indices))},
                           seconds=time.perf_counter() - t0)

    def meta_gradient(self, params: dict[str, np.ndarray], step: int, indices: list[int]) -> ShardResult:
        return self._result(params, indices)

    def meta_gradient_parts(self, params: dict[str, np.ndarray], step: int,
                            indices: list[int]) -> tuple[ShardResult, dict[str, torch.Tensor]]:
        r = self._result(params, indices)
        return dataclasses.replace(r, grads={}), r.grads  # as WorkerActor.meta_gradient_parts splits a result

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def sum_grads(self, *grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return node_sum(*grads)


def run_n(model: Model, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """One cluster of ceil(n / workers_per_node) nodes with n stand-in workers; every mode, ``args.steps`` steps."""
    from ray.cluster_utils import Cluster

    per_node = args.workers_per_node
    nodes = math.ceil(n / per_node)
    layers = model.layers()
    store = max(256 * 2**20, sum(layers) * 4 * (per_node + 4))  # a node's results, the weights and some slack
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": min(n, per_node), "include_dashboard": False, "object_store_memory": store})
    for k in range(1, nodes):
        cluster.add_node(num_cpus=min(per_node, n - k * per_node), object_store_memory=store)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    compute_s = model.tasks_per_worker * model.task_ms / 1e3
    params = {f"layer{i}": torch.zeros(k) for i, k in enumerate(layers)}
    optimizer = torch.optim.Adam(list(params.values()), lr=1e-3)
    out: dict[str, Any] = {"workers": n, "nodes": nodes, "compute_ms": compute_s * 1e3, "modes": {}}
    try:
        cfg = from_dict({"scaling": {"num_workers": n, "cpus_per_worker": 1, "step_timeout_s": 600}})

        class Actor(StandInWorker):
            def __init__(self, cfg_json: str, gpus: float):
                super().__init__(cfg_json, gpus, layers, compute_s)

        t0 = time.perf_counter()
        executor = RayExecutor(cfg, actor_cls=Actor)
        out["start_s"] = time.perf_counter() - t0
        assert len(set(executor.node_ids())) == nodes, "the workers are not spread over every node"
        shards = shard(range(n * model.tasks_per_worker), n)
        for mode in REDUCE_MODES:
            executor.reduce = mode
            rows = []
            for step in range(args.warmup + args.steps):
                t0, cpu0 = time.perf_counter(), time.process_time()
                results = executor.meta_gradients(params, step, shards)
                t1 = time.perf_counter()
                grads, tasks, _ = reduce_results(results)
                t2 = time.perf_counter()
                for key, g in grads.items():
                    params[key].grad = g
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                t3 = time.perf_counter()
                assert tasks == n * model.tasks_per_worker
                if step >= args.warmup:
                    compute = max(r.seconds for r in results)
                    rows.append({"step": t3 - t0, "compute": compute, "broadcast": executor.broadcast_s,
                                 "gather": t1 - t0 - executor.broadcast_s - compute, "reduce": t2 - t1,
                                 "optimiser": t3 - t2, "driver_cpu": time.process_time() - cpu0})
            med = {k: statistics.median(r[k] for r in rows) * 1e3 for k in rows[0]}
            med["efficiency"] = med["compute"] / med["step"]
            out["modes"][mode] = med
        executor.close()
    finally:
        ray.shutdown()
        cluster.shutdown()
    return out


def fit(rows: list[dict[str, Any]], mode: str, key: str) -> tuple[float, float, float]:
    """Least squares of ``key`` (ms) = a + b * workers + c * nodes, refitted without a slope that comes out < 0."""
    x = np.array([[1.0, r["workers"], r["nodes"]] for r in rows])
    y = np.array([r["modes"][mode][key] for r in rows])
    cols = [0, 1, 2] if len({r["nodes"] for r in rows}) > 1 else [0, 1]
    coef = np.zeros(3)
    coef[cols] = np.linalg.lstsq(x[:, cols], y, rcond=None)[0]
    for k in (1, 2):
        if coef[k] < 0:
            cols = [c for c in cols if c != k]
            coef = np.zeros(3)
            coef[cols] = np.linalg.lstsq(x[:, cols], y, rcond=None)[0]
    return float(coef[0]), float(coef[1]), float(coef[2])


# Assumed, not measured here: the bandwidth of one node's network link (25 GbE). What crosses it per step: flat,
# the weights out to each node and every worker's gradient into the driver; node, the weights out and one gradient
# per node back.
NET_GB_S = 3.1


def model_step(compute: float, worker_side: float, driver: tuple[float, float, float], mode: str, gpus: int,
               per_node: int, mb: float, node_sum_ms: float) -> float:
    """Modelled step (ms) at ``gpus`` workers: compute + the workers' own overhead (parallel, measured at N=1)
    + the driver's CPU (fitted) + the bytes through the driver's link at NET_GB_S (+ node: adding a node's
    shards, measured)."""
    nodes = math.ceil(gpus / per_node)
    a, b, c = driver
    crossing = nodes + (gpus if mode == "flat" else nodes)  # gradients of mb MB through the driver's link
    adding = node_sum_ms if mode == "node" else 0.0
    return compute + worker_side + a + b * gpus + c * nodes + crossing * mb / NET_GB_S + adding


def time_node_sum(layers: tuple[int, ...], shards: int) -> float:
    """Median ms of :func:`node_sum` over ``shards`` gradients of ``layers`` in this process (one CPU's work)."""
    grads = [{f"layer{i}": torch.rand(n) for i, n in enumerate(layers)} for _ in range(shards)]
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        node_sum(*grads)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def print_row(mode: str, r: dict[str, Any]) -> None:
    m = r["modes"][mode]
    print(f"{mode:5s} {r['workers']:4d} {r['nodes']:5d} {m['step']:8.1f} {m['compute']:8.1f} {m['broadcast']:7.1f} "
          f"{m['gather']:7.1f} {m['reduce']:7.1f} {m['optimiser']:7.1f} {100 * m['efficiency']:5.1f}% "
          f"{m.get('driver_cpu', float('nan')):10.1f}", flush=True)


HEADER = (f"{'mode':5s} {'N':>4s} {'nodes':>5s} {'step':>8s} {'compute':>8s} {'bcast':>7s} {'gather':>7s} "
          f"{'reduce':>7s} {'optim':>7s} {'eff.':>6s} {'driver CPU':>10s}  (ms, medians)")


def report(model: Model, rows: list[dict[str, Any]], per_node: int) -> dict[str, Any]:
    """The fit and extrapolation of one model's measured rows (printed; returned for the JSON)."""
    mb = sum(model.layers()) * 4 / 1e6
    extra: dict[str, Any] = {}
    compute = rows[0]["compute_ms"]
    node_sum_ms = time_node_sum(model.layers(), per_node)
    extra["node_sum_ms"] = node_sum_ms
    print(f"  adding {per_node} shards' gradients (node_sum, this CPU): {node_sum_ms:.1f} ms; "
          f"assumed network link {NET_GB_S} GB/s")
    for mode in REDUCE_MODES:
        driver = fit(rows, mode, "driver_cpu")
        one = rows[0]["modes"][mode]
        worker_side = max(one["step"] - one["compute"] - one["driver_cpu"], 0.0)
        line = [f"{mode}: driver CPU = {driver[0]:.1f} ms + {driver[1]:.2f} ms x workers + {driver[2]:.2f} ms x "
                f"nodes; workers' own overhead {worker_side:.1f} ms"]
        for gpus in (32, 128, 512):
            step = model_step(compute, worker_side, driver, mode, gpus, per_node, mb, node_sum_ms)
            extra[f"{mode}_{gpus}"] = compute / step
            line.append(f"{gpus} GPUs {100 * compute / step:.0f}%")
        extra[f"{mode}_driver_fit_ms"] = dict(zip(("constant", "per_worker", "per_node"), driver, strict=True))
        extra[f"{mode}_worker_side_ms"] = worker_side
        print("  modelled " + ", ".join(line))
        base = rows[0]["modes"][mode]["step"]
        print(f"  {mode}: measured here, step(1) / step(N): " + ", ".join(
            f"N={r['workers']} {100 * base / r['modes'][mode]['step']:.0f}%" for r in rows))
    return extra


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--max-workers", type=int, default=32)
    p.add_argument("--workers-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--tables", type=Path, default=None, help="reprint the tables and the model from a --out file")
    args = p.parse_args(argv)
    if args.tables is not None:
        res = json.loads(args.tables.read_text())
        for name, got in res["models"].items():
            print(f"\n=== {name}: {got['gradient_mb']:.2f} MB gradients, {got['tasks_per_worker']} tasks per worker x "
                  f"{got['task_ms']:.3f} ms ({got['task_ms_source']}), {res['workers_per_node']} workers per node ===")
            print(HEADER)
            for r in got["rows"]:
                for mode in r["modes"]:
                    print_row(mode, r)
            report(MODELS[name], got["rows"], res["workers_per_node"])
        return 0
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ns = [n for n in (1, 2, 4, 8, 16, 32, 64, 128) if n <= args.max_workers]
    res = {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()[0], "steps": args.steps,
           "workers_per_node": args.workers_per_node, "models": {}}
    for name in args.models:
        model = MODELS[name]
        print(f"\n=== {name}: {sum(model.layers()) * 4 / 1e6:.2f} MB gradients, {model.tasks_per_worker} tasks per "
              f"worker x {model.task_ms:.3f} ms ({model.source}), {args.workers_per_node} workers per node ===",
              flush=True)
        print(HEADER)
        rows = []
        for n in ns:
            r = run_n(model, n, args)
            rows.append(r)
            for mode in r["modes"]:
                print_row(mode, r)
        res["models"][name] = {"gradient_mb": sum(model.layers()) * 4 / 1e6, "tasks_per_worker": model.tasks_per_worker,
                               "task_ms": model.task_ms, "task_ms_source": model.source, "rows": rows,
                               "extrapolation": report(model, rows, args.workers_per_node)}
    if args.out is not None:
        atomic_write(args.out, json.dumps(res, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
