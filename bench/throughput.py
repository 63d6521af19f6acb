"""Meta-training throughput: the vectorised meta-gradient (``torch.func.vmap`` over tasks) vs a per-task loop.

Measures tasks/s of one meta-batch's forward + meta-gradient (no outer optimiser step) for

1. sinusoid regression, MLP 1-40-40-1, meta-batch 25, K=10, second-order MAML, 1 inner step:
   ``alg.meta_gradient`` vs a plain per-task autograd loop written here;
2. Conv4 on Omniglot-shaped random tasks, 5-way 1-shot (1 and 15 queries per class), meta-batch 32,
   1 and 5 inner steps, second and first order: vectorised with ``conv_impl="folded"`` (the default: the
   first block's batch norm folded into one GEMM), with ``"native"`` (``F.conv2d`` + batch norm in every
   block) and ``"im2col"``, and a per-task loop using ``F.conv2d`` / ``F.batch_norm``;
3. the Conv4 first layer (1 -> 64 channels, 3x3, pad 1, 28x28) forward + backward under ``vmap`` with
   per-task weights (32 tasks x 5 images) in several formulations, in GFLOP/s;
4. ``accuracy``: the second-order Conv4 meta-gradient in float32 against float64 (1 and 5 inner steps),
   vectorised and per-task loop, with the metric of ``algorithm.compile``'s check.

Before timing, every vectorised path is checked against the loop in float64 on a small instance.
Timing: ``time.perf_counter``, 2 warm-up iterations, median of the repeats. Each Conv4 implementation is
timed in a fresh process of its own, the implementations in turns (``--rounds``; see ``measure_in_process``).
No data is read: tasks are random tensors of the right shapes (sinusoid tasks come from ``SinusoidTaskSource``).

Results depend on the environment, which the JSON records: the load average (other work on the
cores; more torch threads than free cores makes OpenMP barriers stall) and glibc allocator settings.
Vectorised tensors are large (one Conv4 layer-1 activation for 32 tasks x 5 images is 32 MB), above
glibc's mmap threshold, so each is freshly mapped and page-faulted; e.g.
keeping freed memory in the heap changes the vectorised numbers a lot. The script applies
``mtl_ray.runtime.tune_allocator`` (as the trainer and workers do) to both sides; ``MTL_RAY_TUNE_MALLOC=0``
measures without it.

    python bench/throughput.py                 # full run (a few minutes)
    python bench/throughput.py --quick         # ~1 minute
    python bench/throughput.py --out bench/out/throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import vjp, vmap

from mtl_ray.algorithms import build_algorithm
from mtl_ray.algorithms.base import compile_difference
from mtl_ray.components import from_dict
from mtl_ray.config import Config
from mtl_ray.data.base import TaskBatch
from mtl_ray.data.sinusoid import SinusoidTaskSource
from mtl_ray.models import build_model, initial_params
from mtl_ray.models.layers import batch_norm, folded_block
from mtl_ray.runtime import fp32_precision, tune_allocator

Params = dict[str, torch.Tensor]

WAYS, SHOTS, IMAGE = 5, 1, 28
SINUSOID_TASKS, CONV_TASKS = 25, 32


# --------------------------------------------------------------------------- timing


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn: Callable[[], Any], repeats: int, warmup: int = 2, device: str = "cpu") -> list[float]:
    """Seconds per call of ``fn`` after ``warmup`` untimed calls (CUDA work is synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def summary(times: list[float], tasks: int) -> dict[str, Any]:
    med = statistics.median(times)
    return {"median_s": med, "tasks_per_s": tasks / med, "times_s": times,
            "spread": (max(times) - min(times)) / med}


# --------------------------------------------------------------------------- setups


def sinusoid_config(*, inner_steps: int = 1, first_order: bool = False, compile: bool = False) -> Config:
    return from_dict({
        "data": {"source": "sinusoid", "shots": 10, "queries": 10},
        "model": {"name": "mlp", "hidden_sizes": [40, 40]},
        "algorithm": {"name": "maml", "inner_lr": 0.01, "inner_steps": inner_steps, "first_order": first_order,
                      "compile": compile},
        "optim": {"meta_batch_size": SINUSOID_TASKS},
    })


def conv_config(*, inner_steps: int, first_order: bool, queries: int, impl: str = "folded",
                norm: str = "transductive") -> Config:
    # transductive: the per-task loops, learn2learn and higher normalise with batch statistics, so the kernels
    # compare like with like; model.norm=support also runs the support set in each query pass (docs/architecture.md)
    return from_dict({
        "data": {"source": "omniglot", "ways": WAYS, "shots": SHOTS, "queries": queries, "image_size": IMAGE},
        "model": {"name": "conv4", "channels": 64, "downsample": "pool", "conv_impl": impl, "norm": norm},
        "algorithm": {"name": "maml", "inner_lr": 0.4, "inner_steps": inner_steps, "first_order": first_order},
        "optim": {"meta_batch_size": CONV_TASKS},
    })


def random_image_tasks(tasks: int, queries: int, seed: int = 0) -> TaskBatch:
    """Omniglot-shaped random tasks: ``x [T, N*K, 1, 28, 28]`` in [0, 1), labels ``0..N-1`` per class."""
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(tasks, WAYS * SHOTS, 1, IMAGE, IMAGE, generator=g)
    qx = torch.rand(tasks, WAYS * queries, 1, IMAGE, IMAGE, generator=g)
    sy = torch.arange(WAYS).repeat_interleave(SHOTS).expand(tasks, -1).contiguous()
    qy = torch.arange(WAYS).repeat_interleave(queries).expand(tasks, -1).contiguous()
    return TaskBatch(sx, sy, qx, qy)


@dataclass
class Setup:
    cfg: Config
    alg: Any
    params: Params
    batch: TaskBatch

    def to(self, device: str) -> Setup:
        return Setup(self.cfg, self.alg, {k: v.to(device) for k, v in self.params.items()},
                     self.batch.to(device))

    def to64(self) -> Setup:
        return Setup(self.cfg, self.alg, {k: v.double() for k, v in self.params.items()},
                     self.batch.to("cpu", torch.float64))


def sinusoid_setup(tasks: int = SINUSOID_TASKS, **kw: Any) -> Setup:
    cfg = sinusoid_config(**kw)
    model = build_model(cfg, (1,), 1)
    alg = build_algorithm(cfg, model, "regression", 1)
    batch = SinusoidTaskSource(seed=0, shots=10, queries=10).sample("train", 0, range(tasks))
    return Setup(cfg, alg, initial_params(model, 0), batch)


def conv_setup(tasks: int = CONV_TASKS, **kw: Any) -> Setup:
    cfg = conv_config(**kw)
    model = build_model(cfg, (1, IMAGE, IMAGE), WAYS)
    alg = build_algorithm(cfg, model, "classification", WAYS)
    return Setup(cfg, alg, initial_params(model, 0), random_image_tasks(tasks, cfg.data.queries))


# --------------------------------------------------------------------------- per-task loop baselines


def mlp_forward(p: Params, x: torch.Tensor) -> torch.Tensor:
    """``body.1``, ``body.3``, ... Linear+ReLU layers, then ``head`` (the layout of ``MLP``)."""
    i = 1
    while f"body.{i}.weight" in p:
        x = torch.relu(F.linear(x, p[f"body.{i}.weight"], p[f"body.{i}.bias"]))
        i += 2
    return F.linear(x, p["head.weight"], p["head.bias"])


def conv4_forward(p: Params, x: torch.Tensor) -> torch.Tensor:
    """Conv4 (pool) the ordinary way: ``F.conv2d``, ``F.batch_norm(training=True)``, ReLU, max-pool."""
    i = 0
    while f"body.{i}.conv.weight" in p:
        x = F.conv2d(x, p[f"body.{i}.conv.weight"], p[f"body.{i}.conv.bias"], padding=1)
        x = F.batch_norm(x, None, None, p[f"body.{i}.norm.weight"], p[f"body.{i}.norm.bias"], training=True,
                         eps=1e-5)
        x = F.max_pool2d(torch.relu(x), 2)
        i += 1
    return F.linear(x.flatten(1), p["head.weight"], p["head.bias"])


def loop_meta_gradient(forward: Callable[[Params, torch.Tensor], torch.Tensor],
                       loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], params: Params,
                       batch: TaskBatch, *, inner_lr: float, steps: int, first_order: bool) -> Params:
    """Sum over tasks of each task's MAML meta-gradient, one task at a time with ``torch.autograd``."""
    names = list(params)
    weights = [params[k].detach().requires_grad_() for k in names]
    total = [torch.zeros_like(w) for w in weights]
    for t in range(batch.num_tasks):
        fast = weights
        for _ in range(steps):
            loss = loss_fn(forward(dict(zip(names, fast, strict=True)), batch.support_x[t]), batch.support_y[t])
            grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
            fast = [w - inner_lr * g for w, g in zip(fast, grads, strict=True)]
        query = loss_fn(forward(dict(zip(names, fast, strict=True)), batch.query_x[t]), batch.query_y[t])
        for acc, g in zip(total, torch.autograd.grad(query, weights), strict=True):
            acc += g
    return dict(zip(names, total, strict=True))


def loop_for(setup: Setup) -> Callable[[Params, TaskBatch], Params]:
    a = setup.alg
    forward = mlp_forward if setup.cfg.model.name == "mlp" else conv4_forward
    loss_fn = F.mse_loss if a.kind == "regression" else F.cross_entropy

    def run(params: Params, batch: TaskBatch) -> Params:
        return loop_meta_gradient(forward, loss_fn, params, batch, inner_lr=a.inner_lr, steps=a.inner_steps,
                                  first_order=a.first_order)

    return run


def vectorised_for(setup: Setup) -> Callable[[Params, TaskBatch], Params]:
    return lambda params, batch: setup.alg.meta_gradient(params, batch).grads


def rel_error(got: Params, ref: Params) -> float:
    """Global max |got - ref| over all entries, divided by the global max |ref|."""
    diff = max(float((got[k] - ref[k]).abs().max()) for k in ref)
    scale = max(float(ref[k].abs().max()) for k in ref)
    return diff / scale


def check(setup: Setup, tasks: int) -> float:
    """Vectorised vs loop summed meta-gradient, float64, on the first ``tasks`` tasks."""
    s = setup.to64()
    batch = s.batch.slice(0, tasks)
    return rel_error(vectorised_for(s)(s.params, batch), loop_for(s)(s.params, batch))


def fp32_error(setup: Setup, impl: str) -> tuple[float, str]:
    """Worst per-tensor relative distance (``compile_difference``) of a float32 meta-gradient from float64."""
    fn = loop_for if impl == "loop" else vectorised_for
    got = fn(setup)(setup.params, setup.batch)
    s64 = setup.to64()
    ref = vectorised_for(s64)(s64.params, s64.batch)  # equals the loop's to ~1e-14 (check())
    return compile_difference({k: v.double() for k, v in got.items()}, ref)


# --------------------------------------------------------------------------- sections


def bench_sinusoid(args: argparse.Namespace) -> dict[str, Any]:
    setup = sinusoid_setup()
    err = check(setup, SINUSOID_TASKS)
    print(f"  check sinusoid MAML-2nd: vectorised vs loop, float64, {SINUSOID_TASKS} tasks: rel err {err:.1e}")
    if err > 1e-8:
        raise SystemExit(f"sinusoid check failed: {err:.2e}")
    vec, loop = vectorised_for(setup), loop_for(setup)
    r_vec = summary(measure(lambda: vec(setup.params, setup.batch), args.repeats_fast), SINUSOID_TASKS)
    r_loop = summary(measure(lambda: loop(setup.params, setup.batch), args.repeats), SINUSOID_TASKS)
    out = {"check_rel_err": err, "vectorised": r_vec, "loop": r_loop,
           "ratio": r_vec["tasks_per_s"] / r_loop["tasks_per_s"]}
    # algorithm.compile=true: torch.compile'd vmap(grad), checked against eager on its first call. For a fair
    # pairing the loop is compiled too (torch.compile of the per-task loop; dynamo may split it into graphs).
    compiled = sinusoid_setup(compile=True)
    cvec = vectorised_for(compiled)
    t0 = time.perf_counter()
    cvec(compiled.params, compiled.batch)
    out["compile_s"] = time.perf_counter() - t0
    out["vectorised_compiled"] = summary(measure(lambda: cvec(compiled.params, compiled.batch), args.repeats_fast),
                                         SINUSOID_TASKS)
    out["ratio_compiled"] = out["vectorised_compiled"]["tasks_per_s"] / r_loop["tasks_per_s"]
    try:
        cloop = torch.compile(loop)
        cloop(setup.params, setup.batch)
        out["loop_compiled"] = summary(measure(lambda: cloop(setup.params, setup.batch), args.repeats),
                                       SINUSOID_TASKS)
        out["ratio_compiled_vs_compiled_loop"] = (out["vectorised_compiled"]["tasks_per_s"]
                                                  / out["loop_compiled"]["tasks_per_s"])
    except Exception as e:  # report, do not hide: the compiled loop is a reference, not a product path
        out["loop_compiled_error"] = f"{e.__class__.__name__}: {str(e)[:200]}"
    return out


def conv_cases(quick: bool, all_cases: bool) -> list[tuple[int, int, bool]]:
    """(queries per class, inner steps, first order).

    Full run: the whole 1-query grid plus the training default with 15 queries (2nd order, 1 step); a
    15-query meta-batch takes ~10 s vectorised here, so the rest of that grid only runs with ``--all-cases``.
    """
    grid = [(q, steps, fo) for q in (1, 15) for steps in (1, 5) for fo in (False, True)]
    if all_cases:
        return grid
    if quick:
        return [c for c in grid if c[0] == 1 and c[1] == 1]
    return [c for c in grid if c[0] == 1 or c == (15, 1, False)]


IMPLS = ("folded", "native", "im2col", "loop")
VECTORISED = IMPLS[:-1]


def measure_in_process(spec: dict[str, Any]) -> dict[str, Any]:
    """Time one Conv4 implementation in a fresh Python process (``--one SPEC``); its JSON result.

    Each implementation runs in a process of its own, as the trainer does: the vectorised path leaves
    glibc's heap large and pre-faulted, and a per-task loop timed after it in the same process ran up
    to 1.3x faster than alone. Processes of the implementations alternate (``--rounds``), so a machine
    whose speed drifts over minutes (a shared VM) shifts all of them alike.
    """
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise SystemExit(f"measuring {spec} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """The child side of :func:`measure_in_process`."""
    torch.set_num_threads(spec["threads"])
    tune_allocator()
    impl, dev = spec["impl"], spec["device"]
    setup = conv_setup(tasks=spec["tasks"], inner_steps=spec["inner_steps"], first_order=spec["first_order"],
                       queries=spec["queries"], impl="im2col" if impl == "loop" else impl).to(dev)
    fn = loop_for(setup) if impl == "loop" else vectorised_for(setup)
    with fp32_precision(spec["precision"]):
        if dev.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        times = measure(lambda: fn(setup.params, setup.batch), spec["repeats"], device=dev)
    res: dict[str, Any] = {"times_s": times}
    if dev.startswith("cuda"):
        res["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return res


def bench_conv(args: argparse.Namespace) -> dict[str, Any]:
    # Correctness first, float64, a few tasks, every implementation and order (2 inner steps).
    checks = {}
    for impl in VECTORISED:
        for fo in (False, True):
            setup = conv_setup(tasks=3, inner_steps=2, first_order=fo, queries=2, impl=impl)
            err = check(setup, 3)
            checks[f"{impl}/{'1st' if fo else '2nd'}"] = err
            print(f"  check conv4 {impl:6s} {'1st' if fo else '2nd'} order, 2 inner steps: vectorised vs loop, "
                  f"float64, 3 tasks: rel err {err:.1e}")
            if err > 1e-8:
                raise SystemExit(f"conv4 check failed ({impl}, first_order={fo}): {err:.2e}")
    rows = []
    tasks, dev = args.meta_batch, args.device
    for queries, steps, fo in conv_cases(args.quick, args.all_cases):
        row: dict[str, Any] = {"queries": queries, "inner_steps": steps, "order": "1st" if fo else "2nd",
                               "meta_batch": tasks, "device": dev}
        spec = {"tasks": tasks, "inner_steps": steps, "first_order": fo, "queries": queries, "device": dev,
                "precision": args.precision, "threads": args.threads, "repeats": args.repeats}
        times: dict[str, list[float]] = {name: [] for name in IMPLS}
        # Per round, the ratio of two processes run minutes apart at most: the VM's speed drifts more
        # than that between rounds, and not alike for both sides (docs/benchmarks.md).
        per_round: dict[str, list[float]] = {name: [] for name in VECTORISED}
        for _ in range(args.rounds):  # each implementation in its own process, in turns
            medians = {}
            for name in IMPLS:
                one = measure_in_process({**spec, "impl": name})
                times[name] += one["times_s"]
                medians[name] = statistics.median(one["times_s"])
                if "peak_mem_mib" in one:
                    row.setdefault(name, {})["peak_mem_mib"] = one["peak_mem_mib"]
            for name in VECTORISED:
                per_round[name].append(medians["loop"] / medians[name])
        for name, t in times.items():
            row[name] = {**summary(t, tasks), **row.get(name, {})}
        for name in VECTORISED:
            row[f"ratio_{name}_loop"] = row[name]["tasks_per_s"] / row["loop"]["tasks_per_s"]
            row[f"ratio_{name}_loop_per_round"] = per_round[name]
        print(f"  q={queries:2d} steps={steps} {row['order']}: "
              + "  ".join(f"{name} {row[name]['tasks_per_s']:7.1f}" for name in IMPLS)
              + f" tasks/s  folded/loop {row['ratio_folded_loop']:.2f}x (rounds "
              + ", ".join(f"{r:.2f}" for r in per_round["folded"]) + ")", flush=True)
        rows.append(row)
    return {"checks_rel_err": checks, "rows": rows}


def bench_accuracy(args: argparse.Namespace) -> dict[str, Any]:
    """Second-order Conv4 meta-gradient in float32 against float64, vectorised (folded) and the per-task loop.

    The same metric as ``algorithm.compile``'s check (worst tensor, relative, with a floor of 1e-2 of the
    whole gradient's norm), on 8 random 5-way 1-shot tasks, 1 query per class.
    """
    rows = []
    for steps in (1, 5):
        setup = conv_setup(tasks=8, inner_steps=steps, first_order=False, queries=1)
        for impl in ("folded", "loop"):
            err, worst = fp32_error(setup, impl)
            rows.append({"inner_steps": steps, "impl": impl, "rel_err": err, "worst": worst})
            print(f"  {steps} inner step(s), {impl:6s}: float32 vs float64 {err:.1e} (worst: {worst})", flush=True)
    return {"rows": rows}


def bench_norm(args: argparse.Namespace) -> dict[str, Any]:
    """What ``model.norm=support`` costs per meta-gradient against ``transductive`` (second order, folded).

    Both in this process, alternating per repeat so drift in the machine's speed hits both alike; the query
    pass of ``support`` also runs the task's 5 support images (docs/architecture.md, "Normalisation").
    """
    rows = []
    for queries, steps in ((15, 1), (1, 1), (1, 5)):
        setups = {norm: conv_setup(tasks=args.meta_batch, inner_steps=steps, first_order=False, queries=queries,
                                   norm=norm) for norm in ("support", "transductive")}
        fns = {norm: (lambda st=st: vectorised_for(st)(st.params, st.batch)) for norm, st in setups.items()}
        times: dict[str, list[float]] = {norm: [] for norm in fns}
        for fn in fns.values():
            measure(fn, 0, warmup=1)
        for _ in range(args.repeats):
            for norm, fn in fns.items():
                times[norm] += measure(fn, 1, warmup=0)
        per = {norm: summary(t, args.meta_batch) for norm, t in times.items()}
        ratio = per["support"]["tasks_per_s"] / per["transductive"]["tasks_per_s"]
        rows.append({"queries": queries, "inner_steps": steps, **per, "support_over_transductive": ratio})
        print(f"  {queries:2d} queries/class, {steps} step(s): support {per['support']['tasks_per_s']:6.1f} tasks/s, "
              f"transductive {per['transductive']['tasks_per_s']:6.1f}: ratio {ratio:.2f}", flush=True)
    return {"rows": rows}


# --------------------------------------------------------------------------- layer 1 microbenchmark
#
# Each formulation maps one task's ``x [n, 1, 28, 28]``, ``w [64, 1, 3, 3]``, ``b [64]`` to
# ``[n, 64, 28, 28]`` (possibly as a permuted view); they are run as ``vmap`` over 32 tasks of
# ``vjp`` (forward, then the weight and bias gradients for a fixed output cotangent).


def patches(x: torch.Tensor, k: int = 3, pad: int = 1) -> torch.Tensor:
    """im2col from a strided view of the padded input and a single copy: ``[N, C*k*k, H*W]`` (stride 1)."""
    n, c, h, w = x.shape
    v = F.pad(x, (pad, pad, pad, pad)).unfold(2, k, 1).unfold(3, k, 1)  # [N, C, H, W, k, k] view
    return v.permute(0, 1, 4, 5, 2, 3).reshape(n, c * k * k, h * w)


def l1_native(x, w, b):
    return F.conv2d(x, w, b, padding=1)


def l1_im2col(x, w, b):  # conv_impl="im2col": cols^T @ W^T -> [N, L, O], transposed back to NCHW
    n, o = x.shape[0], w.shape[0]
    out = F.unfold(x, 3, padding=1).transpose(1, 2) @ w.reshape(o, -1).t() + b
    return out.transpose(1, 2).reshape(n, o, *x.shape[-2:])


def l1_w_cols(x, w, b):  # W @ cols -> [N, O, L]: NCHW directly, no transpose copy; bias fused
    n, o = x.shape[0], w.shape[0]
    cols = F.unfold(x, 3, padding=1)
    out = torch.baddbmm(b.view(1, o, 1), w.reshape(o, -1).expand(n, -1, -1), cols)
    return out.view(n, o, *x.shape[-2:])


def l1_w_patches(x, w, b):  # as l1_w_cols, im2col by one strided copy instead of F.unfold
    n, o = x.shape[0], w.shape[0]
    out = torch.baddbmm(b.view(1, o, 1), w.reshape(o, -1).expand(n, -1, -1), patches(x))
    return out.view(n, o, *x.shape[-2:])


def l1_channels_last(x, w, b):  # one GEMM [N*L, 9] @ [9, O] left channels-last (returned as a permuted view)
    n, o = x.shape[0], w.shape[0]
    h, wd = x.shape[-2:]
    cols = patches(x).transpose(1, 2).reshape(-1, w[0].numel())
    return torch.addmm(b, cols, w.reshape(o, -1).t()).view(n, h, wd, o).permute(0, 3, 1, 2)


def l1_shifts(x, w, b):  # 9 shifted multiply-adds
    h, wd = x.shape[-2:]
    xp = F.pad(x, (1, 1, 1, 1))
    out = b.view(1, -1, 1, 1)
    for dy in range(3):
        for dx in range(3):
            out = out + xp[:, :, dy:dy + h, dx:dx + wd] * w[:, :, dy, dx].view(1, -1, 1, 1)
    return out


LAYER1 = {
    "native F.conv2d (grouped under vmap)": (l1_native, False),
    "im2col: unfold, cols^T @ W^T, transpose (conv_impl=im2col)": (l1_im2col, False),
    "W @ unfold(x) (baddbmm, NCHW out)": (l1_w_cols, False),
    "W @ strided-view patches (baddbmm, NCHW out)": (l1_w_patches, False),
    "channels-last GEMM [N*L,9]@[9,O] (NHWC out)": (l1_channels_last, False),
    "9 shifted multiply-adds": (l1_shifts, False),
    "W @ pre-unfolded cols (unfold once, outside)": (None, True),
}


def bench_layer1(args: argparse.Namespace) -> dict[str, Any]:
    tasks, n, o = 32, 5, 64
    g = torch.Generator().manual_seed(0)
    x = torch.rand(tasks, n, 1, IMAGE, IMAGE, generator=g)
    w = torch.randn(tasks, o, 1, 3, 3, generator=g) / 3
    b = torch.randn(tasks, o, generator=g) / 10
    cot = torch.randn(tasks, n, o, IMAGE, IMAGE, generator=g)
    cols = vmap(lambda x: F.unfold(x, 3, padding=1))(x)  # weights do not touch the input: unfold it once
    flops = 2 * (2 * tasks * n * IMAGE * IMAGE * o * 9)  # forward + weight gradient (no input gradient needed)

    def fwd_bwd(f):
        def one(x, w, b, cot):
            _, pull = vjp(lambda w, b: f(x, w, b), w, b)
            return pull(cot)
        return vmap(one)

    def pre_unfolded(cols, w, b):
        out = torch.baddbmm(b.view(1, o, 1), w.reshape(o, -1).expand(n, -1, -1), cols)
        return out.view(n, o, IMAGE, IMAGE)

    ref = fwd_bwd(l1_native)(x, w, b, cot)
    results = {}
    for name, (f, pre) in LAYER1.items():
        fn = fwd_bwd(pre_unfolded if pre else f)
        inp = cols if pre else x
        with warnings.catch_warnings():  # unfold_backward has no vmap batching rule: a (timed) per-task fallback
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            got = fn(inp, w, b, cot)
        err = max(float((a - r).abs().max() / r.abs().max()) for a, r in zip(got, ref, strict=True))
        times = measure(lambda fn=fn, inp=inp: fn(inp, w, b, cot), args.repeats)
        med = statistics.median(times)
        results[name] = {"median_s": med, "gflops": flops / med / 1e9, "rel_err_vs_native": err, "times_s": times}
        print(f"  {name:58s} {med * 1e3:8.2f} ms {flops / med / 1e9:7.2f} GFLOP/s  (grad rel err {err:.0e})",
              flush=True)
    return {"flop_per_call": flops, "formulations": results, "block": bench_block1(args)}


def bench_block1(args: argparse.Namespace) -> dict[str, Any]:
    """The whole first block (conv, batch norm, 2x2 max-pool, ReLU) under vmap(vjp): plain vs folded_block."""
    tasks, n, o = 32, 5, 64
    g = torch.Generator().manual_seed(0)
    x = torch.rand(tasks, n, 1, IMAGE, IMAGE, generator=g)
    w = torch.randn(tasks, o, 1, 3, 3, generator=g) / 3
    gamma, beta = 1 + torch.randn(tasks, o, generator=g) / 10, torch.randn(tasks, o, generator=g) / 10
    cot = torch.randn(tasks, n, o, IMAGE // 2, IMAGE // 2, generator=g)

    def plain(x, w, gamma, beta):
        y = batch_norm(F.conv2d(x, w, torch.zeros_like(gamma), padding=1), gamma, beta)
        return F.relu(F.max_pool2d(y, 2))

    def folded(x, w, gamma, beta):
        return folded_block(x, w, torch.zeros_like(gamma), gamma, beta, stride=1, pool=True)

    def fwd_bwd(f):
        def one(x, w, gamma, beta, cot):
            _, pull = vjp(lambda w, gamma, beta: f(x, w, gamma, beta), w, gamma, beta)
            return pull(cot)
        return vmap(one)

    out: dict[str, Any] = {}
    ref = fwd_bwd(plain)(x, w, gamma, beta, cot)
    for name, f in (("plain: F.conv2d, batch_norm, F.max_pool2d, relu", plain),
                    ("folded_block (conv_impl=folded)", folded)):
        fn = fwd_bwd(f)
        got = fn(x, w, gamma, beta, cot)
        err = max(float((a - r).abs().max() / r.abs().max()) for a, r in zip(got, ref, strict=True))
        times = measure(lambda fn=fn: fn(x, w, gamma, beta, cot), args.repeats)
        out[name] = {"median_s": statistics.median(times), "rel_err_vs_plain": err, "times_s": times}
        print(f"  block: {name:51s} {statistics.median(times) * 1e3:8.2f} ms  (grad rel err {err:.0e})", flush=True)
    return out


# --------------------------------------------------------------------------- report


def print_tables(res: dict[str, Any]) -> None:
    print("\n=== meta-gradient throughput (tasks/s, median; forward + meta-gradient, no optimiser step) ===")
    if "sinusoid" in res:
        s = res["sinusoid"]
        print("sinusoid MLP 1-40-40-1, meta-batch 25, K=10, MAML 2nd order, 1 inner step")
        print(f"  vectorised {s['vectorised']['tasks_per_s']:9.0f}   loop {s['loop']['tasks_per_s']:7.0f}   "
              f"ratio {s['ratio']:.1f}x (target >= 8x)")
        if "vectorised_compiled" in s:
            print(f"  vectorised, algorithm.compile=true {s['vectorised_compiled']['tasks_per_s']:9.0f}   "
                  f"ratio vs eager loop {s['ratio_compiled']:.1f}x   (compile {s['compile_s']:.1f}s)")
            if "loop_compiled" in s:
                print(f"  loop, torch.compile {s['loop_compiled']['tasks_per_s']:9.0f}   "
                      f"compiled vectorised / compiled loop {s['ratio_compiled_vs_compiled_loop']:.1f}x")
            else:
                print(f"  loop, torch.compile: failed ({s['loop_compiled_error']})")
    if "conv4" in res:
        r0 = res["conv4"]["rows"][0] if res["conv4"]["rows"] else {}
        print(f"Conv4 Omniglot 5-way 1-shot, meta-batch {r0.get('meta_batch', CONV_TASKS)} on "
              f"{r0.get('device', 'cpu')}, precision {res['env']['precision']} (vectorised = vmap over tasks)")
        head = (f"  {'queries':>7} {'steps':>5} {'order':>5} | " + " ".join(f"{n:>8}" for n in IMPLS) + " | "
                + " ".join(f"{n + '/loop':>11}" for n in VECTORISED))
        print(head)
        print("  " + "-" * (len(head) - 2))
        for r in res["conv4"]["rows"]:
            print(f"  {r['queries']:>7} {r['inner_steps']:>5} {r['order']:>5} | "
                  + " ".join(f"{r[n]['tasks_per_s']:8.1f}" for n in IMPLS) + " | "
                  + " ".join(f"{r[f'ratio_{n}_loop']:10.2f}x" for n in VECTORISED)
                  + "  folded/loop by round " + ", ".join(f"{x:.2f}" for x in r["ratio_folded_loop_per_round"])
                  + (f"  peak MiB folded {r['folded']['peak_mem_mib']:.0f} loop {r['loop']['peak_mem_mib']:.0f}"
                     if "peak_mem_mib" in r["folded"] else ""))
        print("  (target: folded/loop, the default, >= 2x for 2nd order)")
    if "layer1" in res:
        print("Conv4 layer 1 (1->64, 3x3, pad 1, 28x28), vmap over 32 tasks x 5 images, forward + weight grad")
        for name, r in res["layer1"]["formulations"].items():
            print(f"  {name:58s} {r['median_s'] * 1e3:8.2f} ms {r['gflops']:7.2f} GFLOP/s")
        print("Conv4 block 1 (conv, batch norm, max-pool, ReLU), same tasks, forward + weight/norm grads")
        for name, r in res["layer1"]["block"].items():
            print(f"  {name:58s} {r['median_s'] * 1e3:8.2f} ms")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer cases and repeats (~1 minute)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (Conv4 section; float64 checks stay on CPU)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "tf32"),
                   help="CUDA fp32 arithmetic, as scaling.precision: fp32 = IEEE (the trainer's default), tf32 = "
                        "TensorFloat-32 convolutions/matmuls (torch's cuDNN default); no effect on CPU")
    p.add_argument("--meta-batch", type=int, default=CONV_TASKS, help="Conv4 meta-batch (default 32; e.g. 128)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 5; quick 3)")
    p.add_argument("--all-cases", action="store_true",
                   help="also the 15-query grid (1/5 steps, 1st order): several more minutes")
    p.add_argument("--sections", default="sinusoid,conv4,layer1,accuracy",
                   help="comma-separated subset of sinusoid,conv4,layer1,accuracy,norm")
    p.add_argument("--rounds", type=int, default=2,
                   help="Conv4: processes per implementation, alternating (default 2; quick 1)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process of measure_in_process
    args = p.parse_args(argv)
    if args.one is not None:
        print(json.dumps(run_one(json.loads(args.one))))
        return 0
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.rounds = 1 if args.quick else args.rounds
    args.repeats_fast = max(args.repeats, 3 if args.quick else 9)  # cheap calls: more repeats, noise is high
    torch.set_num_threads(args.threads)
    tuned = tune_allocator()  # as the trainer and every worker do (MTL_RAY_TUNE_MALLOC=0 to compare)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]

    load = os.getloadavg()[0]
    res: dict[str, Any] = {
        "env": {"torch": torch.__version__, "python": sys.version.split()[0], "machine": platform.machine(),
                "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "quick": args.quick,
                "precision": args.precision, "rounds": args.rounds,
                "repeats": args.repeats, "warmup": 2, "malloc_tuned": tuned, "loadavg_1min_start": load,
                "allocator_env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "LD_PRELOAD"))},
                "omp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "KMP_"))}},
    }
    if load > 0.5:
        print(f"note: 1-minute load average is {load:.1f} before starting: other work shares the CPUs, expect noise "
              "(with more torch threads than free cores, OpenMP barriers can stall for milliseconds)")
    t0 = time.perf_counter()
    if "sinusoid" in sections:
        print("[sinusoid]", flush=True)
        res["sinusoid"] = bench_sinusoid(args)
    if "conv4" in sections:
        print(f"[conv4] precision {args.precision}", flush=True)
        res["conv4"] = bench_conv(args)
    if "accuracy" in sections:
        print("[accuracy] second-order Conv4 meta-gradient, float32 vs float64", flush=True)
        res["accuracy"] = bench_accuracy(args)
    if "norm" in sections:
        print("[norm] model.norm=support vs transductive, second-order Conv4 meta-gradient", flush=True)
        res["norm"] = bench_norm(args)
    if "layer1" in sections:
        print("[layer1]", flush=True)
        res["layer1"] = bench_layer1(args)
    res["env"]["wall_s"] = time.perf_counter() - t0
    res["env"]["loadavg_1min_end"] = os.getloadavg()[0]
    res["env"]["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print_tables(res)
    print(f"\nwall time {res['env']['wall_s']:.0f} s, {args.threads} threads, peak RSS "
          f"{res['env']['peak_rss_mib']:.0f} MiB, load average {load:.1f} -> {res['env']['loadavg_1min_end']:.1f}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
