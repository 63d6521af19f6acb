"""Hyperparameter sweeps: every trial is a full meta-training run with its own Ray worker actors.

Each trial reserves a placement group of ``[trial process] + num_workers x [worker]`` bundles, so its
actors are scheduled inside the trial's reservation and concurrent trials never oversubscribe the
cluster. A trial reports its meta-validation metrics with a checkpoint at every validation; ASHA
stops weak trials early; a failed trial restarts from its last checkpoint (``max_failures``); an
interrupted sweep continues with ``--resume`` (``Tuner.restore``). The sweep is an MLflow parent run
whose children are the trials; at the end it holds the trial table and the best config, and the best
trial's model is registered (``mtl-ray-<config name>``).

A trial's MLflow run is named after its hyperparameters (``trial 3: inner_lr=0.4 outer_lr=0.001``) and
ends with its learning curve, checkpoint and pyfunc model. Its last report to Tune is sent only after
the run is closed: Tune stops a trial (ASHA at ``max_t``, or any scheduler) as soon as it has the
result, which used to kill it before its model was logged. A trial that ASHA stopped early is killed
by Tune mid-run; the driver closes its run afterwards as FINISHED, tagged ``tune.stopped_early=true``,
with the checkpoint and model of its last reported validation. A trial that failed (after
``max_failures`` restarts) is FAILED.

Tune's own output keeps its trial table (the sweep's metric first among the result columns) and
drops its TensorBoard hint (no TensorBoard files are written; MLflow holds the curves) and the
"Checkpoint successfully created" line of every report.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from mtl_ray.atomic import atomic_write
from mtl_ray.checkpoint import latest_checkpoint
from mtl_ray.config import Config
from mtl_ray.distributed.driver import MetaTrainer
from mtl_ray.ray_session import connect
from mtl_ray.recipes.train import train as run_training
from mtl_ray.runtime import DropMessages
from mtl_ray.tracking.mlflow_run import (
    RUN_ID_FILE,
    ensure_experiment,
    git_commit,
    learning_curve,
    log_run_model,
    registered_model_name,
    standard_tags,
    tracking_uri,
    version_tags,
)
from mtl_ray.tune.spec import SweepSpec, to_tune_space, trial_config

BEST_CONFIG = "best_config.yaml"
TRIALS_CSV = "trials.csv"


@dataclass(frozen=True)
class TrialRow:
    trial_id: str
    params: dict[str, Any]
    best: float | None
    steps: int
    status: str
    run_dir: str
    resumed_from_step: int = 0  # the step a restarted trial continued from (0: never restarted)


@dataclass(frozen=True)
class SweepResult:
    rows: list[TrialRow]
    best_config_path: Path
    best_checkpoint: str | None
    best_trial: str
    best_metric: float
    sweep_dir: Path


# ---------------------------------------------------------------------------- inside a trial


def trial_run_config(spec: SweepSpec, params: Mapping[str, Any], sweep_dir: Path) -> Config:
    """A trial's training config: sampled values applied; checkpoints at every validation; MLflow
    in the sweep's store (beside the sweep directory, like any run's)."""
    cfg = trial_config(spec, params)
    return cfg.replace(**{"tracking.checkpoint_every": cfg.optim.val_every, "tracking.progress": False,
                          "tracking.uri": tracking_uri(spec.base, sweep_dir), "tracking.checkpoint_uri": ""})


def trial_run_name(trial_id: str, params: Mapping[str, Any]) -> str:
    """``trial 3: inner_lr=0.4 outer_lr=0.001``: the trial's number (from Tune's ``<experiment>_<number>`` id;
    a search algorithm's own ids, e.g. Optuna's ``8eb741bc``, as they are) and its sampled values, each under the
    last part of its key."""
    number = trial_id.rsplit("_", 1)[-1]
    number = str(int(number)) if number.isdigit() else trial_id
    values = " ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(_plain_value(v))}" for k, v in params.items())
    return f"trial {number}: {values}".strip()


def _plain_value(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def _report_order(metric: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The sweep's metric first, then the other meta-validation metrics, then the rest: Tune's trial table shows
    the first few result keys."""
    first = [metric, *sorted(k for k in metrics if k.startswith("meta_val/") and k != metric)]
    return {**{k: metrics[k] for k in first if k in metrics}, **metrics}


class _Reporter:
    """Reports each meta-validation (and its checkpoint) to Tune: one Tune iteration per validation.

    The run's last validation is held back (:attr:`final`): Tune stops the trial when it gets it, so
    :func:`train_trial` sends it once the run has logged its model and closed.
    """

    def __init__(self, trainer: MetaTrainer, metric: str):
        self.trainer = trainer
        self.metric = metric
        self.start_step = trainer.step  # > 0 when this trial was restored from a checkpoint
        self.final: tuple[dict[str, Any], str | None] | None = None

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if not any(k.startswith("meta_val/") for k in metrics):
            return
        ckpt = self.trainer.last_checkpoint
        report = _report_order(self.metric, {**metrics, "step": step, "resumed_from_step": self.start_step})
        ckpt = ckpt if ckpt is not None and ckpt.endswith(f"step_{step:08d}.pt") else None
        o = self.trainer.cfg.optim
        if step >= o.steps or step % o.val_every:  # the last validation (off schedule: the time budget ended it)
            self.final = (report, ckpt)
            return
        send(report, ckpt)


def send(report: dict[str, Any], ckpt: str | None) -> None:
    """``tune.report`` with a copy of ``ckpt`` as the Tune checkpoint (Tune moves it into the sweep's storage)."""
    from ray import tune

    if ckpt is None:
        tune.report(report)
        return
    with tempfile.TemporaryDirectory() as d:
        shutil.copy2(ckpt, Path(d) / Path(ckpt).name)
        tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))


_CHECKPOINT_LINE = DropMessages("Checkpoint successfully created at")


def _quiet_trial() -> None:
    """Ray's INFO line at every reported checkpoint, forwarded from each trial to the driver's console."""
    for name in ("ray.train._internal.storage", "ray.train.v2._internal.execution.storage"):
        logger = logging.getLogger(name)
        if _CHECKPOINT_LINE not in logger.filters:
            logger.addFilter(_CHECKPOINT_LINE)


def _name_trial_run(run_dir: Path, cfg: Config, trial_id: str, params: Mapping[str, Any], spec: SweepSpec) -> None:
    """Name the trial's MLflow run (just opened by the training recipe) after its hyperparameters."""
    id_file = run_dir / RUN_ID_FILE
    if not cfg.tracking.mlflow or not id_file.is_file():
        return
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri(cfg, run_dir))
        run_id = id_file.read_text().strip()
        client.update_run(run_id, name=trial_run_name(trial_id, {k: params[k] for k in spec.space if k in params}))
        client.set_tag(run_id, "tune.trial_id", trial_id)
    except Exception as e:  # tracking never stops a trial
        print(f"warning: could not name the trial's MLflow run ({e.__class__.__name__}: {e})", file=sys.stderr)


def train_trial(params: dict[str, Any], *, spec: SweepSpec, sweep_dir: str, parent_run_id: str | None) -> None:
    """The Tune function trainable: one meta-training run, resumed from Tune's checkpoint after a failure."""
    from ray import tune

    _quiet_trial()
    sweep = Path(sweep_dir)
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    run_dir = sweep / "trials" / trial_id
    cfg = trial_run_config(spec, params, sweep)
    restored = tune.get_checkpoint()
    resume = False
    if restored is not None:
        # Tune's checkpoint is the truth: the killed attempt may have written newer local checkpoints
        # whose results Tune never received. Resuming from those would skip the reports Tune waits for.
        ckdir = run_dir / "checkpoints"
        ckdir.mkdir(parents=True, exist_ok=True)
        with restored.as_directory() as d:
            src = max(Path(d).glob("step_*.pt"))  # step_XXXXXXXX.pt: zero-padded, so names sort by step
            for stale in ckdir.glob("step_*.pt"):
                if stale.name > src.name:
                    stale.unlink()
            if not (ckdir / src.name).exists():
                shutil.copy2(src, ckdir / src.name)
        resume = True
    reporters: list[_Reporter] = []

    def hook(trainer: MetaTrainer) -> list[_Reporter]:  # called once the trial's MLflow run is open
        _name_trial_run(run_dir, cfg, trial_id, params, spec)
        reporters.append(_Reporter(trainer, spec.metric))
        return reporters

    # The trial directory is Tune's: a retry without a checkpoint replaces what the failed attempt wrote.
    run_training(cfg, run_dir, resume=resume, overwrite=not resume, parent_run_id=parent_run_id,
                 trainer_hook=hook, out=sys.stdout)
    if reporters and reporters[0].final is not None:  # the run is closed, its model logged: now Tune may stop it
        send(*reporters[0].final)


# ---------------------------------------------------------------------------- the driver


def _bundles(spec: SweepSpec) -> list[dict[str, float]]:
    s = spec.base.scaling
    head = {"CPU": spec.trial_cpus}
    if s.num_workers == 0:  # the trial trains in its own process
        return [{"CPU": max(spec.trial_cpus, 1.0), **({"GPU": s.gpus_per_worker} if s.gpus_per_worker else {})}]
    worker = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.gpus_per_worker else {})}
    return [head] + [worker] * s.num_workers


def _parent_run(spec: SweepSpec, sweep_dir: Path, resume: bool) -> tuple[Any, str | None]:
    """The sweep's MLflow parent run (created once, before any trial: no sqlite migration race)."""
    cfg = spec.base
    if not cfg.tracking.mlflow:
        return None, None
    try:
        client, exp_id = ensure_experiment(cfg, sweep_dir)
        id_file = sweep_dir / RUN_ID_FILE
        if resume and id_file.is_file():
            run_id = id_file.read_text().strip()
            client.update_run(run_id, status="RUNNING")
            return client, run_id
        commit = git_commit()
        tags = {**standard_tags(commit), "sweep": spec.name, "sweep.source": spec.source, "git.commit": commit,
                **version_tags()}
        run = client.create_run(exp_id, run_name=sweep_dir.name, tags=tags)
        atomic_write(id_file, run.info.run_id)
        from mlflow.entities import Param

        params = [Param(f"space.{k}", f"{d.kind}{list(d.values)}") for k, d in spec.space.items()]
        params += [Param(k, str(v)) for k, v in (("metric", spec.metric), ("mode", spec.mode),
                                                   ("search", spec.search), ("num_samples", spec.num_samples),
                                                   ("scheduler", spec.scheduler))]
        client.log_batch(run.info.run_id, params=params)
        return client, run.info.run_id
    except Exception as e:  # tracking never stops a sweep
        print(f"warning: MLflow tracking at {tracking_uri(cfg, sweep_dir)} is unavailable "
              f"({e.__class__.__name__}: {e}); the sweep continues without it", file=sys.stderr)
        return None, None


def resume_problem(sweep_dir: Path) -> str | None:
    """Why ``--resume`` cannot continue the sweep in ``sweep_dir`` (None when Tune can restore it): without this a
    resume of a mistyped directory started a new sweep there."""
    from ray import tune

    tune_dir = sweep_dir.absolute() / "tune"
    if tune.Tuner.can_restore(str(tune_dir)):
        return None
    what = ("does not exist" if not sweep_dir.exists() else
            f"holds no sweep to resume (no Tune experiment state in {tune_dir})")
    return (f"--resume: got --sweep-dir {str(sweep_dir)!r}, which {what}; expected the directory of an earlier sweep "
            "(the `mtl-ray tune` that started it printed it); drop --resume to start a new sweep")


def run_sweep(spec: SweepSpec, sweep_dir: Path, *, resume: bool = False, out: TextIO = sys.stdout) -> SweepResult:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    sweep_dir = sweep_dir.absolute()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    bundles = _bundles(spec)
    connect(spec.base, min_cpus=sum(b["CPU"] for b in bundles))  # a local Ray fits at least one trial
    client, parent_id = _parent_run(spec, sweep_dir, resume)
    trainable = tune.with_resources(
        tune.with_parameters(train_trial, spec=spec, sweep_dir=str(sweep_dir), parent_run_id=parent_id),
        tune.PlacementGroupFactory(bundles))
    tune_dir = sweep_dir / "tune"
    if resume and tune.Tuner.can_restore(str(tune_dir)):
        print(f"resuming sweep from {tune_dir}", file=out, flush=True)
        tuner = tune.Tuner.restore(str(tune_dir), trainable, resume_unfinished=True, resume_errored=True)
    else:
        if spec.scheduler == "asha":
            scheduler: Any = ASHAScheduler(time_attr="training_iteration", max_t=spec.rounds,
                                           grace_period=min(spec.grace_period, spec.rounds),
                                           reduction_factor=spec.reduction_factor)
        else:
            scheduler = FIFOScheduler()
        search_alg = None
        if spec.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            search_alg = OptunaSearch(seed=spec.base.seed)
        tuner = tune.Tuner(
            trainable, param_space=to_tune_space(spec),
            tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
                                        search_alg=search_alg, scheduler=scheduler,
                                        max_concurrent_trials=spec.max_concurrent_trials or None),
            run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir), verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                      callbacks=_result_loggers()))
    grid = _fit_without_tensorboard(tuner)
    result = summarize(spec, grid, sweep_dir)
    serve = _finish_parent(client, parent_id, spec, result)
    for line in table_lines(spec, result):
        print(line, file=out)
    print(f"best config: {result.best_config_path}\nbest checkpoint: {result.best_checkpoint}", file=out, flush=True)
    if serve:
        print(f"serve the best model: {serve}", file=out, flush=True)
    return result


def _result_loggers() -> list[Any]:
    """The result files Tune's results are read back from (CSV and JSON); not its TensorBoard logger."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    return [CSVLoggerCallback(), JsonLoggerCallback()]


def _fit_without_tensorboard(tuner: Any) -> Any:
    """``tuner.fit()`` without Tune's automatic loggers (the run config names the CSV and JSON ones): with its
    TensorBoard logger Tune also prints a ``tensorboard --logdir`` hint nobody here needs (MLflow has the
    curves). Tune reads the switch from the environment when the fit starts; it is restored afterwards."""
    key = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        return tuner.fit()
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


# ---------------------------------------------------------------------------- results


def summarize(spec: SweepSpec, grid: Any, sweep_dir: Path) -> SweepResult:
    sign = 1.0 if spec.mode == "max" else -1.0
    rows: list[TrialRow] = []
    for r in grid:
        df = r.metrics_dataframe
        history = [] if df is None or spec.metric not in df else [float(v) for v in df[spec.metric].dropna()]
        best = max(history, key=lambda v: sign * v) if history else None
        trial_id = str((r.metrics or {}).get("trial_id") or Path(r.path).name)
        status = "ERROR" if r.error else ("STOPPED" if r.metrics and r.metrics.get("step", 0) < spec.base.optim.steps
                                          else "DONE")
        rows.append(TrialRow(trial_id=trial_id, params={k: r.config.get(k) for k in spec.space}, best=best,
                             steps=int((r.metrics or {}).get("step", 0)), status=status,
                             run_dir=str(sweep_dir / "trials" / trial_id),
                             resumed_from_step=int((r.metrics or {}).get("resumed_from_step", 0))))
    scored = [row for row in rows if row.best is not None and math.isfinite(row.best)]
    if not scored:
        errors = [f"{r.trial_id}: {r.status}" for r in rows]
        raise RuntimeError(f"sweep {spec.name}: no trial reported {spec.metric} ({errors}); see the trial logs "
                           f"under {sweep_dir / 'tune'}")
    best_row = max(scored, key=lambda row: sign * row.best)  # type: ignore[operator]
    best_value = best_row.best
    assert best_value is not None  # scored rows have one
    best_cfg = trial_config(spec, best_row.params)
    text = (f"# best of sweep {spec.name} ({spec.metric} {spec.mode} = {best_row.best:.4f}, trial "
            f"{best_row.trial_id}); train it with: mtl-ray train {BEST_CONFIG}\n"
            + yaml.safe_dump(best_cfg.to_dict(), sort_keys=False))
    best_path = atomic_write(sweep_dir / BEST_CONFIG, text)
    best_ckpt = latest_checkpoint(best_row.run_dir)
    result = SweepResult(rows=rows, best_config_path=best_path, best_checkpoint=best_ckpt,
                         best_trial=best_row.trial_id, best_metric=float(best_value), sweep_dir=sweep_dir)
    atomic_write(sweep_dir / TRIALS_CSV, trials_csv(spec, rows))
    return result


def trials_csv(spec: SweepSpec, rows: Sequence[TrialRow]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial_id", *spec.space, f"best {spec.metric}", "steps", "status"])
    for r in rows:
        w.writerow([r.trial_id, *(r.params[k] for k in spec.space), "" if r.best is None else f"{r.best:.6g}",
                    r.steps, r.status])
    return buf.getvalue()


def table_lines(spec: SweepSpec, result: SweepResult) -> list[str]:
    keys = list(spec.space)
    head = ["trial", *keys, f"best {spec.metric}", "steps", "status"]
    body = [[r.trial_id, *(_fmt(r.params[k]) for k in keys), "-" if r.best is None else f"{r.best:.4f}",
             str(r.steps), r.status] for r in result.rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return [line(head), *(line(b) for b in body)]


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _finish_parent(client: Any, parent_id: str | None, spec: SweepSpec, result: SweepResult) -> str | None:
    """Close the sweep's run and its trials' runs, register the best model; return the command serving it."""
    if client is None or parent_id is None:
        return None
    try:
        from mlflow.entities import Metric

        client.log_artifact(parent_id, str(result.best_config_path))
        client.log_artifact(parent_id, str(result.sweep_dir / TRIALS_CSV))
        client.log_batch(parent_id, metrics=[Metric(f"best_{spec.metric}", result.best_metric, 0, 0)])
        client.set_tag(parent_id, "best_trial", result.best_trial)
        client.set_tag(parent_id, "best_checkpoint", str(result.best_checkpoint))
        uri = tracking_uri(spec.base, result.sweep_dir)
        for row in result.rows:
            close_trial_run(client, uri, spec, row)
        version = register_best(client, uri, spec, result, parent_id)
        client.set_terminated(parent_id, status="FINISHED")
    except Exception as e:
        print(f"warning: could not finish the sweep's MLflow run ({e.__class__.__name__}: {e})", file=sys.stderr)
        return None
    if version is None:
        return None
    from mtl_ray.serving import serve_command

    return serve_command(version.name, version.version, uri)


STOPPED_EARLY_TAG = "tune.stopped_early"


def close_trial_run(client: Any, uri: str, spec: SweepSpec, row: TrialRow) -> str | None:
    """Close a trial's MLflow run the trial could not close itself; return its final status (None: no run).

    A run the trial closed (FINISHED) is left as it is. A trial that errored is FAILED. Any other (Tune stopped
    it before its run ended: ASHA stopping it early) is FINISHED with its config, the checkpoint and learning
    curve up to its last reported step, and the pyfunc model of that checkpoint; ``tune.stopped_early=true``
    when it stopped before ``optim.steps``.
    """
    id_file = Path(row.run_dir) / RUN_ID_FILE
    if not id_file.is_file():
        return None
    run_id = id_file.read_text().strip()
    run = client.get_run(run_id)
    if run.info.status == "FINISHED":
        return "FINISHED"
    if row.status == "ERROR":
        client.set_terminated(run_id, status="FAILED")
        return "FAILED"
    run_dir = Path(row.run_dir)
    early = row.steps < spec.base.optim.steps
    client.set_tag(run_id, STOPPED_EARLY_TAG, str(early).lower())
    if early:
        client.set_tag(run_id, "tune.stopped_by", spec.scheduler)
    at_step = run_dir / "checkpoints" / f"step_{row.steps:08d}.pt"
    ckpt = str(at_step) if at_step.is_file() else latest_checkpoint(run_dir)
    if (run_dir / "config.yaml").is_file():
        client.log_artifact(run_id, str(run_dir / "config.yaml"))
    if ckpt and "://" not in ckpt:
        client.log_artifact(run_id, ckpt, "checkpoints")
    curve = learning_curve(run_dir, until=row.steps)
    if curve is not None:
        client.log_artifact(run_id, str(curve))
    if ckpt and "://" not in ckpt and not (run.outputs and run.outputs.model_outputs):
        log_run_model(uri, run_id, ckpt, step=row.steps, name=None)  # also ends the run (FINISHED)
    client.set_terminated(run_id, status="FINISHED")
    return "FINISHED"


def register_best(client: Any, uri: str, spec: SweepSpec, result: SweepResult, parent_id: str) -> Any:
    """Register the best trial's logged model as a new version of ``mtl-ray-<config name>`` (None when it has
    none); the parent run's ``best_model`` tag names the version."""
    best = next(r for r in result.rows if r.trial_id == result.best_trial)
    id_file = Path(best.run_dir) / RUN_ID_FILE
    if not id_file.is_file():
        return None
    run_id = id_file.read_text().strip()
    outputs = client.get_run(run_id).outputs
    if not (outputs and outputs.model_outputs):
        return None
    model_id = outputs.model_outputs[-1].model_id
    name = registered_model_name(spec.base)
    with contextlib.suppress(Exception):  # it exists already
        client.create_registered_model(name)
    source = client.get_logged_model(model_id).artifact_location
    version = client.create_model_version(name, source, run_id=run_id, model_id=model_id,
                                          tags={"sweep": spec.name, "trial": best.trial_id})
    client.set_tag(parent_id, "best_model", f"models:/{name}/{version.version}")
    return version


def sweep(sweep_path: str, overrides: Sequence[str] = (), sweep_dir: str | None = None, *, resume: bool = False,
          out: Any = None) -> SweepResult:
    """``mtl-ray tune`` / ``jobs/tune.py``: check the sweep (base config, every value of its space, the data)
    before Ray starts, then run it into ``sweep_dir`` (default ``<base tracking.run_dir>/<sweep>-<time>``)."""
    import time

    from mtl_ray.config import ConfigError
    from mtl_ray.tune.spec import check_sweep, load_sweep

    spec = load_sweep(sweep_path, list(overrides))
    problems = check_sweep(spec)
    if problems:
        raise ConfigError(problems)
    if resume and not sweep_dir:
        raise ConfigError(["--resume: got no sweep to resume; expected --sweep-dir DIR of an earlier sweep"])
    if resume and sweep_dir and (problem := resume_problem(Path(sweep_dir))):
        raise ConfigError([problem])
    path = (Path(sweep_dir) if sweep_dir else
            Path(spec.base.tracking.run_dir) / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}").absolute()
    return run_sweep(spec, path, resume=resume, out=sys.stdout if out is None else out)
