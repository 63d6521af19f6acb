"""Backbones: tasks/s and peak memory of MAML's meta-gradient per backbone x order x inner steps, vectorised vs
a per-task loop, and the sampling rate alone of an 84x84 RGB Parquet table.

Backbones (5-way 1-shot, 15 queries per class, ``model.norm=support``, the defaults of a run):

* ``conv4-28-gray-64``: Conv4, 64 filters, 28x28 grayscale (Omniglot's shape);
* ``conv4-84-rgb-32``: Conv4, 32 filters, 84x84 RGB (the MAML paper's mini-ImageNet setting);
* ``resnet12-84-rgb``: ResNet-12, widths 64-160-320-640, 84x84 RGB (MetaOptNet, TADAM). ``--quick`` runs a narrow
  one (16-32-64-128) instead: the full one takes about a minute and 8 GB per second-order task on a CPU.

Each (backbone, first/second order, 1/5 inner steps) runs one meta-batch's forward + meta-gradient (no optimiser
step) two ways, each in a fresh Python process of its own (its peak memory is then its own):

* vectorised: ``FunctionalAlgorithm.meta_gradient``, ``torch.func.vmap`` over tasks, in the chunks a ShardWorker
  uses with ``algorithm.task_chunk_size=0`` (``mtl_ray.memory.chunk_limit``: as many tasks per call as
  ``algorithm.chunk_memory_mb``'s budget holds by the memory estimate; ``--chunk-memory-mb`` sets it);
* loop: the same algorithm's ``adapt``/``predict`` one task at a time with ``torch.autograd.grad`` (no ``vmap``).

Peak memory is the process's peak resident set (``getrusage``) less its resident set before the first call, next
to what ``mtl_ray.memory`` estimates for it (one chunk's tensors, plus 0.1 GB for a process's first call); on CUDA
``torch.cuda.max_memory_allocated``.
The sampling section writes a synthetic raw-uint8 table (100 classes x 600 images, 84x84 RGB, as mini-ImageNet;
``--quick``: 60 per class) with ``mtl_ray.data.imagetable.write_table``, loads it as ``data.source=parquet`` and
times ``TaskSource.sample`` alone. Before timing, the vectorised and loop meta-gradients are checked against each
other in float64 on small instances of both backbones. Timing helpers are bench/throughput.py's.

    python bench/backbones.py --quick            # a few minutes
    python bench/backbones.py                    # the full grid: about 40 minutes on a 2-core CPU, 12 GB
    python bench/backbones.py --device cuda      # on a GPU (falls back to the CPU, saying so, when there is none)
    python bench/backbones.py --out bench/out/backbones.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from throughput import measure, summary  # bench/throughput.py: timing (warm-up, median)

from mtl_ray import memory
from mtl_ray.algorithms import build_algorithm
from mtl_ray.components import from_dict
from mtl_ray.config import Config
from mtl_ray.data.base import TaskBatch
from mtl_ray.memory import fmt_bytes
from mtl_ray.models import build_model, initial_params
from mtl_ray.runtime import tune_allocator

Params = dict[str, torch.Tensor]

WAYS, SHOTS, QUERIES = 5, 1, 15
NARROW = (16, 32, 64, 128)  # --quick's ResNet-12 widths
BACKBONES: dict[str, dict[str, Any]] = {
    "conv4-28-gray-64": {"model": {"name": "conv4", "channels": 64}, "x": (1, 28, 28), "meta_batch": 32},
    "conv4-84-rgb-32": {"model": {"name": "conv4", "channels": 32}, "x": (3, 84, 84), "meta_batch": 8},
    "resnet12-84-rgb": {"model": {"name": "resnet12"}, "x": (3, 84, 84), "meta_batch": 4},
}
IMPLS = ("vectorised", "loop")
FIRST_CALL_BYTES = 100 * 2**20  # a process's first meta-gradient call (part of mtl_ray.memory.BASE_BYTES)


# --------------------------------------------------------------------------- setups


def config(backbone: str, *, first_order: bool, steps: int, quick: bool = False, chunk_memory_mb: int = 0,
           image_size: int | None = None, model: dict[str, Any] | None = None) -> Config:
    b = BACKBONES[backbone]
    m = dict(b["model"] if model is None else model)
    if quick and m["name"] == "resnet12":
        m["widths"] = list(NARROW)
    # the model and algorithm are built for explicit shapes: the table named here is never read
    return from_dict({
        "data": {"source": "parquet", "path": "synthetic.parquet", "ways": WAYS, "shots": SHOTS, "queries": QUERIES,
                 "image_size": image_size or b["x"][-1]},
        "model": m,
        "algorithm": {"name": "maml", "inner_lr": 0.01, "inner_steps": steps, "first_order": first_order,
                      "chunk_memory_mb": chunk_memory_mb},
    })


def random_tasks(tasks: int, x_shape: tuple[int, ...], shots: int = SHOTS, queries: int = QUERIES,
                 seed: int = 0) -> TaskBatch:
    """Random images in [0, 1) of ``x_shape``, labels ``0..N-1`` per class: ``x [T, N*K, *x_shape]``."""
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(tasks, WAYS * shots, *x_shape, generator=g)
    qx = torch.rand(tasks, WAYS * queries, *x_shape, generator=g)
    sy = torch.arange(WAYS).repeat_interleave(shots).expand(tasks, -1).contiguous()
    qy = torch.arange(WAYS).repeat_interleave(queries).expand(tasks, -1).contiguous()
    return TaskBatch(sx, sy, qx, qy)


def loop_meta_gradient(alg: Any, params: Params, batch: TaskBatch) -> Params:
    """Sum over tasks of each task's meta-gradient, one task at a time: the algorithm's own ``adapt`` and
    ``predict`` without ``vmap``, differentiated with ``torch.autograd`` (tests/algorithms' reference)."""
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for t in range(batch.num_tasks):
        p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        state = alg.adapt(p, batch.support_x[t], batch.support_y[t], alg.inner_steps)
        loss = alg.loss(alg.predict(p, state, batch.query_x[t]), batch.query_y[t])
        for k, g in zip(p, torch.autograd.grad(loss, list(p.values()), allow_unused=True), strict=True):
            if g is not None:
                total[k] += g
    return total


def check_equivalence() -> dict[str, float]:
    """Vectorised vs loop meta-gradient, float64, second and first order, 2 inner steps, on small instances."""
    out = {}
    small = {"conv4": {"name": "conv4", "channels": 4}, "resnet12": {"name": "resnet12", "widths": [4, 4, 4, 4]}}
    for name, m in small.items():
        for fo in (False, True):
            cfg = config("conv4-84-rgb-32", first_order=fo, steps=2, image_size=16, model=m)
            model = build_model(cfg, (3, 16, 16), WAYS).double()
            alg = build_algorithm(cfg, model, "classification", WAYS)
            params = {k: v.double() for k, v in initial_params(model, 0).items()}
            batch = random_tasks(3, (3, 16, 16), queries=2).to("cpu", torch.float64)
            got, want = alg.meta_gradient(params, batch).grads, loop_meta_gradient(alg, params, batch)
            num = sum(float((got[k] - want[k]).square().sum()) for k in want) ** 0.5
            err = num / sum(float(want[k].square().sum()) for k in want) ** 0.5
            out[f"{name} {'first' if fo else 'second'} order"] = err
            if not err < 1e-9:
                raise SystemExit(f"check failed: {name}, first_order={fo}: vectorised vs loop rel err {err:.2e}")
    return out


# --------------------------------------------------------------------------- one measurement, in its own process


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """The child side of :func:`measure_in_process`: build, time and measure one case."""
    torch.set_num_threads(spec["threads"])
    tune_allocator()  # as the trainer and every worker do
    dev = spec["device"]
    b = BACKBONES[spec["backbone"]]
    x_shape = tuple(b["x"])
    cfg = config(spec["backbone"], first_order=spec["first_order"], steps=spec["steps"], quick=spec["quick"],
                 chunk_memory_mb=spec["chunk_memory_mb"])
    model = build_model(cfg, x_shape, WAYS)
    alg = build_algorithm(cfg, model, "classification", WAYS)
    alg.chunk_limit = memory.chunk_limit(cfg, dev, x_shape)  # as a ShardWorker does
    params = {k: v.to(dev) for k, v in initial_params(model, 0).items()}
    batch = random_tasks(spec["tasks"], x_shape).to(dev)
    if spec["impl"] == "loop":
        def fn() -> Params:
            return loop_meta_gradient(alg, params, batch)
        chunk_sizes = [1] * spec["tasks"]
    else:
        def fn() -> Params:
            return alg.meta_gradient(params, batch).grads
        chunk_sizes = [b - a for a, b in alg.chunks(batch, True, spec["steps"])]
    before = _rss()
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = measure(fn, spec["repeats"], warmup=spec["warmup"], device=dev)
    est = memory.estimate_shard(cfg, spec["tasks"], x_shape=x_shape)
    res: dict[str, Any] = {
        "times_s": times, "chunk_sizes": chunk_sizes,
        "rss_before_bytes": before, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        # what the estimate says one chunk's tensors take (the loop: one task's), plus a process's first call
        "estimate_chunk_bytes": est.chunk // est.chunk_tasks * max(chunk_sizes) + FIRST_CALL_BYTES,
    }
    res["peak_delta_bytes"] = res["peak_rss_bytes"] - before
    if dev.startswith("cuda"):
        res["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    return res


def measure_in_process(spec: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`run_one` in a fresh Python process (``--one SPEC``) and return its JSON result."""
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise SystemExit(f"measuring {spec} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- sections


def bench_compute(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for backbone in args.backbones:
        b = BACKBONES[backbone]
        tasks = args.meta_batch or (2 if args.quick else b["meta_batch"])
        heavy = backbone.startswith("resnet12") and not args.quick and args.device == "cpu"
        for first_order in (False, True):
            for steps in args.steps:
                row: dict[str, Any] = {"backbone": backbone, "order": "first" if first_order else "second",
                                       "steps": steps, "tasks": tasks}
                for impl in IMPLS:
                    # a full ResNet-12 meta-gradient takes minutes on a CPU: one timed call, no warm-up
                    spec = {"backbone": backbone, "first_order": first_order, "steps": steps, "impl": impl,
                            "tasks": tasks, "threads": args.threads, "device": args.device, "quick": args.quick,
                            "repeats": 1 if heavy else args.repeats, "warmup": 0 if heavy else 1,
                            "chunk_memory_mb": args.chunk_memory_mb}
                    t0 = time.perf_counter()
                    r = measure_in_process(spec)
                    r.update(summary(r["times_s"], tasks))
                    row[impl] = r
                    print(f"  {backbone} {row['order']} order, {steps} step(s), {tasks} tasks, {impl}: "
                          f"{r['tasks_per_s']:.3g} tasks/s, peak +{fmt_bytes(r['peak_delta_bytes'])} "
                          f"(estimate {fmt_bytes(r['estimate_chunk_bytes'])}), chunks {r['chunk_sizes']} "
                          f"[{time.perf_counter() - t0:.0f} s]", flush=True)
                row["ratio"] = row["vectorised"]["tasks_per_s"] / row["loop"]["tasks_per_s"]
                rows.append(row)
    return rows


def bench_sampling(args: argparse.Namespace) -> dict[str, Any]:
    """Tasks/s of ``TaskSource.sample`` alone over a synthetic 84x84 RGB raw-uint8 table."""
    from mtl_ray.data import build_task_source, clear_caches
    from mtl_ray.data.imagetable import write_table

    classes, per_class = 100, (60 if args.quick else 600)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="mtl-ray-bench-") as tmp:
        path = Path(tmp) / "synthetic84.parquet"
        t0 = time.perf_counter()
        images = rng.integers(0, 256, size=(classes * per_class, 3, 84, 84), dtype=np.uint8)
        write_table(path, [f"c{i:03d}" for i in range(classes) for _ in range(per_class)], images)
        write_s = time.perf_counter() - t0
        del images
        cfg = from_dict({"data": {"source": "parquet", "path": str(path), "ways": WAYS, "shots": SHOTS,
                                  "queries": QUERIES, "image_size": 84}})
        clear_caches()
        rss0 = _rss()
        t0 = time.perf_counter()
        source = build_task_source(cfg)
        load_s = time.perf_counter() - t0
        out: dict[str, Any] = {"classes": classes, "images_per_class": per_class, "write_s": write_s,
                               "load_s": load_s, "file_bytes": path.stat().st_size,
                               "rss_after_load_bytes": _rss() - rss0, "x_shape": list(source.x_shape), "rates": {}}
        steps = iter(range(10**6))  # a new step each call: new tasks, as in training
        for tasks in (4, 32):
            r = summary(measure(lambda t=tasks: source.sample("train", next(steps), range(t)), args.repeats + 2),
                        tasks)
            out["rates"][str(tasks)] = r
            print(f"  sampling {tasks} tasks per call: {r['tasks_per_s']:.0f} tasks/s", flush=True)
        clear_caches()
    return out


# --------------------------------------------------------------------------- report


def print_tables(res: dict[str, Any]) -> None:
    env = res["env"]
    print(f"\n=== meta-gradient, 5-way 1-shot 15-query, MAML, device {env['device']}, {env['threads']} thread(s) "
          "(forward + meta-gradient, no optimiser step) ===")
    print("| backbone | order | inner steps | meta-batch | vectorised tasks/s | loop tasks/s | vectorised / loop | "
          "tasks per vmap call | peak RSS increase vectorised (estimate) | peak RSS increase loop (estimate) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    mem = "peak_cuda_bytes" if env["device"].startswith("cuda") else "peak_delta_bytes"
    for r in res.get("compute", []):
        v, lp = r["vectorised"], r["loop"]
        print(f"| {r['backbone']} | {r['order']} | {r['steps']} | {r['tasks']} | {v['tasks_per_s']:.3g} | "
              f"{lp['tasks_per_s']:.3g} | {r['ratio']:.2f}x | {max(v['chunk_sizes'])} | {fmt_bytes(v[mem])} "
              f"({fmt_bytes(v['estimate_chunk_bytes'])}) | {fmt_bytes(lp[mem])} "
              f"({fmt_bytes(lp['estimate_chunk_bytes'])}) |")
    s = res.get("sampling")
    if s:
        print(f"\n=== sampling alone: data.source=parquet, synthetic raw-uint8 table {s['classes']} classes x "
              f"{s['images_per_class']} images, 84x84 RGB ({fmt_bytes(s['file_bytes'])} on disk; loaded once in "
              f"{s['load_s']:.1f} s, +{fmt_bytes(s['rss_after_load_bytes'])} resident) ===")
        print("| tasks per call | sampling tasks/s |")
        print("|---|---|")
        for tasks, r in s["rates"].items():
            print(f"| {tasks} | {r['tasks_per_s']:.0f} |")
        rate = s["rates"]["32"]["tasks_per_s"]
        for r in res.get("compute", []):
            if r["backbone"] != "conv4-28-gray-64" and r["steps"] == 1:
                v = r["vectorised"]["tasks_per_s"]
                print(f"  {r['backbone']} {r['order']} order, 1 step: compute {v:.3g} tasks/s; sampling takes "
                      f"{100 * v / rate:.2g}% of a step's time")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--quick", action="store_true",
                   help="meta-batch 2, 1 inner step, a narrow ResNet-12, 60 images per class (a few minutes)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda without a GPU: says so, runs on the CPU)")
    p.add_argument("--backbones", default=",".join(BACKBONES), help=f"comma-separated subset of {','.join(BACKBONES)}")
    p.add_argument("--steps", default=None, help="inner steps, comma-separated (default 1,5; --quick 1)")
    p.add_argument("--meta-batch", type=int, default=0,
                   help="tasks per meta-batch (default: 32 conv4-28, 8 conv4-84, 4 resnet12; --quick 2)")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per case after one warm-up (default 2)")
    p.add_argument("--chunk-memory-mb", type=int, default=0,
                   help="algorithm.chunk_memory_mb for the vectorised path (default 0: derived, as in a run)")
    p.add_argument("--sections", default="compute,sampling", help="comma-separated subset of compute,sampling")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--tables", type=Path, default=None, metavar="JSON",
                   help="print the tables of an earlier run's --out file and exit (the estimates as they are now)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process of measure_in_process
    args = p.parse_args(argv)
    if args.one is not None:
        print(json.dumps(run_one(json.loads(args.one))))
        return 0
    if args.tables is not None:
        res = json.loads(args.tables.read_text())
        for r in res.get("compute", []):  # today's estimate for the same case (the fit may have moved)
            cfg = config(r["backbone"], first_order=r["order"] == "first", steps=r["steps"], quick=res["env"]["quick"])
            for impl in IMPLS:
                tasks = max(r[impl]["chunk_sizes"])
                est = memory.task_cost(cfg, "train", r["steps"], tuple(BACKBONES[r["backbone"]]["x"])).chunk
                r[impl]["estimate_chunk_bytes"] = tasks * est + FIRST_CALL_BYTES
        print_tables(res)
        return 0
    torch.set_num_threads(args.threads)
    tune_allocator()
    gpu = None
    if args.device.startswith("cuda"):
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(torch.device(args.device))
        else:
            print("no GPU is available here (torch.cuda.is_available() is False): running on the CPU instead")
            args.device = "cpu"
    args.backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    unknown = [b for b in args.backbones if b not in BACKBONES]
    if unknown:
        p.error(f"--backbones: got {unknown}, expected some of {', '.join(BACKBONES)}")
    args.steps = [int(s) for s in (args.steps or ("1" if args.quick else "1,5")).split(",")]
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    load = os.getloadavg()[0]
    res: dict[str, Any] = {"env": {
        "torch": torch.__version__, "python": sys.version.split()[0], "machine": platform.machine(),
        "cpus": os.cpu_count(), "threads": args.threads, "device": args.device, "gpu": gpu, "quick": args.quick,
        "date": time.strftime("%Y-%m-%d"), "loadavg_1min_start": load,
        "memory_available_bytes": (memory.available_memory() or (0, ""))[0]}}
    if load > 0.5:
        print(f"note: 1-minute load average is {load:.1f} before starting: other work shares the CPUs, expect noise")
    t0 = time.perf_counter()
    print("[check] vectorised vs loop, float64, conv4 and resnet12 (small), first and second order")
    res["check"] = check_equivalence()
    print("  " + ", ".join(f"{k}: {v:.1e}" for k, v in res["check"].items()))
    if "compute" in sections:
        print("[compute]", flush=True)
        res["compute"] = bench_compute(args)
    if "sampling" in sections:
        print("[sampling]", flush=True)
        res["sampling"] = bench_sampling(args)
    res["env"]["wall_s"] = time.perf_counter() - t0
    res["env"]["loadavg_1min_end"] = os.getloadavg()[0]
    print_tables(res)
    print(f"\nwall time {res['env']['wall_s']:.0f} s, load average {load:.1f} -> {res['env']['loadavg_1min_end']:.1f}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
