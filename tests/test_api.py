"""The Python API's promises: an answer depends on the support set and the query only (not on the other queries,
their order, or how labels are spelled), ``adapt``'s defaults are the model's eval settings, and bad input gets one
clear error. Real models (randomly initialised, then nudged so no output is degenerate), no mocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mtl_ray.algorithms import ALGORITHMS, TaskShape, build_learner, initial_meta_params
from mtl_ray.api import FewShotLearner, natural_key
from mtl_ray.components import from_dict
from mtl_ray.config import UserError
from mtl_ray.data.base import TaskBatch
from mtl_ray.serving import FewShotModel, ServingInputError

WAYS, SHOTS, QUERIES, SIZE = 3, 2, 4, 16
SHAPE = TaskShape("classification", (1, SIZE, SIZE), WAYS)


def _learner(name: str = "maml", norm: str = "support", **algorithm) -> FewShotLearner:
    raw = {"model": {"channels": 6, "norm": norm}, "data": {"ways": WAYS, "image_size": SIZE},
           "algorithm": {"name": name, "inner_steps": 1, "eval_inner_steps": 2, "inner_lr": 0.3, **algorithm}}
    if name == "mtl":
        raw["model"]["init"] = "a-pretrained-body"  # any body of the right layout: these are fresh weights
    cfg = from_dict(raw)
    params = initial_meta_params(cfg, build_learner(cfg, shape=SHAPE))
    g = torch.Generator().manual_seed(3)
    params = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in params.items()}
    return FewShotLearner(cfg, params, SHAPE)


def _task(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(WAYS * SHOTS, 1, SIZE, SIZE, generator=g)
    sy = torch.arange(WAYS).repeat_interleave(SHOTS)
    qx = torch.rand(WAYS * QUERIES, 1, SIZE, SIZE, generator=g)
    return sx, sy, qx


# ------------------------------------------------------------------ batch independence


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_a_query_gets_the_same_bits_alone_in_any_subset_and_order_api_and_pyfunc(name):
    learner = _learner(name)
    sx, sy, qx = _task()
    adapted = learner.adapt(sx, sy.tolist())
    whole = adapted.predict_scores(qx)
    perm = torch.randperm(len(qx), generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.cat([adapted.predict_scores(qx[i:i + 1]) for i in range(len(qx))]), whole)
    assert torch.equal(adapted.predict_scores(qx[perm])[perm.argsort()], whole)
    assert torch.equal(adapted.predict_scores(qx[[7, 2, 9]]), whole[[7, 2, 9]])

    model = FewShotModel.from_learner(learner)
    request = {"support_x": sx.numpy(), "support_y": np.array(["a", "b", "c"])[sy.numpy()]}
    batched = model.predict(None, {**request, "query_x": qx.numpy()})
    alone = [model.predict(None, {**request, "query_x": qx[i:i + 1].numpy()})[0] for i in range(len(qx))]
    assert list(batched) == alone
    assert list(model.predict(None, {**request, "query_x": qx[perm].numpy()})) == list(batched[perm.numpy()])


def test_a_regression_query_gets_the_same_bits_alone_and_in_any_order():
    cfg = from_dict({"data": {"source": "sinusoid"}, "model": {"name": "mlp"}, "algorithm": {"name": "maml"}})
    shape = TaskShape("regression", (1,), 1)
    learner = FewShotLearner(cfg, initial_meta_params(cfg, build_learner(cfg, shape=shape)), shape)
    g = torch.Generator().manual_seed(0)
    x, qx = torch.rand(5, 1, generator=g), torch.rand(37, 1, generator=g) * 10 - 5
    adapted = learner.adapt(x, torch.sin(x))
    whole = adapted.predict(qx)
    assert torch.equal(torch.cat([adapted.predict(qx[i:i + 1]) for i in range(len(qx))]), whole)
    assert torch.equal(adapted.predict(qx.flip(0)).flip(0), whole)


def test_a_model_without_batch_norm_is_never_refused_as_transductive():
    """An MLP has nothing to normalise: old sinusoid checkpoints (loaded as transductive) answer as before."""
    cfg = from_dict({"data": {"source": "sinusoid"}, "model": {"name": "mlp", "norm": "transductive"},
                     "algorithm": {"name": "maml"}})
    shape = TaskShape("regression", (1,), 1)
    learner = FewShotLearner(cfg, initial_meta_params(cfg, build_learner(cfg, shape=shape)), shape)
    x = torch.linspace(-1, 1, 5).view(5, 1)
    assert learner.adapt(x, torch.sin(x)).predict(x).shape == (5, 1)


def test_a_transductive_model_is_refused_unless_the_call_opts_in():
    learner = _learner("protonet", norm="transductive")
    sx, sy, qx = _task()
    adapted = learner.adapt(sx, sy)
    with pytest.raises(UserError, match=r"trained with model.norm=transductive: .* Pass transductive=True"):
        adapted.predict(qx)
    got = adapted.predict_scores(qx, transductive=True)
    alg = adapted.algorithm
    with torch.no_grad():  # the batch is scored as a whole, as the papers do
        assert torch.equal(got, alg.predict(adapted.params, adapted.state, qx))
    assert not torch.equal(adapted.predict_scores(qx[:1], transductive=True), got[:1])  # and it shows

    model = FewShotModel.from_learner(learner)
    request = {"support_x": sx.numpy(), "support_y": sy.numpy(), "query_x": qx.numpy()}
    with pytest.raises(ServingInputError, match=r"model.norm=transductive") as e:
        model.predict(None, request)
    assert e.value.get_http_status_code() == 400
    assert model.predict(None, request, params={"transductive": True}).tolist() == adapted.predict(
        qx, transductive=True)
    with pytest.raises(ServingInputError, match=r"params.transductive: got 'yes', expected true or false"):
        model.predict(None, request, params={"transductive": "yes"})


# ------------------------------------------------------------------ classes and labels


def test_output_units_follow_first_appearance_not_the_spelling_of_labels():
    learner = _learner("maml")
    sx, sy, qx = _task()
    numbers = [[10, 2, 1][i] for i in sy.tolist()]  # sorted as strings: "1" < "10" < "2" would reorder them
    words = [["ten", "two", "one"][i] for i in sy.tolist()]
    a, b = learner.adapt(sx, numbers), learner.adapt(sx, words)
    assert a.classes == (10, 2, 1) and b.classes == ("ten", "two", "one")
    assert torch.equal(a.predict_scores(qx), b.predict_scores(qx))
    assert [{10: "ten", 2: "two", 1: "one"}[v] for v in a.predict(qx)] == b.predict(qx)


def test_the_api_answers_as_mtl_ray_eval_does_for_a_maml_head():
    """`mtl-ray eval` scores a task with support labels 0..N-1, class 0 first; the API given the same support set in
    the same order, with any labels, uses the same head units, so it gives the same answers."""
    learner = _learner("maml")
    sx, sy, qx = _task()
    alg = build_learner(learner.cfg, shape=SHAPE).algorithm
    with torch.no_grad():
        state = alg.adapt(learner.params, sx, sy, learner.cfg.eval_inner_steps)
        want = alg.predict(learner.params, state, qx).argmax(-1).tolist()
    labels = ["class10", "class2", "class1"]
    got = learner.adapt(sx, [labels[i] for i in sy.tolist()]).predict(qx)
    assert got == [labels[i] for i in want]
    metrics = alg.evaluate(learner.params, TaskBatch(sx[None], sy[None], qx[None], torch.tensor([want])),
                           learner.cfg.eval_inner_steps)
    assert float(metrics["acc"][0]) == 1.0  # eval's vectorised path scores those same answers as right


def test_adapt_folder_takes_classes_in_natural_order(tmp_path):
    learner = _learner("maml")
    sx, sy, _qx = _task()
    for name, i in (("10", 0), ("2", 1), ("1", 2)):
        for j, img in enumerate(sx[sy == i]):
            (tmp_path / name).mkdir(exist_ok=True)
            Image.fromarray((img[0].numpy() * 255).round().astype(np.uint8)).save(tmp_path / name / f"{j}.png")
    adapted = learner.adapt_folder(tmp_path)
    assert adapted.classes == ("1", "2", "10")
    assert sorted(["class10", "class2", "Class1", "a"], key=natural_key) == ["a", "Class1", "class2", "class10"]


# ------------------------------------------------------------------ adapt's settings


def test_adapt_defaults_to_eval_inner_steps_and_takes_an_inner_lr():
    learner = _learner("maml")
    sx, sy, qx = _task()
    assert "steps=2, inner_lr=0.3" in repr(learner)  # eval_inner_steps, not the training inner_steps=1
    default = learner.adapt(sx, sy)
    assert (default.steps, default.inner_lr) == (2, 0.3)
    assert "steps=2, inner_lr=0.3, norm=support" in repr(default)
    assert torch.equal(default.predict_scores(qx), learner.adapt(sx, sy, 2).predict_scores(qx))
    assert not torch.equal(default.predict_scores(qx), learner.adapt(sx, sy, 1).predict_scores(qx))
    faster = learner.adapt(sx, sy, inner_lr=0.05)
    other = FewShotLearner(learner.cfg.replace(**{"algorithm.inner_lr": 0.05}), learner.params, SHAPE)
    assert torch.equal(faster.predict_scores(qx), other.adapt(sx, sy).predict_scores(qx))
    assert not torch.equal(faster.predict_scores(qx), default.predict_scores(qx))


# ------------------------------------------------------------------ bad input


def _image(tmp_path):
    path = tmp_path / "q.png"
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(path)
    return path


SX, SY, QX = _task()
BAD_ADAPT = [  # (case, kwargs for adapt, message pattern naming the value)
    ("support_x of strings", dict(support_x="images", support_y=SY), r"support_x: got str .*expected a float tensor"),
    ("support_x wrong shape", dict(support_x=torch.zeros(6, 1, 28, 28), support_y=SY),
     r"support_x: got shape \(6, 1, 28, 28\), expected \[M, 1, 16, 16\]"),
    ("one example without batch axis", dict(support_x=SX[0], support_y=SY[:1]), r"got shape \(1, 16, 16\).*x\[None\]"),
    ("empty support", dict(support_x=SX[:0], support_y=[]), r"support_x: got 0 examples"),
    ("NaN support", dict(support_x=SX.clone().fill_(float("nan")), support_y=SY), r"support_x: got non-finite"),
    ("inf support", dict(support_x=SX.clone().fill_(float("inf")), support_y=SY), r"support_x: got non-finite"),
    ("too few labels", dict(support_x=SX, support_y=SY[:-1]), r"support_y: got 5 labels, expected one per .*\(6\)"),
    ("2-D labels", dict(support_x=SX, support_y=SY.view(2, 3)), r"support_y: got an array of shape \(2, 3\)"),
    ("unhashable labels", dict(support_x=SX, support_y=[[0], [0], [1], [1], [2], [2]]),
     r"support_y: got the label \[0\] \(list\), expected hashable"),
    ("NaN label", dict(support_x=SX, support_y=[0.0, 0.0, 1.0, 1.0, float("nan"), 2.0]), r"got the label nan"),
    ("a string as labels", dict(support_x=SX, support_y="aabbcc"), r"support_y: got str 'aabbcc', expected a list"),
    ("one class", dict(support_x=SX, support_y=[0] * 6), r"support_y: got 1 distinct label\(s\) \[0\], expected at"),
    ("wrong way count", dict(support_x=SX[:4], support_y=[0, 0, 1, 1]), r"got 2 classes, expected 3"),
    ("negative steps", dict(support_x=SX, support_y=SY, steps=-1), r"steps: got -1, expected a whole number >= 0"),
    ("fractional steps", dict(support_x=SX, support_y=SY, steps=1.5), r"steps: got 1.5, expected a whole number"),
    ("steps as text", dict(support_x=SX, support_y=SY, steps="3"), r"steps: got '3', expected a whole number"),
    ("negative inner_lr", dict(support_x=SX, support_y=SY, inner_lr=-0.1), r"inner_lr: got -0.1, expected a finite"),
    ("NaN inner_lr", dict(support_x=SX, support_y=SY, inner_lr=float("nan")), r"inner_lr: got nan, expected a"),
]


@pytest.mark.parametrize("case,kwargs,message", BAD_ADAPT, ids=[c[0] for c in BAD_ADAPT])
def test_bad_adapt_input_gets_one_clear_error(case, kwargs, message):
    with pytest.raises(UserError, match=message):
        _learner("maml").adapt(**kwargs)


BAD_PREDICT = [
    ("empty query set", QX[:0], r"query_x: got 0 examples \(shape \(0, 1, 16, 16\)\)"),
    ("NaN query", QX.clone().fill_(float("nan")), r"query_x: got non-finite values"),
    ("query wrong shape", torch.zeros(2, 3, SIZE, SIZE), r"query_x: got shape \(2, 3, 16, 16\), expected \[M, 1, 16"),
    ("query not numbers", [["a"]], r"query_x: got list that is not an array of numbers"),
]


@pytest.mark.parametrize("case,query,message", BAD_PREDICT, ids=[c[0] for c in BAD_PREDICT])
def test_bad_predict_input_gets_one_clear_error(case, query, message):
    with pytest.raises(UserError, match=message):
        _learner("protonet").adapt(SX, SY).predict(query)


def test_bad_image_paths_get_one_clear_error(tmp_path):
    adapted = _learner("protonet").adapt(SX, SY)
    with pytest.raises(UserError, match=r"nope.png: cannot read the image \(No such file or directory\); expected"):
        adapted.predict_images([_image(tmp_path), tmp_path / "nope.png"])
    with pytest.raises(UserError, match=r"paths: got .*q.png'\), expected a non-empty list"):
        adapted.predict_images(_image(tmp_path))
    with pytest.raises(UserError, match=r"paths: got \[\], expected a non-empty list"):
        adapted.predict_images([])


def test_regression_targets_are_checked():
    cfg = from_dict({"data": {"source": "sinusoid"}, "model": {"name": "mlp"}, "algorithm": {"name": "maml"}})
    shape = TaskShape("regression", (1,), 1)
    learner = FewShotLearner(cfg, initial_meta_params(cfg, build_learner(cfg, shape=shape)), shape)
    x = torch.linspace(-1, 1, 5).view(5, 1)
    assert learner.adapt(x, torch.zeros(5)).predict(x).shape == (5, 1)
    for y, message in ((torch.zeros(4), r"support_y: got shape \(4,\), expected \[5\] or \[5, 1\]"),
                       (torch.zeros(5, 2), r"support_y: got shape \(5, 2\), expected \[5\]"),
                       (torch.full((5,), float("inf")), r"support_y: got non-finite targets"),
                       (["a"] * 5, r"support_y: got list that is not numbers")):
        with pytest.raises(UserError, match=message):
            learner.adapt(x, y)
