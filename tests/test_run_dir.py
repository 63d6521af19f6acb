"""A run directory belongs to one run (docs/runs.md): resume rules, used directories, damaged checkpoints,
file modes and failed writes, through the real CLI entry point ``mtl_ray.cli.main`` on tiny sinusoid runs."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtl_ray.api import FewShotLearner
from mtl_ray.checkpoint import (
    META_STAGE,
    PRETRAIN_STAGE,
    RESUME_MAY_CHANGE,
    UNUSED_BY_STAGE,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    resume_differences,
)
from mtl_ray.cli import EXIT_CONFIG, main
from mtl_ray.components import from_dict
from mtl_ray.config import Config, UserError
from mtl_ray.data import omniglot
from mtl_ray.recipes.train import train as run_training
from mtl_ray.tracking.local import read_metrics

REPO = Path(__file__).resolve().parents[1]
SIN = ["data.source=sinusoid", "model.name=mlp", "model.hidden_sizes=[16,16]", "data.shots=5", "data.queries=5",
       "algorithm.inner_lr=0.01", "optim.meta_batch_size=4", "optim.steps=6", "optim.val_every=3",
       "optim.val_tasks=4", "tracking.checkpoint_every=3", "tracking.mlflow=false", "tracking.progress=false"]


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def train(capsys, run: Path, *extra: str) -> tuple[int, str, str]:
    return cli(capsys, "train", *SIN, *extra, "--run-dir", run)


def snapshot(root: Path) -> dict[str, tuple | None]:
    """Every path under ``root``; for files their mtime, size and content hash."""
    if not root.exists():
        return {}
    out: dict[str, tuple | None] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_mtime_ns, st.st_size, hashlib.sha1(p.read_bytes()).hexdigest())
        else:
            out[str(p.relative_to(root))] = None
    return out


def sin_cfg(*extra: str) -> Config:
    return from_dict({}, [*SIN, *extra])


@pytest.fixture
def run6(tmp_path, capsys) -> Path:
    """A finished 6-step run: checkpoints at steps 3 and 6."""
    run = tmp_path / "run"
    rc, _, err = train(capsys, run)
    assert rc == 0, err
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step_00000003.pt", "step_00000006.pt"]
    return run


# --------------------------------------------------------------------------- resume with another config


@pytest.mark.parametrize("change,key,old,new", [
    (["model.hidden_sizes=[8]"], "model.hidden_sizes", "[16,16]", "[8]"),  # parameter layout
    (["algorithm.name=metasgd"], "algorithm.name", "maml", "metasgd"),  # adds per-parameter learning rates
    (["algorithm.inner_steps=2"], "algorithm.inner_steps", "1", "2"),  # the objective
    (["data.shots=7"], "data.shots", "5", "7"),  # the task stream
    (["seed=1"], "seed", "0", "1"),
    (["optim.outer_lr=0.01"], "optim.outer_lr", "0.001", "0.01"),
    (["optim.optimizer=sgd"], "optim.optimizer", "adam", "sgd"),  # the optimiser state
])
def test_resume_with_a_changed_config_is_refused_before_anything_is_written(run6, capsys, change, key, old, new):
    before = snapshot(run6)
    rc, _, err = train(capsys, run6, "optim.steps=9", *change, "--resume")
    assert rc == EXIT_CONFIG
    assert err.startswith("error: --resume: the config differs") and err.count("\n") == 1, err
    assert f"{key}: checkpoint {old}, given {new}" in err
    assert f"Resume with the checkpoint's values ({key}={old})" in err and "--overwrite" in err
    assert str(run6 / "checkpoints" / "step_00000006.pt") in err
    assert snapshot(run6) == before  # not even config.yaml


def test_resume_lists_every_differing_key(run6, capsys):
    rc, _, err = train(capsys, run6, "model.hidden_sizes=[8]", "seed=3", "tracking.log_every=1", "--resume")
    assert rc == EXIT_CONFIG and "in 2 key(s)" in err
    assert "model.hidden_sizes: checkpoint [16,16], given [8]; seed: checkpoint 0, given 3" in err
    assert "tracking.log_every" not in err.split("Resume with")[0]


def test_resume_of_an_omniglot_run_with_another_task_shape_or_model_is_refused(omniglot_root, tmp_path, capsys):
    run = tmp_path / "omni"
    tiny = [f"data.root={omniglot_root}", "data.ways=3", "data.queries=1", "model.channels=4", "model.blocks=2",
            "model.downsample=stride", "optim.meta_batch_size=2", "optim.steps=1", "optim.val_every=0",
            "tracking.checkpoint_every=1", "tracking.mlflow=false", "tracking.progress=false"]
    rc, _, err = cli(capsys, "train", *tiny, "--run-dir", run)
    assert rc == 0, err
    before = snapshot(run)
    for change, shown in ((["data.ways=4"], "data.ways: checkpoint 3, given 4"),
                          (["model.channels=8"], "model.channels: checkpoint 4, given 8"),
                          (["model.blocks=3"], "model.blocks: checkpoint 2, given 3"),
                          (["model.downsample=pool"], "model.downsample: checkpoint stride, given pool"),
                          (["algorithm.name=protonet"], "algorithm.name: checkpoint maml, given protonet")):
        rc, _, err = cli(capsys, "train", *tiny, "optim.steps=2", *change, "--run-dir", run, "--resume")
        assert rc == EXIT_CONFIG and shown in err, (change, err)
    assert snapshot(run) == before
    rc, out, err = cli(capsys, "train", *tiny, "optim.steps=2", "--run-dir", run, "--resume")
    assert rc == 0 and "start at step 1/2" in out, err


def test_resume_with_allowed_changes_continues_like_an_uninterrupted_run(tmp_path, capsys):
    part, whole = tmp_path / "part", tmp_path / "whole"
    assert train(capsys, whole, "optim.steps=9")[0] == 0
    assert train(capsys, part)[0] == 0
    allowed = ["optim.steps=9", "optim.val_every=2", "optim.val_tasks=6", "optim.max_minutes=30",
               "tracking.log_every=1", "tracking.checkpoint_every=2", "scaling.max_restarts=1",
               "scaling.step_timeout_s=99", "algorithm.task_chunk_size=2", "name=renamed", "pretrain.steps=5"]
    rc, out, err = train(capsys, part, *allowed, "--resume")
    assert rc == 0, err
    assert "start at step 6/9" in out
    a, b = load_checkpoint(part), load_checkpoint(whole)
    assert a.step == b.step == 9  # task_chunk_size only regroups the float sums
    assert all(torch.allclose(a.params[k], b.params[k], atol=1e-6, rtol=1e-5) for k in b.params)
    assert [r["step"] for r in read_metrics(part)] == list(range(1, 10))


def test_every_key_off_the_allow_list_must_match():
    """Changing any config leaf is flagged unless RESUME_MAY_CHANGE (or the stage's unused keys) lists it."""
    base = Config()
    free: dict[str, list[str]] = {META_STAGE: [], PRETRAIN_STAGE: []}
    for section in dataclasses.fields(Config):
        value = getattr(base, section.name)
        leaves = ([(f"{section.name}.{f.name}", f.name) for f in dataclasses.fields(value)]
                  if dataclasses.is_dataclass(value) else [(section.name, None)])
        for key, field_name in leaves:
            changed = (dataclasses.replace(base, **{section.name: dataclasses.replace(value, **{field_name: "__x__"})})
                       if field_name else dataclasses.replace(base, **{section.name: "__x__"}))
            for stage in (META_STAGE, PRETRAIN_STAGE):
                allowed = RESUME_MAY_CHANGE | UNUSED_BY_STAGE[stage]
                listed = key in allowed or f"{key.split('.')[0]}.*" in allowed
                was = base.to_dict()[section.name]
                was = was[field_name] if field_name else was
                diff = resume_differences(base, changed, stage)
                assert diff == ([] if listed else [(key, was, "__x__")]), (key, diff)
                if listed:
                    free[stage].append(key)
    for must in ("seed", "model.name", "model.hidden_sizes", "model.channels", "model.blocks", "model.downsample",
                 "model.norm", "algorithm.name", "data.ways", "data.image_size", "data.source", "data.shots",
                 "optim.outer_lr", "optim.meta_batch_size"):
        assert must not in free[META_STAGE], must
    assert {"optim.steps", "optim.max_minutes", "optim.val_every", "optim.val_tasks", "tracking.log_every",
            "tracking.progress", "tracking.checkpoint_every", "scaling.num_workers", "scaling.address"} <= set(
        free[META_STAGE])


# --------------------------------------------------------------------------- used run directories


def test_a_fresh_run_into_a_used_run_dir_is_refused_and_nothing_changes(run6, capsys):
    before = snapshot(run6)
    rc, out, err = train(capsys, run6, "optim.steps=3")
    assert rc == EXIT_CONFIG and out == ""
    assert err.startswith(f"error: run directory {run6}: holds an earlier run (config.yaml, metrics.jsonl, "
                          "2 checkpoint(s) up to checkpoints/step_00000006.pt)"), err
    assert "--resume" in err and "--overwrite" in err and err.count("\n") == 1
    assert snapshot(run6) == before


@pytest.mark.parametrize("leftover", ["config.yaml", "metrics.jsonl", "mlflow_run_id", "checkpoints/step_00000001.pt"])
def test_any_record_of_an_earlier_run_makes_the_dir_used(tmp_path, capsys, leftover):
    run = tmp_path / "run"
    (run / leftover).parent.mkdir(parents=True, exist_ok=True)
    (run / leftover).write_text("x")
    before = snapshot(run)
    rc, _, err = train(capsys, run)
    assert rc == EXIT_CONFIG and "holds an earlier run" in err
    assert snapshot(run) == before


def test_a_used_checkpoint_uri_is_refused(run6, tmp_path, capsys):
    uri = f"file://{run6}/checkpoints"
    rc, _, err = train(capsys, tmp_path / "other", f"tracking.checkpoint_uri={uri}")
    assert rc == EXIT_CONFIG and "holds an earlier run" in err and "step_00000006.pt" in err
    assert not (tmp_path / "other").exists()


def test_overwrite_replaces_the_earlier_run(run6, capsys):
    (run6 / "mlflow_run_id").write_text("old")
    (run6 / "notes.txt").write_text("mine")  # not a run record: kept
    rc, out, err = train(capsys, run6, "optim.steps=3", "seed=5", "--overwrite")
    assert rc == 0, err
    assert out.startswith(f"--overwrite: removed the earlier run in {run6} (config.yaml, metrics.jsonl, "
                          "mlflow_run_id, 2 checkpoint(s) up to checkpoints/step_00000006.pt)")
    assert sorted(p.name for p in (run6 / "checkpoints").iterdir()) == ["step_00000003.pt"]
    assert latest_checkpoint(run6).endswith("step_00000003.pt") and load_checkpoint(run6).config.seed == 5
    assert [r["step"] for r in read_metrics(run6)] == [1, 2, 3]
    assert not (run6 / "mlflow_run_id").exists() and (run6 / "notes.txt").read_text() == "mine"
    assert "seed: 5" in (run6 / "config.yaml").read_text()


def test_resume_and_overwrite_together_are_refused(run6, capsys):
    before = snapshot(run6)
    rc, _, err = train(capsys, run6, "--resume", "--overwrite")
    assert rc == EXIT_CONFIG and "--resume and --overwrite: got both" in err
    assert snapshot(run6) == before


def test_pretrain_refuses_a_used_run_dir_before_ray_starts(run6, omniglot_root, capsys):
    before = snapshot(run6)
    tiny = [f"data.root={omniglot_root}", "model.channels=4", "pretrain.num_workers=1", "pretrain.steps=1",
            "pretrain.batch_size=8", "tracking.mlflow=false"]  # cheap even if the refusal broke
    rc, _, err = cli(capsys, "pretrain", *tiny, "--run-dir", run6)
    assert rc == EXIT_CONFIG and "holds an earlier run" in err
    rc, _, err = cli(capsys, "pretrain", *tiny, "--run-dir", run6, "--resume")
    assert rc == EXIT_CONFIG and "is a meta checkpoint, expected a pretrain one" in err
    assert snapshot(run6) == before
    assert "--overwrite" in cli_help("pretrain") and "--overwrite" in cli_help("train")


def cli_help(command: str) -> str:
    from mtl_ray.cli import _parser

    sub = next(a for a in _parser()._actions if a.dest == "command").choices[command]
    return sub.format_help()


def _job(name: str, *argv: str) -> subprocess.CompletedProcess:
    """``python jobs/<name>.py ARGV`` as ``ray job submit`` runs it (a fresh process, from the repository)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, f"jobs/{name}.py", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_meta_train_job_refuses_a_used_run_dir_and_takes_overwrite(run6):
    cfg_file = run6.parent / "sin.yaml"
    cfg_file.write_text(json.dumps({}))
    before = snapshot(run6)
    proc = _job("meta_train", str(cfg_file), *SIN, "--run-dir", str(run6))
    assert proc.returncode == EXIT_CONFIG and "holds an earlier run" in proc.stderr and snapshot(run6) == before
    proc = _job("meta_train", str(cfg_file), *SIN, "optim.steps=3", "--run-dir", str(run6), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert latest_checkpoint(run6).endswith("step_00000003.pt")
    proc = _job("pretrain", "--help")  # the pretrain job takes the flag too
    assert proc.returncode == 0 and "--overwrite" in proc.stdout and "python jobs/pretrain.py" in proc.stdout


# --------------------------------------------------------------------------- damaged checkpoints


def _truncate(path: Path, keep: int = 4000) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_resume_skips_a_truncated_newest_checkpoint_for_the_newest_intact_one(tmp_path, capsys):
    run, whole = tmp_path / "run", tmp_path / "whole"
    assert train(capsys, whole, "optim.steps=9")[0] == 0
    assert train(capsys, run)[0] == 0
    newest = run / "checkpoints" / "step_00000006.pt"
    _truncate(newest)
    rc, out, err = train(capsys, run, "optim.steps=9", "--resume")
    assert rc == 0, err
    (warning,) = [line for line in (out + err).splitlines() if line.startswith("warning: --resume skipped")]
    assert warning.startswith(f"warning: --resume skipped {newest} (not a readable mtl-ray checkpoint (")
    assert warning.endswith(f"renamed it to {newest}.corrupt; resuming from {run / 'checkpoints' / 'step_00000003.pt'}"
                            " (step 3)")
    assert "start at step 3/9" in out
    a, b = load_checkpoint(run), load_checkpoint(whole)  # the newest is the resumed run's own now
    assert a.step == 9 and all(torch.equal(a.params[k], b.params[k]) for k in b.params)
    assert (run / "checkpoints" / "step_00000006.pt.corrupt").is_file()
    load_checkpoint(newest)  # rewritten by the resumed run


def test_resume_with_no_intact_checkpoint_is_a_clear_error(run6, capsys):
    for p in (run6 / "checkpoints").iterdir():
        _truncate(p)
    before = snapshot(run6)
    rc, _, err = train(capsys, run6, "--resume")
    assert rc == EXIT_CONFIG and err.count("\n") == 1
    assert "--resume: no intact checkpoint in" in err and "2 unreadable: step_00000006.pt: not a readable" in err
    assert snapshot(run6) == before


def _rewrite(src: Path, dst: Path, edit) -> Path:
    raw = torch.load(src, weights_only=True)
    torch.save(edit(dict(raw)), dst)
    return dst


def _without(key):
    return lambda d: {k: v for k, v in d.items() if k != key}


def _with(key, value):
    return lambda d: {**d, key: value}


def _bad_model(d):
    cfg = json.loads(d["config"])
    cfg["model"]["name"] = "resnet"
    return {**d, "config": json.dumps(cfg)}


@pytest.mark.parametrize("edit,what", [
    (_without("optimizer"), "the checkpoint lacks optimizer (expected every one of"),
    (_without("config"), "the checkpoint lacks config"),
    (_with("config", '{"model": {"name": "ml'), "its embedded config is broken (JSONDecodeError:"),
    (_with("config", "[1, 2]"), "its embedded config is broken (TypeError:"),
    (_bad_model, "its embedded config is not a valid mtl-ray config (model.name: got 'resnet'"),
    (_with("shape", '{"kind": "regression"}'), "its shape is broken (KeyError:"),
    (_with("params", [1, 2]), "its params is broken (TypeError: expected a dict of named tensors)"),
    (_with("format", 7), "checkpoint format 7, expected 1"),
    (lambda d: [1, 2], "holds a list, expected an mtl-ray checkpoint"),
    (None, "not a readable mtl-ray checkpoint (")])
def test_a_damaged_checkpoint_is_a_clear_error_for_eval_and_the_api(run6, capsys, edit, what):
    bad = run6.parent / "bad.pt"
    if edit is None:
        shutil.copy(run6 / "checkpoints" / "step_00000006.pt", bad)
        _truncate(bad)
    else:
        _rewrite(run6 / "checkpoints" / "step_00000006.pt", bad, edit)
    rc, _, err = cli(capsys, "eval", bad, "--episodes", "2")
    assert rc == EXIT_CONFIG and err.count("\n") == 1
    assert err.startswith(f"error: {bad}: {what}"), err
    assert "pass an intact one" in err
    with pytest.raises(CheckpointError, match="pass an intact one") as e:
        FewShotLearner.from_checkpoint(bad)
    assert what in str(e.value) and isinstance(e.value, UserError)


def test_eval_of_a_run_whose_newest_checkpoint_is_damaged_names_the_one_before(run6, capsys):
    _truncate(run6 / "checkpoints" / "step_00000006.pt")
    rc, _, err = cli(capsys, "eval", run6, "--episodes", "2")
    assert rc == EXIT_CONFIG and "step_00000006.pt: not a readable mtl-ray checkpoint" in err
    assert f"(the run's next newest checkpoint is {run6 / 'checkpoints' / 'step_00000003.pt'})" in err


# --------------------------------------------------------------------------- file modes


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


@pytest.mark.parametrize("mask,want", [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_honour_the_umask(tmp_path, capsys, linked_root, mask, want):
    src = tmp_path / "imgs"
    for k in range(2):
        (src / f"c{k}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8), 40 * (k + i), np.uint8), "L").save(src / f"c{k}" / f"{i}.png")
    root = linked_root("images_background_small1.zip")
    with umask(mask):
        rc, _, err = train(capsys, tmp_path / "run")
        assert rc == 0, err
        rc, _, err = cli(capsys, "data", "convert", src, tmp_path / "t.parquet", "--image-size", "8")
        assert rc == 0, err
        cache = omniglot.load_omniglot_table(
            from_dict({"data": {"root": str(root), "archives": ["images_background_small1"]}}).data).cache_path
    run = tmp_path / "run"
    files = [run / "config.yaml", run / "metrics.jsonl", *sorted((run / "checkpoints").iterdir()),
             tmp_path / "t.parquet", Path(cache)]  # the Omniglot cache
    assert {str(p): oct(_mode(p)) for p in files} == {str(p): oct(want) for p in files}


# --------------------------------------------------------------------------- failures at start


def test_unknown_checkpoint_uri_scheme_fails_at_start(tmp_path, capsys):
    run = tmp_path / "run"
    rc, out, err = train(capsys, run, "tracking.checkpoint_uri=foo://x")
    assert rc == EXIT_CONFIG and out == "" and err.count("\n") == 1
    assert "checkpoint location 'foo://x': pyarrow.fs cannot open it" in err
    assert not run.exists()


@pytest.mark.parametrize("how", ["config", "env"])
def test_unreachable_ray_address_fails_at_start_without_hanging(tmp_path, how):
    """In a fresh process, as a user runs it: in this one an earlier test's Ray may be up, and is then reused."""
    run = tmp_path / "run"
    extra = ["scaling.num_workers=1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if how == "config":
        extra.append("scaling.address=127.0.0.1:1")
    else:
        env["RAY_ADDRESS"] = "127.0.0.1:1"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "mtl_ray.cli", "train", *SIN, *extra, "--run-dir", str(run)],
                          env=env, capture_output=True, text=True, timeout=120)
    rc, err = proc.returncode, proc.stderr
    assert time.monotonic() - t0 < 60
    where = "scaling.address" if how == "config" else "$RAY_ADDRESS"
    assert rc == EXIT_CONFIG and err.count("\n") == 1
    assert err.startswith(f"error: {where}: got '127.0.0.1:1', but nothing accepts connections there"), err
    assert not run.exists()


@contextlib.contextmanager
def read_only(path: Path):
    """Make ``path`` refuse new files for real: ``chattr +i`` as root (root ignores modes), else ``chmod 555``."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)]).returncode != 0:
            pytest.skip("running as root and chattr +i is not available here")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)


@pytest.mark.parametrize("which", ["run dir", "checkpoint dir", "parent"])
def test_a_read_only_directory_fails_at_start_with_nothing_written(tmp_path, capsys, which):
    run = tmp_path / "run"
    ro = {"run dir": run, "checkpoint dir": run / "checkpoints", "parent": tmp_path}[which]
    ro.mkdir(parents=True, exist_ok=True)
    before = snapshot(tmp_path)
    with read_only(ro):
        rc, out, err = train(capsys, run)
    assert rc == EXIT_CONFIG and out == "" and err.count("\n") == 1
    assert err.startswith("error: cannot write "), err
    assert "Operation not permitted" in err or "Permission denied" in err
    assert snapshot(tmp_path) == before


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("a small tmpfs cannot be mounted here (needs root and mount)")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def _fill(directory: Path, leave: int = 0) -> None:
    """Write until the filesystem is full, then give back ``leave`` bytes."""
    with open(directory / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
    size = (directory / "filler").stat().st_size
    os.truncate(directory / "filler", max(0, size - leave))


def test_a_full_disk_fails_at_start_with_nothing_written(tmp_path, capsys):
    with small_tmpfs(tmp_path / "disk", "64k") as disk:
        _fill(disk)
        before = snapshot(disk)
        rc, out, err = train(capsys, disk / "run")
        assert rc == EXIT_CONFIG and out == "" and err.count("\n") == 1
        assert "No space left on device (ENOSPC)" in err
        assert snapshot(disk) == before


class _AfterStep:
    """A callback that does ``act()`` once, after step ``step`` (its checkpoint is written by then)."""

    def __init__(self, step, act):
        self.step, self.act = step, act

    def on_metrics(self, step, metrics):
        if step == self.step:
            self.act()


def _no_temp_files(run: Path) -> bool:
    return not [p for p in run.rglob(".*") if p.is_file()]


def test_a_disk_that_fills_mid_run_stops_it_with_the_previous_checkpoint_intact(tmp_path, capsys):
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        run = disk / "run"
        with pytest.raises(CheckpointError) as e:
            # 8 KiB left: metrics.jsonl's appends fit, the 12 KiB checkpoint at step 6 does not
            run_training(sin_cfg(), run, callbacks=[_AfterStep(3, lambda: _fill(disk, 8192))], out=sys.stdout)
        msg = str(e.value)
        assert msg.startswith(f"checkpoint {run / 'checkpoints' / 'step_00000006.pt'}: cannot write it (No space "
                              "left on device)"), msg
        assert f"the newest earlier checkpoint, {run / 'checkpoints' / 'step_00000003.pt'}, is intact" in msg
        assert "--resume" in msg and isinstance(e.value, UserError)
        assert load_checkpoint(run).step == 3 and _no_temp_files(run)
        (disk / "filler").unlink()
        summary = run_training(sin_cfg(), run, resume=True, out=sys.stdout)
        assert summary.steps == 3 and load_checkpoint(run).step == 6


def test_a_checkpoint_dir_made_read_only_mid_run_stops_it_with_the_previous_checkpoint_intact(tmp_path, capsys):
    run = tmp_path / "run"
    stack = contextlib.ExitStack()
    with stack, pytest.raises(CheckpointError) as e:
        run_training(sin_cfg(), run, out=sys.stdout,
                     callbacks=[_AfterStep(3, lambda: stack.enter_context(read_only(run / "checkpoints")))])
    assert "step_00000006.pt: cannot write it (" in str(e.value)
    assert "step_00000003.pt, is intact" in str(e.value)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000003.pt"]
    assert load_checkpoint(run).step == 3
    rc, out, err = train(capsys, run, "--resume")
    assert rc == 0 and "start at step 3/6" in out, err


def test_a_budgeted_run_prints_the_exact_command_that_continues_it(tmp_path):
    """``optim.max_minutes`` reached: the last line is a command that, run as printed, resumes the run."""
    run = tmp_path / "budget"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MTL_RAY_OVERRIDES")}
    argv = ["train", *SIN, "optim.max_minutes=0.00001", "--run-dir", str(run)]  # ends after its first step
    proc = subprocess.run([sys.executable, "-m", "mtl_ray.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("budget reached at step 1/6 (optim.max_minutes=1e-05); continue with: "), last
    command = last.split("continue with: ", 1)[1]
    again = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=300,
                           cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "start at step 1/6" in again.stdout and "budget reached at step 2/6" in again.stdout, again.stdout


def test_the_time_left_is_the_smaller_of_the_steps_left_and_the_budget_left():
    import io

    from mtl_ray.tracking.local import Progress

    bar = Progress(1000, initial=0, max_minutes=1.0, stream=io.StringIO())
    bar.t0 -= 10.0  # 10 s into the run, 10 of 1000 steps done: 990 s at this pace, but 50 s of budget left
    assert 49.0 < bar.eta_s(10) <= 50.0
    unbudgeted = Progress(1000, initial=0, stream=io.StringIO())
    unbudgeted.t0 -= 10.0
    assert 989.0 < unbudgeted.eta_s(10) < 992.0
    bar.on_metrics(10, {})  # the line a log (no terminal) gets every `every` steps names the time left
    assert "step 10/1000  left 0m50s" in bar.stream.getvalue() or "left 0m49s" in bar.stream.getvalue()
