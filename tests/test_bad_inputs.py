"""Every bad input gets one clear error before anything starts: exit 2, the bad value named, nothing written.

One table of cases over the entry points (train, eval, tune, pretrain, validate, data convert), each run through
the real CLI: ``mtl_ray.cli.main([...])`` in this process, or ``python -m mtl_ray.cli`` in a subprocess for the
cases that start Ray or must show no traceback on stderr. Before and after each case the test snapshots every file
under its tmp directory (run directories and the MLflow store: ``tracking.run_dir`` is there), the data root (its
Omniglot cache) and the shared assets (the checkpoint ``eval`` reads); they must be identical afterwards. The
memory cases ask for terabytes, so they fail on any machine. The Python API and pyfunc model inputs are
tests/test_api.py's and tests/test_serving.py's; the served model's request-size limit is
tests/test_serving_limits.py's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml

from mtl_ray.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "jobs" / "configs"
SIN = str(CONFIGS / "sinusoid_maml.yaml")
OMNI = str(CONFIGS / "omniglot_maml.yaml")
PRETRAIN = str(CONFIGS / "omniglot_pretrain.yaml")
TB = 10**12  # what the memory cases ask for is at least this: no machine has it


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # {tmp} {runs} {root} {assets} {ckpt} {configs} are filled in
    needles: tuple[str, ...]  # all must be in stderr: the bad value and what was expected
    files: dict[str, str | bytes] = field(default_factory=dict)  # inputs written into {tmp} before the snapshot
    subprocess: bool = False  # run `python -m mtl_ray.cli` (Ray starts, or stderr must show no traceback)
    written: tuple[str, ...] = ()  # paths under {tmp} that others' code writes before the error (see the case)


def _sweep(space: dict, base: str = SIN, **extra) -> str:
    return yaml.safe_dump({"base": base, "space": space, **extra})


R = "tracking.run_dir={runs}"
OMNI_ROOT = "data.root={root}"
CASES = [
    # ------------------------------------------------------------------ train: NaN and infinity in any float field
    Case("train-inner_lr-inf", ("train", SIN, "algorithm.inner_lr=.inf", R),
         ("algorithm.inner_lr: got inf, expected a finite number",)),
    Case("train-inner_lr-nan", ("train", SIN, "algorithm.inner_lr=.nan", R),
         ("algorithm.inner_lr: got nan, expected a finite number",)),
    Case("train-outer_lr-minus-inf", ("train", SIN, "optim.outer_lr=-.inf", R),
         ("optim.outer_lr: got -inf, expected a finite number",)),
    Case("train-outer_lr-nan-string", ("train", SIN, "optim.outer_lr=nan", R),
         ("optim.outer_lr: got nan, expected a finite number",)),
    Case("train-grad_clip-inf-string", ("train", SIN, "optim.grad_clip=inf", R),
         ("optim.grad_clip: got inf, expected a finite number",)),
    Case("train-max_minutes-overflow", ("train", SIN, "optim.max_minutes=1e999", R),
         ("optim.max_minutes: got inf, expected a finite number",)),
    Case("train-step_timeout-nan", ("train", SIN, "scaling.step_timeout_s=.nan", R),
         ("scaling.step_timeout_s: got nan, expected a finite number",)),
    Case("train-cpus_per_worker-Infinity", ("train", SIN, "scaling.cpus_per_worker=Infinity", R),
         ("scaling.cpus_per_worker: got inf, expected a finite number",)),
    Case("train-val_fraction-nan", ("train", SIN, "data.val_fraction=.nan", R),
         ("data.val_fraction: got nan, expected a finite number",)),
    Case("train-pretrain-section-too", ("train", SIN, "pretrain.probe_lr=.inf", R),
         ("pretrain.probe_lr: got inf, expected a finite number",)),
    Case("train-nonfinite-listed-with-others", ("train", SIN, "algorithm.inner_lr=.inf", "optim.outer_lr=-1", R),
         ("algorithm.inner_lr: got inf, expected a finite number", "optim.outer_lr: got -1.0, expected a value > 0",
          "2 problem(s)")),
    Case("train-nonfinite-listed-with-type-errors", ("train", SIN, "optim.steps=.inf", "optim.outer_lr=.nan", R),
         ("optim.steps: got inf (float), expected an integer", "optim.outer_lr: got nan, expected a finite number")),
    Case("train-nonfinite-in-the-file", ("train", "{tmp}/inf.yaml", R),
         ("algorithm.inner_lr: got inf, expected a finite number",),
         files={"inf.yaml": "data: {source: sinusoid}\nmodel: {name: mlp}\nalgorithm: {inner_lr: .inf}\n"}),
    # ------------------------------------------------------------------ train: files that are not YAML configs
    Case("train-config-not-utf8", ("train", "{tmp}/latin1.yaml", R),
         ("latin1.yaml' is not UTF-8 text (byte b'\\xe9' at offset 7)", "save it as UTF-8"),
         files={"latin1.yaml": "name: r\xe9sum\xe9\n".encode("latin-1")}, subprocess=True),
    Case("train-config-is-a-directory", ("train", "{tmp}/configs", R),
         ("configs' is a directory, expected a YAML file",), files={"configs/a.yaml": "seed: 1\n"}),
    # ------------------------------------------------------------------ train: sizes that cannot fit in memory
    Case("train-meta_batch-too-big-sinusoid", ("train", SIN, "optim.meta_batch_size=100000000000", R),
         ("memory: a training step with optim.meta_batch_size=100000000000", "available",
          "lower optim.meta_batch_size")),
    Case("train-queries-too-big-sinusoid", ("train", SIN, "data.queries=1000000000", R),
         ("memory: a training step", "10+1000000000 points", "data.queries")),
    Case("train-meta_batch-too-big-omniglot", ("train", OMNI, OMNI_ROOT, "optim.meta_batch_size=100000000", R),
         ("optim.meta_batch_size=100000000 (50000000 per shard of 5-way 1+15 28x28 images", "TB here",
          "lower optim.meta_batch_size"), subprocess=True),
    Case("train-image_size-too-big-no-cache-written", ("train", OMNI, OMNI_ROOT, "data.image_size=20000", R),
         ("20000x20000 images", "or data.image_size")),
    Case("train-chunk-too-big", ("train", OMNI, OMNI_ROOT, "optim.meta_batch_size=200000",
                                 "algorithm.task_chunk_size=100000", R),
         ("algorithm.task_chunk_size=100000: 100000 tasks per vmap call",
          "set algorithm.task_chunk_size below 100000")),
    Case("train-val_tasks-too-many", ("train", SIN, "optim.val_tasks=100000000000", R),
         ("memory: validation with optim.val_tasks=100000000000", "lower optim.val_tasks")),
    Case("train-one-task-too-big", ("train", OMNI, OMNI_ROOT, "data.ways=5", "data.image_size=6000", R),
         ("one task alone needs", "lower data.ways, data.shots, data.queries or data.image_size")),
    # ------------------------------------------------------------------ train: Parquet tables that are not image tables
    Case("train-parquet-image-strings", ("train", "data.source=parquet", "data.path={assets}/strings.parquet", R),
         ("strings.parquet: column 'image' has type string, expected binary", "mtl-ray data convert")),
    Case("train-parquet-image-floats", ("train", "data.source=parquet", "data.path={assets}/floats.parquet", R),
         ("floats.parquet: column 'image' has type double, expected binary",)),
    Case("train-parquet-decompression-bomb", ("train", "data.source=parquet", "data.path={assets}/bomb.parquet", R),
         ("bomb.parquet row 0 (label 'c0'): got an image too large to decode safely", "downscale it or remove it")),
    # ------------------------------------------------------------------ train: the workers cannot be placed
    # The workers are placed before the run directory's first write, so the same command can be run again.
    Case("train-workers-cannot-be-placed", ("train", SIN, "scaling.num_workers=1", "scaling.gpus_per_worker=4",
                                            "scaling.step_timeout_s=20", "--run-dir", "{runs}/placed", R),
         ("scaling.num_workers=1: got 1 x (1 CPU, 4 GPU) asked of the local Ray started here, which has",
          "Lower scaling.num_workers"), subprocess=True),
    # ------------------------------------------------------------------ eval
    Case("eval-episodes-zero", ("eval", "{ckpt}", "--episodes", "0"), ("--episodes: got 0, expected >= 1",)),
    Case("eval-episodes-too-many", ("eval", "{ckpt}", "--episodes", "100000000000"),
         ("memory: evaluation with --episodes=100000000000", "lower --episodes")),
    Case("eval-shards-too-big", ("eval", "{ckpt}", "--episodes", "1000000000", "optim.meta_batch_size=1000000000"),
         ("memory: evaluation with --episodes=1000000000 (1000000000 per shard", "lower optim.meta_batch_size")),
    Case("eval-queries-too-big", ("eval", "{ckpt}", "--episodes", "10", "data.queries=1000000000"),
         ("memory: evaluation", "5+1000000000 points")),
    Case("eval-override-inf", ("eval", "{ckpt}", "algorithm.inner_lr=.inf"),
         ("algorithm.inner_lr: got inf, expected a finite number",)),
    Case("eval-override-nan-string", ("eval", "{ckpt}", "algorithm.inner_lr=NaN"),
         ("algorithm.inner_lr: got nan, expected a finite number",)),
    # ------------------------------------------------------------------ tune
    Case("tune-uniform-over-an-integer", ("tune", "{tmp}/s.yaml", "--sweep-dir", "{tmp}/sweep", R),
         ("sweep.space.optim.meta_batch_size.uniform: got a continuous range [8, 64] over an integer key",
          "expected randint"), files={"s.yaml": _sweep({"optim.meta_batch_size": {"uniform": [8, 64]}})}),
    Case("tune-loguniform-over-an-integer", ("tune", "{tmp}/s.yaml", "--sweep-dir", "{tmp}/sweep", R),
         ("sweep.space.algorithm.inner_steps.loguniform: got a continuous range [1, 5] over an integer key",),
         files={"s.yaml": _sweep({"algorithm.inner_steps": {"loguniform": [1, 5]}})}),
    Case("tune-uniform-over-a-bool", ("tune", "{tmp}/s.yaml", "--sweep-dir", "{tmp}/sweep", R),
         ("sweep.space.algorithm.first_order.uniform: got a continuous range [0, 1] over a bool key",
          "expected choice"), files={"s.yaml": _sweep({"algorithm.first_order": {"uniform": [0, 1]}})}),
    Case("tune-ways-above-the-classes", ("tune", "{tmp}/s.yaml", "--sweep-dir", "{tmp}/sweep", R, OMNI_ROOT),
         ("sweep.space.data.ways value 100: data.ways: got 100, expected <=", "classes in the 'val' split"),
         files={"s.yaml": _sweep({"data.ways": {"choice": [5, 100]}}, base=OMNI)}),
    Case("tune-value-cannot-fit", ("tune", "{tmp}/s.yaml", "--sweep-dir", "{tmp}/sweep", R),
         ("sweep.space.optim.meta_batch_size value 100000000000: memory: a training step",),
         files={"s.yaml": _sweep({"optim.meta_batch_size": {"grid": [8, 100000000000]}}, search="grid")}),
    Case("tune-values-cannot-fit-together", ("tune", "{tmp}/s.yaml", "--sweep-dir", "{tmp}/sweep", R),
         ("sweep.space with data.queries=1000000, optim.meta_batch_size=1000000 together", "memory:"),
         files={"s.yaml": _sweep({"data.queries": {"choice": [10, 1000000]},
                                  "optim.meta_batch_size": {"choice": [25, 1000000]}})}),
    Case("tune-choice-inf", ("tune", "{tmp}/s.yaml", "--sweep-dir", "{tmp}/sweep", R),
         ("sweep.space.algorithm.inner_lr value inf: algorithm.inner_lr: got inf, expected a finite number",),
         files={"s.yaml": _sweep({"algorithm.inner_lr": {"choice": [0.1, float("inf")]}})}),
    Case("tune-uniform-to-inf", ("tune", "{tmp}/s.yaml", "--sweep-dir", "{tmp}/sweep", R),
         ("sweep.space.optim.outer_lr value inf: optim.outer_lr: got inf, expected a finite number",),
         files={"s.yaml": _sweep({"optim.outer_lr": {"uniform": [0.001, float("inf")]}})}),
    Case("tune-trial_cpus-nan", ("tune", "{tmp}/s.yaml", "--sweep-dir", "{tmp}/sweep", R),
         ("sweep.trial_cpus: got nan, expected a finite number",),
         files={"s.yaml": _sweep({"algorithm.inner_lr": {"choice": [0.1]}}, trial_cpus=float("nan"))}),
    Case("tune-resume-missing-dir", ("tune", "{tmp}/s.yaml", "--sweep-dir", "{tmp}/typo", "--resume", R),
         ("--resume: got --sweep-dir", "typo', which does not exist", "drop --resume to start a new sweep"),
         files={"s.yaml": _sweep({"algorithm.inner_lr": {"choice": [0.1]}})}, subprocess=True),
    Case("tune-resume-dir-without-a-sweep", ("tune", "{tmp}/s.yaml", "--sweep-dir", "{tmp}/other", "--resume", R),
         ("other', which holds no sweep to resume",),
         files={"s.yaml": _sweep({"algorithm.inner_lr": {"choice": [0.1]}}), "other/notes.txt": "not a sweep\n"}),
    Case("tune-sweep-not-utf8", ("tune", "{tmp}/s.yaml", "--sweep-dir", "{tmp}/sweep"),
         ("s.yaml' is not UTF-8 text",), files={"s.yaml": b"base: \xff\xfe\n"}),
    Case("tune-sweep-is-a-directory", ("tune", "{tmp}", "--sweep-dir", "{tmp}/sweep"),
         ("is a directory, expected a YAML file",)),
    # ------------------------------------------------------------------ pretrain
    Case("pretrain-lr-nan", ("pretrain", PRETRAIN, OMNI_ROOT, "pretrain.lr=.nan", R),
         ("pretrain.lr: got nan, expected a finite number",)),
    Case("pretrain-weight_decay-minus-inf", ("pretrain", PRETRAIN, OMNI_ROOT, "pretrain.weight_decay=-.inf", R),
         ("pretrain.weight_decay: got -inf, expected a finite number",)),
    Case("pretrain-batch-too-big", ("pretrain", PRETRAIN, OMNI_ROOT, "pretrain.batch_size=2000000000", R),
         ("memory: a pretraining step with pretrain.batch_size=2000000000", "lower pretrain.batch_size")),
    Case("pretrain-image_size-too-big-no-cache-written", ("pretrain", PRETRAIN, OMNI_ROOT, "data.image_size=20000", R),
         ("memory: a pretraining step", "lower data.image_size")),
    Case("pretrain-config-not-utf8", ("pretrain", "{tmp}/p.yaml", R), ("p.yaml' is not UTF-8 text",),
         files={"p.yaml": b"\x89PNG\r\n\x1a\n"}),
    # ------------------------------------------------------------------ validate
    Case("validate-not-utf8", ("validate", "{tmp}/a.yaml"), ("a.yaml' is not UTF-8 text",),
         files={"a.yaml": b"seed: 1\n\xc3\x28\n"}),
    Case("validate-directory", ("validate", "{tmp}/d"), ("d' is a directory, expected a YAML file",),
         files={"d/x.yaml": "seed: 1\n"}),
    Case("validate-nonfinite-in-a-file", ("validate", "{tmp}/a.yaml"),
         ("optim.outer_lr: got inf, expected a finite number",),
         files={"a.yaml": "data: {source: sinusoid}\nmodel: {name: mlp}\noptim: {outer_lr: .inf}\n"}),
    Case("validate-memory-in-a-file", ("validate", "{tmp}/a.yaml"),
         ("memory: a training step with optim.meta_batch_size=100000000000",),
         files={"a.yaml": "data: {source: sinusoid}\nmodel: {name: mlp}\noptim: {meta_batch_size: 100000000000}\n"}),
    Case("validate-sweep-uniform-over-an-integer", ("validate", "{tmp}/s.yaml"),
         ("sweep.space.data.shots.uniform: got a continuous range [1, 5] over an integer key",),
         files={"s.yaml": _sweep({"data.shots": {"uniform": [1, 5]}})}),
    Case("validate-sweep-data-check", ("validate", "{tmp}/s.yaml"),
         ("sweep.space.data.ways value 100: data.ways: got 100, expected <=",),
         files={"s.yaml": _sweep({"data.ways": {"choice": [100]}}, base=OMNI, overrides=["data.root={root}"])}),
    Case("validate-one-bad-among-good", ("validate", SIN, "{tmp}/a.yaml"),
         ("a.yaml: invalid config", "scaling.gpus_per_worker: got nan"),
         files={"a.yaml": "data: {source: sinusoid}\nmodel: {name: mlp}\nscaling: {gpus_per_worker: .nan}\n"}),
    # ------------------------------------------------------------------ data convert
    Case("convert-into-an-existing-directory", ("data", "convert", "{assets}/imgs", "{tmp}/out"),
         ("out: got an existing directory as the output, expected the path of the Parquet file",
          "imgs.parquet"), files={"out/keep.txt": "mine\n"}),
    Case("convert-decompression-bomb", ("data", "convert", "{assets}/bomb", "{tmp}/t.parquet"),
         ("big.png: got an image too large to decode safely", "exceeds limit of", "downscale it or remove it"),
         subprocess=True),
    Case("convert-decompression-bomb-warning-size", ("data", "convert", "{assets}/warnbomb", "{tmp}/t.parquet"),
         ("big.png: got an image too large to decode safely", "could be decompression bomb")),
]


# --------------------------------------------------------------------------- assets and snapshots


@pytest.fixture(scope="module")
def assets(tmp_path_factory, sinusoid_run) -> Path:
    """Inputs the cases read: a sinusoid checkpoint, image folders (one a decompression bomb), Parquet tables."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    d = tmp_path_factory.mktemp("bad_input_assets")
    shutil.copytree(sinusoid_run, d / "run")  # a copy: the snapshot compares these assets before and after
    for c in range(3):
        (d / "imgs" / f"c{c}").mkdir(parents=True)
        Image.fromarray(np.full((8, 8), 40 * c, np.uint8)).save(d / "imgs" / f"c{c}" / "0.png")
    limit = Image.MAX_IMAGE_PIXELS
    side_error = int((2 * limit) ** 0.5) + 100  # above 2x the limit: Pillow raises DecompressionBombError
    side_warn = int(limit**0.5) + 100  # above the limit: Pillow only warns (and would decode ~90 MB)
    for name, side in (("bomb", side_error), ("warnbomb", side_warn)):
        (d / name / "c0").mkdir(parents=True)
        Image.new("L", (side, side)).save(d / name / "c0" / "big.png")  # ~200 KB of zlib for up to 190 MB
    pq.write_table(pa.table({"label": ["a", "b"], "image": ["x", "y"]}), d / "strings.parquet")
    pq.write_table(pa.table({"label": ["a", "b"], "image": [1.0, 2.0]}), d / "floats.parquet")
    bomb = (d / "bomb" / "c0" / "big.png").read_bytes()
    pq.write_table(pa.table({"label": ["c0", "c1"], "image": pa.array([bomb, bomb], pa.binary())}), d / "bomb.parquet")
    return d


def snapshot(*roots: Path) -> dict[str, tuple[int, int] | None]:
    """Every file (size, mtime) and directory under ``roots``."""
    out: dict[str, tuple[int, int] | None] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for n in dirnames:
                out[os.path.join(dirpath, n)] = None
            for n in filenames:
                st = os.lstat(os.path.join(dirpath, n))
                out[os.path.join(dirpath, n)] = (st.st_size, st.st_mtime_ns)
    return out


def _fill(text: str, values: dict[str, str]) -> str:
    for k, v in values.items():
        text = text.replace("{" + k + "}", v)
    return text


def run_cli(argv: list[str], *, in_subprocess: bool, capsys, data_root: Path) -> tuple[int, str]:
    if not in_subprocess:
        rc = main(argv)
        return rc, capsys.readouterr().err
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"MTL_RAY_DATA_DIR": str(data_root), "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"})
    proc = subprocess.run([sys.executable, "-m", "mtl_ray.cli", *argv], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stderr


def test_there_are_enough_cases_over_every_entry_point():
    commands = {c.argv[0] for c in CASES}
    assert commands == {"train", "eval", "tune", "pretrain", "validate", "data"}
    assert len(CASES) >= 45 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_exits_2_naming_the_value_and_writes_nothing(case, assets, omniglot_root, tmp_path, capsys,
                                                                monkeypatch):
    monkeypatch.setenv("MTL_RAY_DATA_DIR", str(omniglot_root))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    values = {"tmp": str(tmp_path), "runs": str(tmp_path / "runs"), "root": str(omniglot_root),
              "assets": str(assets), "ckpt": str(assets / "run"), "configs": str(CONFIGS)}
    for name, content in case.files.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(_fill(content, values))
    roots = (tmp_path, omniglot_root, assets)
    before = snapshot(*roots)
    rc, err = run_cli([_fill(a, values) for a in case.argv], in_subprocess=case.subprocess, capsys=capsys,
                      data_root=omniglot_root)
    assert rc == 2, err
    starts = ("error: ", f"{_fill(case.argv[1], values)}: ", f"{_fill(case.argv[-1], values)}: ")
    assert any(line.startswith(starts) for line in err.splitlines()), err  # Ray may log a line before it
    for needle in case.needles:
        assert _fill(needle, values) in err, (needle, err)
    after = snapshot(*roots)
    allowed = tuple(str(tmp_path / w) for w in case.written)
    new = {k: v for k, v in after.items() if before.get(k, "absent") != v and not k.startswith(allowed)}
    gone = [k for k in before if k not in after]
    assert not new and not gone, f"written: {sorted(new)}; removed: {gone}"


def test_the_snapshot_sees_a_write(tmp_path):
    """The 'nothing written' check can fail: a file appearing (or changing) under a root shows."""
    before = snapshot(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "config.yaml").write_text("seed: 0\n")
    assert snapshot(tmp_path) != before


def test_every_float_field_is_covered_by_the_finite_check():
    """The check is generated from the schema: every float field of every section refuses NaN (a new field too)."""
    from mtl_ray.components import from_dict
    from mtl_ray.config import Config, ConfigError, float_fields

    fields = float_fields()
    assert len(fields) >= 13 and ("algorithm", "inner_lr") in fields and ("scaling", "step_timeout_s") in fields
    for section, name in fields:
        with pytest.raises(ConfigError) as e:
            from_dict({}, [f"{section}.{name}=.nan"])
        default = getattr(getattr(Config(), section), name)
        got = "(nan,)" if isinstance(default, tuple) else "nan"  # a tuple[float, ...] field reads .nan as (nan,)
        assert e.value.problems == [f"{section}.{name}: got {got}, expected a finite number (NaN and infinity are "
                                    f"not); e.g. the default {default!r}"]
