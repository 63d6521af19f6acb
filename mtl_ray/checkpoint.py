"""Atomic checkpoints that load without unpickling arbitrary objects (``torch.load(weights_only=True)``).

A checkpoint holds the meta-parameters, the outer optimiser's state, the step, the config (as JSON,
so the seed that drives task sampling travels with it) and counters. Its ``stage`` says what wrote
it: meta-training ("meta") or supervised pretraining ("pretrain", whose params are a many-way
classifier's weights). A location is a local directory
or any ``pyarrow.fs`` URI (``s3://bucket/run``, ``gs://...``, ``hdfs://...``, ``file:///...``), so a
run on a cluster can checkpoint to shared storage and resume on another machine. Files are written
to a temporary name in the same directory and then moved into place (locally through
:func:`mtl_ray.atomic.atomic_write`, mode 0o666 less the umask), so a crash never leaves a
half-written checkpoint under a real name, and a failed write (disk full, read-only directory)
leaves the earlier checkpoints as they were.

A checkpoint belongs to one run: ``--resume`` continues it only with a config that differs from the
embedded one in :data:`RESUME_MAY_CHANGE` keys (run length, validation, logging, placement), see
:func:`resume_differences`; a truncated or corrupt newest checkpoint is skipped for the newest intact
one (:func:`resume_point`). docs/runs.md describes the rules.

Meta-learning from pretrained weights (``model.init``) reads a checkpoint too: :func:`init_body` takes
only its ``body.*`` weights (its head was trained for other classes) and :func:`check_init` says, before
anything starts, why they cannot start a config.
"""

from __future__ import annotations

import fnmatch
import io
import json
import re
import sys
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import pyarrow.fs as pafs
import torch

from mtl_ray.algorithms import Params, TaskShape
from mtl_ray.atomic import WriteError, atomic_write, check_writable
from mtl_ray.components import from_dict
from mtl_ray.config import NORM_TRANSDUCTIVE, Config, ConfigError, DataConfig, UserError
from mtl_ray.data.normalise import IDENTITY
from mtl_ray.data.registry import SOURCES

FORMAT_VERSION = 1
META_STAGE = "meta"  # Checkpoint.stage: what wrote it
PRETRAIN_STAGE = "pretrain"
_NAME = re.compile(r"^step_(\d{8})\.pt$")
_LEFTOVER = re.compile(r"^(\.step_\d{8}\.pt\..*\.tmp|step_\d{8}\.pt\.corrupt)$")  # temp files, set-aside files
CORRUPT_SUFFIX = ".corrupt"  # a checkpoint --resume skipped is renamed to <name>.corrupt
_KEYS = ("format", "step", "params", "optimizer", "config", "shape", "skipped_steps", "tasks_seen", "metrics")
_DAMAGED = ("the file is truncated or damaged, or not a checkpoint of this mtl-ray: pass an intact one (e.g. an "
            "earlier checkpoints/step_XXXXXXXX.pt of the run) or train again")

# Config keys a resumed run may change ("section.*": the whole section). Every other key must equal the
# checkpoint's: it shapes the parameters (model.*, data.ways/image_size/source, algorithm.name), the
# task stream (seed, data.*) or the optimisation (optim.outer_lr, optimizer, meta_batch_size, ...), and
# changing it would continue a different run on these weights. What may change: how long the run goes
# on, how often it validates, logs and checkpoints, where and how fast it computes (scaling.*; results
# are the same for any number of workers), where the data and the step-0 weights (model.init, used at
# step 0 only) are found, and the run's labels. docs/runs.md lists them too.
RESUME_MAY_CHANGE: frozenset[str] = frozenset({
    "name",
    "data.root", "data.download", "data.cache_dir",  # where data is found or cached, not what it is
    "model.init", "model.conv_impl",
    "algorithm.task_chunk_size", "algorithm.chunk_memory_mb", "algorithm.compile",
    "optim.steps", "optim.max_minutes", "optim.val_every", "optim.val_tasks",
    "pretrain.steps", "pretrain.max_minutes", "pretrain.val_every", "pretrain.num_workers",
    "pretrain.max_failures", "pretrain.probe_steps", "pretrain.probe_lr", "pretrain.probe",
    "algorithm.finetune_steps", "algorithm.finetune_lr", "algorithm.finetune_augment",  # how eval adapts, not training
    "scaling.*",
    "tracking.*",
})
# Keys a stage never reads: a meta-training run ignores the pretrain section; pretraining uses its own
# optimiser settings and every train-split class (not N-way tasks).
UNUSED_BY_STAGE: dict[str, frozenset[str]] = {
    META_STAGE: frozenset({"pretrain.*"}),
    PRETRAIN_STAGE: frozenset({"optim.*", "algorithm.inner_lr", "algorithm.inner_steps", "algorithm.eval_inner_steps",
                               "algorithm.first_order", "data.ways", "data.shots", "data.queries"}),
}


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
    """A checkpoint location or file that cannot be used; ``reason`` is what is wrong with a damaged file."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message

    def __reduce__(self) -> tuple[Any, ...]:  # keeps ``reason`` across processes (Ray)
        return (type(self), (str(self), self.reason))


def _damaged(path: str, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}; {_DAMAGED}", reason=what)


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
            raise CheckpointError(f"checkpoint location {text!r}: pyarrow.fs cannot open it ({_one_line(e)}); "
                                  "expected a local path or a URI such as s3://bucket/dir, gs://bucket/dir or "
                                  "file:///abs/dir") from e
    return pafs.LocalFileSystem(), str(Path(text).resolve())


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or e.__class__.__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def _kind(fs: pafs.FileSystem, path: str) -> pafs.FileType:
    return fs.get_file_info(path).type


def _shown(location: str | Path, base: str, name: str) -> str:
    """A file's path as callers see it: the URI for a URI location, else the absolute local path."""
    return _join(str(location).rstrip("/"), name) if "://" in str(location) else _join(base, name)


def save_checkpoint(location: str | Path, ckpt: Checkpoint) -> str:
    """Write ``<location>/step_XXXXXXXX.pt`` (temporary name, then moved); return its path or URI.

    A write that fails (disk full, read-only location, lost credentials) raises :class:`CheckpointError`
    with the earlier checkpoints untouched and no temporary file left behind.
    """
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
    target = _shown(location, base, name)
    try:
        if _is_local(fs):
            atomic_write(_join(base, name), buf.getvalue())
        else:
            _remote_write(fs, base, name, buf.getvalue())
    except (WriteError, OSError) as e:
        reason = e.error if isinstance(e, WriteError) else e
        why = reason.strerror or _one_line(reason) if isinstance(reason, OSError) else _one_line(reason)
        try:
            before = latest_checkpoint(location)
        except UserError:
            before = None
        kept = f"the newest earlier checkpoint, {before}, is intact" if before else "no earlier checkpoint exists"
        raise CheckpointError(f"checkpoint {target}: cannot write it ({why}); {kept}. Free some space "
                              "or make the location writable, then continue with --resume") from e
    return target


def _remote_write(fs: pafs.FileSystem, base: str, name: str, data: bytes) -> None:
    fs.create_dir(base, recursive=True)
    tmp = _join(base, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, _join(base, name))  # a rename on HDFS; copy+delete on object stores
    except BaseException:
        try:
            if _kind(fs, tmp) == pafs.FileType.File:
                fs.delete_file(tmp)
        except Exception:  # the original error is the one to report
            pass
        raise


def check_location(location: str | Path) -> None:
    """Raise :class:`CheckpointError` unless checkpoints can be written to ``location`` (tried for real)."""
    fs, base = _resolve(location)
    fix = ("checkpoints go there (tracking.checkpoint_uri, else <run dir>/checkpoints): make it writable or free "
           "some space, or point tracking.checkpoint_uri / --run-dir elsewhere")
    if _is_local(fs):
        try:
            check_writable(base, fix)
        except WriteError as e:
            raise CheckpointError(str(e)) from e
        return
    probe = _join(base, f".write-check.{uuid.uuid4().hex[:12]}")
    try:
        fs.create_dir(base, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"\0")
        fs.delete_file(probe)
    except Exception as e:  # pyarrow raises OSError subclasses and ArrowException for credentials, buckets ...
        raise CheckpointError(f"checkpoint location {location}: cannot write there ({_one_line(e)}); {fix}") from e


def checkpoint_paths(location: str | Path) -> list[str]:
    """Every ``step_XXXXXXXX.pt`` of a checkpoint location (or of ``<run dir>/checkpoints``), oldest first."""
    fs, base = _resolve(location)
    try:
        nested = _join(base, "checkpoints")
        if _kind(fs, nested) == pafs.FileType.Directory:
            base, location = nested, _join(str(location).rstrip("/"), "checkpoints")
        if _kind(fs, base) != pafs.FileType.Directory:
            return []
        names = sorted(Path(i.path).name for i in fs.get_file_info(pafs.FileSelector(base))
                       if _NAME.match(Path(i.path).name))
    except OSError as e:
        raise CheckpointError(f"checkpoint location {location}: cannot list it ({_one_line(e)}); expected a "
                              "readable directory or URI") from e
    return [_shown(location, base, n) for n in names]


def latest_checkpoint(location: str | Path) -> str | None:
    """The newest ``step_XXXXXXXX.pt`` in a checkpoint location, or in ``<run dir>/checkpoints``."""
    found = checkpoint_paths(location)
    return found[-1] if found else None


def remove_checkpoints(location: str | Path) -> list[str]:
    """Delete every checkpoint (and leftover temporary or set-aside file) of ``location``; what was removed."""
    fs, base = _resolve(location)
    if _kind(fs, base) != pafs.FileType.Directory:
        return []
    removed = []
    for info in fs.get_file_info(pafs.FileSelector(base)):
        name = Path(info.path).name
        if info.type == pafs.FileType.File and (_NAME.match(name) or _LEFTOVER.match(name)):
            fs.delete_file(info.path)
            removed.append(_shown(location, base, name))
    return removed


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a ``.pt`` file, or the latest checkpoint of a run directory / checkpoint location.

    Anything wrong with the file (unreadable, truncated, missing keys, a broken embedded config) is a
    :class:`CheckpointError` naming the file, what is wrong and the fix.
    """
    fs, resolved = _resolve(path)
    kind = _kind(fs, resolved)
    if kind == pafs.FileType.Directory:
        found = checkpoint_paths(path)
        if not found:
            raise CheckpointError(f"{path}: no checkpoint found; expected a run directory holding "
                                  "checkpoints/step_XXXXXXXX.pt or a .pt file")
        try:
            return load_checkpoint(found[-1])
        except CheckpointError as e:
            if len(found) > 1:
                raise CheckpointError(f"{e} (the run's next newest checkpoint is {found[-2]})") from e
            raise
    elif kind != pafs.FileType.File:
        raise CheckpointError(f"{path}: no such checkpoint file; pass a .pt file or a run directory")
    try:
        with fs.open_input_file(resolved) as f:
            data = f.read()
        raw = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt / foreign files
        raise _damaged(str(path), f"not a readable mtl-ray checkpoint ({e.__class__.__name__}: {_one_line(e)})") from e
    return _parse(raw, str(path))


def _parse(raw: Any, path: str) -> Checkpoint:
    if not isinstance(raw, dict):
        raise _damaged(path, f"holds a {type(raw).__name__}, expected an mtl-ray checkpoint (a dict with "
                             f"{', '.join(_KEYS)})")
    if raw.get("format") != FORMAT_VERSION:
        raise _damaged(path, f"checkpoint format {raw.get('format')!r}, expected {FORMAT_VERSION}")
    missing = [k for k in _KEYS if k not in raw]
    if missing:
        raise _damaged(path, f"the checkpoint lacks {', '.join(missing)} (expected every one of {', '.join(_KEYS)})")

    def field_of(key: str, parse: Callable[[Any], Any]) -> Any:
        try:
            return parse(raw[key])
        except ConfigError as e:
            raise _damaged(path, f"its embedded config is not a valid mtl-ray config ({'; '.join(e.problems)})") from e
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            what = "embedded config" if key == "config" else key
            raise _damaged(path, f"its {what} is broken ({e.__class__.__name__}: {_one_line(e)})") from e

    def config_of(text: Any) -> Config:
        if not isinstance(json.loads(text), dict):
            raise TypeError(f"got {text[:40]!r}, expected a JSON object of config sections")
        return embedded_config(text)

    def params_of(p: Any) -> Params:
        if not isinstance(p, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in p.items()):
            raise TypeError("expected a dict of named tensors")
        return dict(p)

    def dict_of(d: Any) -> dict:
        if not isinstance(d, dict):
            raise TypeError(f"got a {type(d).__name__}, expected a dict")
        return d

    return Checkpoint(
        step=field_of("step", int),
        params=field_of("params", params_of),
        optimizer=field_of("optimizer", dict_of),
        config=field_of("config", config_of),
        shape=field_of("shape", lambda text: _shape(json.loads(text))),
        skipped_steps=field_of("skipped_steps", int),
        tasks_seen=field_of("tasks_seen", int),
        metrics=field_of("metrics", lambda text: dict_of(json.loads(text))),
        stage=str(raw.get("stage", META_STAGE)),  # checkpoints written before pretraining existed are meta ones
    )


def embedded_config(text: str) -> Config:
    """A checkpoint's config. One written before ``model.norm`` existed was trained with batch statistics, and is
    scored with them: its missing ``model.norm`` means ``transductive``, not today's default. One written before
    ``data.channel_mean`` existed saw raw pixels: its missing statistics mean none (``[0.0]``/``[1.0]``), not
    whatever its table records today."""
    raw = json.loads(text)
    if isinstance(raw, dict) and isinstance(raw.setdefault("model", {}), dict):
        raw["model"].setdefault("norm", NORM_TRANSDUCTIVE)
    data = raw.get("data") if isinstance(raw, dict) else None
    if isinstance(data, dict) and "channel_mean" not in data and "channel_std" not in data:
        spec = SOURCES.get(str(data.get("source", DataConfig.source)))
        if spec is not None and spec.load is not None:
            data.update(channel_mean=list(IDENTITY[0]), channel_std=list(IDENTITY[1]))
    return from_dict(raw)


def _shape(d: dict) -> TaskShape:
    return TaskShape(kind=d["kind"], x_shape=tuple(int(s) for s in d["x_shape"]), ways=int(d["ways"]))


# --------------------------------------------------------------------------- resuming


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run resumes from, and the newer ones skipped as unreadable (path, why)."""

    path: str
    checkpoint: Checkpoint
    skipped: tuple[tuple[str, str], ...] = ()


def resume_point(location: str | Path) -> ResumePoint | None:
    """The newest intact checkpoint of ``location`` (None when it has none at all); reads only.

    Newer checkpoints that do not load (truncated by a crash, damaged) are listed in ``skipped``;
    :func:`set_aside` then moves them out of the way. No intact one at all is a :class:`CheckpointError`.
    """
    found = checkpoint_paths(location)
    skipped: list[tuple[str, str]] = []
    for path in reversed(found):
        try:
            return ResumePoint(path, load_checkpoint(path), tuple(skipped))
        except CheckpointError as e:
            skipped.append((path, e.reason))
    if not skipped:
        return None
    listed = "; ".join(f"{Path(p).name}: {why}" for p, why in skipped[:3])
    raise CheckpointError(f"--resume: no intact checkpoint in {location} ({len(skipped)} unreadable: {listed}); "
                          "start a new run instead (--overwrite replaces this one, or pass another --run-dir)")


def set_aside(point: ResumePoint, out: TextIO | None = None) -> None:
    """Rename each skipped checkpoint to ``<name>.corrupt`` (so it is no run's "latest"), one line each.

    Idempotent: one already set aside (the trainer and the run's first writes both call this) is left alone.
    """
    out = out or sys.stderr
    for path, why in point.skipped:
        fs, resolved = _resolve(path)
        if _kind(fs, resolved) != pafs.FileType.File:
            continue
        fs.move(resolved, resolved + CORRUPT_SUFFIX)
        print(f"warning: --resume skipped {path} ({why}), renamed it to {path}{CORRUPT_SUFFIX}; resuming from "
              f"{point.path} (step {point.checkpoint.step})", file=out, flush=True)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def resume_differences(written: Config, given: Config, stage: str = META_STAGE) -> list[tuple[str, Any, Any]]:
    """``(key, checkpoint value, given value)`` for every key that differs and may not change on resume."""
    old, new = _flat(written.to_dict()), _flat(given.to_dict())
    free = RESUME_MAY_CHANGE | UNUSED_BY_STAGE.get(stage, frozenset())
    return [(k, old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k) and not _matches(k, free)]


def _value(v: Any) -> str:
    if isinstance(v, str):
        return v if v else "''"
    return json.dumps(v, separators=(",", ":"))


def check_resume(point: ResumePoint, cfg: Config, stage: str) -> None:
    """Raise :class:`CheckpointError` unless ``cfg`` may continue ``point`` (same stage, allowed changes only)."""
    ck, path = point.checkpoint, point.path
    if ck.stage != stage:
        fix = (f"to meta-train from it, start a new run with model.init={path}" if stage == META_STAGE
               else "resume it with `mtl-ray train --resume`, or pretrain into another --run-dir")
        raise CheckpointError(f"--resume: {path} is a {ck.stage} checkpoint, expected a {stage} one; {fix}")
    diff = resume_differences(ck.config, cfg, stage)
    if not diff:
        return
    shown = "; ".join(f"{k}: checkpoint {_value(a)}, given {_value(b)}" for k, a, b in diff)
    fix = " ".join(f"{k}={_value(a)}" for k, a, _ in diff)
    raise CheckpointError(
        f"--resume: the config differs from the one {path} was written with, in {len(diff)} key(s) that must stay "
        f"the same to continue a run: {shown}. Resume with the checkpoint's values ({fix}), or start a new run "
        "(another --run-dir, or --overwrite to replace this one). Only run length, validation, logging, checkpointing, "
        "placement and path keys may change on resume (RESUME_MAY_CHANGE, docs/runs.md)")


def _expected_params(cfg: Config, ck: Checkpoint) -> dict[str, torch.Tensor]:
    """The parameter shapes ``cfg`` builds for the checkpoint's task shape (its stage's model)."""
    from mtl_ray.algorithms import build_learner
    from mtl_ray.models import build_pretrain_model

    if ck.stage == PRETRAIN_STAGE:  # a classifier over every train class: ways is that class count
        return dict(build_pretrain_model(cfg, ck.shape.x_shape, ck.shape.ways).named_parameters())
    learner = build_learner(cfg, shape=ck.shape)
    return learner.algorithm.init_params(dict(learner.model.named_parameters()))


def check_fits(point: ResumePoint, cfg: Config) -> None:
    """Raise :class:`CheckpointError` unless the checkpoint's weights have exactly the entries and shapes that
    ``cfg`` builds (a second guard after :func:`check_resume`, e.g. for a checkpoint of another mtl-ray version)."""
    from mtl_ray.algorithms import check_param_shapes

    bad = check_param_shapes(_expected_params(cfg, point.checkpoint), point.checkpoint.params, "checkpoint")
    if bad:
        raise CheckpointError(f"--resume: the weights in {point.path} do not fit the model this config builds "
                              f"({'; '.join(bad[:3])}{'; ...' if len(bad) > 3 else ''}); the checkpoint was written "
                              "by another model or mtl-ray version: start a new run (another --run-dir, or "
                              "--overwrite)")


def init_body(cfg: Config) -> Params | None:
    """The body weights ``model.init`` names (None when it is empty)."""
    from mtl_ray.models import body_params

    return body_params(load_checkpoint(cfg.model.init).params) if cfg.model.init else None


def check_init(cfg: Config) -> list[str]:
    """Why ``model.init`` cannot start this config (empty when it can, or when it is unset)."""
    from mtl_ray.algorithms import check_param_shapes, uses_head
    from mtl_ray.models import BODY_PREFIX, body_params, build_model

    if not cfg.model.init:
        return []
    try:
        ck = load_checkpoint(cfg.model.init)
    except CheckpointError as e:
        return [f"model.init: {e} (write one with `mtl-ray pretrain CONFIG --run-dir DIR`, then model.init=DIR)"]
    body = body_params(ck.params)
    m = ck.config.model
    written = f"model.name={m.name} channels={m.channels} blocks={m.blocks} downsample={m.downsample}"
    if not body:
        return [f"model.init: {cfg.model.init!r} holds no {BODY_PREFIX}* weights; expected a checkpoint of "
                "`mtl-ray pretrain` or `mtl-ray train`"]
    size = ck.shape.x_shape[-1]
    if len(ck.shape.x_shape) == 3 and size != cfg.data.image_size:
        return [f"data.image_size: got {cfg.data.image_size}, expected {size} (model.init was trained on "
                f"{size}x{size} images); set data.image_size={size}"]
    out = cfg.data.ways if uses_head(cfg.algorithm.name) else 0
    want = body_params(dict(build_model(cfg, ck.shape.x_shape, out).named_parameters()))
    bad = check_param_shapes(want, body, "body")
    if bad:
        return [f"model.init: its body does not fit this config's model ({'; '.join(bad[:3])}); it was written with "
                f"{written}: use the same model settings"]
    return []
