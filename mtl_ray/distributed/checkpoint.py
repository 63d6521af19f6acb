"""Atomic checkpoints that load without unpickling arbitrary objects (``torch.load(weights_only=True)``).

A checkpoint holds the meta-parameters, the outer optimiser's state, the step, the config (as JSON,
so the seed that drives task sampling travels with it) and counters. Files are written to a
temporary name in the same directory and renamed, so a crash never leaves a half-written one.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mtl_ray.algorithms import Params, TaskShape
from mtl_ray.config import Config, UserError, from_dict

FORMAT_VERSION = 1
_NAME = re.compile(r"^step_(\d{8})\.pt$")


@dataclass(frozen=True)
class Checkpoint:
    step: int
    params: Params
    optimizer: dict[str, Any]
    config: Config
    shape: TaskShape
    skipped_steps: int = 0
    tasks_seen: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


class CheckpointError(UserError):
    pass


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT_VERSION,
        "step": ckpt.step,
        "params": {k: v.detach().cpu() for k, v in ckpt.params.items()},
        "optimizer": ckpt.optimizer,
        "config": ckpt.config.to_json(),
        "shape": json.dumps({"kind": ckpt.shape.kind, "x_shape": list(ckpt.shape.x_shape), "ways": ckpt.shape.ways}),
        "skipped_steps": ckpt.skipped_steps,
        "tasks_seen": ckpt.tasks_seen,
        "metrics": json.dumps(ckpt.metrics),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_run_checkpoint(run_dir: str | Path, ckpt: Checkpoint) -> Path:
    """``<run_dir>/checkpoints/step_XXXXXXXX.pt``."""
    return save_checkpoint(checkpoint_dir(run_dir) / f"step_{ckpt.step:08d}.pt", ckpt)


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path}: no checkpoint found; expected a run directory holding "
                                  "checkpoints/step_XXXXXXXX.pt or a .pt file")
        path = found
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; pass a .pt file or a run directory")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt / foreign files
        raise CheckpointError(f"{path}: not a readable mtl-ray checkpoint ({e.__class__.__name__}: {e})") from e
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_VERSION:
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"{path}: checkpoint format {got!r}, expected {FORMAT_VERSION}")
    return Checkpoint(
        step=int(raw["step"]),
        params=dict(raw["params"]),
        optimizer=raw["optimizer"],
        config=from_dict(json.loads(raw["config"])),
        shape=_shape(json.loads(raw["shape"])),
        skipped_steps=int(raw["skipped_steps"]),
        tasks_seen=int(raw["tasks_seen"]),
        metrics=json.loads(raw["metrics"]),
    )


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return None
    found = sorted(p for p in d.iterdir() if _NAME.match(p.name))
    return found[-1] if found else None


def _shape(d: dict) -> TaskShape:
    return TaskShape(kind=d["kind"], x_shape=tuple(d["x_shape"]), ways=int(d["ways"]))
