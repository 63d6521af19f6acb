"""``scaling.reduce=collective``: replicas on a Ray Train worker group all-reduce meta-gradients (gloo here).

Against in-process training (float64, so only the summation order differs): the same weights and meta-validation
after N steps, through a resume, and after a killed worker restarted the group from its last checkpoint; every
step recorded once. On the session's Ray (``ray_cluster``).
"""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from mtl_ray.checkpoint import load_checkpoint
from mtl_ray.components import from_dict
from mtl_ray.config import ConfigError
from mtl_ray.distributed.driver import MetaTrainer
from mtl_ray.recipes.train import train
from mtl_ray.tracking.local import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.cluster]
META_BATCH = 6


def _cfg(workers: int, steps: int, **over):
    base = {"data": {"source": "sinusoid", "shots": 5, "queries": 5}, "model": {"name": "mlp", "hidden_sizes": [16]},
            "algorithm": {"name": "maml", "inner_lr": 0.01},
            "optim": {"meta_batch_size": META_BATCH, "steps": steps, "val_every": 4, "val_tasks": 5},
            "scaling": {"num_workers": workers, "torch_threads": 1, "cpus_per_worker": 1, "precision": "fp64",
                        "reduce": "collective" if workers else "flat"},
            "tracking": {"checkpoint_every": 4, "log_every": 3, "progress": False, "mlflow": False}}
    return from_dict(base, [f"{k}={v}" for k, v in over.items()])


def _in_process(steps: int, where: Path) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    trainer = MetaTrainer.create(_cfg(0, steps), where)
    summary = trainer.fit()
    return trainer.params, summary.final_val


def _assert_same(params: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert params.keys() == reference.keys()
    for k in params:  # float64: the all-reduce's order of summation is the only difference
        assert torch.allclose(params[k], reference[k], atol=1e-10, rtol=1e-9), k


def _train_worker_pids(raylet: int) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if (proc.name.isdigit() and b"RayTrainWorker" in (proc / "cmdline").read_bytes()
                    and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == raylet):
                pids.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    return pids


def test_replicas_reach_in_process_weights_through_a_killed_worker_and_a_resume(ray_cluster, tmp_path):
    """One run to step 30 in which a replica is killed after the step-20 checkpoint (the group restarts from it),
    then a resume to step 40: the in-process run's weights and meta-validation, every step recorded once."""
    reference, val = _in_process(40, tmp_path / "ref")
    run = tmp_path / "run"
    over = {"tracking.checkpoint_every": 10, "optim.val_every": 20, "tracking.log_every": 5,
            "scaling.max_restarts": 2}
    killed: list[int] = []
    stop = threading.Event()
    raylet = ray_cluster.head_node.all_processes["raylet"][0].process.pid

    def kill_after_the_step_20_checkpoint() -> None:
        while not stop.is_set():
            if (run / "checkpoints" / "step_00000020.pt").exists():
                for pid in _train_worker_pids(raylet)[-1:]:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_the_step_20_checkpoint)
    killer.start()
    try:
        first = train(_cfg(2, 30, **over), run, out=io.StringIO())
    finally:
        stop.set()
        killer.join()
    assert killed, "no Ray Train worker was found to kill"
    assert first.step == 30 and first.worker_faults >= 1, first
    summary = train(_cfg(2, 40, **over), run, resume=True, out=io.StringIO())
    ck = load_checkpoint(summary.checkpoint)
    assert ck.step == 40 and summary.tasks == 10 * META_BATCH, summary
    _assert_same(ck.params, reference)
    assert summary.final_val == pytest.approx(val, rel=1e-9)  # the validation tasks split across replicas
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 41))  # retrained steps recorded once


def test_collective_needs_workers_and_a_share_for_each():
    with pytest.raises(ConfigError, match=r"scaling\.num_workers=0"):
        _cfg(0, 2, **{"scaling.reduce": "collective"})
    with pytest.raises(ConfigError, match=r"optim\.meta_batch_size: got 2 .* expected >= 3"):
        _cfg(3, 2, **{"optim.meta_batch_size": 2})
