"""The meta-training recipe: check -> place workers -> records -> fit -> final records -> model.

The shared body of ``mtl-ray train``, ``jobs/meta_train.py`` and every Ray Tune trial. Its records:
``config.yaml`` and ``metrics.jsonl`` in the run directory, a progress display, an MLflow run (a
child of the sweep's parent run for a trial) holding the trained learner as a pyfunc model, then the
final summary. docs/runs.md describes the run directory; docs/architecture.md the layers.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TextIO

from mtl_ray.checkpoint import META_STAGE, check_init
from mtl_ray.config import REDUCE_COLLECTIVE, Config, ConfigError
from mtl_ray.distributed.driver import Callback, MetaTrainer, Summary
from mtl_ray.tracking.local import JsonlMetrics, Progress
from mtl_ray.tracking.mlflow_run import MlflowRun
from mtl_ray.tracking.rundir import RunPlan, begin_run, prepare_run


def check_config(cfg: Config) -> Config:
    """The checks that need the data and ``model.init``; raise one ConfigError with every problem."""
    from mtl_ray.data import check_data
    from mtl_ray.memory import memory_problems

    memory = memory_problems(cfg)  # first: the data checks load the data at these sizes, which may not fit either
    problems = (memory or check_data(cfg)) + check_init(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def train(cfg: Config, run_dir: Path, *, resume: bool = False, overwrite: bool = False,
          callbacks: Sequence[Callback] = (), parent_run_id: str | None = None,
          trainer_hook: Callable[[MetaTrainer], Sequence[Callback]] | None = None, model: bool = True,
          resume_command: str | None = None, out: TextIO | None = None) -> Summary:
    """Meta-train ``cfg`` into ``run_dir`` (resuming from its latest checkpoint when ``resume``).

    A ``run_dir`` that holds an earlier run is refused unless ``resume`` continues it or ``overwrite``
    replaces it (:mod:`mtl_ray.tracking.rundir`); every check runs before anything is written.
    ``callbacks`` (and those ``trainer_hook`` builds from the trainer, e.g. Tune's reporter) get every step's
    metrics after the local records are written. ``model`` logs the trained learner into the MLflow run and
    registers it as a new version of ``mtl-ray-<config name>`` (:meth:`MlflowRun.log_model`; a sweep's trials
    leave registering to the sweep), and the closing lines say how to serve it.
    ``resume_command`` is what the closing lines tell a run that stopped at ``optim.max_minutes`` to run next.
    """
    import torch

    from mtl_ray.data.registry import with_channel_stats

    out = sys.stdout if out is None else out  # looked up per call: the stdout of the moment (captured, redirected)
    cfg = with_channel_stats(cfg)  # the normalisation it trains with, recorded in config.yaml and every checkpoint
    plan = prepare_run(cfg, run_dir, resume=resume, overwrite=overwrite, stage=META_STAGE)
    if cfg.scaling.reduce == REDUCE_COLLECTIVE:  # the loop runs on a Ray Train worker group, not here
        if trainer_hook is not None or callbacks:
            raise ConfigError(["scaling.reduce: got 'collective' in a run that reports each step to its caller "
                               "(a Tune trial), expected flat or node; the collective loop runs on its workers"])
        return _train_collective(cfg, run_dir, plan, resume=resume, parent_run_id=parent_run_id, model=model,
                                 resume_command=resume_command, out=out)
    if cfg.scaling.torch_threads:
        torch.set_num_threads(cfg.scaling.torch_threads)
    # The workers are placed (and a resume point read) before the first write: a placement failure leaves the run
    # directory as it was, so the same command can simply be run again.
    trainer = MetaTrainer.create(cfg, run_dir, resume=resume)
    try:
        begin_run(cfg, plan, out)
    except BaseException:
        trainer.close()
        raise
    log = JsonlMetrics(run_dir, resume_step=trainer.step)
    progress = Progress(cfg.optim.steps, trainer.step, every=cfg.tracking.log_every, enabled=cfg.tracking.progress,
                        max_minutes=cfg.optim.max_minutes)
    tracker = MlflowRun(cfg, run_dir, resume=resume, parent_run_id=parent_run_id) if cfg.tracking.mlflow else None
    trainer.callbacks += [log, progress, *([tracker] if tracker else []), *callbacks,
                          *(trainer_hook(trainer) if trainer_hook else [])]
    print(f"run dir: {run_dir}  (start at step {trainer.step}/{cfg.optim.steps}, "
          f"{cfg.algorithm.name} on {cfg.data.source}, {cfg.scaling.num_workers} worker(s))", file=out, flush=True)
    if tracker is not None and tracker.run_id:
        print(f"mlflow: run {tracker.run_id} in experiment {cfg.tracking.experiment!r} at {tracker.uri}",
              file=out, flush=True)
    status = "FAILED"
    try:
        summary = trainer.fit()
        status = "FINISHED"
    finally:
        progress.close()
        log.close()
        trainer.close()
        if tracker is not None and status == "FAILED":
            tracker.finish(status=status)
    serve = None
    if tracker is not None:  # the model first: logging it reopens the run, so it must not follow finish()
        info = tracker.log_model(summary.checkpoint) if model else None
        tracker.finish(status=status, checkpoint=summary.checkpoint)
        serve = tracker.serve_command(info)
    _closing_lines(cfg, summary, serve, resume_command, out)
    return summary


def _closing_lines(cfg: Config, summary: Summary, serve: str | None, resume_command: str | None,
                   out: TextIO) -> None:
    for line in summary.lines():
        print(line, file=out, flush=True)
    if serve:
        print(f"serve it: {serve}", file=out, flush=True)
    if summary.budget_reached:
        then = f"; continue with: {resume_command}" if resume_command else " (continue it with --resume)"
        print(f"budget reached at step {summary.step}/{cfg.optim.steps} (optim.max_minutes={cfg.optim.max_minutes:g})"
              f"{then}", file=out, flush=True)


def _collective_records(cfg: Config, run_dir: str, mlflow: bool, start_step: int) -> list[Callback]:
    """Built on the Ray Train controller: metrics.jsonl, progress lines and the driver's MLflow run."""
    records: list[Callback] = [JsonlMetrics(run_dir, resume_step=start_step),
                               Progress(cfg.optim.steps, start_step, every=cfg.tracking.log_every,
                                        enabled=cfg.tracking.progress, max_minutes=cfg.optim.max_minutes)]
    if mlflow:
        records.append(MlflowRun(cfg, run_dir, resume=True))
    return records


def _train_collective(cfg: Config, run_dir: Path, plan: RunPlan, *, resume: bool, parent_run_id: str | None,
                      model: bool, resume_command: str | None, out: TextIO) -> Summary:
    """``scaling.reduce=collective``: the same records as any run, written from the Ray Train controller
    (mtl_ray/distributed/collective.py)."""
    from mtl_ray.distributed.collective import run_collective

    begin_run(cfg, plan, out)
    tracker = MlflowRun(cfg, run_dir, resume=resume, parent_run_id=parent_run_id) if cfg.tracking.mlflow else None
    s = cfg.scaling
    print(f"run dir: {run_dir}  (start at step {plan.step}/{cfg.optim.steps}, {cfg.algorithm.name} on "
          f"{cfg.data.source}, {s.num_workers} replica(s) all-reducing, scaling.reduce=collective)", file=out,
          flush=True)
    if tracker is not None and tracker.run_id:
        print(f"mlflow: run {tracker.run_id} in experiment {cfg.tracking.experiment!r} at {tracker.uri}",
              file=out, flush=True)
    records = partial(_collective_records, cfg, str(run_dir), bool(tracker and tracker.run_id))
    status, summary = "FAILED", None
    try:
        summary = run_collective(cfg, run_dir, resume=resume, make_callbacks=records)
        status = "FINISHED"
    finally:
        if tracker is not None and summary is None:
            tracker.finish(status=status)
    serve = None
    if tracker is not None:
        info = tracker.log_model(summary.checkpoint) if model else None
        tracker.finish(status=status, checkpoint=summary.checkpoint)
        serve = tracker.serve_command(info)
    _closing_lines(cfg, summary, serve, resume_command, out)
    return summary
