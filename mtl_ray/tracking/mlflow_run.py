"""Every training run is an MLflow run; a sweep is a parent run with one child per trial.

Default store: ``mlflow.db`` (sqlite) beside the run directory, i.e. ``runs/mlflow.db`` for runs
under ``runs/``, with the experiment's artifacts under ``mlartifacts/`` next to it (explicit, so
artifacts never land in whatever the current directory is, e.g. a Tune trial's scratch dir).
``tracking.uri`` or ``$MLFLOW_TRACKING_URI`` points at a server instead.

Logged:

* tags: MLflow's own (``mlflow.user``, ``mlflow.source.name``/``type``, ``mlflow.source.git.commit``,
  ``mlflow.runName``: what ``mlflow.start_run`` sets, which ``MlflowClient.create_run`` does not; a
  sweep's trials take the user and source of the sweep's parent run), the data files' md5s, seed,
  the package versions, ``run_dir``;
* params: the flattened config, only the keys the run reads (:func:`run_params`). The rule: every key,
  less (1) the keys its stage never reads (``checkpoint.UNUSED_BY_STAGE``: the whole ``pretrain.*``
  section for meta-training, with or without ``model.init``, whose checkpoint's own run holds the
  settings that made it; the meta-optimisation keys for pretraining), (2) the ``data.*`` keys its
  task source does not read (``SourceSpec.config_keys``), (3) the ``model.*`` keys its model does not
  read (the model class's ``config_keys``; the algorithm's own ``model_class`` when it has one);
* the training data as an MLflow dataset input (context ``training``; name: the source; digest:
  from the data files' md5s; source: the data's path, or the code that makes it);
* metrics in batches (every ``tracking.log_every`` steps and at each validation), and MLflow's system
  metrics (``system/*``: CPU, memory, disk, network; every ``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``
  seconds, default 10; measured free for a training run, so always on);
* artifacts at the end (config, final checkpoint, learning-curve PNG) and the pyfunc model
  (:meth:`MlflowRun.log_model`: registered as a new version of ``mtl-ray-<config name>``, the final
  step's metrics linked to the logged model).

If the tracking server cannot be reached, training goes on: the tracker says so once and stops
trying; ``metrics.jsonl`` in the run directory stays the complete local record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

from mtl_ray.atomic import atomic_write
from mtl_ray.config import Config
from mtl_ray.runtime import DropMessages
from mtl_ray.tracking.local import METRICS_FILE, read_metrics

RUN_ID_FILE = "mlflow_run_id"
PARENT_TAG = "mlflow.parentRunId"
# MLflow's own tag keys (mlflow.utils.mlflow_tags), spelled out so this module imports without MLflow.
USER_TAG, SOURCE_NAME_TAG, SOURCE_TYPE_TAG = "mlflow.user", "mlflow.source.name", "mlflow.source.type"
GIT_COMMIT_TAG, RUN_NAME_TAG = "mlflow.source.git.commit", "mlflow.runName"
SOURCE_TAGS = (USER_TAG, SOURCE_NAME_TAG, SOURCE_TYPE_TAG, GIT_COMMIT_TAG)
TRAINING_CONTEXT = "training"
# Fail fast against a dead server instead of MLflow's default minutes of retries.
_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# INFO lines MLflow prints on the main path: a new sqlite store's schema migration ("Creating initial MLflow
# database tables...", alembic's own), and the system-metrics monitor's start/stop chatter.
_QUIET_LOGGERS = ("mlflow.store.db.utils", "alembic", "mlflow.system_metrics")


def quiet_mlflow_logs() -> None:
    """Silence the INFO lines above (warnings and errors still show)."""
    for name in _QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)


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


# ---------------------------------------------------------------------------- params: the keys a run reads

def _unused_by_stage(stage: str) -> frozenset[str]:
    from mtl_ray.checkpoint import UNUSED_BY_STAGE

    return UNUSED_BY_STAGE.get(stage, frozenset())


def run_params(cfg: Config, stage: str = "meta") -> dict[str, str]:
    """The flattened config keys the run reads (the rule is in the module docstring)."""
    unused = _unused_by_stage(stage)
    from mtl_ray.algorithms.registry import ALGORITHMS
    from mtl_ray.data.registry import SOURCES
    from mtl_ray.models.registry import MODELS

    source, algorithm = SOURCES.get(cfg.data.source), ALGORITHMS.get(cfg.algorithm.name)
    model = (algorithm.model_class if algorithm is not None else None) or MODELS.get(cfg.model.name)
    data_keys = source.config_keys if source is not None else None  # the components say what they read
    model_keys = getattr(model, "config_keys", None)

    def used(key: str) -> bool:
        section, _, name = key.partition(".")
        if key in unused or f"{section}.*" in unused:
            return False
        if section == "data" and data_keys is not None:
            return name in data_keys
        if section == "model" and model_keys is not None:
            return name in model_keys
        return True

    return {k: v for k, v in flatten(cfg.to_dict()).items() if used(k)}


# ---------------------------------------------------------------------------- tags


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


def standard_tags(commit: str | None = None) -> dict[str, str]:
    """MLflow's own run tags as ``mlflow.start_run`` sets them (user, source name and type), with the git
    commit of this package's checkout (when it is one). ``MlflowClient.create_run`` sets none of them."""
    from mlflow.tracking.context.registry import resolve_tags

    tags = {k: v for k, v in resolve_tags({}).items() if k in SOURCE_TAGS}
    commit = git_commit() if commit is None else commit
    if commit != "unknown":
        tags[GIT_COMMIT_TAG] = commit
    return tags


def data_md5s(cfg: Config) -> dict[str, str]:
    """md5 of every data file the run reads (empty for synthetic sources)."""
    if cfg.data.source == "sinusoid":
        return {}
    from mtl_ray.data import load_source

    return dict(load_source(cfg).md5s)


def data_tags(cfg: Config, md5s: Mapping[str, str] | None = None) -> dict[str, str]:
    """``data.md5.<file>`` tags (empty for synthetic sources)."""
    md5s = data_md5s(cfg) if md5s is None else md5s
    return {f"data.md5.{name}": md5 for name, md5 in md5s.items()}


# ---------------------------------------------------------------------------- the training data as a dataset


def data_digest(cfg: Config, md5s: Mapping[str, str]) -> str:
    """A digest of the training data: the md5 of its files' md5s; for synthetic data (no files), of what
    makes the task stream (the source, seed, shots and queries)."""
    if md5s:
        text = "\n".join(f"{name}={md5}" for name, md5 in sorted(md5s.items()))
    else:
        d = cfg.data
        text = json.dumps({"source": d.source, "seed": cfg.seed, "shots": d.shots, "queries": d.queries},
                          sort_keys=True)
    return hashlib.md5(text.encode()).hexdigest()


def data_source_uri(cfg: Config) -> str | None:
    """Where the data files are: ``data.path`` (parquet), ``<data.root>/omniglot``; None for code-made data."""
    from mtl_ray.data.fetch import data_root

    d = cfg.data
    if d.source == "parquet" and d.path:
        p = Path(d.path).expanduser()
        return str((p if p.exists() else data_root(d.root) / p).absolute())
    if d.source == "omniglot":
        return str((data_root(d.root) / "omniglot").absolute())
    return None


def training_dataset(cfg: Config, md5s: Mapping[str, str]) -> Any:
    """The run's training data as an MLflow (meta) dataset: name = ``data.source``, digest =
    :func:`data_digest`, source = the data's path (``local``), or for sinusoid and digits the code that makes
    or bundles it (``code``)."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    # defined in mlflow.data.sources when mlflow.data is imported (a registered source), so invisible to mypy
    from mlflow.data.sources import LocalArtifactDatasetSource  # type: ignore[attr-defined]

    uri = data_source_uri(cfg)
    if uri is not None:
        source: Any = LocalArtifactDatasetSource(uri)
    else:
        code = {"sinusoid": "mtl_ray.data.sinusoid", "digits": "sklearn.datasets.load_digits"}
        source = CodeDatasetSource({"mlflow.source.name": code.get(cfg.data.source, "mtl_ray.data")})
    # MetaDataset implements Dataset.profile, but as a property over an abstract one: mypy reports it abstract
    return MetaDataset(source=source, name=cfg.data.source, digest=data_digest(cfg, md5s))  # type: ignore[abstract]


def log_training_dataset(client: Any, run_id: str, cfg: Config, md5s: Mapping[str, str]) -> None:
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    entity = training_dataset(cfg, md5s)._to_mlflow_entity()
    client.log_inputs(run_id, datasets=[DatasetInput(entity, [InputTag(MLFLOW_DATASET_CONTEXT, TRAINING_CONTEXT)])])


# ---------------------------------------------------------------------------- the store


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

    quiet_mlflow_logs()
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


# ---------------------------------------------------------------------------- the model


# At every log_model: the INFO line as MLflow checks the input example (its failures still show), and the advice
# against a pickled python_model, which does not apply: the model is this package's own class, shipped with it.
_VALIDATING = DropMessages("Validating input example against model signature",
                            "Passing a Python object as `python_model`")


def _quiet_validation_line() -> None:
    """Drop the two lines above from the ``mlflow.pyfunc`` logger (nothing else)."""
    logger = logging.getLogger("mlflow.pyfunc")
    if _VALIDATING not in logger.filters:
        logger.addFilter(_VALIDATING)


def registered_model_name(cfg: Config) -> str:
    """``mtl-ray-<config name>``: the registered model a run's pyfunc model becomes a version of."""
    return "mtl-ray-" + (re.sub(r"[^A-Za-z0-9_.-]+", "-", cfg.name).strip("-") or "run")


def final_step(run_dir: str | Path) -> int:
    """The last step in ``metrics.jsonl`` (0 without records)."""
    rows = read_metrics(run_dir)
    return int(rows[-1]["step"]) if rows else 0


def log_run_model(uri: str, run_id: str, checkpoint: str, *, step: int, name: str | None) -> Any:
    """Log ``checkpoint`` as run ``run_id``'s pyfunc few-shot model at ``step`` (MLflow links the run's metrics
    at that step to the logged model) and, when ``name`` is given, register it as a new version of ``name``.
    Returns MLflow's ``ModelInfo`` (``registered_model_version`` set when registered)."""
    import mlflow

    from mtl_ray.serving import log_fewshot_model

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keeps job logs readable
    _quiet_validation_line()
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    env = os.environ.get("MLFLOW_TRACKING_URI")  # set_tracking_uri writes it too: this process's later runs read it
    mlflow.set_tracking_uri(uri)
    try:
        return log_fewshot_model(checkpoint, run_id=run_id, step=step, registered_model_name=name)
    finally:
        if previous is not None:
            mlflow.set_tracking_uri(previous)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


# ---------------------------------------------------------------------------- the run


class MlflowRun:
    """A training run's MLflow run, used as a trainer callback; inert after the first failure.

    ``run_dir/mlflow_run_id`` remembers the run, so ``--resume`` (or a restarted Tune trial) keeps
    logging into the same MLflow run. ``stage`` ("meta", "pretrain"; default: ``tags["stage"]``, else
    "meta") chooses the params logged (:func:`run_params`). ``system_metrics`` (default on) samples
    CPU/memory/disk/network into ``system/*`` while the run is open, unless another process already holds
    the run open (e.g. pretraining's Ray Train controller logging into the driver's run).
    """

    def __init__(self, cfg: Config, run_dir: str | Path, *, resume: bool = False, parent_run_id: str | None = None,
                 tags: Mapping[str, str] | None = None, every: int | None = None, out: TextIO | None = None,
                 stage: str | None = None, run_name: str | None = None, system_metrics: bool = True):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.out = out or sys.stderr
        self.uri = tracking_uri(cfg, run_dir)
        self.client: Any = None
        self.run_id: str | None = None
        self.parent_run_id = parent_run_id
        self.failed: str | None = None
        self.stage = stage or dict(tags or {}).get("stage", "meta")
        self._monitor: Any = None
        self.registered_name: str | None = None  # what log_model registered the model as
        self._buffer: list[Any] = []
        self._every = max(cfg.tracking.log_every if every is None else every, 1)  # flush every N steps
        problem = reachable(self.uri)
        if problem:
            self._fail(problem)
            return
        self.guard(lambda: self._start(resume, parent_run_id, dict(tags or {}), run_name, system_metrics))

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
    def _start(self, resume: bool, parent_run_id: str | None, tags: dict[str, str], run_name: str | None,
               system_metrics: bool) -> None:
        from mlflow.entities import Param

        self.client, exp_id = ensure_experiment(self.cfg, self.run_dir)
        id_file = self.run_dir / RUN_ID_FILE
        if resume and id_file.is_file():
            self.run_id = id_file.read_text().strip()
            run = self.client.get_run(self.run_id)
            self.parent_run_id = run.data.tags.get(PARENT_TAG, parent_run_id)
            held = run.info.status == "RUNNING"  # another process of this run has it open and samples the system
            self.client.update_run(self.run_id, status="RUNNING")
            if system_metrics and not held:
                self._start_system_metrics(resume=True)
            return
        md5s = data_md5s(self.cfg)
        commit = git_commit()
        source = standard_tags(commit)
        if parent_run_id:  # a trial: its process is a Ray worker; the sweep's run says who started it, and how
            parent = self.client.get_run(parent_run_id).data.tags
            source.update({k: parent[k] for k in SOURCE_TAGS if k in parent})
        all_tags = {**source, "seed": str(self.cfg.seed), "git.commit": commit, "run_dir": str(self.run_dir),
                    "algorithm": self.cfg.algorithm.name, "data.source": self.cfg.data.source,
                    **version_tags(), **data_tags(self.cfg, md5s), **tags}
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        run = self.client.create_run(exp_id, run_name=run_name or self.run_dir.name,
                                     tags={k: str(v) for k, v in all_tags.items()})
        self.run_id = run.info.run_id
        atomic_write(id_file, self.run_id)
        params = [Param(k, v) for k, v in run_params(self.cfg, self.stage).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        log_training_dataset(self.client, self.run_id, self.cfg, md5s)
        if system_metrics:
            self._start_system_metrics(resume=False)

    def _start_system_metrics(self, *, resume: bool) -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            quiet_mlflow_logs()
            self._monitor = SystemMetricsMonitor(self.run_id, resume_logging=resume, tracking_uri=self.uri)
            self._monitor.start()
        except Exception as e:  # e.g. psutil missing: the run is tracked all the same
            print(f"warning: MLflow system metrics are off for this run ({e.__class__.__name__}: {e})",
                  file=self.out, flush=True)

    def _stop_system_metrics(self) -> None:
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            self.guard(monitor.finish)

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

    def log_model(self, checkpoint: str | None, *, step: int | None = None, register: bool | None = None,
                  name: str | None = None) -> Any:
        """Log ``checkpoint`` as the run's pyfunc few-shot model (:func:`mtl_ray.serving.log_fewshot_model`),
        the metrics of ``step`` (default: the last in ``metrics.jsonl``) linked to it, and register it as a new
        version of ``name`` (default :func:`registered_model_name`). ``register`` None: register unless the run
        is a sweep's trial (the sweep registers its best trial's model). Returns the ``ModelInfo`` (None when
        skipped: no run, no local checkpoint, or tracking failed)."""
        run_id = self.run_id
        if not checkpoint or "://" in checkpoint or run_id is None or self.failed is not None:
            return None
        self.flush()
        self._stop_system_metrics()  # what follows is bookkeeping, not training
        register = self.parent_run_id is None if register is None else register
        reg_name = (name or registered_model_name(self.cfg)) if register else None
        self.registered_name = reg_name
        at = final_step(self.run_dir) if step is None else step
        return self.guard(lambda: log_run_model(self.uri, run_id, checkpoint, step=at, name=reg_name))

    def serve_command(self, info: Any, port: int = 5001) -> str | None:
        """The shell command that serves ``info``'s registered version (None when it was not registered)."""
        version = getattr(info, "registered_model_version", None)
        if not version:
            return None
        from mtl_ray.serving import serve_command

        return serve_command(self.registered_name or registered_model_name(self.cfg), version, self.uri, port=port)

    def finish(self, *, status: str = "FINISHED", checkpoint: str | None = None) -> None:
        """Flush metrics, log the config, the final checkpoint and a learning curve, close the run."""
        if self.run_id is None:
            return
        self.flush()
        self._stop_system_metrics()
        config = self.run_dir / "config.yaml"
        if config.is_file():
            self.log_artifact(config)
        if checkpoint and "://" not in checkpoint and Path(checkpoint).is_file():
            self.log_artifact(checkpoint, "checkpoints")
        curve = learning_curve(self.run_dir)
        if curve is not None:
            self.log_artifact(curve)
        self.guard(lambda: self.client.set_terminated(self.run_id, status=status))


def learning_curve(run_dir: Path, until: int | None = None) -> Path | None:
    """``run_dir/learning_curve.png``: meta-train and meta-val loss (and accuracy) against step (to ``until``)."""
    rows = [r for r in read_metrics(run_dir) if until is None or r["step"] <= until]
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
