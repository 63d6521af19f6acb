"""Training runs land in MLflow (a real server): params, metric histories, tags, artifacts; a dead
server never stops training."""

from __future__ import annotations

import io
import socket

import pytest
from mlflow.tracking import MlflowClient

from mtl_ray import metrics as M
from mtl_ray.components import from_dict
from mtl_ray.data.registry import SOURCES
from mtl_ray.recipes.train import train as run_training
from mtl_ray.tracking.local import read_metrics
from mtl_ray.tracking.mlflow_run import (
    GIT_COMMIT_TAG,
    SOURCE_NAME_TAG,
    SOURCE_TYPE_TAG,
    USER_TAG,
    MlflowRun,
    data_digest,
    data_tags,
    registered_model_name,
    run_params,
    tracking_uri,
)

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

    # MLflow's own tags, as mlflow.start_run would set them
    tags = run.data.tags
    assert tags[USER_TAG] and tags[SOURCE_NAME_TAG] and tags[SOURCE_TYPE_TAG] == "LOCAL"
    assert tags.get(GIT_COMMIT_TAG, tags["git.commit"]) == tags["git.commit"]
    assert tags["mlflow.runName"] == "run"
    # params: only the sections and keys this run reads (sinusoid, MLP, meta-training)
    params = run.data.params
    assert not [k for k in params if k.startswith("pretrain.")]
    assert {k.split(".", 1)[1] for k in params if k.startswith("data.")} == SOURCES["sinusoid"].config_keys
    assert "model.hidden_sizes" in params and "model.channels" not in params
    # the training data as a dataset input
    (ds,) = run.inputs.dataset_inputs
    assert ds.dataset.name == "sinusoid" and ds.dataset.digest == data_digest(cfg, {})
    assert ds.dataset.source_type == "code" and "mtl_ray.data.sinusoid" in ds.dataset.source
    assert [(t.key, t.value) for t in ds.tags] == [("mlflow.data.context", "training")]


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


@pytest.mark.usefixtures("omniglot_root")
def test_omniglot_dataset_input_digest_comes_from_the_file_md5s(omniglot_cfg):
    from mtl_ray.tracking.mlflow_run import data_source_uri, training_dataset

    cfg = omniglot_cfg()
    md5s = {k.removeprefix("data.md5."): v for k, v in data_tags(cfg).items()}
    ds = training_dataset(cfg, md5s)
    assert ds.name == "omniglot" and ds.digest == data_digest(cfg, md5s) and len(ds.digest) == 32
    assert ds.digest != data_digest(cfg, {**md5s, "images_background_small1.zip": "0" * 32})
    assert ds.source.to_dict() == {"uri": data_source_uri(cfg)} and data_source_uri(cfg).endswith("/omniglot")


def test_params_only_for_what_the_run_reads():
    """The rule of the module docstring: stage, data source and architecture decide which keys are logged."""
    sinusoid = from_dict({"data": {"source": "sinusoid"}, "model": {"name": "mlp"}})
    keys = set(run_params(sinusoid))
    assert not {k for k in keys if k.startswith("pretrain.")}
    assert {"data.source", "data.shots", "data.queries"} <= keys
    assert not {"data.archives", "data.rotations", "data.ways", "data.image_size", "data.path"} & keys
    assert "model.hidden_sizes" in keys and not {"model.channels", "model.blocks", "model.norm"} & keys
    assert {"optim.outer_lr", "algorithm.inner_lr", "scaling.num_workers", "tracking.log_every", "seed"} <= keys

    omniglot = from_dict({"data": {"source": "omniglot"}, "model": {"name": "conv4"}})
    keys = set(run_params(omniglot))
    assert {"data.archives", "data.rotations", "data.ways", "model.channels", "model.norm"} <= keys
    assert not {"data.path", "data.val_fraction", "model.hidden_sizes"} & keys
    pretrain = set(run_params(omniglot, "pretrain"))
    assert {"pretrain.lr", "pretrain.batch_size"} <= pretrain
    assert not {k for k in pretrain if k.startswith("optim.")} and "data.shots" not in pretrain


def test_registered_model_name():
    assert registered_model_name(from_dict({"name": "omniglot_maml"})) == "mtl-ray-omniglot_maml"
    assert registered_model_name(from_dict({"name": "my run/2"})) == "mtl-ray-my-run-2"


def test_system_metrics_are_logged_while_the_run_is_open(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = MlflowRun(_cfg(tmp_path, uri), tmp_path / "run")
    assert tracker.run_id and tracker.failed is None
    import time

    time.sleep(1.0)
    tracker.finish()
    metrics = MlflowClient(uri).get_run(tracker.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics
