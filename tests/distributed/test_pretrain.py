"""Meta-transfer learning end to end: Ray Train pretraining (2 workers), both ways of meta-learning from it,
worker-failure recovery, and cross-domain evaluation through the CLI."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from test_cli import cli

from mtl_ray import metrics as M
from mtl_ray.checkpoint import latest_checkpoint, load_checkpoint
from mtl_ray.components import from_dict
from mtl_ray.config import ConfigError
from mtl_ray.distributed.driver import MetaTrainer
from mtl_ray.distributed.executor import LocalExecutor
from mtl_ray.distributed.pretrain import pretrain_lr
from mtl_ray.recipes.evaluate import evaluate
from mtl_ray.recipes.pretrain import pretrain as run_pretraining
from mtl_ray.recipes.train import check_config
from mtl_ray.tracking.local import read_metrics
from mtl_ray.tracking.mlflow_run import tracking_uri

pytestmark = pytest.mark.slow


def _pretrain_cfg(root: Path, run_dir: Path, **pretrain):
    return from_dict({
        "data": {"root": str(root), "queries": 2, "rotations": False},  # 163 classes: learns within a minute
        "model": {"channels": 32},
        "pretrain": {"num_workers": 2, "steps": 120, "batch_size": 64, "lr": 0.003, "val_every": 60, **pretrain},
        "tracking": {"run_dir": str(run_dir.parent), "log_every": 20, "checkpoint_every": 60, "progress": False},
    })


@pytest.fixture(scope="module")
def pretrained(ray_cluster, omniglot_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """One real pretraining run on the session's Ray: 2 Ray Train workers, 120 steps, local MLflow; with a cosine
    head (Baseline++) and a warmed-up cosine learning-rate schedule, so the resume test checks both resume exactly
    (the killed-worker test runs the defaults: a linear head at a constant rate)."""
    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    cfg = _pretrain_cfg(omniglot_root, run_dir, head="cosine", schedule="cosine", warmup_steps=10)
    summary = run_pretraining(cfg, run_dir)
    return cfg, run_dir, summary


def test_pretraining_on_two_ray_train_workers_learns_and_checkpoints(pretrained):
    cfg, run_dir, summary = pretrained
    rows = [r for r in read_metrics(run_dir) if M.PRETRAIN_LOSS in r]
    assert [r["step"] for r in rows] == [20, 40, 60, 80, 100, 120]
    assert all(r[M.PRETRAIN_WORKERS] == 2 for r in rows)
    assert rows[-1][M.PRETRAIN_LOSS] < rows[0][M.PRETRAIN_LOSS] - 1.0  # ln(163 classes) = 5.09 at the start
    assert rows[-1][M.PRETRAIN_VAL_ACC] > 10 / 163  # held-out examples, far above chance
    ck = load_checkpoint(summary.checkpoint)
    assert (ck.stage, ck.step, ck.shape.ways) == ("pretrain", 120, 163)
    assert "head.bias" not in ck.params and float(ck.params["head.scale"]) != 10.0  # the cosine head's learned scale
    assert [r[M.PRETRAIN_LR] for r in rows] == [pretrain_lr(cfg.pretrain, s - 1) for s in range(20, 121, 20)]
    assert rows[-1][M.PRETRAIN_LR] < 1e-5 < rows[0][M.PRETRAIN_LR]  # annealed to ~0 at pretrain.steps
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000060.pt", "step_00000120.pt"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(cfg, run_dir))
    run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "pretrain"
    history = client.get_metric_history(run.info.run_id, M.PRETRAIN_LOSS)
    assert sorted(m.step for m in history) == [20, 40, 60, 80, 100, 120]
    assert "checkpoints" in [a.path for a in client.list_artifacts(run.info.run_id)]


def test_resume_continues_from_the_run_dirs_checkpoint_like_an_uninterrupted_run(pretrained, tmp_path):
    """--resume from the fixture's step-60 checkpoint reaches the fixture's step-120 weights."""
    cfg, run_dir, summary = pretrained
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(run_dir / "checkpoints" / "step_00000060.pt", resumed / "checkpoints")
    out = run_pretraining(cfg.replace(**{"tracking.mlflow": False}), resumed, resume=True)
    want, got = load_checkpoint(summary.checkpoint), load_checkpoint(out.checkpoint)
    assert got.step == 120
    assert all(torch.allclose(got.params[k], v, atol=1e-5) for k, v in want.params.items())
    assert [r["step"] for r in read_metrics(resumed)] == [80, 100, 120]


def _meta_cfg(cfg, run_dir: Path, algorithm: str, **algo):
    return cfg.replace(**{"model.init": str(run_dir), "algorithm.name": algorithm, "optim.meta_batch_size": 4,
                          "optim.steps": 3, "optim.val_every": 0, "optim.outer_lr": 0.01, "tracking.mlflow": False,
                          **{f"algorithm.{k}": v for k, v in algo.items()}})


def test_full_mode_starts_meta_training_from_the_pretrained_body(pretrained, tmp_path):
    cfg, run_dir, summary = pretrained
    body = {k: v for k, v in load_checkpoint(summary.checkpoint).params.items() if k.startswith("body.")}
    meta = check_config(_meta_cfg(cfg, run_dir, "metasgd", inner_lr=0.1))
    trainer = MetaTrainer.create(meta, tmp_path, executor=LocalExecutor(meta))
    assert all(torch.equal(trainer.params[k], v) for k, v in body.items())
    assert trainer.params["head.weight"].shape == (5, 32)  # a fresh 5-way head, not the pretraining one
    assert not trainer.params["head.weight"].any() and not trainer.params["head.bias"].any()  # starting at zero
    assert torch.equal(trainer.params["meta.lr.head.weight"], torch.full((5, 32), 0.1))  # Meta-SGD's rates
    trainer.fit()
    assert not torch.equal(trainer.params["body.0.conv.weight"], body["body.0.conv.weight"])  # fine-tuned


def test_mtl_mode_meta_learns_only_scale_and_shift(pretrained, tmp_path):
    cfg, run_dir, summary = pretrained
    body = {k: v for k, v in load_checkpoint(summary.checkpoint).params.items() if k.startswith("body.")}
    meta = check_config(_meta_cfg(cfg, run_dir, "mtl", inner_lr=0.1, inner_steps=5))
    trainer = MetaTrainer.create(meta, tmp_path, executor=LocalExecutor(meta))
    before = {k: v.clone() for k, v in trainer.params.items()}
    trainer.fit()
    saved = load_checkpoint(latest_checkpoint(tmp_path)).params
    for k, v in body.items():  # the backbone is bit-identical: in the trainer and in its checkpoint
        assert torch.equal(trainer.params[k], v) and torch.equal(saved[k], v), k
    assert not trainer.params["head.weight"].any()  # the head's initialisation stays zero
    learned = [k for k in before if k.startswith("meta.ss.")]
    assert len(learned) == 2 * 4
    assert all(not torch.equal(trainer.params[k], before[k]) for k in learned)
    assert set(trainer.optimizer.state) == {trainer.params[k] for k in learned}  # no optimiser state for the body


def test_model_init_problems_are_reported_before_anything_starts(pretrained, tmp_path):
    cfg, run_dir, _ = pretrained
    with pytest.raises(ConfigError, match=r"model.init: .*does not fit.*channels=32"):
        check_config(_meta_cfg(cfg, run_dir, "maml").replace(**{"model.channels": 64}))
    with pytest.raises(ConfigError, match=r"data.image_size: got 32, expected 28"):
        check_config(_meta_cfg(cfg, run_dir, "maml").replace(**{"data.image_size": 32}))
    with pytest.raises(ConfigError, match=r"model.init: .*no such checkpoint"):
        check_config(_meta_cfg(cfg, tmp_path / "missing.pt", "mtl"))
    with pytest.raises(ConfigError, match=r"algorithm.name: got 'mtl' with model.init empty"):
        from_dict({"algorithm": {"name": "mtl"}})


def _accuracy(text: str) -> tuple[float, float]:
    m = re.search(r"meta_test/acc: ([\d.]+)% ± ([\d.]+)%", text)
    assert m, text
    return float(m.group(1)), float(m.group(2))


def test_cross_domain_eval_on_digits_through_the_cli(pretrained, omniglot_root: Path, tmp_path):
    """Omniglot-pretrained body -> scikit-learn digits, 5-way 1-shot: pretrain-only and after MTL."""
    cfg, run_dir, _ = pretrained
    out = cli("eval", str(run_dir), "data.source=digits", "--episodes", "100", env_root=omniglot_root).stdout
    assert "digits/test: 100 episodes, 5-way 1-shot" in out and "pretrained body + linear head" in out
    acc, half = _accuracy(out)
    assert acc - half > 20.0 + 5.0  # chance is 20%
    buf = io.StringIO()  # pretrain.probe=cosine: the same episodes by cosine nearest class mean (no steps)
    cosine = evaluate(str(run_dir), overrides=["data.source=digits", "pretrain.probe=cosine"], episodes=100, out=buf)
    assert "pretrained body + cosine nearest class mean" in buf.getvalue() and "0 inner steps" in buf.getvalue()
    assert cosine[M.META_TEST_ACC] - cosine[M.META_TEST_ACC + "_ci95"] > 0.25
    meta = _meta_cfg(cfg, run_dir, "mtl", inner_lr=0.1, inner_steps=5)
    trainer = MetaTrainer.create(meta, tmp_path, executor=LocalExecutor(meta))
    trainer.fit()
    out = cli("eval", trainer.last_checkpoint, "data.source=digits", "data.shots=5", "--episodes", "100",
              env_root=omniglot_root).stdout
    assert "5-way 5-shot" in out and "[mtl, model.norm=support]" in out
    acc, half = _accuracy(out)
    assert acc - half > 25.0


def _train_worker_pids(raylet: int) -> list[int]:
    """Ray Train worker actors (process title ``ray::RayTrainWorker...``) started by this session's raylet."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if (proc.name.isdigit() and b"RayTrainWorker" in (proc / "cmdline").read_bytes()
                    and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == raylet):
                pids.append(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    return pids


def _kill_a_worker_after_first_checkpoint(run_dir: Path, raylet: int, killed: list[int],
                                          stop: threading.Event) -> None:
    while not stop.is_set():
        if (run_dir / "checkpoints" / "step_00000060.pt").exists():
            for pid in _train_worker_pids(raylet)[:1]:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
        time.sleep(0.1)


def test_a_killed_worker_is_recovered_from_the_latest_checkpoint(ray_cluster, omniglot_root, tmp_path):
    run_dir = tmp_path / "run"
    cfg = _pretrain_cfg(omniglot_root, run_dir, steps=160, max_failures=2).replace(**{"tracking.mlflow": False})
    killed: list[int] = []
    stop = threading.Event()
    raylet = ray_cluster.head_node.all_processes["raylet"][0].process.pid
    killer = threading.Thread(target=_kill_a_worker_after_first_checkpoint, args=(run_dir, raylet, killed, stop))
    killer.start()
    try:
        summary = run_pretraining(cfg, run_dir)
    finally:
        stop.set()
        killer.join()
    assert killed, "no Ray Train worker was found to kill"
    assert killed[0] not in _train_worker_pids(raylet)
    assert load_checkpoint(summary.checkpoint).step == 160
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == list(range(20, 161, 20))  # every report once, though the steps after 60 were trained twice


def test_the_python_api_adapts_a_pretrained_body_to_any_number_of_classes(pretrained):
    """FewShotLearner on a pretraining run: a linear head per support set, for 3 or 4 classes alike."""
    from mtl_ray.api import FewShotLearner
    from mtl_ray.data import load_source
    from mtl_ray.data.base import to_float_images

    cfg, run_dir, _ = pretrained
    learner = FewShotLearner.from_checkpoint(run_dir)
    pool = load_source(cfg.replace(**{"data.source": "digits"})).splits["test"]
    for names in (["0", "1", "7"], ["2", "3", "5", "8"]):
        imgs = {n: pool.images[pool.names.index(n)] for n in names}
        support = torch.cat([to_float_images(imgs[n][:5]) for n in names])
        adapted = learner.adapt(support, [n for n in names for _ in range(5)])
        assert adapted.params["head.weight"].shape == (len(names), 32)
        queries = torch.cat([to_float_images(imgs[n][5:25]) for n in names])
        truth = [n for n in names for _ in range(20)]
        acc = sum(p == n for p, n in zip(adapted.predict(queries), truth, strict=True)) / len(truth)
        assert acc > 1.5 / len(names), (names, acc)  # well above chance
        ck = load_checkpoint(str(run_dir))  # pretrain.probe=cosine: class means by cosine, no head, no steps
        cosine = FewShotLearner(ck.config.replace(**{"pretrain.probe": "cosine"}), ck.params, ck.shape,
                                pretrained=True).adapt(support, [n for n in names for _ in range(5)])
        assert "head.weight" not in cosine.params and "meta.temperature" in cosine.params
        acc = sum(p == n for p, n in zip(cosine.predict(queries), truth, strict=True)) / len(truth)
        assert acc > 1.5 / len(names), (names, acc)


def test_cli_pretrain_rejects_a_bad_config_before_ray_starts(omniglot_root, tmp_path):
    proc = cli("pretrain", "jobs/configs/omniglot_pretrain.yaml", "pretrain.holdout=20", "pretrain.batch_size=7",
               "--run-dir", str(tmp_path / "run"), env_root=omniglot_root, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "pretrain.batch_size: got 7, expected a multiple of pretrain.num_workers=2" in proc.stderr
    assert not (tmp_path / "run").exists()
    proc = cli("pretrain", "jobs/configs/omniglot_pretrain.yaml", "pretrain.holdout=20", "--run-dir",
               str(tmp_path / "run"), env_root=omniglot_root, check=False)
    assert proc.returncode == 2 and "pretrain.holdout: got 20, expected < 20" in proc.stderr


def test_cross_domain_eval_on_a_users_parquet_table(pretrained, omniglot_root, tmp_path):
    """Any image folder a user converts: here 5 digit classes written as PNGs, then `mtl-ray data convert`."""
    from PIL import Image

    from mtl_ray.data import load_source

    _, run_dir, _ = pretrained
    pool = load_source(from_dict({"data": {"source": "digits"}})).splits["test"]
    for name, images in list(zip(pool.names, pool.images, strict=True))[:5]:
        (tmp_path / "imgs" / f"digit_{name}").mkdir(parents=True)
        for i, img in enumerate(images[:8]):
            Image.fromarray(img[0]).save(tmp_path / "imgs" / f"digit_{name}" / f"{i}.png")
    table = tmp_path / "digits.parquet"
    cli("data", "convert", str(tmp_path / "imgs"), str(table), env_root=omniglot_root)
    out = cli("eval", str(run_dir), "data.source=parquet", f"data.path={table}", "data.shots=1", "data.queries=5",
              "--split", "all", "--episodes", "60", env_root=omniglot_root).stdout
    assert "parquet/all: 60 episodes, 5-way 1-shot" in out
    acc, half = _accuracy(out)
    assert acc - half > 25.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pretraining_on_a_gpu_worker(ray_cluster, omniglot_root, tmp_path):
    """scaling.gpus_per_worker > 0: the Ray Train worker trains on its GPU and checkpoints CPU tensors."""
    import ray

    if ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("the session's Ray cluster has no GPU resource")
    run_dir = tmp_path / "run"
    cfg = _pretrain_cfg(omniglot_root, run_dir, num_workers=1, steps=20).replace(
        **{"scaling.gpus_per_worker": 1.0, "tracking.mlflow": False, "tracking.checkpoint_every": 20})
    summary = run_pretraining(cfg, run_dir)
    ck = load_checkpoint(summary.checkpoint)
    assert ck.step == 20 and all(v.device.type == "cpu" for v in ck.params.values())
