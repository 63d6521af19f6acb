"""Meta-training speed of the in-process trainer on one config, for a wall-clock budget (no Ray, no MLflow).

This is the trainer `mtl-ray train` runs with ``scaling.num_workers=0``, without the tracking around
it, so it also runs where only torch is installed (e.g. a GPU box's stock image). It prints one JSON
line: steps, tasks/s, the final meta-validation, peak memory (GPU, and the process's resident set) and
the page faults taken while training.

    python bench/train_speed.py jobs/configs/omniglot_maml.yaml --minutes 1.5 scaling.gpus_per_worker=1
    python bench/train_speed.py jobs/configs/omniglot_maml.yaml --minutes 1.5 scaling.gpus_per_worker=1 \\
        scaling.precision=tf32
    python bench/train_speed.py jobs/configs/omniglot_maml.yaml --steps 7 algorithm.task_chunk_size=32
    python bench/train_speed.py jobs/configs/sinusoid_maml.yaml --steps 300 --kernel
    python bench/train_speed.py jobs/configs/sinusoid_maml.yaml --steps 300 --kernel algorithm.compile=true

``--kernel`` also times the meta-gradient alone in a loop on one sampled meta-batch (the kernel) and prints
kernel tasks/s, fit()'s tasks/s and their ratio, and the step's split: sampling, meta-gradient, the rest; then
``--rounds`` rounds of fit() and the kernel in turn, and the median of their per-round ratios (the figure to
quote on a machine whose load changes).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from collections.abc import Callable

import torch

from mtl_ray.components import load_config
from mtl_ray.config import Config
from mtl_ray.distributed.driver import MetaTrainer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--minutes", type=float, default=1.5, help="training budget after one warm-up step")
    p.add_argument("--steps", type=int, default=0, help="train this many steps instead of --minutes")
    p.add_argument("--val-tasks", type=int, default=600, help="meta-validation tasks at the end")
    p.add_argument("--kernel", action="store_true", help="also time the meta-gradient alone (see above)")
    p.add_argument("--rounds", type=int, default=5,
                   help="--kernel: then alternate fit() and the kernel this many times, --steps/rounds steps each, "
                        "and print their ratio per round and its median (load that drifts hits both alike)")
    args = p.parse_intermixed_args(argv)  # overrides may come after --minutes
    cfg = load_config(args.config, [
        "scaling.num_workers=0", "scaling.torch_threads=0", "optim.steps=1000000", "optim.val_every=0",
        f"optim.val_tasks={args.val_tasks}", f"optim.max_minutes={0 if args.steps else args.minutes}",
        "tracking.checkpoint_every=0", "tracking.progress=false", *args.overrides])
    cuda = torch.cuda.is_available() and cfg.scaling.gpus_per_worker > 0
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = MetaTrainer.create(cfg, run_dir)
        trainer.train_step()  # warm-up: first-call allocations and kernel selection
        if cuda:
            torch.cuda.synchronize()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        summary = trainer.fit(until=trainer.step + args.steps if args.steps else None)
        usage = resource.getrusage(resource.RUSAGE_SELF)  # training only: before the final validation
        faults, peak_rss_mib = usage.ru_minflt - faults, usage.ru_maxrss / 1024
        kernel = _kernel(trainer, cfg, max(args.steps, 50), summary.tasks_per_s) if args.kernel else {}
        if args.kernel and args.rounds:
            kernel.update(_interleaved(trainer, cfg, max(args.steps, 50) // args.rounds, args.rounds))
        final_val = trainer.meta_validate()
        trainer.close()
    print(json.dumps({
        "config": args.config, "overrides": args.overrides, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__, "steps": summary.steps, "seconds": summary.seconds,
        "tasks_per_s": summary.tasks_per_s, "final_val": final_val,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0,
        "peak_rss_mib": peak_rss_mib, "page_faults": faults, **kernel}))
    return 0


def _kernel(trainer: MetaTrainer, cfg: Config, steps: int, fit_tasks_per_s: float) -> dict[str, float]:
    """The meta-gradient alone on one meta-batch, ``steps`` times, and sampling alone (in-process worker)."""
    worker = trainer.executor.worker  # type: ignore[attr-defined]  # num_workers=0: a LocalExecutor
    n = cfg.optim.meta_batch_size
    batch = worker._sample("train", 0, range(n), augment=True)
    params = worker._params(trainer.params)
    cuda = batch.support_x.is_cuda

    def timed(fn: Callable[[int], object]) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(steps):
            fn(i)
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / steps

    with worker._numerics():
        kernel_s = timed(lambda i: worker.learner.algorithm.meta_gradient(params, batch))
    sample_s = timed(lambda i: worker._draw("train", i, range(n), augment=True))
    step_s = n / fit_tasks_per_s
    return {"kernel_tasks_per_s": n / kernel_s, "fit_over_kernel": fit_tasks_per_s * kernel_s / n,
            "step_ms": 1e3 * step_s, "kernel_ms": 1e3 * kernel_s, "sample_ms": 1e3 * sample_s,
            "rest_ms": 1e3 * (step_s - kernel_s)}


def _interleaved(trainer: MetaTrainer, cfg: Config, steps: int, rounds: int) -> dict[str, object]:
    """fit() for ``steps`` steps, then the kernel ``steps`` times on one meta-batch, ``rounds`` times in turn."""
    worker = trainer.executor.worker  # type: ignore[attr-defined]
    n = cfg.optim.meta_batch_size
    batch = worker._sample("train", 0, range(n), augment=True)
    ratios = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        trainer.fit(until=trainer.step + steps)
        fit_s = time.perf_counter() - t0
        params = worker._params(trainer.params)
        t0 = time.perf_counter()
        with worker._numerics():
            for _ in range(steps):
                worker.learner.algorithm.meta_gradient(params, batch)
        if batch.support_x.is_cuda:
            torch.cuda.synchronize()
        ratios.append((time.perf_counter() - t0) / fit_s)
    return {"fit_over_kernel_rounds": [round(r, 3) for r in ratios],
            "fit_over_kernel_median": sorted(ratios)[len(ratios) // 2]}


if __name__ == "__main__":
    raise SystemExit(main())
