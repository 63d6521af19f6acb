"""``ray job submit`` end to end against a real local head started with ``ray start --head``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from mtl_ray.checkpoint import latest_checkpoint, load_checkpoint

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EXCLUDES = [".venv", ".git", "runs", "mlruns", "bench/out", "data", ".pytest_cache"]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def ray_head():
    """A head node in its own process group, token auth explicitly off (loopback), killed by PID after."""
    port, dash, client, agent, agent_grpc, metrics, env_agent = _free_ports(7)
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths have a length limit
    # RAY_ADDRESS may point at the test session's other Ray instance: the head and jobs must not see it.
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--port", str(port), "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dash), "--ray-client-server-port", str(client), "--num-cpus", "2",
         # Agent ports too: the session's other Ray instance holds the defaults (e.g. 52365), and a head
         # whose job agent cannot bind answers every submission with "No available agent".
         "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
         "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(env_agent),
         "--temp-dir", temp], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail(f"ray start --head did not come up (exit {proc.poll()})")
            time.sleep(1)
    try:
        yield {"address": address, "env": env}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _submit(head: dict, job_id: str, *args: str, script: str = "jobs/meta_train.py") -> subprocess.CompletedProcess:
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head["address"], "--submission-id", job_id,
           "--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--",
           sys.executable, script, *args]
    deadline = time.monotonic() + 90
    while True:
        out = subprocess.run(cmd, env=head["env"], capture_output=True, text=True, timeout=300)
        # The dashboard answers before the head's job agent is up; Ray says to try again later.
        if "No available agent to submit job" not in out.stderr or time.monotonic() > deadline:
            return out
        time.sleep(2)


def _status(head: dict, job_id: str) -> str:
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(head["address"]).get_job_status(job_id).value)


def test_job_trains_on_workers_and_writes_checkpoint_and_metrics(ray_head, tmp_path):
    run_dir = tmp_path / "run"
    out = _submit(ray_head, "mtl-ok", "jobs/configs/sinusoid_maml.yaml", "optim.steps=20",
                  "optim.val_every=10", "tracking.checkpoint_every=10", "tracking.log_every=5",
                  "scaling.num_workers=2", "scaling.torch_threads=1", "--run-dir", str(run_dir))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert _status(ray_head, "mtl-ok") == "SUCCEEDED"
    assert "2 worker(s)" in out.stdout and "steps: 20  tasks: " in out.stdout  # start line and summary
    assert load_checkpoint(latest_checkpoint(run_dir)).step == 20
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 20


def test_job_with_bad_config_fails_with_the_error_in_its_logs(ray_head, tmp_path):
    out = _submit(ray_head, "mtl-bad", "jobs/configs/sinusoid_maml.yaml", "optim.outer_lr=-1",
                  "scaling.num_workers=2", "--run-dir", str(tmp_path / "run"))
    assert out.returncode != 0
    assert _status(ray_head, "mtl-bad") == "FAILED", out.stdout[-3000:] + out.stderr[-3000:]
    from ray.job_submission import JobSubmissionClient

    logs = JobSubmissionClient(ray_head["address"]).get_job_logs("mtl-bad")
    assert "optim.outer_lr: got -1.0, expected a value > 0" in logs
    assert not (tmp_path / "run").exists()  # rejected before anything was written


def test_pipeline_job_pretrains_on_ray_train_meta_trains_from_it_and_deploys(ray_head, omniglot_root, tmp_path):
    """jobs/pipeline.py: pretraining is a TorchTrainer with 2 workers inside a submitted job, meta-training starts
    from its body, and each target's deployment search runs as Tune trials on the cluster."""
    root = tmp_path / "pmf"
    one_setting = "deploy.space={algorithm.finetune_steps: {grid: [2]}}"
    out = _submit(ray_head, "mtl-pipeline", "jobs/configs/pipeline_omniglot.yaml",
                  f"data.root={omniglot_root}", "data.rotations=false", "model.channels=16", "pretrain.steps=20",
                  "pretrain.batch_size=32", "pretrain.val_every=20", "tracking.log_every=10",
                  "tracking.checkpoint_every=20", "tracking.progress=false", "tracking.mlflow=false",
                  "optim.steps=2", "optim.val_every=2", "optim.val_tasks=4", "optim.meta_batch_size=4",
                  "deploy.episodes=4", "deploy.test_episodes=4", one_setting, "--run-dir", str(root),
                  script="jobs/pipeline.py")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert _status(ray_head, "mtl-pipeline") == "SUCCEEDED"
    assert "2 Ray Train worker(s)" in out.stdout and "pretrained to step 20" in out.stdout
    ck = load_checkpoint(latest_checkpoint(root / "pretrain"))
    assert (ck.stage, ck.step) == ("pretrain", 20)
    meta = load_checkpoint(latest_checkpoint(root / "meta_train"))
    assert meta.step == 2 and Path(meta.config.model.init) == root / "pretrain"
    for target in ("omniglot", "fashion"):
        assert load_checkpoint(root / f"deploy-{target}").config.algorithm.finetune_steps == 2
    bad = _submit(ray_head, "mtl-pretrain-bad", "jobs/configs/omniglot_pretrain.yaml",
                  f"data.root={omniglot_root}", "pretrain.holdout=20", "--run-dir", str(tmp_path / "bad"),
                  script="jobs/pretrain.py")
    assert bad.returncode != 0 and _status(ray_head, "mtl-pretrain-bad") == "FAILED"
    assert not (tmp_path / "bad").exists()
