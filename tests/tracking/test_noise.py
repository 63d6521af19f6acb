"""A training run's console output carries the run's lines, not the libraries' chatter."""

from __future__ import annotations

import pytest

# Each was printed by a plain `mtl-ray train` (or `mtl-ray tune`) before it was silenced where it comes from.
NOISE = {
    "MLflow's sqlite schema migration": "Creating initial MLflow database tables",
    "MLflow's schema upgrade": "Updating database tables",
    "alembic's migration lines": "alembic.runtime.migration",
    "MLflow's type-hint advice": "Add type hints to the `predict` method",
    "MLflow's signature-from-type-hints attempt": "Failed to infer signature from type hint",
    "MLflow's pickled-model advice": "Passing a Python object as `python_model`",
    "MLflow's input-example line": "Validating input example against model signature",
    "MLflow's system-metrics chatter": "system metrics monitoring",
    "Ray's token-auth notice": "Token authentication is enabled for this Ray cluster",
    "Tune's TensorBoard hint": "tensorboard --logdir",
    "Tune's per-checkpoint line": "Checkpoint successfully created",
}


@pytest.mark.slow
def test_a_short_training_run_prints_none_of_the_libraries_noise(sinusoid_cli_run):
    tmp, proc = sinusoid_cli_run
    text = proc.stdout + proc.stderr
    assert "mlflow: run " in proc.stdout and (tmp / "runs" / "mlflow.db").is_file()  # the store was created here
    found = {what: line for what, line in NOISE.items() if line in text}
    assert not found, f"{found}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    assert not (tmp / "mlflow.db").exists() and not (tmp / "mlruns").exists()  # nothing in the current directory
