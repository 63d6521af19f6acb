"""Test-time fine-tuning through `mtl-ray eval`, the Python API and the served model: each adapts as the algorithm
layer's FineTune does (mtl_ray/algorithms/finetune.py), with the checkpoint's algorithm.finetune_* as defaults and
key=value / keyword overrides. A ProtoNet checkpoint on 8x8 digits (fresh weights, nudged), no training, no mocks."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from mtl_ray import metrics as M
from mtl_ray.algorithms import TaskShape, build_learner, initial_meta_params
from mtl_ray.algorithms.finetune import FineTune, api_seed, finetune_seed
from mtl_ray.api import FewShotLearner
from mtl_ray.checkpoint import Checkpoint, save_checkpoint
from mtl_ray.cli import main
from mtl_ray.components import from_dict
from mtl_ray.config import UserError
from mtl_ray.recipes.evaluate import evaluate
from mtl_ray.serving import FewShotModel

WAYS, SHAPE = 3, TaskShape("classification", (1, 8, 8), 3)
EPISODES = 4
FT = ["algorithm.finetune_steps=2", "algorithm.finetune_lr=0.5"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(cfg, run dir, params) of a ProtoNet checkpoint on digits."""
    cfg = from_dict({"data": {"source": "digits", "ways": WAYS, "shots": 2, "queries": 2, "image_size": 8},
                     "model": {"channels": 3, "blocks": 2}, "algorithm": {"name": "protonet", "inner_steps": 0},
                     "tracking": {"mlflow": False, "progress": False}})
    params = initial_meta_params(cfg, build_learner(cfg, shape=SHAPE))
    g = torch.Generator().manual_seed(0)
    params = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in params.items()}
    run_dir = tmp_path_factory.mktemp("ft_run")
    save_checkpoint(run_dir / "checkpoints", Checkpoint(step=3, params=params, optimizer={}, config=cfg, shape=SHAPE))
    return cfg, run_dir, params


def _reference(cfg, params, overrides, seeds=False):
    """The algorithm layer on the same episodes ``(test, 0, 0..EPISODES-1)``."""
    cfg = from_dict(cfg.to_dict(), overrides)
    learner = build_learner(cfg)
    batch = learner.source.sample("test", 0, range(EPISODES))
    ft = learner.finetune
    assert ft is not None
    s = [finetune_seed(cfg.seed, "test", 0, i) for i in range(EPISODES)] if seeds else None
    with torch.no_grad():
        return {k: float(v.mean()) for k, v in ft.evaluate(learner.algorithm, params, batch, s).items()}


def _eval(run_dir, *overrides):
    """`mtl-ray eval`'s recipe (the CLI passes it the key=value overrides as they are): its numbers and its text."""
    out = io.StringIO()
    result = evaluate(str(run_dir), overrides=overrides, episodes=EPISODES, out=out)
    return result, out.getvalue()


def test_eval_fine_tunes_every_episode_as_the_algorithm_layer_does(run):
    cfg, run_dir, params = run
    plain, out0 = _eval(run_dir)
    tuned, out = _eval(run_dir, *FT)
    assert "test-time fine-tuned 2 steps at lr 0.5" in out and "fine-tuned" not in out0
    want = _reference(cfg, params, FT)
    assert tuned[M.META_TEST_LOSS] == pytest.approx(want["loss"], rel=1e-5)
    assert tuned[M.META_TEST_ACC] == pytest.approx(want["acc"], rel=1e-5)
    assert tuned[M.META_TEST_LOSS] != pytest.approx(plain[M.META_TEST_LOSS], rel=1e-3)
    # augmented: each episode's copies from its own coordinates (the worker's seeds), not the unaugmented numbers
    aug, out = _eval(run_dir, *FT, "algorithm.finetune_augment=true")
    assert "fine-tuned 2 steps at lr 0.5, augmented" in out
    want_aug = _reference(cfg, params, [*FT, "algorithm.finetune_augment=true"], seeds=True)
    assert aug[M.META_TEST_LOSS] == pytest.approx(want_aug["loss"], rel=1e-5)
    assert want_aug["loss"] != pytest.approx(want["loss"], rel=1e-3)


def test_eval_refuses_bad_finetuning_values_with_one_error(run, capsys):
    _cfg, run_dir, _ = run
    assert main(["eval", str(run_dir), "--episodes", "2", "algorithm.finetune_steps=-2"]) == 2
    err = capsys.readouterr().err
    assert "algorithm.finetune_steps: got -2, expected a whole number >= 0" in err and "Traceback" not in err


def _task(seed=1, ways=WAYS):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(ways * 2, 1, 8, 8, generator=g), torch.arange(ways).repeat_interleave(2),
            torch.rand(5, 1, 8, 8, generator=g))


def test_api_and_served_model_fine_tune_with_the_checkpoints_settings_by_default(run):
    cfg, run_dir, params = run
    sx, sy, qx = _task()
    learner = FewShotLearner.from_checkpoint(run_dir)
    tuned = learner.adapt(sx, sy.tolist(), finetune_steps=2, finetune_lr=0.5)
    alg = build_learner(cfg, shape=SHAPE).algorithm
    ft = FineTune(2, 0.5)
    with torch.no_grad():
        want = ft.predict(alg, ft.adapt(alg, params, sx, sy), qx)
    torch.testing.assert_close(tuned.predict_scores(qx), want, rtol=1e-5, atol=1e-5)
    plain = learner.adapt(sx, sy.tolist()).predict_scores(qx)  # the checkpoint's default: no fine-tuning
    assert not torch.allclose(plain, want, atol=1e-3)
    assert "fine-tuned 2 steps at lr 0.5" in repr(tuned)

    # a model whose config says fine-tune: the API's defaults and the served model follow it, bit for bit
    by_default = FewShotLearner(cfg.replace(**{"algorithm.finetune_steps": 2, "algorithm.finetune_lr": 0.5}),
                                params, SHAPE)
    adapted = by_default.adapt(sx, sy.tolist())
    assert torch.equal(adapted.predict_scores(qx), tuned.predict_scores(qx))
    assert torch.equal(by_default.adapt(sx, sy.tolist(), finetune_steps=0).predict_scores(qx), plain)
    served = FewShotModel.from_learner(by_default).predict(None, {
        "support_x": sx.numpy(), "support_y": np.array(["a", "b", "c"])[sy.numpy()], "query_x": qx.numpy()})
    assert list(served) == [["a", "b", "c"][i] for i in adapted.predict_scores(qx).argmax(-1).tolist()]

    # augmented: the same support set always gets the same answers (seeded by the run's seed), not the plain ones
    aug = [by_default.adapt(sx, sy.tolist(), finetune_augment=True).predict_scores(qx) for _ in range(2)]
    assert torch.equal(aug[0], aug[1]) and not torch.allclose(aug[0], want, atol=1e-4)
    with torch.no_grad():
        ref = FineTune(2, 0.5, True, cfg.data.channel_mean, cfg.data.channel_std)
        state = ref.adapt_one(alg, params, sx, sy, api_seed(cfg.seed))
    torch.testing.assert_close(aug[0], ref.predict(alg, state, qx), rtol=1e-5, atol=1e-5)


def test_a_head_model_fine_tunes_any_number_of_classes(run):
    cfg, _, _ = run
    maml = cfg.replace(**{"algorithm.name": "maml", "algorithm.inner_steps": 1})
    learner = FewShotLearner(maml, initial_meta_params(maml, build_learner(maml, shape=SHAPE)), SHAPE)
    sx, sy, qx = _task(ways=2)
    with pytest.raises(UserError, match="got 2 classes, expected 3"):
        learner.adapt(sx, sy.tolist())
    assert learner.adapt(sx, sy.tolist(), finetune_steps=1).predict_scores(qx).shape == (5, 2)


@pytest.mark.parametrize("kwargs,message", [
    ({"finetune_steps": -1}, "finetune_steps: got -1, expected a whole number >= 0"),
    ({"finetune_steps": 1.5}, "finetune_steps: got 1.5, expected a whole number >= 0"),
    ({"finetune_steps": 2, "finetune_lr": float("nan")}, "finetune_lr: got nan, expected a finite number >= 0"),
    ({"finetune_steps": 2, "finetune_augment": "yes"}, "finetune_augment: got 'yes', expected True or False"),
    ({"finetune_augment": True}, "finetune_augment: got True with finetune_steps=0, expected False"),
])
def test_bad_finetuning_arguments_get_one_clear_error(run, kwargs, message):
    _cfg, run_dir, _ = run
    sx, sy, _ = _task()
    with pytest.raises(UserError) as e:
        FewShotLearner.from_checkpoint(run_dir).adapt(sx, sy.tolist(), **kwargs)
    assert str(e.value).startswith(message), str(e.value)


def test_a_served_model_that_augments_when_it_adapts_requires_kornia():
    from mtl_ray.serving import default_pip_requirements

    assert not any(r.startswith("kornia") for r in default_pip_requirements())
    assert any(r.startswith("kornia==") for r in default_pip_requirements(augment=True))
