"""Throughput of in-process vs 1 vs 2 Ray workers, and the share of each step outside compute.

Conv4 (max-pool), Omniglot 5-way 1-shot, meta-batch 32, second-order MAML, 1 inner step, through the
real trainer (``MetaTrainer`` with the in-process or the Ray executor). Per configuration: a few
warm-up steps, then ``--steps`` timed steps. Reported per configuration: tasks/s, the ratio to
in-process, and ``meta_train/overhead`` (1 - slowest shard's compute / step time: broadcast, gather,
reduce and the optimiser step), plus the bytes moved per step (weights out, gradients back).

    python bench/scaling.py                      # needs the Omniglot zips ($MTL_RAY_DATA_DIR)
    python bench/scaling.py --steps 20 --out bench/out/scaling.json

All configurations share the machine's cores: on 2 cores, 2 workers x 1 thread use the same CPUs as
1 worker x 2 threads, so the ratio measures the distribution overhead, not extra hardware.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

from mtl_ray import metrics as M
from mtl_ray.atomic import atomic_write
from mtl_ray.components import load_config
from mtl_ray.distributed.driver import MetaTrainer

ROOT = Path(__file__).resolve().parents[1]
CASES = [("in-process, 2 threads", 0, 2, 2), ("1 worker x 2 threads", 1, 2, 2), ("2 workers x 1 thread", 2, 1, 1)]


class Collect:
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.rows.append(metrics)


def run_case(workers: int, threads: int, cpus: float, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    cfg = load_config(ROOT / "jobs" / "configs" / "omniglot_maml.yaml", [
        "data.queries=1", "optim.meta_batch_size=32", "optim.val_every=0", "tracking.checkpoint_every=0",
        "tracking.progress=false", f"scaling.num_workers={workers}", f"scaling.torch_threads={threads}",
        f"scaling.cpus_per_worker={cpus}", *args.overrides])
    collect = Collect()
    t0 = time.perf_counter()
    trainer = MetaTrainer.create(cfg, tmp / f"w{workers}", callbacks=[collect])
    start_s = time.perf_counter() - t0
    try:
        trainer.fit(until=args.warmup)
        collect.rows.clear()
        t0 = time.perf_counter()
        trainer.fit(until=args.warmup + args.steps)
        wall = time.perf_counter() - t0
    finally:
        trainer.close()
    nbytes = sum(v.numel() * v.element_size() for v in trainer.params.values())
    return {"workers": workers, "threads": threads, "start_s": start_s, "tasks_per_s": args.steps * 32 / wall,
            "step_s": wall / args.steps,
            "overhead_median": statistics.median(r[M.META_TRAIN_OVERHEAD] for r in collect.rows),
            "overhead_mean": statistics.fmean(r[M.META_TRAIN_OVERHEAD] for r in collect.rows),
            "weights_bytes": nbytes, "bytes_per_step": nbytes * (1 + max(workers, 1))}


@ray.remote(num_cpus=0)
class Echo:
    def nbytes(self, x) -> int:
        return int(x.nbytes)


def measure_transfers() -> dict[str, float]:
    """Same-node costs the scaling model uses: an actor call round trip and ray.put / pull of weights."""
    import numpy as np

    echo = Echo.remote()
    ray.get(echo.nbytes.remote(np.zeros(1)))
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    for _ in range(50):
        ray.get(echo.nbytes.remote(np.zeros(1)))
    out["call_round_trip_ms"] = (time.perf_counter() - t0) / 50 * 1e3
    for name, n in (("conv4", 113_000), ("resnet12", 12_400_000)):
        x = np.zeros(n, dtype=np.float32)
        t0 = time.perf_counter()
        ref = ray.put(x)
        out[f"put_{name}_ms"] = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        ray.get(echo.nbytes.remote(ref))
        out[f"actor_read_{name}_ms"] = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        ray.get(ray.put(x.copy()))  # a result coming back: serialise + store + read in the driver
        out[f"roundtrip_{name}_ms"] = (time.perf_counter() - t0) * 1e3
    ray.kill(echo)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every case")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    res: dict[str, Any] = {"cpus": os.cpu_count(), "steps": args.steps, "loadavg_start": os.getloadavg()[0],
                           "cases": {}}
    with tempfile.TemporaryDirectory() as d:
        for name, workers, threads, cpus in CASES:
            r = run_case(workers, threads, cpus, args, Path(d))
            res["cases"][name] = r
            print(f"{name:24s} {r['tasks_per_s']:6.1f} tasks/s  step {r['step_s'] * 1e3:6.0f} ms  "
                  f"overhead {100 * r['overhead_median']:4.1f}% (median)  start {r['start_s']:.1f}s", flush=True)
    res["transfers"] = measure_transfers()
    print("transfers (same node): " + ", ".join(f"{k} {v:.2f}" for k, v in res["transfers"].items()))
    ray.shutdown()
    base = res["cases"][CASES[0][0]]["tasks_per_s"]
    print("\n=== throughput relative to in-process ===")
    for name, r in res["cases"].items():
        print(f"  {name:24s} {r['tasks_per_s'] / base:5.2f}x  overhead {100 * r['overhead_median']:.1f}%  "
              f"weights {r['weights_bytes'] / 1e3:.0f} kB, {r['bytes_per_step'] / 1e3:.0f} kB moved per step")
    if args.out is not None:
        atomic_write(args.out, json.dumps(res, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
