"""Sweeps end to end on the session's Ray: trials with 2 worker actors each in their own placement
group, ASHA, a real MLflow server (parent + child runs), the best config trains, a killed trial
resumes from its checkpoint."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from mtl_ray import metrics as M
from mtl_ray.components import load_config
from mtl_ray.recipes.train import train as run_training
from mtl_ray.tracking.local import read_metrics
from mtl_ray.tune.spec import load_sweep
from mtl_ray.tune.sweep import BEST_CONFIG, TRIALS_CSV, run_sweep

pytestmark = [pytest.mark.slow, pytest.mark.cluster]
CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"


def _sweep(tmp_path, uri: str, **body) -> Path:
    spec = {"base": str(CONFIGS / "sinusoid_maml.yaml"),
            "overrides": ["optim.steps=60", "optim.val_every=20", "optim.val_tasks=16", "optim.meta_batch_size=8",
                          "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "scaling.torch_threads=1",
                          "tracking.log_every=20", f"tracking.uri={uri}", "tracking.experiment=sweeps"],
            "metric": "meta_val/loss", "mode": "min", "search": "random", "num_samples": 4, "trial_cpus": 0.5,
            "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
            "space": {"algorithm.inner_lr": {"loguniform": [0.001, 0.05]},
                      "optim.outer_lr": {"loguniform": [1.0e-4, 1.0e-2]}}}
    spec.update(body)
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def test_sweep_with_asha_logs_parent_and_children_and_best_config_trains(ray_cluster, mlflow_server, tmp_path,
                                                                         capfd):
    spec = load_sweep(_sweep(tmp_path, mlflow_server, search="optuna", max_concurrent_trials=2))
    out = io.StringIO()
    result = run_sweep(spec, tmp_path / "sweep", out=out)
    tune_output = capfd.readouterr()
    console = tune_output.out + tune_output.err
    assert "tensorboard --logdir" not in console and "Checkpoint successfully created" not in console
    headers = [line for line in console.splitlines() if "Trial name" in line and "status" in line]
    assert headers and all("meta_val/loss" in h for h in headers[-1:]), headers  # the sweep's metric is a column
    assert len(result.rows) == 4 and all(r.status in ("DONE", "STOPPED") for r in result.rows), out.getvalue()
    assert max(r.steps for r in result.rows) == 60
    scored = [r.best for r in result.rows if r.best is not None]
    assert result.best_metric == min(scored)
    assert (tmp_path / "sweep" / TRIALS_CSV).read_text().count("\n") == 5
    assert "best config:" in out.getvalue()

    client = MlflowClient(mlflow_server)
    parent_id = (tmp_path / "sweep" / "mlflow_run_id").read_text().strip()
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["best_trial"] == result.best_trial
    assert {a.path for a in client.list_artifacts(parent_id)} >= {BEST_CONFIG, TRIALS_CSV}
    exp = client.get_experiment_by_name("sweeps")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(children) == 4
    rows = {r.trial_id: r for r in result.rows}
    for child in children:
        tags = child.data.tags
        row = rows[tags["tune.trial_id"]]
        # finished, whether it ran to the end (the winner among them) or ASHA stopped it early
        assert child.info.status == "FINISHED", (row, child.info.status)
        assert tags.get("tune.stopped_early", "false") == str(row.steps < 60).lower(), (row, tags)
        assert tags["run_dir"] == row.run_dir and Path(row.run_dir).name == row.trial_id
        assert re.fullmatch(r"trial \S+: inner_lr=\S+ outer_lr=\S+", child.info.run_name), child.info.run_name
        assert tags["mlflow.user"] == parent.data.tags["mlflow.user"]
        assert tags["mlflow.source.name"] == parent.data.tags["mlflow.source.name"]
        assert float(child.data.params["algorithm.inner_lr"]) > 0
        assert child.data.params["scaling.num_workers"] == "2"
        steps = [m.step for m in client.get_metric_history(child.info.run_id, M.META_VAL_LOSS)]
        assert steps and steps == sorted(steps) and steps[0] == 20
        # its learning curve, checkpoint and model
        assert {"config.yaml", "learning_curve.png", "checkpoints"} <= {a.path for a in
                                                                       client.list_artifacts(child.info.run_id)}
        ckpts = [a.path for a in client.list_artifacts(child.info.run_id, "checkpoints")]
        assert f"checkpoints/step_{row.steps:08d}.pt" in ckpts, (row, ckpts)
        assert child.outputs.model_outputs, row
    # the best trial's model is registered, and the sweep says how to serve it
    name, version = parent.data.tags["best_model"].removeprefix("models:/").split("/")
    mv = client.get_model_version(name, version)
    best_child = next(c for c in children if c.data.tags["tune.trial_id"] == result.best_trial)
    assert name == "mtl-ray-sinusoid_maml" and mv.run_id == best_child.info.run_id
    assert f"serve the best model: MLFLOW_TRACKING_URI={mlflow_server}" in out.getvalue()

    best = load_config(result.best_config_path, ["optim.steps=5", "scaling.num_workers=0", "tracking.mlflow=false"])
    best_row = next(r for r in result.rows if r.trial_id == result.best_trial)
    assert best.algorithm.inner_lr == pytest.approx(best_row.params["algorithm.inner_lr"])
    summary = run_training(best, tmp_path / "best", out=io.StringIO())
    assert summary.steps == 5
    assert result.best_checkpoint and Path(result.best_checkpoint).is_file()


def _trial_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ray::ImplicitFunc"], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def test_killed_trial_resumes_from_its_checkpoint(ray_cluster, tmp_path):
    spec = load_sweep(_sweep(tmp_path, "", num_samples=1, scheduler="fifo", max_failures=2,
                             overrides=["optim.steps=80", "optim.val_every=20", "optim.meta_batch_size=8",
                                        "scaling.num_workers=2", "scaling.cpus_per_worker=0.5",
                                        "scaling.torch_threads=1", "tracking.mlflow=false"],
                             space={"algorithm.inner_lr": {"choice": [0.01]}}))
    sweep_dir = tmp_path / "sweep"
    killed: list[int] = []

    def killer() -> None:  # SIGKILL the trial process once it has checkpointed step 40
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            for ck in sweep_dir.glob("trials/*/checkpoints/step_00000040.pt"):
                rows = read_metrics(ck.parents[1])
                if rows and rows[-1]["step"] < 80:
                    for pid in _trial_pids():
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    result = run_sweep(spec, sweep_dir, out=io.StringIO())
    t.join(timeout=5)
    assert killed, "the trial finished before it could be killed"
    (row,) = result.rows
    assert row.status == "DONE" and row.steps == 80
    assert row.resumed_from_step in (20, 40)  # restarted from a checkpoint, not from scratch
    steps = [r["step"] for r in read_metrics(row.run_dir)]
    assert steps == list(range(1, 81))  # resumed from step 40's checkpoint, nothing counted twice


def test_interrupted_sweep_resumes(tmp_path):
    """``mtl-ray tune`` killed after its first trial finished; ``--resume`` completes the rest (own local Ray)."""
    sweep = _sweep(tmp_path, "", num_samples=3, scheduler="fifo", max_concurrent_trials=1,
                   overrides=["optim.steps=40", "optim.val_every=20", "optim.meta_batch_size=8",
                              "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "scaling.torch_threads=1",
                              "tracking.mlflow=false"])
    sweep_dir = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "mtl_ray.cli", "tune", str(sweep), "--sweep-dir", str(sweep_dir)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not any(len(read_metrics(d)) == 40 for d in sweep_dir.glob("trials/*")):
            assert proc.poll() is None and time.monotonic() < deadline, "the sweep ended or stalled before 1 trial"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its local Ray and the trials
        proc.wait()
    assert not (sweep_dir / TRIALS_CSV).exists()  # it really was interrupted
    out = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resuming sweep from" in out.stdout
    for noise in ("tensorboard --logdir", "Checkpoint successfully created", "Token authentication is enabled"):
        assert noise not in out.stdout + out.stderr, noise
    rows = (sweep_dir / TRIALS_CSV).read_text().splitlines()[1:]
    assert len(rows) == 3 and all(r.endswith(",40,DONE") for r in rows), rows
