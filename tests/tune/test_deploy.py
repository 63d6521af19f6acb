"""The deployment search (mtl_ray/tune/deploy.py) and the one-command pipeline (mtl_ray/tune/pipeline.py), on the
session's Ray: real Tune trials score a real trained ProtoNet on Fashion-MNIST's validation episodes; the deployed
checkpoint carries the winner to ``mtl-ray eval``, the Python API and (through its config) the served model."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import pytest
import yaml

from mtl_ray.api import FewShotLearner
from mtl_ray.checkpoint import load_checkpoint
from mtl_ray.cli import main
from mtl_ray.components import from_dict
from mtl_ray.config import ConfigError
from mtl_ray.distributed.driver import MetaTrainer
from mtl_ray.recipes.evaluate import evaluate
from mtl_ray.tune.deploy import TRIALS_CSV, deploy, score
from mtl_ray.tune.pipeline import PIPELINE_FILE, run_pipeline

pytestmark = [pytest.mark.slow, pytest.mark.cluster]
CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"
QUIET = ["tracking.mlflow=false"]


@pytest.fixture(scope="module")
def protonet_run(omniglot_root, tmp_path_factory) -> Path:
    """A ProtoNet meta-trained for 30 steps on Omniglot (in-process): a model worth adapting, trained in seconds."""
    run = tmp_path_factory.mktemp("deploy") / "run"
    cfg = from_dict({"name": "tiny_protonet", "data": {"root": str(omniglot_root), "val_alphabets": ["Early_Aramaic"],
                                                        "test_alphabets": ["Korean", "Tagalog"]},
                     "model": {"channels": 16}, "algorithm": {"name": "protonet", "inner_steps": 0},
                     "optim": {"steps": 30, "meta_batch_size": 4, "val_every": 0, "outer_lr": 0.003},
                     "tracking": {"checkpoint_every": 0, "progress": False, "mlflow": False}})
    trainer = MetaTrainer.create(cfg, run)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return run


def _deploy_file(where: Path, **body) -> Path:
    spec = {"name": "fashion", "target": ["data.source=fashion_mnist"], "episodes": 30, "test_episodes": 60,
            "search": "grid", "space": {"algorithm.finetune_steps": {"grid": [0, 4]},
                                        "algorithm.finetune_lr": {"grid": [0.01, 0.1]},
                                        "algorithm.finetune_augment": {"grid": [False]}}}
    spec.update(body)
    p = where / "deploy.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def test_the_search_picks_the_best_trial_and_the_deployed_model_adapts_with_it(ray_cluster, protonet_run, tmp_path):
    out = io.StringIO()
    result = deploy(str(protonet_run), str(_deploy_file(tmp_path)), QUIET, tmp_path / "deployed", out=out)
    # 0 steps x 2 learning rates is one trial (its rate changes nothing), 4 steps x 2 rates two more
    got = sorted((r.params["algorithm.finetune_steps"], r.params["algorithm.finetune_lr"]) for r in result.rows)
    assert [g[0] for g in got] == [0, 4, 4] and {g[1] for g in got[1:]} == {0.01, 0.1}, out.getvalue()
    best = max(result.rows, key=lambda r: r.acc or -1.0)
    assert result.val_acc == best.acc and result.chosen == best.params
    # a Tune trial's score is the in-process score of the same settings on the same validation episodes
    chosen = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in result.chosen.items()]
    assert score(result.checkpoint, [], "val", 30)[0] == pytest.approx(result.val_acc, abs=1e-6)
    assert score(str(protonet_run), ["data.source=fashion_mnist", *chosen], "val", 30)[0] == \
        pytest.approx(result.val_acc, abs=1e-6)
    # the chosen values reproduce their validation score on fresh test episodes, within the two intervals
    assert abs(result.test_acc - result.val_acc) <= result.val_ci95 + result.test_ci95, result.lines()
    # the deployed checkpoint carries the winner: eval, the API and the served model (built from it) use it
    ck = load_checkpoint(result.out_dir)
    a = ck.config.algorithm
    assert (a.finetune_steps, a.finetune_lr) == (result.chosen["algorithm.finetune_steps"],
                                                 result.chosen["algorithm.finetune_lr"])
    assert ck.config.data.source == "fashion_mnist" and ck.params.keys() == load_checkpoint(protonet_run).params.keys()
    scored = evaluate(str(result.out_dir), episodes=60, out=io.StringIO())
    assert scored["meta_test/acc"] == pytest.approx(result.test_acc, abs=1e-6)
    learner = FewShotLearner.from_checkpoint(result.out_dir)
    assert ("fine-tuned" in repr(learner)) == (a.finetune_steps > 0), repr(learner)
    with (result.out_dir / TRIALS_CSV).open() as f:
        assert len(list(csv.DictReader(f))) == len(result.rows)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch left behind


def test_bad_deployments_exit_2_naming_the_value_and_write_nothing(protonet_run, sinusoid_run, tmp_path, capsys):
    def run(*args: str) -> str:
        assert main(["deploy", *args]) == 2
        return capsys.readouterr().err

    out = tmp_path / "deployed"
    bad_key = _deploy_file(tmp_path, space={"optim.outer_lr": {"grid": [0.1, 0.01]}})
    err = run(str(protonet_run), str(bad_key), "--out", str(out))
    assert "deploy.space.optim.outer_lr" in err and "mtl-ray tune" in err
    err = run(str(protonet_run), str(_deploy_file(tmp_path, target=["data.source=nope"])), "--out", str(out))
    assert "'nope'" in err and "data.source" in err
    err = run(str(sinusoid_run), str(_deploy_file(tmp_path, target=[])), "--out", str(out))
    assert "regression" in err
    err = run(str(protonet_run), str(_deploy_file(tmp_path)), "deploy.episodes=1", "deploy.serach=grid",
              "--out", str(out))
    assert "deploy.episodes: got 1" in err and "deploy.serach: unknown key" in err  # every problem at once
    assert not out.exists()
    out.mkdir()
    err = run(str(protonet_run), str(_deploy_file(tmp_path)), "--out", str(out))
    assert "--overwrite" in err and not any(out.iterdir())


def _pipeline(where: Path, **body) -> Path:
    meta = {"config": str(CONFIGS / "omniglot_protonet.yaml"), "overrides": ["model.channels=16"]}
    pipe = {"name": "tiny_pmf", "pretrain": {"config": str(CONFIGS / "omniglot_pretrain.yaml"),
                                             "overrides": ["model.channels=16", "pretrain.num_workers=1"]},
            "meta_train": meta, "deploy": [str(_deploy_file(where, space={"algorithm.finetune_steps": {"grid": [2]},
                                                                         "algorithm.finetune_lr": {"grid": [0.05]}}))]}
    pipe.update(body)
    p = where / "pipeline.yaml"
    p.write_text(yaml.safe_dump(pipe))
    return p


SMALL = ["pretrain.steps=4", "pretrain.val_every=2", "pretrain.batch_size=16", "optim.steps=2", "optim.val_every=2",
         "optim.val_tasks=4", "optim.meta_batch_size=2", "tracking.progress=false", "tracking.checkpoint_every=2",
         "scaling.num_workers=0", "deploy.episodes=4", "deploy.test_episodes=4", *QUIET]


def test_the_pipeline_runs_every_stage_and_resumes_what_did_not_finish(ray_cluster, omniglot_root, tmp_path):
    path, root = _pipeline(tmp_path), tmp_path / "pmf"
    overrides = [*SMALL, f"data.root={omniglot_root}"]
    first = run_pipeline(str(path), overrides, str(root), out=io.StringIO())["fashion"]
    meta = load_checkpoint(root / "meta_train")
    assert meta.step == 2 and Path(meta.config.model.init) == root / "pretrain"  # meta-trained from its pretraining
    assert load_checkpoint(first.checkpoint).config.algorithm.finetune_steps == 2
    assert yaml.safe_load((root / PIPELINE_FILE).read_text())["deployed"]["fashion"]["val_acc"] == first.val_acc
    shutil.rmtree(first.out_dir)  # as if interrupted during the search: the training stages are kept, it reruns
    log = io.StringIO()
    again = run_pipeline(str(path), overrides, str(root), resume=True, out=log)["fashion"]
    assert log.getvalue().count("done earlier: kept") == 2, log.getvalue()
    assert (again.val_acc, again.test_acc) == (first.val_acc, first.test_acc)
    assert load_checkpoint(root / "meta_train").step == 2
    with pytest.raises(ConfigError, match="holds an earlier pipeline"):
        run_pipeline(str(path), overrides, str(root), out=io.StringIO())


def test_a_bad_pipeline_names_every_problem_before_anything_runs(omniglot_root, tmp_path):
    meta = {"config": str(CONFIGS / "omniglot_protonet.yaml"), "overrides": ["model.channels=32"]}
    path = _pipeline(tmp_path, meta_train=meta, deploy=["absent.yaml"])
    with pytest.raises(ConfigError) as e:
        run_pipeline(str(path), [f"data.root={omniglot_root}"], str(tmp_path / "pmf"), out=io.StringIO())
    text = str(e.value)
    assert "model section" in text and "absent.yaml" in text
    assert not (tmp_path / "pmf").exists()


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("deploy_*.yaml")))
def test_every_shipped_deploy_file_is_valid_for_the_shipped_protonet(name, omniglot_root):
    """Each shipped search file loads and passes the checks a real search runs before Ray starts (its target's
    keys, every value of its space, the target's data in its split and test), against the model bench/transfer.py
    deploys: jobs/configs/omniglot_protonet.yaml."""
    from mtl_ray.components import load_config
    from mtl_ray.tune.deploy import check_deploy, load_deploy

    cfg = load_config(CONFIGS / "omniglot_protonet.yaml", [f"data.root={omniglot_root}"])
    spec = load_deploy(CONFIGS / name)
    assert spec.name == name.removeprefix("deploy_").removesuffix(".yaml") and spec.split == "val"
    assert check_deploy(spec, cfg) == []
