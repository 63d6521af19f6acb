"""Training runs land in MLflow (a real server): params, metric histories, tags, artifacts; a dead
server never stops training."""

from __future__ import annotations

import io
import socket

import pytest
from mlflow.tracking import MlflowClient

from mtl_ray import metrics as M
from mtl_ray.components import from_dict
from mtl_ray.recipes.train import train as run_training
from mtl_ray.tracking.local import read_metrics
from mtl_ray.tracking.mlflow_run import data_tags, tracking_uri

STEPS = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(tmp_path, uri: str, **over):
    base = {"name": "mlflow_test", "data": {"source": "sinusoid", "shots": 5, "queries": 5},
            "model": {"name": "mlp"}, "algorithm": {"name": "maml", "inner_lr": 0.01},
            "optim": {"meta_batch_size": 4, "steps": STEPS, "val_every": 6, "val_tasks": 8},
            "tracking": {"checkpoint_every": 6, "log_every": 5, "progress": False, "uri": uri,
                         "run_dir": str(tmp_path), "experiment": "mtl-ray-tests"}}
    return from_dict(base, [f"{k}={v}" for k, v in over.items()])


def test_training_run_is_logged_to_the_server(mlflow_server, tmp_path):
    cfg = _cfg(tmp_path, mlflow_server)
    out = io.StringIO()
    summary = run_training(cfg, tmp_path / "run", out=out)
    run_id = (tmp_path / "run" / "mlflow_run_id").read_text().strip()
    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["optim.outer_lr"] == str(cfg.optim.outer_lr)
    assert run.data.params["algorithm.name"] == "maml" and run.data.params["seed"] == "0"
    assert run.data.tags["seed"] == "0"
    assert len(run.data.tags["git.commit"]) == 40 or run.data.tags["git.commit"] == "unknown"
    assert run.data.tags["version.torch"].startswith("2.")
    history = client.get_metric_history(run_id, M.META_TRAIN_LOSS)
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))  # every step, logged in batches
    assert [m.step for m in client.get_metric_history(run_id, M.META_VAL_LOSS)] == [6, 12]
    arts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "learning_curve.png", "checkpoints"} <= arts
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints")] == ["checkpoints/step_00000012.pt"]
    assert summary.steps == STEPS and f"mlflow: run {run_id}" in out.getvalue()


def test_resumed_run_continues_the_same_mlflow_run(mlflow_server, tmp_path):
    cfg = _cfg(tmp_path, mlflow_server)
    run_training(cfg.replace(**{"optim.steps": 6}), tmp_path / "run", out=io.StringIO())
    first = (tmp_path / "run" / "mlflow_run_id").read_text()
    run_training(cfg, tmp_path / "run", resume=True, out=io.StringIO())
    assert (tmp_path / "run" / "mlflow_run_id").read_text() == first
    steps = [m.step for m in MlflowClient(mlflow_server).get_metric_history(first, M.META_TRAIN_LOSS)]
    assert sorted(steps) == list(range(1, STEPS + 1))


def test_dead_tracking_server_does_not_stop_training(tmp_path, capsys):
    dead = f"http://127.0.0.1:{free_port()}"
    summary = run_training(_cfg(tmp_path, dead), tmp_path / "run", out=io.StringIO())
    assert summary.steps == STEPS
    err = capsys.readouterr().err
    assert err.count(f"MLflow tracking at {dead} is unavailable") == 1
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == list(range(1, STEPS + 1))


def test_default_store_is_local_sqlite_beside_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = _cfg(tmp_path, "")
    assert tracking_uri(cfg, tmp_path / "run") == f"sqlite:///{tmp_path}/mlflow.db"  # beside the run dir
    run_training(cfg, tmp_path / "run", out=io.StringIO())
    run_id = (tmp_path / "run" / "mlflow_run_id").read_text()
    client = MlflowClient(tracking_uri(cfg, tmp_path / "run"))
    assert client.get_run(run_id).info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    assert (tmp_path / "mlartifacts").is_dir() and not (tmp_path / "run" / "mlruns").exists()


@pytest.mark.usefixtures("omniglot_root")
def test_data_files_md5_become_tags(omniglot_cfg):
    tags = data_tags(omniglot_cfg())
    assert set(tags) == {"data.md5.images_background_small1.zip", "data.md5.images_background_small2.zip"}
    assert all(len(v) == 32 for v in tags.values())
