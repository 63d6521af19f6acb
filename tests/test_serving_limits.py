"""The served model's request-size limit: HTTP 413 beyond ``$MTL_RAY_MAX_REQUEST_BYTES``, configurable, 500 when the
setting itself is bad.

MLflow's scoring server has no body-size limit of its own (it reads the whole body, then parses it), so the model
checks the inputs it is given before adapting (mtl_ray.serving.check_request_size). These tests send real HTTP
requests to MLflow's own scoring app (``scoring_server.init``) served by uvicorn in this process, and one to a real
``mlflow models serve`` (slow); the model is a tiny sinusoid MAML logged to a sqlite store under tmp.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest

from mtl_ray.checkpoint import latest_checkpoint
from mtl_ray.serving import (
    DEFAULT_MAX_REQUEST_BYTES,
    MAX_REQUEST_BYTES_ENV,
    RequestTooLargeError,
    check_request_size,
    log_fewshot_model,
)


@pytest.fixture(scope="module")
def model_uri(tmp_path_factory, sinusoid_run) -> str:
    root = tmp_path_factory.mktemp("serving_limits")
    checkpoint = latest_checkpoint(sinusoid_run)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    try:
        exp = mlflow.create_experiment("limits", artifact_location=str(root / "artifacts"))
        with mlflow.start_run(experiment_id=exp):
            info = log_fewshot_model(checkpoint)
        # a local copy: the served model needs no tracking store
        return mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(root / "model"))
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def server(model_uri):
    """MLflow's scoring app for the model, on uvicorn in a thread of this process: ``http://127.0.0.1:PORT``."""
    import uvicorn
    from mlflow.pyfunc import scoring_server

    flag = "_MLFLOW_IS_IN_SERVING_ENVIRONMENT"  # init() sets it for the process; put it back afterwards
    before = os.environ.get(flag)
    sys_path = list(sys.path)  # loading a model with code paths prepends its code directory
    app = scoring_server.init(mlflow.pyfunc.load_model(model_uri))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        sys.path[:] = sys_path
        if before is None:
            os.environ.pop(flag, None)
        else:
            os.environ[flag] = before


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def body(queries: int) -> bytes:
    x = np.linspace(-4, 4, max(queries, 5), dtype=np.float32)[:, None]
    return json.dumps({"inputs": {"support_x": x[:5].tolist(), "support_y": np.sin(x[:5, 0]).tolist(),
                                  "query_x": x[:queries].tolist()}}).encode()


def post(url: str, data: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(f"{url}/invocations", data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_request_over_the_limit_is_answered_413_naming_sizes_limit_and_setting(server, monkeypatch):
    monkeypatch.setenv(MAX_REQUEST_BYTES_ENV, "4000")
    status, answer = post(server, body(10))
    assert status == 200 and len(answer["predictions"]) == 10
    status, answer = post(server, body(1000))  # query_x: 1000 float32 = 4000 B, plus the support set
    assert status == 413, answer
    assert answer["error_code"] == "REQUEST_LIMIT_EXCEEDED"
    msg = answer["message"]
    assert "request: got 4040 bytes (4.0 KB) of inputs" in msg and "query_x shape (1000, 1) 4.0 KB" in msg, msg
    assert f"expected at most 4000 (4.0 KB, {MAX_REQUEST_BYTES_ENV})" in msg, msg
    assert "send the queries in several smaller requests" in msg


def test_the_limit_is_configurable_and_0_lifts_it(server, monkeypatch):
    monkeypatch.setenv(MAX_REQUEST_BYTES_ENV, "0")
    status, answer = post(server, body(20000))
    assert status == 200 and len(answer["predictions"]) == 20000
    monkeypatch.setenv(MAX_REQUEST_BYTES_ENV, "50000")
    assert post(server, body(20000))[0] == 413  # 80 KB of queries
    monkeypatch.delenv(MAX_REQUEST_BYTES_ENV)
    assert post(server, body(20000))[0] == 200  # the default, 32 MiB


def test_a_bad_setting_is_the_servers_error_naming_it(server, monkeypatch):
    monkeypatch.setenv(MAX_REQUEST_BYTES_ENV, "32MB")
    status, answer = post(server, body(10))
    assert status == 500, answer
    assert f"{MAX_REQUEST_BYTES_ENV}: got '32MB', expected a whole number of bytes" in answer["message"]


def test_the_default_limit_and_what_is_counted(monkeypatch):
    monkeypatch.delenv(MAX_REQUEST_BYTES_ENV, raising=False)
    assert DEFAULT_MAX_REQUEST_BYTES == 32 * 2**20
    sx, sy = np.zeros((5, 1, 28, 28), np.float32), np.array(["a", "b", "c", "d", "e"], dtype=object)
    fits = np.zeros(((DEFAULT_MAX_REQUEST_BYTES - sx.nbytes - 5) // (4 * 784), 1, 28, 28), np.float32)
    check_request_size({"support_x": sx, "support_y": sy, "query_x": fits})
    over = np.zeros((fits.shape[0] + 1, 1, 28, 28), np.float32)
    with pytest.raises(RequestTooLargeError) as e:
        check_request_size({"support_x": sx, "support_y": sy, "query_x": over})
    assert e.value.get_http_status_code() == 413
    # nested lists (a DataFrame cell, or JSON read without a signature): 4 bytes a number, counted only up to the
    # limit, so sizing a huge request costs no more than the limit
    monkeypatch.setenv(MAX_REQUEST_BYTES_ENV, "1000")
    huge = [[0.0]] * 10_000_000
    t0 = time.perf_counter()
    with pytest.raises(RequestTooLargeError, match=r"got at least 1004 bytes \(1.0 KB\) of inputs"):
        check_request_size({"query_x": huge, "support_x": [[0.0]]})
    assert time.perf_counter() - t0 < 0.5


def test_pyfunc_predict_refuses_too(model_uri, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv(MAX_REQUEST_BYTES_ENV, "100")
    model = mlflow.pyfunc.load_model(model_uri)
    x = np.zeros((100, 1), np.float32)
    with pytest.raises(RequestTooLargeError, match=rf"expected at most 100 \(100 B, {MAX_REQUEST_BYTES_ENV}\)"):
        model.predict({"support_x": x[:5], "support_y": np.zeros(5, np.float32), "query_x": x})


@pytest.mark.slow
def test_mlflow_models_serve_answers_413(model_uri, tmp_path):
    """The real ``mlflow models serve`` (its own uvicorn process) with the limit set in its environment."""
    port = free_port()
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, MAX_REQUEST_BYTES_ENV: "4000", "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}"}
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([f"{venv_bin}/mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
                             "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if urllib.request.urlopen(f"{url}/ping", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-2000:]
            time.sleep(0.5)
        assert post(url, body(10))[0] == 200
        status, answer = post(url, body(1000))
        assert status == 413 and f"expected at most 4000 (4.0 KB, {MAX_REQUEST_BYTES_ENV})" in answer["message"], answer
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
