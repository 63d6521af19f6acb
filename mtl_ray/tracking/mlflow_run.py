"""Every training run is an MLflow run; a sweep is a parent run with one child per trial.

Default store: ``mlflow.db`` (sqlite) beside the run directory, i.e. ``runs/mlflow.db`` for runs
under ``runs/``, with the experiment's artifacts under ``mlartifacts/`` next to it (explicit, so
artifacts never land in whatever the current directory is, e.g. a Tune trial's scratch dir).
``tracking.uri`` or ``$MLFLOW_TRACKING_URI`` points at a server instead.

Logged: the flattened config as params; metrics in batches (every ``tracking.log_every`` steps and
at each validation); tags for the data files' md5s, seed, git commit and package versions;
artifacts at the end (config, final checkpoint, learning-curve PNG, and whatever the caller adds,
e.g. the pyfunc model). If the tracking server cannot be reached, training goes on: the tracker says
so once and stops trying; ``metrics.jsonl`` in the run directory stays the complete local record.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mtl_ray.atomic import atomic_write
from mtl_ray.config import Config
from mtl_ray.tracking.local import METRICS_FILE, read_metrics

RUN_ID_FILE = "mlflow_run_id"
PARENT_TAG = "mlflow.parentRunId"
# Fail fast against a dead server instead of MLflow's default minutes of retries.
_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def _root(run_dir: str | Path) -> Path:
    return Path(run_dir).absolute().parent


def tracking_uri(cfg: Config, run_dir: str | Path) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<run dir's parent>/mlflow.db``."""
    uri = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri or f"sqlite:///{_root(run_dir) / 'mlflow.db'}"


def artifact_location(cfg: Config, run_dir: str | Path) -> str | None:
    """Explicit artifact root for a local store; a server chooses its own (None)."""
    if tracking_uri(cfg, run_dir).startswith(("http://", "https://", "databricks")):
        return None
    return (_root(run_dir) / "mlartifacts").as_uri()


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)[:6000]
    return out


def git_commit() -> str:
    """The commit of the source tree this package runs from ("unknown" outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def version_tags() -> dict[str, str]:
    import mlflow
    import ray
    import torch

    from mtl_ray import __version__

    return {"version.mtl_ray": __version__, "version.torch": torch.__version__, "version.ray": ray.__version__,
            "version.mlflow": mlflow.__version__, "version.python": platform.python_version()}


def data_tags(cfg: Config) -> dict[str, str]:
    """md5 of every data file the run reads (empty for synthetic sources)."""
    if cfg.data.source == "sinusoid":
        return {}
    from mtl_ray.data import load_pools

    return {f"data.md5.{name}": md5 for name, md5 in load_pools(cfg).md5s.items()}


def reachable(uri: str, timeout: float = 3.0) -> str | None:
    """None when ``uri`` can be used, else why not (only http(s) servers are probed)."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            r.read()
        return None
    except OSError as e:
        return f"{e.__class__.__name__}: {e}"


def ensure_experiment(cfg: Config, run_dir: str | Path) -> tuple[Any, str]:
    """An MlflowClient for the run's store and the experiment id (created once, with its artifact root)."""
    from mlflow.tracking import MlflowClient

    for k, v in _HTTP_ENV.items():
        os.environ.setdefault(k, v)
    uri = tracking_uri(cfg, run_dir)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        return client, exp.experiment_id
    try:
        return client, client.create_experiment(cfg.tracking.experiment,
                                                  artifact_location=artifact_location(cfg, run_dir))
    except Exception:  # created concurrently by another process
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            raise
        return client, exp.experiment_id


class MlflowRun:
    """A training run's MLflow run, used as a trainer callback; inert after the first failure.

    ``run_dir/mlflow_run_id`` remembers the run, so ``--resume`` (or a restarted Tune trial) keeps
    logging into the same MLflow run.
    """

    def __init__(self, cfg: Config, run_dir: str | Path, *, resume: bool = False, parent_run_id: str | None = None,
                 tags: Mapping[str, str] | None = None, every: int | None = None, out=None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.out = out or sys.stderr
        self.uri = tracking_uri(cfg, run_dir)
        self.client: Any = None
        self.run_id: str | None = None
        self.failed: str | None = None
        self._buffer: list[Any] = []
        self._every = max(cfg.tracking.log_every if every is None else every, 1)  # flush every N steps
        problem = reachable(self.uri)
        if problem:
            self._fail(problem)
            return
        self.guard(lambda: self._start(resume, parent_run_id, dict(tags or {})))

    # ------------------------------------------------------------------ failure handling
    def _fail(self, why: str) -> None:
        if self.failed is None:
            self.failed = why
            print(f"warning: MLflow tracking at {self.uri} is unavailable ({why}); training continues, "
                  f"metrics stay complete in {self.run_dir / METRICS_FILE}", file=self.out, flush=True)

    def guard(self, fn: Callable[[], Any]) -> Any:
        if self.failed is not None:
            return None
        try:
            return fn()
        except Exception as e:  # any tracking error: report once, never stop training
            self._fail(f"{e.__class__.__name__}: {str(e)[:300]}")
            return None

    # ------------------------------------------------------------------ lifecycle
    def _start(self, resume: bool, parent_run_id: str | None, tags: dict[str, str]) -> None:
        from mlflow.entities import Param

        self.client, exp_id = ensure_experiment(self.cfg, self.run_dir)
        id_file = self.run_dir / RUN_ID_FILE
        if resume and id_file.is_file():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        all_tags = {"seed": str(self.cfg.seed), "git.commit": git_commit(), "run_dir": str(self.run_dir),
                    "algorithm": self.cfg.algorithm.name, "data.source": self.cfg.data.source,
                    **version_tags(), **data_tags(self.cfg), **tags}
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        run = self.client.create_run(exp_id, run_name=self.run_dir.name,
                                     tags={k: str(v) for k, v in all_tags.items()})
        self.run_id = run.info.run_id
        atomic_write(id_file, self.run_id)
        params = [Param(k, v) for k, v in flatten(self.cfg.to_dict()).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self.failed is not None or self.run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if step % self._every == 0 or any(k.startswith("meta_val/") for k in metrics):
            self.flush()

    def flush(self) -> None:
        if not self._buffer or self.run_id is None:
            return
        buf, self._buffer = self._buffer, []
        self.guard(lambda: [self.client.log_batch(self.run_id, metrics=buf[i:i + 1000])
                             for i in range(0, len(buf), 1000)])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.run_id is not None:
            self.guard(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def finish(self, *, status: str = "FINISHED", checkpoint: str | None = None) -> None:
        """Flush metrics, log the config, the final checkpoint and a learning curve, close the run."""
        if self.run_id is None:
            return
        self.flush()
        config = self.run_dir / "config.yaml"
        if config.is_file():
            self.log_artifact(config)
        if checkpoint and "://" not in checkpoint and Path(checkpoint).is_file():
            self.log_artifact(checkpoint, "checkpoints")
        curve = learning_curve(self.run_dir)
        if curve is not None:
            self.log_artifact(curve)
        self.guard(lambda: self.client.set_terminated(self.run_id, status=status))


def learning_curve(run_dir: Path) -> Path | None:
    """``run_dir/learning_curve.png``: meta-train and meta-val loss (and accuracy) against step."""
    rows = read_metrics(run_dir)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("meta_train/loss", "meta_val/loss"), ("meta_train/acc", "meta_val/acc"),
            ("pretrain/loss", "pretrain/val_loss"), ("pretrain/acc", "pretrain/val_acc")]
    keys = [pair for pair in keys if any(pair[0] in r or pair[1] in r for r in rows)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for ax, pair in zip(axes[0], keys, strict=True):
        for k in pair:
            pts = [(r["step"], r[k]) for r in rows if k in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=k, marker="o" if "val" in k else None,
                        markersize=3, linewidth=1)
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        return atomic_write(run_dir / "learning_curve.png", lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
