"""Small end-to-end runs through the real CLI (subprocess) on real data: learning, eval, errors, API."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtl_ray.api import FewShotLearner
from mtl_ray.config import UserError
from mtl_ray.data.lake import load_lake_runs
from mtl_ray.tracking.local import read_metrics

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "jobs" / "configs"


def cli(*args: str, env_root: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # not the test session's Ray
    env["PYTHONUNBUFFERED"] = "1"
    if env_root is not None:
        env["MTL_RAY_DATA_DIR"] = str(env_root)
    proc = subprocess.run([sys.executable, "-m", "mtl_ray.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def _ci_value(text: str, key: str) -> float:
    m = re.search(rf"{re.escape(key)}: ([0-9.]+)", text)
    assert m, text
    return float(m.group(1))


@pytest.mark.slow
def test_sinusoid_maml_post_adaptation_mse_far_below_pre_adaptation(tmp_path):
    run = tmp_path / "sin"
    out = cli("train", str(CONFIGS / "sinusoid_maml.yaml"), "optim.steps=1500", "optim.val_every=500",
              "--run-dir", str(run))
    assert "final meta-validation" in out.stdout and "checkpoint:" in out.stdout
    post = _ci_value(cli("eval", str(run), "--episodes", "300").stdout, "meta_test/loss")
    pre = _ci_value(cli("eval", str(run), "--episodes", "300", "algorithm.eval_inner_steps=0").stdout,
                    "meta_test/loss")
    assert post < 0.5 * pre, (pre, post)
    steps = [r["step"] for r in read_metrics(run)]
    assert steps == list(range(1, 1501))
    # the run is in the default MLflow store beside the run dir, with the model as a pyfunc
    import mlflow
    import numpy as np

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        run_id = (run / "mlflow_run_id").read_text()
        info = mlflow.get_run(run_id).info
        assert info.status == "FINISHED"
        (model,) = [m for m in mlflow.search_logged_models(experiment_ids=[info.experiment_id], output_format="list")
                    if m.source_run_id == run_id]
        x = np.linspace(-4, 4, 10, dtype=np.float32)[:, None]
        y = (2.0 * np.sin(x[:, 0] + 0.5)).astype(np.float32)
        pred = mlflow.pyfunc.load_model(model.model_uri).predict({"support_x": x, "support_y": y, "query_x": x})
        want = FewShotLearner.from_checkpoint(run).adapt(torch.from_numpy(x), torch.from_numpy(y)).predict(
            torch.from_numpy(x))
        assert np.allclose(np.asarray(pred, dtype=np.float32).ravel(), np.asarray(want, dtype=np.float32).ravel(),
                           atol=1e-5)
    finally:
        mlflow.set_tracking_uri(None)


OMNIGLOT_FAST = ["data.queries=5", "model.downsample=stride", "optim.val_every=0", "tracking.checkpoint_every=0",
                 "tracking.log_every=20"]


@pytest.mark.slow
@pytest.mark.parametrize("config,extra", [
    ("omniglot_protonet.yaml", ["optim.steps=100", "optim.meta_batch_size=8"]),
    ("omniglot_maml.yaml", ["optim.steps=250", "optim.meta_batch_size=8", "algorithm.first_order=true"]),
])
def test_omniglot_held_out_alphabets_far_above_chance(config, extra, omniglot_root, shared_data, tmp_path):
    run = tmp_path / "run"
    out = cli("train", str(CONFIGS / config), *OMNIGLOT_FAST, *extra, "--run-dir", str(run), env_root=omniglot_root)
    if "maml" in config:  # the main job's config: Ray worker actors on a local Ray that mtl-ray starts itself
        assert "2 worker(s)" in out.stdout and "worker faults: 0" in out.stdout, out.stdout
    text = cli("eval", str(run), "--episodes", "200", env_root=omniglot_root).stdout
    acc = _ci_value(text, "meta_test/acc")
    assert acc > 40.0, text  # chance is 20% for 5-way; held-out alphabets Korean + Tagalog
    # the Python API adapts and predicts like the evaluator: same checkpoint, a held-out task
    learner = FewShotLearner.from_checkpoint(run)
    from mtl_ray.data import build_task_source

    source = build_task_source(learner.cfg.replace(**{"data.root": str(omniglot_root)}))
    task = source.sample("test", 0, [0])
    names = [f"char{int(i)}" for i in task.support_y[0]]
    adapted = learner.adapt(task.support_x[0], names)
    preds = adapted.predict(task.query_x[0])
    assert len(preds) == task.query_x.shape[1] and set(preds) <= set(names)
    truth = [f"char{int(i)}" for i in task.query_y[0]]
    assert sum(p == t for p, t in zip(preds, truth, strict=True)) / len(truth) > 0.2
    if "protonet" in config:
        zip_path = shared_data / "omniglot" / "lake_oneshot_runs_01-10.zip"
        lake = cli("eval", str(run), "--lake", str(zip_path), env_root=omniglot_root).stdout
        err = float(re.search(r"error ([0-9.]+)%", lake).group(1))
        assert 0.0 <= err < 95.0, lake  # better than chance (95%) on Lake's 20-way runs


@pytest.mark.slow
def test_api_adapts_to_a_folder_of_images(omniglot_root, tmp_path, shared_data):
    from PIL import Image

    run = tmp_path / "run"
    cli("train", str(CONFIGS / "omniglot_protonet.yaml"), *OMNIGLOT_FAST, "optim.steps=40",
        "optim.meta_batch_size=4", "--run-dir", str(run), env_root=omniglot_root)
    runs = load_lake_runs(shared_data / "omniglot" / "lake_oneshot_runs_01-10.zip", 28)
    r = runs[0]
    folder = tmp_path / "support"
    for i in range(20):
        (folder / f"class{i:02d}").mkdir(parents=True)
        img = (255 - (r.support_x[i, 0] * 255).round().byte()).numpy()  # back to black ink on white
        Image.fromarray(img).save(folder / f"class{i:02d}" / "a.png")
    learner = FewShotLearner.from_checkpoint(run, invert=True)
    adapted = learner.adapt_folder(folder)
    assert adapted.classes == tuple(f"class{i:02d}" for i in range(20))
    # predicting the support images themselves returns their own classes (a 1-shot prototype sanity check)
    preds = adapted.predict_images(sorted(folder.glob("*/a.png")))
    assert sum(p == f"class{i:02d}" for i, p in enumerate(preds)) >= 18
    with pytest.raises(UserError, match="expected \\[M, 1, 28, 28\\]"):
        adapted.predict(torch.zeros(2, 1, 14, 14))


def test_bad_config_exits_2_listing_every_problem(tmp_path):
    proc = cli("train", str(CONFIGS / "sinusoid_maml.yaml"), "optim.outer_lr=-1", "algorithm.name=nope",
               "data.shots=0", "--run-dir", str(tmp_path / "r"), check=False)
    assert proc.returncode == 2
    for needle in ["optim.outer_lr: got -1.0", "algorithm.name: got 'nope'", "data.shots: got 0"]:
        assert needle in proc.stderr
    assert not (tmp_path / "r").exists()  # nothing started, nothing written


def test_missing_data_exits_2_naming_file_and_url(tmp_path):
    proc = cli("train", str(CONFIGS / "omniglot_protonet.yaml"), f"data.root={tmp_path}", check=False)
    assert proc.returncode == 2
    assert "images_background_small1.zip" in proc.stderr and "github.com/brendenlake/omniglot" in proc.stderr


def test_resume_needs_a_run(tmp_path):
    proc = cli("train", str(CONFIGS / "sinusoid_maml.yaml"), "--resume", check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr


def test_data_convert_then_train_on_parquet(tmp_path):
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    for c in range(12):
        (tmp_path / "imgs" / f"c{c}").mkdir(parents=True)
        for i in range(4):
            arr = (torch.rand(20, 20, generator=rng) * 255).byte().numpy()
            Image.fromarray(arr).save(tmp_path / "imgs" / f"c{c}" / f"{i}.png")
    cli("data", "convert", str(tmp_path / "imgs"), str(tmp_path / "t.parquet"), "--image-size", "16")
    out = cli("train", "data.source=parquet", f"data.path={tmp_path / 't.parquet'}", "data.ways=2",
              "data.test_fraction=0.4",
              "data.shots=1", "data.queries=2", "data.image_size=16", "algorithm.name=protonet",
              "algorithm.inner_steps=0", "optim.steps=3", "optim.val_every=0", "optim.meta_batch_size=2",
              "tracking.progress=false", "--run-dir", str(tmp_path / "run"))
    assert "steps: 3" in out.stdout
    assert "source: parquet" in (tmp_path / "run" / "config.yaml").read_text()


def test_tune_with_a_bad_sweep_exits_2_before_anything_starts(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"base: {CONFIGS / 'sinusoid_maml.yaml'}\nsearch: optuna\n"
                     "space:\n  algorithm.inner_lr: {loguniform: [-1, 1]}\n  optim.steps: {grid: [10, 20]}\n")
    proc = cli("tune", str(sweep), "--sweep-dir", str(tmp_path / "sw"), check=False)
    assert proc.returncode == 2, proc.stderr
    assert "sweep.space.algorithm.inner_lr.loguniform: got low=-1, expected > 0" in proc.stderr
    assert "'grid' domains need search: grid or random" in proc.stderr
    assert not (tmp_path / "sw").exists() and "Ray" not in proc.stderr
    ok = cli("validate", str(CONFIGS / "sweep_sinusoid_maml.yaml"))
    assert ok.stdout.startswith("ok: ")
