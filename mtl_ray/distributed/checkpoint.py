"""Atomic checkpoints that load without unpickling arbitrary objects (``torch.load(weights_only=True)``).

A checkpoint holds the meta-parameters, the outer optimiser's state, the step, the config (as JSON,
so the seed that drives task sampling travels with it) and counters. Its ``stage`` says what wrote
it: meta-training ("meta") or supervised pretraining ("pretrain", whose params are a many-way
classifier's weights). A location is a local directory
or any ``pyarrow.fs`` URI (``s3://bucket/run``, ``gs://...``, ``hdfs://...``, ``file:///...``), so a
run on a cluster can checkpoint to shared storage and resume on another machine. Files are written
to a temporary name in the same directory and then moved into place, so a crash never leaves a
half-written checkpoint under a real name.
"""

from __future__ import annotations

import io
import json
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from mtl_ray.algorithms import Params, TaskShape
from mtl_ray.config import NORM_TRANSDUCTIVE, Config, UserError, from_dict

FORMAT_VERSION = 1
META_STAGE = "meta"  # Checkpoint.stage: what wrote it
PRETRAIN_STAGE = "pretrain"
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
    stage: str = META_STAGE


class CheckpointError(UserError):
    pass


def checkpoint_location(run_dir: str | Path, uri: str = "") -> str:
    """Where a run's checkpoints go: ``uri`` (``tracking.checkpoint_uri``) or ``<run_dir>/checkpoints``."""
    return uri or str(Path(run_dir) / "checkpoints")


def _resolve(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """A filesystem and a path on it for a local path or a ``pyarrow.fs`` URI."""
    text = str(location)
    if "://" in text:
        try:
            return pafs.FileSystem.from_uri(text)
        except Exception as e:  # unknown scheme, missing credentials, bad bucket name ...
            raise CheckpointError(f"checkpoint location {text!r}: pyarrow.fs cannot open it ({e}); expected a local "
                                  "path or a URI such as s3://bucket/dir, gs://bucket/dir or file:///abs/dir") from e
    return pafs.LocalFileSystem(), str(Path(text).resolve())


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def _kind(fs: pafs.FileSystem, path: str) -> pafs.FileType:
    return fs.get_file_info(path).type


def save_checkpoint(location: str | Path, ckpt: Checkpoint) -> str:
    """Write ``<location>/step_XXXXXXXX.pt`` (temporary name, then moved); return its path or URI."""
    fs, base = _resolve(location)
    name = f"step_{ckpt.step:08d}.pt"
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
        "stage": ckpt.stage,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    fs.create_dir(base, recursive=True)
    tmp = _join(base, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(buf.getvalue())
        fs.move(tmp, _join(base, name))  # a rename on local disks and HDFS; copy+delete on object stores
    except BaseException:
        if _kind(fs, tmp) == pafs.FileType.File:
            fs.delete_file(tmp)
        raise
    return _join(str(location).rstrip("/"), name) if "://" in str(location) else _join(base, name)


def latest_checkpoint(location: str | Path) -> str | None:
    """The newest ``step_XXXXXXXX.pt`` in a checkpoint location, or in ``<run dir>/checkpoints``."""
    fs, base = _resolve(location)
    nested = _join(base, "checkpoints")
    if _kind(fs, nested) == pafs.FileType.Directory:
        base, location = nested, _join(str(location).rstrip("/"), "checkpoints")
    if _kind(fs, base) != pafs.FileType.Directory:
        return None
    names = sorted(Path(i.path).name for i in fs.get_file_info(pafs.FileSelector(base))
                   if _NAME.match(Path(i.path).name))
    if not names:
        return None
    return _join(str(location).rstrip("/"), names[-1]) if "://" in str(location) else _join(base, names[-1])


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a ``.pt`` file, or the latest checkpoint of a run directory / checkpoint location."""
    fs, resolved = _resolve(path)
    kind = _kind(fs, resolved)
    if kind == pafs.FileType.Directory:
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path}: no checkpoint found; expected a run directory holding "
                                  "checkpoints/step_XXXXXXXX.pt or a .pt file")
        path = found
        fs, resolved = _resolve(path)
    elif kind != pafs.FileType.File:
        raise CheckpointError(f"{path}: no such checkpoint file; pass a .pt file or a run directory")
    try:
        with fs.open_input_file(resolved) as f:
            data = f.read()
        raw = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt / foreign files
        raise CheckpointError(f"{path}: not a readable mtl-ray checkpoint ({e.__class__.__name__}: {e})") from e
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_VERSION:
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"{path}: checkpoint format {got!r}, expected {FORMAT_VERSION}")
    return Checkpoint(
        step=int(raw["step"]),
        params=dict(raw["params"]),
        optimizer=raw["optimizer"],
        config=embedded_config(raw["config"]),
        shape=_shape(json.loads(raw["shape"])),
        skipped_steps=int(raw["skipped_steps"]),
        tasks_seen=int(raw["tasks_seen"]),
        metrics=json.loads(raw["metrics"]),
        stage=str(raw.get("stage", META_STAGE)),  # checkpoints written before pretraining existed are meta ones
    )


def embedded_config(text: str) -> Config:
    """A checkpoint's config. One written before ``model.norm`` existed was trained with batch statistics, and is
    scored with them: its missing ``model.norm`` means ``transductive``, not today's default."""
    raw = json.loads(text)
    if isinstance(raw, dict) and isinstance(raw.setdefault("model", {}), dict):
        raw["model"].setdefault("norm", NORM_TRANSDUCTIVE)
    return from_dict(raw)


def _shape(d: dict) -> TaskShape:
    return TaskShape(kind=d["kind"], x_shape=tuple(d["x_shape"]), ways=int(d["ways"]))
