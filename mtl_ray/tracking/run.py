"""One training run with its records: the shared body of ``mtl-ray train``, the job and Tune trials,
and of ``mtl-ray pretrain`` and its job.

config.yaml and metrics.jsonl in the run directory, a progress display, an MLflow run (child of a
sweep's parent run for a trial), then the final summary. Extra callbacks (e.g. Tune's reporter) get
every step's metrics after the local records are written.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from mtl_ray.config import Config
from mtl_ray.distributed.checkpoint import META_STAGE, PRETRAIN_STAGE
from mtl_ray.distributed.driver import Callback, MetaTrainer, Summary
from mtl_ray.distributed.pretrain import PretrainSummary, run_pretrain
from mtl_ray.tracking.local import JsonlMetrics, Progress
from mtl_ray.tracking.mlflow_run import MlflowRun
from mtl_ray.tracking.rundir import begin_run, prepare_run

OnFinish = Callable[[MlflowRun, Summary], None]


def run_training(cfg: Config, run_dir: Path, *, resume: bool = False, overwrite: bool = False,
                 callbacks: Sequence[Callback] = (), parent_run_id: str | None = None,
                 on_finish: OnFinish | None = None,
                 trainer_hook: Callable[[MetaTrainer], Sequence[Callback]] | None = None, out=None) -> Summary:
    """Meta-train ``cfg`` into ``run_dir`` (resuming from its latest checkpoint when ``resume``).

    A ``run_dir`` that holds an earlier run is refused unless ``resume`` continues it or ``overwrite``
    replaces it (:mod:`mtl_ray.tracking.rundir`); every check runs before anything is written.
    """
    import torch

    out = sys.stdout if out is None else out  # looked up per call: the stdout of the moment (captured, redirected)
    plan = prepare_run(cfg, run_dir, resume=resume, overwrite=overwrite, stage=META_STAGE)
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
    progress = Progress(cfg.optim.steps, trainer.step, every=cfg.tracking.log_every, enabled=cfg.tracking.progress)
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
    if tracker is not None:
        if on_finish is not None:
            on_finish(tracker, summary)
        tracker.finish(status=status, checkpoint=summary.checkpoint)
    for line in summary.lines():
        print(line, file=out, flush=True)
    return summary


def _pretrain_records(cfg: Config, run_dir: str, mlflow: bool, start_step: int) -> list[Callback]:
    """Built on the Ray Train controller (the driver's node): metrics.jsonl, progress lines, MLflow."""
    records: list[Callback] = [JsonlMetrics(run_dir, resume_step=start_step),
                               Progress(cfg.pretrain.steps, start_step, every=cfg.tracking.log_every,
                                        enabled=cfg.tracking.progress)]
    if mlflow:  # the run the driver opened (run_dir/mlflow_run_id); every report is one batch
        records.append(MlflowRun(cfg, run_dir, resume=True, every=1))
    return records


def run_pretraining(cfg: Config, run_dir: Path, *, resume: bool = False, overwrite: bool = False,
                    out=None) -> PretrainSummary:
    """Pretrain ``cfg`` on Ray Train into ``run_dir`` (from its latest checkpoint when ``resume``; a used
    ``run_dir`` only with ``resume`` or ``overwrite``, as for :func:`run_training`)."""
    out = sys.stdout if out is None else out
    plan = prepare_run(cfg, run_dir, resume=resume, overwrite=overwrite, stage=PRETRAIN_STAGE)
    begin_run(cfg, plan, out)
    start = plan.step
    tracker = (MlflowRun(cfg, run_dir, resume=resume, tags={"stage": PRETRAIN_STAGE, "algorithm": PRETRAIN_STAGE})
               if cfg.tracking.mlflow else None)
    p = cfg.pretrain
    print(f"run dir: {run_dir}  (pretrain from step {start}/{p.steps}, {cfg.data.source} train split, "
          f"{p.num_workers} Ray Train worker(s))", file=out, flush=True)
    if tracker is not None and tracker.run_id:
        print(f"mlflow: run {tracker.run_id} in experiment {cfg.tracking.experiment!r} at {tracker.uri}",
              file=out, flush=True)
    records = partial(_pretrain_records, cfg, str(run_dir), bool(tracker and tracker.run_id))
    status, summary = "FAILED", None
    try:
        summary = run_pretrain(cfg, run_dir, resume=resume, make_callbacks=records)
        status = "FINISHED"
    finally:
        if tracker is not None:
            tracker.finish(status=status, checkpoint=summary.checkpoint if summary else None)
    for line in summary.lines():
        print(line, file=out, flush=True)
    return summary
