"""A run directory belongs to one run: the checks made before a run writes anything, then its first writes.

:func:`prepare_run` only reads. It refuses a used run directory (``config.yaml``, ``metrics.jsonl``,
``mlflow_run_id``, checkpoints) unless the run resumes it or ``overwrite`` replaces it; on resume it
picks the newest intact checkpoint and checks that the config may continue it
(:data:`mtl_ray.checkpoint.RESUME_MAY_CHANGE`); it checks that the checkpoint location
(``tracking.checkpoint_uri`` too) can be written and that the Ray address to join answers. Any
problem is a :class:`~mtl_ray.config.UserError` (exit 2) and nothing has been written.
:func:`begin_run` then clears the old run (``overwrite``), sets unreadable checkpoints aside and
writes ``config.yaml``. docs/runs.md describes the rules.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import yaml

from mtl_ray.atomic import WriteError, atomic_write, check_writable
from mtl_ray.checkpoint import (
    META_STAGE,
    PRETRAIN_STAGE,
    ResumePoint,
    check_fits,
    check_location,
    check_resume,
    checkpoint_location,
    checkpoint_paths,
    remove_checkpoints,
    resume_point,
    set_aside,
)
from mtl_ray.config import Config, ConfigError, UserError
from mtl_ray.tracking.local import METRICS_FILE

CONFIG_FILE = "config.yaml"
# What a run writes into its directory besides checkpoints (mlflow_run.RUN_ID_FILE, learning_curve.png) and
# Ray Train's storage for pretraining; --overwrite removes exactly these, nothing else in the directory.
RUN_FILES = (CONFIG_FILE, METRICS_FILE, "mlflow_run_id", "learning_curve.png")
RUN_DIRS = ("ray_train",)


class RunDirError(UserError):
    pass


@dataclass(frozen=True)
class RunPlan:
    """What :func:`prepare_run` found: where the run starts and what :func:`begin_run` does first."""

    run_dir: Path
    location: str  # where checkpoints go
    resume: ResumePoint | None  # the checkpoint resumed from (None: a fresh run)
    overwrite: list[str]  # the earlier run's records to remove first (a fresh run with --overwrite)
    stage: str = META_STAGE

    @property
    def step(self) -> int:
        return self.resume.checkpoint.step if self.resume else 0


def earlier_run(run_dir: Path, location: str) -> list[str]:
    """The records of an earlier run in ``run_dir`` (and its checkpoint location): paths, empty when unused."""
    found = [str(run_dir / n) for n in (*RUN_FILES, *RUN_DIRS) if (run_dir / n).exists()]
    for where in dict.fromkeys([location, str(run_dir / "checkpoints")]):
        found += checkpoint_paths(where)
    return found


def _describe(paths: list[str], run_dir: Path) -> str:
    names = [p[len(str(run_dir)) + 1:] if p.startswith(f"{run_dir}/") else p for p in paths]
    ckpts = [n for n in names if n.endswith(".pt")]
    other = [n for n in names if not n.endswith(".pt")]
    parts = other + ([f"{len(ckpts)} checkpoint(s) up to {ckpts[-1]}"] if ckpts else [])
    return ", ".join(parts)


def prepare_run(cfg: Config, run_dir: Path, *, resume: bool, overwrite: bool, stage: str = META_STAGE,
                uses_ray: bool | None = None) -> RunPlan:
    """Every check before a run starts; writes nothing. ``uses_ray``: check the Ray address (default: the
    stage needs Ray: pretraining always, meta-training with ``scaling.num_workers > 0``)."""
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite: got both, expected at most one (--resume continues the run in "
                          f"{run_dir}, --overwrite deletes it and starts afresh)")
    location = checkpoint_location(run_dir, cfg.tracking.checkpoint_uri)
    point = None
    clear: list[str] = []
    if resume:
        point = resume_point(location)
        if point is None:
            raise ConfigError([f"--resume: no checkpoint in {location}; expected the run directory (or "
                               "tracking.checkpoint_uri) of an earlier run (pass it with --run-dir, or drop --resume "
                               "to start fresh)"])
        check_resume(point, cfg, stage)
        check_fits(point, cfg)
    else:
        used = earlier_run(run_dir, location)
        if used and not overwrite:
            raise RunDirError(f"run directory {run_dir}: holds an earlier run ({_describe(used, run_dir)}); a new run "
                              "there would mix with it (its later checkpoints would stay the latest). Continue it with "
                              "--resume, replace it with --overwrite (deletes those files first), or pass another "
                              "--run-dir")
        clear = used
    if uses_ray is None:
        uses_ray = stage == PRETRAIN_STAGE or cfg.scaling.num_workers > 0
    if uses_ray:
        from mtl_ray.ray_session import check_address

        check_address(cfg)
    try:
        check_writable(run_dir, "the run writes config.yaml, metrics.jsonl and checkpoints there: make it writable "
                                "or free some space, or pass another --run-dir")
    except WriteError as e:
        raise RunDirError(str(e)) from e
    check_location(location)
    return RunPlan(run_dir, location, point, clear, stage)


def begin_run(cfg: Config, plan: RunPlan, out: TextIO | None = None) -> None:
    """The run's first writes: remove the earlier run (``--overwrite``), set aside unreadable checkpoints
    (``--resume``, one line each on ``out``; a resumed pretraining also drops Ray Train's own storage, so
    it starts from the checkpoint chosen here), write ``config.yaml``."""
    out = out or sys.stderr
    if plan.overwrite:
        for name in RUN_FILES:
            (plan.run_dir / name).unlink(missing_ok=True)
        for name in RUN_DIRS:
            shutil.rmtree(plan.run_dir / name, ignore_errors=True)
        for where in dict.fromkeys([plan.location, str(plan.run_dir / "checkpoints")]):
            remove_checkpoints(where)
        print(f"--overwrite: removed the earlier run in {plan.run_dir} ({_describe(plan.overwrite, plan.run_dir)})",
              file=out, flush=True)
    if plan.resume is not None:
        set_aside(plan.resume, out)
        if plan.stage == PRETRAIN_STAGE:  # else Ray Train restores its own newest checkpoint, not the one chosen here
            for name in RUN_DIRS:
                shutil.rmtree(plan.run_dir / name, ignore_errors=True)
    atomic_write(plan.run_dir / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
