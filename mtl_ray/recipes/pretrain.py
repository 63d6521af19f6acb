"""The pretraining recipe: check -> Ray Train workers -> records on the controller -> summary.

The shared body of ``mtl-ray pretrain`` and ``jobs/pretrain.py``; meta-training then starts from its
checkpoint with ``model.init`` (docs/transfer.md).
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import TextIO

from mtl_ray.checkpoint import PRETRAIN_STAGE
from mtl_ray.config import Config, ConfigError
from mtl_ray.distributed.driver import Callback
from mtl_ray.distributed.pretrain import PretrainSummary, run_pretrain
from mtl_ray.tracking.local import JsonlMetrics, Progress
from mtl_ray.tracking.mlflow_run import MlflowRun
from mtl_ray.tracking.rundir import begin_run, prepare_run


def check_pretrain_config(cfg: Config) -> Config:
    """The checks pretraining needs (memory, then its data); raise one ConfigError with every problem."""
    from mtl_ray.data import check_pretrain_data
    from mtl_ray.memory import memory_problems

    problems = memory_problems(cfg, pretrain=True) or check_pretrain_data(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def _records(cfg: Config, run_dir: str, mlflow: bool, start_step: int) -> list[Callback]:
    """Built on the Ray Train controller (the driver's node): metrics.jsonl, progress lines, MLflow."""
    records: list[Callback] = [JsonlMetrics(run_dir, resume_step=start_step),
                               Progress(cfg.pretrain.steps, start_step, every=cfg.tracking.log_every,
                                        enabled=cfg.tracking.progress, max_minutes=cfg.pretrain.max_minutes)]
    if mlflow:  # the run the driver opened (run_dir/mlflow_run_id); every report is one batch
        records.append(MlflowRun(cfg, run_dir, resume=True, every=1))
    return records


def pretrain(cfg: Config, run_dir: Path, *, resume: bool = False, overwrite: bool = False,
             out: TextIO | None = None) -> PretrainSummary:
    """Pretrain ``cfg`` on Ray Train into ``run_dir`` (from its latest checkpoint when ``resume``; a used
    ``run_dir`` only with ``resume`` or ``overwrite``, as for :func:`mtl_ray.recipes.train.train`)."""
    from mtl_ray.data.registry import with_channel_stats

    out = sys.stdout if out is None else out
    cfg = with_channel_stats(cfg)  # the normalisation it trains with, recorded in config.yaml and every checkpoint
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
    records = partial(_records, cfg, str(run_dir), bool(tracker and tracker.run_id))
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
