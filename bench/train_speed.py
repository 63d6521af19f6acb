"""Meta-training speed of the in-process trainer on one config, for a wall-clock budget (no Ray, no MLflow).

This is the trainer `mtl-ray train` runs with ``scaling.num_workers=0``, without the tracking around
it, so it also runs where only torch is installed (e.g. a GPU box's stock image). It prints one JSON
line: steps, tasks/s, the final meta-validation, peak memory (GPU, and the process's resident set) and
the page faults taken while training.

    python bench/train_speed.py jobs/configs/omniglot_maml.yaml --minutes 1.5 scaling.gpus_per_worker=1
    python bench/train_speed.py jobs/configs/omniglot_maml.yaml --minutes 1.5 scaling.gpus_per_worker=1 \\
        scaling.precision=tf32
    python bench/train_speed.py jobs/configs/omniglot_maml.yaml --steps 7 algorithm.task_chunk_size=32
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile

import torch

from mtl_ray.components import load_config
from mtl_ray.distributed.driver import MetaTrainer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--minutes", type=float, default=1.5, help="training budget after one warm-up step")
    p.add_argument("--steps", type=int, default=0, help="train this many steps instead of --minutes")
    p.add_argument("--val-tasks", type=int, default=600, help="meta-validation tasks at the end")
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
        final_val = trainer.meta_validate()
        trainer.close()
    print(json.dumps({
        "config": args.config, "overrides": args.overrides, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__, "steps": summary.steps, "seconds": summary.seconds,
        "tasks_per_s": summary.tasks_per_s, "final_val": final_val,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0,
        "peak_rss_mib": peak_rss_mib, "page_faults": faults}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
