"""A real ``mtl-ray train`` of the shipped sinusoid config, once per session, its output captured."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"


@pytest.fixture(scope="session")
def sinusoid_cli_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """(tmp dir, the finished process) of ``mtl-ray train jobs/configs/sinusoid_maml.yaml optim.steps=5
    scaling.num_workers=1 --run-dir <tmp>/runs/run`` run in ``<tmp>``: one Ray worker, so a local Ray starts too;
    the default MLflow store (``<tmp>/runs/mlflow.db``, created by this run). Ray's and MLflow's environment
    switches of the test session are removed, so the process sees what a user's shell has."""
    tmp = tmp_path_factory.mktemp("sinusoid_cli")
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_AUTH_MODE", "PYTEST_CURRENT_TEST")}
    cmd = [str(Path(sys.executable).parent / "mtl-ray"), "train", str(CONFIGS / "sinusoid_maml.yaml"),
           "optim.steps=5", "scaling.num_workers=1", "--run-dir", str(tmp / "runs" / "run")]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, proc
