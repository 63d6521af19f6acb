"""serving: a checkpoint logged as an MLflow pyfunc model adapts and predicts like the Python API.

Real MLflow (a sqlite store and artifacts under tmp), a tiny ProtoNet trained in-process on the bundled
digits, and the scoring server's own request handler for the ``mlflow models serve`` JSON path.
"""

from __future__ import annotations

import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import scoring_server

from mtl_ray.api import FewShotLearner
from mtl_ray.components import from_dict
from mtl_ray.config import UserError
from mtl_ray.data import build_task_source
from mtl_ray.distributed.driver import MetaTrainer
from mtl_ray.serving import FewShotModel, ServingInputError, log_fewshot_model

WAYS = 5
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _train(cfg, run_dir: Path) -> str:
    trainer = MetaTrainer.create(cfg, run_dir)
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    assert summary.checkpoint
    return summary.checkpoint


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """A sqlite MLflow store with its own artifact location; the previous tracking URI comes back afterwards."""
    root = tmp_path_factory.mktemp("mlflow")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    try:
        yield mlflow.create_experiment("serving", artifact_location=str(root / "artifacts"))
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.fixture(autouse=True)
def _keep_sys_path(monkeypatch):
    """Loading a model with code_paths prepends its code directory to sys.path; undo that after each test."""
    monkeypatch.setattr(sys, "path", list(sys.path))


@pytest.fixture(scope="module")
def digits(tmp_path_factory, tracking):
    """(cfg, checkpoint, held-out task, ModelInfo): a ProtoNet on 8x8 digits, logged with an input example."""
    cfg = from_dict({"data": {"source": "digits", "ways": WAYS, "shots": 1, "queries": 5, "image_size": 8},
                     "model": {"name": "conv4", "channels": 8, "blocks": 2}, "algorithm": {"name": "protonet"},
                     "optim": {"steps": 5, "meta_batch_size": 2, "val_every": 0},
                     "tracking": {"checkpoint_every": 0, "progress": False, "mlflow": False}})
    ckpt = _train(cfg, tmp_path_factory.mktemp("digits_run"))
    task = build_task_source(cfg).sample("test", 0, [0])
    example = {"support_x": task.support_x[0].numpy(), "support_y": task.support_y[0].numpy(),
               "query_x": task.query_x[0, :2].numpy()}
    with mlflow.start_run(experiment_id=tracking):
        info = log_fewshot_model(ckpt, input_example=example)
    return cfg, ckpt, task, info


def _inputs(task, labels=None) -> dict[str, np.ndarray]:
    y = task.support_y[0].tolist()
    return {"support_x": task.support_x[0].numpy(),
            "support_y": np.array([labels[i] for i in y] if labels else y, dtype=object),
            "query_x": task.query_x[0].numpy()}


def test_logged_model_predicts_like_the_api(digits):
    _cfg, ckpt, task, info = digits
    model = mlflow.pyfunc.load_model(info.model_uri)
    got = model.predict(_inputs(task))
    want = FewShotLearner.from_checkpoint(ckpt).adapt(task.support_x[0], task.support_y[0]).predict(task.query_x[0])
    assert isinstance(got, np.ndarray) and got.shape == (task.query_x.shape[1],)
    assert got.tolist() == want
    accuracy = float(np.mean(got == task.query_y[0].numpy()))
    assert accuracy > 1 / WAYS, accuracy

    # string labels come back as the same strings
    named = model.predict(_inputs(task, NAMES))
    assert named.tolist() == [NAMES[i] for i in want]

    sig = model.metadata.signature.inputs.to_dict()
    assert [(s["name"], tuple(s["tensor-spec"]["shape"])) for s in sig] == [
        ("support_x", (-1, 1, 8, 8)), ("support_y", (-1,)), ("query_x", (-1, 1, 8, 8))]
    reqs = (Path(mlflow.artifacts.download_artifacts(info.model_uri)) / "requirements.txt").read_text()
    assert "torch==" in reqs and "ray" not in reqs and "scikit-learn" not in reqs


def test_scoring_server_json_inputs(digits):
    """The body ``mlflow models serve`` gets (JSON "inputs" of nested lists) goes through its own handler."""
    _cfg, _ckpt, task, info = digits
    model = mlflow.pyfunc.load_model(info.model_uri)
    schema = model.metadata.get_input_schema()
    want = model.predict(_inputs(task, NAMES)).tolist()
    body = json.dumps({"inputs": {k: v.tolist() for k, v in _inputs(task, NAMES).items()}})
    res = scoring_server.invocations(body, "application/json", model, schema)
    assert res.status == 200, res.response
    assert json.loads(res.response) == {"predictions": want}

    # a support set whose labels do not match its examples: HTTP 400 naming got / expected
    bad = json.loads(body)
    bad["inputs"]["support_y"] = bad["inputs"]["support_y"][:-1]
    with pytest.raises(ServingInputError) as e:
        scoring_server.invocations(json.dumps(bad), "application/json", model, schema)
    assert e.value.get_http_status_code() == 400
    assert f"support_y: got shape ({WAYS - 1},), expected [{WAYS}] (one label per support_x example)" in e.value.message


def test_dataframe_row_and_direct_model(digits):
    _cfg, ckpt, task, _info = digits
    direct = FewShotModel.from_learner(FewShotLearner.from_checkpoint(ckpt))
    want = direct.predict(None, _inputs(task, NAMES)).tolist()
    row = pd.DataFrame([{k: v.tolist() for k, v in _inputs(task, NAMES).items()}])
    assert direct.predict(None, row).tolist() == want
    with pytest.raises(UserError, match=r"got a DataFrame with 2 rows, expected one row holding one task"):
        direct.predict(None, pd.concat([row, row]))


def test_bad_input_names_got_expected_and_fix(digits):
    _cfg, ckpt, task, info = digits
    direct = FewShotModel.from_learner(FewShotLearner.from_checkpoint(ckpt))
    good = _inputs(task)

    missing = {k: v for k, v in good.items() if k != "query_x"}
    with pytest.raises(UserError, match=r"got keys \['support_x', 'support_y'\], expected support_x, support_y, "
                                        r"query_x \(missing query_x\); pass a dict \{'support_x': float32 \[S, 1, 8"):
        direct.predict(None, missing)
    wrong = {**good, "query_x": np.zeros((3, 1, 28, 28), np.float32)}
    with pytest.raises(UserError, match=r"query_x: got shape \(3, 1, 28, 28\), expected \[Q, 1, 8, 8\]; resize "
                                        r"images to the shape \[1, 8, 8\] this model was trained on"):
        direct.predict(None, wrong)
    with pytest.raises(UserError, match=r"for one example add a leading axis"):
        direct.predict(None, {**good, "query_x": good["query_x"][0]})

    # through pyfunc, MLflow's tensor signature rejects these first, with its own message
    model = mlflow.pyfunc.load_model(info.model_uri)
    with pytest.raises(MlflowException, match=r"missing inputs \['query_x'\]"):
        model.predict(missing)
    with pytest.raises(MlflowException, match=r"Shape of input \(3, 1, 28, 28\) does not match expected shape "
                                              r"\(-1, 1, 8, 8\)"):
        model.predict(wrong)
    # what a signature cannot see still reaches the model's own check
    with pytest.raises(ServingInputError, match=r"support_y: got shape \(4,\), expected \[5\]"):
        model.predict({**good, "support_y": good["support_y"][:4]})


def test_log_needs_an_active_run_and_a_checkpoint(digits, tracking, tmp_path):
    _cfg, ckpt, _task, _info = digits
    with pytest.raises(UserError, match="got no active MLflow run"):
        log_fewshot_model(ckpt)
    with mlflow.start_run(experiment_id=tracking), pytest.raises(UserError, match="directory without checkpoints"):
        log_fewshot_model(tmp_path)


@pytest.fixture(scope="module")
def sinusoid_maml(tmp_path_factory, tracking):
    """(run directory, test tasks, ModelInfo): a MAML regressor, whose adaptation is torch.func.grad steps."""
    cfg = from_dict({"data": {"source": "sinusoid", "shots": 5, "queries": 4}, "model": {"name": "mlp",
                     "hidden_sizes": [8]}, "algorithm": {"name": "maml"},
                     "optim": {"steps": 2, "meta_batch_size": 2, "val_every": 0},
                     "tracking": {"checkpoint_every": 0, "progress": False, "mlflow": False}})
    run = tmp_path_factory.mktemp("sinusoid") / "run"
    _train(cfg, run)
    tasks = build_task_source(cfg).sample("test", 0, range(8))
    with mlflow.start_run(experiment_id=tracking):
        info = log_fewshot_model(run)  # a run directory: its newest checkpoint
    return run, tasks, info


def _regression_inputs(tasks, i: int) -> dict[str, np.ndarray]:
    return {"support_x": tasks.support_x[i].numpy(), "support_y": tasks.support_y[i, :, 0].numpy(),
            "query_x": tasks.query_x[i].numpy()}


def test_regression_model_predicts_values(sinusoid_maml):
    run, tasks, info = sinusoid_maml
    model = mlflow.pyfunc.load_model(info.model_uri)
    got = model.predict(_regression_inputs(tasks, 0))
    want = FewShotLearner.from_checkpoint(run).adapt(tasks.support_x[0], tasks.support_y[0]).predict(tasks.query_x[0])
    assert got.dtype == np.float32 and got.shape == (4,)
    np.testing.assert_allclose(got, want.reshape(-1).numpy(), rtol=1e-6)


def test_concurrent_requests_answer_as_one_at_a_time(sinusoid_maml):
    """The scoring server runs each request in a thread (asyncio.to_thread); torch.func's inner loop is not
    thread-safe, so without the API's lock some answers were errors and others silently different."""
    _run, tasks, info = sinusoid_maml
    model = mlflow.pyfunc.load_model(info.model_uri)
    schema = model.metadata.get_input_schema()
    bodies = [json.dumps({"inputs": {k: v.tolist() for k, v in _regression_inputs(tasks, i).items()}})
              for i in range(tasks.num_tasks)]

    def answer(i: int) -> str:
        res = scoring_server.invocations(bodies[i], "application/json", model, schema)
        assert res.status == 200, res.response
        return res.response

    want = [answer(i) for i in range(tasks.num_tasks)]
    assert len(set(want)) == len(want)  # different tasks, different answers: a mix-up would show
    order = [i for _ in range(10) for i in range(tasks.num_tasks)]
    with ThreadPoolExecutor(max_workers=tasks.num_tasks) as pool:
        got = list(pool.map(answer, order))
    assert got == [want[i] for i in order]


def test_a_transductive_model_serves_only_requests_that_opt_in(digits, tracking, tmp_path, caplog):
    cfg, _ckpt, task, _info = digits
    cfg = cfg.replace(**{"model.norm": "transductive"})
    ckpt = _train(cfg, tmp_path / "run")
    with caplog.at_level("WARNING"), mlflow.start_run(experiment_id=tracking):
        info = log_fewshot_model(ckpt)
    assert "Got error" not in caplog.text  # MLflow's trial prediction of the input example passed
    model = mlflow.pyfunc.load_model(info.model_uri)
    with pytest.raises(MlflowException, match=r"model.norm=transductive: .* Pass transductive=True"):
        model.predict(_inputs(task))
    got = model.predict(_inputs(task), params={"transductive": True}).tolist()
    assert got == FewShotLearner.from_checkpoint(ckpt).adapt(task.support_x[0], task.support_y[0]).predict(
        task.query_x[0], transductive=True)
    # the stored serving example says what such a request needs
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "model")))
    example = json.loads((local / "serving_input_example.json").read_text())
    assert example["params"] == {"transductive": True}


def _json_body(task, **changes) -> dict:
    body = {"inputs": {k: v.tolist() for k, v in _inputs(task, NAMES).items()}}
    for key, value in changes.items():
        where = body if key == "params" else body["inputs"]
        where[key] = value
    return body


BAD_REQUESTS = [  # (case, changes to a good JSON request, message naming the value)
    ("empty query set", {"query_x": []}, r"Shape of input \(0,\) does not match"),
    ("NaN in the support set", {"support_x": "nan"}, r"support_x: got non-finite values"),
    ("labels one short", {"support_y": list(NAMES[:WAYS - 1])}, r"support_y: got shape \(4,\), expected \[5\]"),
    ("one class only", {"support_y": ["zero"] * WAYS}, r"support_y: got 1 distinct label\(s\) \['zero'\]"),
    ("images of another size", {"query_x": np.zeros((2, 1, 28, 28)).tolist()}, r"query_x|does not match"),
    ("transductive not a boolean", {"params": {"transductive": "yes"}}, r"transductive"),
]


@pytest.mark.parametrize("case,changes,message", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_http_4xx_naming_the_value(digits, case, changes, message):
    """Through the scoring server's own handler, as `mlflow models serve` answers them."""
    _cfg, _ckpt, task, info = digits
    model = mlflow.pyfunc.load_model(info.model_uri)
    body = _json_body(task, **changes)
    if changes.get("support_x") == "nan":
        body["inputs"]["support_x"] = np.full(np.shape(body["inputs"]["query_x"])[1:], np.nan)[None].repeat(
            WAYS, 0).tolist()
    try:
        res = scoring_server.invocations(json.dumps(body), "application/json", model,
                                         model.metadata.get_input_schema())
        status, text = res.status, res.response
    except MlflowException as e:
        status, text = e.get_http_status_code(), e.message
    assert 400 <= status < 500, (status, text)
    assert re.search(message, text), text


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_command_serves_the_registered_version_over_http(sinusoid_run, tmp_path, monkeypatch):
    """The literal command serve_command returns, typed into bash where only the venv's mlflow is named: it
    serves the registered version from the run's store, scores a request, and writes no ./mlflow.db."""
    import os
    import signal
    import subprocess
    import time
    import urllib.request

    from mlflow.tracking import MlflowClient

    from mtl_ray.serving import serve_command
    from mtl_ray.tracking.mlflow_run import log_run_model

    stray_before = (Path.cwd() / "mlflow.db").exists()
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    (tmp_path / "store").mkdir()
    client = MlflowClient(uri)
    exp = client.create_experiment("serve", artifact_location=(tmp_path / "store" / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    ckpt = sorted((sinusoid_run / "checkpoints").glob("step_*.pt"))[-1]
    info = log_run_model(uri, run_id, str(ckpt), step=2, name="mtl-ray-serve-test")
    assert info.registered_model_version == 1
    assert client.get_run(run_id).outputs.model_outputs[0].model_id == info.model_id

    port = _free_port()
    cmd = serve_command("mtl-ray-serve-test", info.registered_model_version, uri, port=port)
    assert cmd.startswith(f"MLFLOW_TRACKING_URI={uri} PATH=") and "models:/mtl-ray-serve-test/1" in cmd
    cwd = tmp_path / "shell"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "VIRTUAL_ENV")}
    env["PATH"] = "/usr/bin:/bin"  # a shell where the venv is not activated
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(["bash", "-c", cmd], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    request = {"inputs": {"support_x": [[-1.0], [0.0], [1.0], [2.0]], "support_y": [0.5, 0.0, -0.5, -1.0],
                          "query_x": [[0.5], [1.5]]}}
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(request).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as res:
            assert res.status == 200
            got = json.loads(res.read())["predictions"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    x = request["inputs"]
    want = FewShotLearner.from_checkpoint(str(ckpt)).adapt(np.array(x["support_x"], np.float32),
                                                           np.array(x["support_y"], np.float32))
    assert np.allclose(got, want.predict(np.array(x["query_x"], np.float32)).reshape(-1).numpy(), atol=1e-5)
    assert not (cwd / "mlflow.db").exists() and not (cwd / "mlruns").exists()
    assert (Path.cwd() / "mlflow.db").exists() == stray_before  # nor in the test's own current directory
