"""Test-time fine-tuning (mtl_ray/algorithms/finetune.py; Hu et al. 2022, P>M>F): N SGD steps on the body and a
prototype-initialised head, in float64 against steps written out by hand; 0 steps are ProtoNet; a query's answer
does not depend on the other queries; vmap over tasks equals a per-task loop; augmentation is fixed per task."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_exact_math import _image_batch
from torch import nn

from mtl_ray.algorithms import ProtoNet, TaskShape, build_learner, initial_meta_params
from mtl_ray.algorithms.finetune import BODY, HEAD_B, HEAD_W, FineTune, finetune_seed
from mtl_ray.components import from_dict
from mtl_ray.config import ConfigError

WAYS, SHOTS, QUERIES, SIZE = 3, 2, 2, 8
SHAPE = TaskShape("classification", (1, SIZE, SIZE), WAYS)


class Tiny(nn.Module):
    """body(x) = tanh(x A^T + a): small enough to write the fine-tuning steps out by hand."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 3), nn.Tanh())


def test_finetuning_equals_explicit_sgd_steps_on_body_and_prototype_head_float64():
    g = torch.Generator().manual_seed(0)
    A, a = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    sx, qx = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(4, 4, generator=g, dtype=torch.float64)
    sy = torch.tensor([0, 1, 1, 0, 1])
    alg = ProtoNet(Tiny().double(), kind="classification", ways=2)
    steps, lr = 3, 0.3
    state = FineTune(steps, lr).adapt(alg, {"body.0.weight": A, "body.0.bias": a}, sx, sy)

    # by hand: prototypes c_n, head W = 2 c, b = -|c|^2, then SGD on the mean cross-entropy of the support set
    z = torch.tanh(sx @ A.T + a)
    c = torch.stack([z[sy == n].mean(0) for n in range(2)])
    p = [A.clone(), a.clone(), 2 * c, -(c * c).sum(1)]
    for _ in range(steps):
        p = [t.detach().requires_grad_(True) for t in p]
        loss = F.cross_entropy(torch.tanh(sx @ p[0].T + p[1]) @ p[2].T + p[3], sy)
        p = [t - lr * d for t, d in zip(p, torch.autograd.grad(loss, p), strict=True)]
    for key, want in zip((BODY + "0.weight", BODY + "0.bias", HEAD_W, HEAD_B), p, strict=True):
        torch.testing.assert_close(state[key], want.detach(), rtol=0, atol=1e-10)
    zq = torch.tanh(qx @ p[0].T + p[1])
    want = (zq @ p[2].T + p[3] - (zq * zq).sum(1, keepdim=True)).detach()  # minus |z|^2: softmax unchanged
    torch.testing.assert_close(FineTune.predict(alg, state, qx), want, rtol=0, atol=1e-10)
    assert not torch.allclose(state[BODY + "0.weight"], A)  # the body is fine-tuned, not only the head


def _conv(name: str = "protonet", **algorithm):
    raw = {"data": {"ways": WAYS, "shots": SHOTS, "queries": QUERIES, "image_size": SIZE},
           "model": {"channels": 3, "blocks": 2, "init": "any-body" if name == "mtl" else ""},
           "algorithm": {"name": name, "inner_steps": 0 if name == "protonet" else 1, **algorithm}}
    cfg = from_dict(raw)
    learner = build_learner(cfg, shape=SHAPE)
    learner.model.double()
    g = torch.Generator().manual_seed(1)
    params = {k: v.double() + 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64)
              for k, v in initial_meta_params(cfg, learner).items()}
    return learner, params


def test_zero_steps_give_protonets_logits_and_predictions():
    learner, params = _conv()
    alg, b = learner.algorithm, _image_batch(1, WAYS, SHOTS, 6, SIZE)
    sx, sy, qx = b.support_x[0], b.support_y[0], b.query_x[0]
    got = FineTune.predict(alg, FineTune(0, 0.5).adapt(alg, params, sx, sy), qx)
    want = alg.predict(params, alg.adapt(params, sx, sy), qx)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    moved = FineTune.predict(alg, FineTune(2, 0.5).adapt(alg, params, sx, sy), qx)
    assert not torch.allclose(moved, want, atol=1e-3)  # and steps change them


def test_mtl_fine_tunes_its_scaled_and_shifted_body():
    learner, params = _conv("mtl")
    alg, b = learner.algorithm, _image_batch(1, WAYS, SHOTS, QUERIES, SIZE)
    sx, sy, qx = b.support_x[0], b.support_y[0], b.query_x[0]
    state = FineTune(0, 0.5).adapt(alg, params, sx, sy)
    zq, zs = alg.features(params, qx, state), alg.features(params, sx)  # MTL's own (modulated) features
    protos = torch.stack([zs[sy == n].mean(0) for n in range(WAYS)])
    want = -(zq.unsqueeze(1) - protos.unsqueeze(0)).pow(2).sum(-1)
    torch.testing.assert_close(FineTune.predict(alg, state, qx), want, rtol=0, atol=1e-10)


def test_a_querys_answer_does_not_depend_on_the_other_queries():
    learner, params = _conv()
    alg, b = learner.algorithm, _image_batch(1, WAYS, SHOTS, 3, SIZE)
    state = FineTune(2, 0.5).adapt(alg, params, b.support_x[0], b.support_y[0])
    qx = b.query_x[0]
    whole = FineTune.predict(alg, state, qx)
    alone = torch.cat([FineTune.predict(alg, state, qx[i:i + 1]) for i in range(len(qx))])
    torch.testing.assert_close(alone, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(FineTune.predict(alg, state, qx.flip(0)).flip(0), whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["protonet", "maml"])
def test_vmapped_over_tasks_equals_a_per_task_loop_float64(name):
    learner, params = _conv(name)
    alg, b, ft = learner.algorithm, _image_batch(3, WAYS, SHOTS, QUERIES, SIZE), FineTune(2, 0.5)
    got = ft.evaluate(alg, params, b)
    for t in range(b.num_tasks):
        out = FineTune.predict(alg, ft.adapt(alg, params, b.support_x[t], b.support_y[t]), b.query_x[t])
        assert abs(float(got["loss"][t]) - float(F.cross_entropy(out, b.query_y[t]))) < 1e-10
        assert float(got["acc"][t]) == float((out.argmax(-1) == b.query_y[t]).double().mean())


def test_augmented_finetuning_is_fixed_per_task_whatever_the_chunks():
    (whole, params), (chunked, _) = _conv(), _conv(task_chunk_size=1)
    b = _image_batch(3, WAYS, SHOTS, QUERIES, SIZE)
    ft = FineTune(2, 0.5, augment=True, channel_mean=(0.5,), channel_std=(0.25,))
    seeds = [finetune_seed(0, "test", 0, i) for i in range(3)]
    a = ft.evaluate(whole.algorithm, params, b, seeds)
    c = ft.evaluate(chunked.algorithm, params, b, seeds)  # one task per vmap call
    again = ft.evaluate(whole.algorithm, params, b, seeds)
    for k in a:
        torch.testing.assert_close(c[k], a[k], rtol=1e-12, atol=1e-12)
        assert torch.equal(again[k], a[k])
    # task 1 alone (its own seed) is task 1 of the batch; other seeds and no augmentation give other numbers
    one = ft.evaluate(whole.algorithm, params, b.slice(1, 2), seeds[1:2])
    torch.testing.assert_close(one["loss"], a["loss"][1:2], rtol=1e-12, atol=1e-12)
    other = ft.evaluate(whole.algorithm, params, b, [finetune_seed(1, "test", 0, i) for i in range(3)])
    plain = FineTune(2, 0.5).evaluate(whole.algorithm, params, b)
    assert not torch.allclose(other["loss"], a["loss"]) and not torch.allclose(plain["loss"], a["loss"])
    # the views are pixels augmented and normalised again: un-normalised they lie in [0, 1]
    views = ft.views(b.support_x, seeds)
    assert views.shape == (3, 2, WAYS * SHOTS, 1, SIZE, SIZE)
    pixels = views * 0.25 + 0.5
    assert float(pixels.min()) >= -1e-12 and float(pixels.max()) <= 1 + 1e-12


@pytest.mark.parametrize("override,message", [
    (["algorithm.finetune_steps=-1"], "algorithm.finetune_steps: got -1, expected a whole number >= 0"),
    (["algorithm.finetune_lr=-0.5"], "algorithm.finetune_lr: got -0.5, expected a step size >= 0"),
    (["algorithm.finetune_lr=nan"], "algorithm.finetune_lr: got nan, expected a finite number"),
    (["algorithm.finetune_augment=true"], "algorithm.finetune_augment: got true with algorithm.finetune_steps=0"),
    (["algorithm.finetune_steps=5", "data.source=sinusoid", "model.name=mlp"],
     "algorithm.finetune_steps: got 5 with data.source=sinusoid (regression), expected 0"),
])
def test_bad_finetuning_settings_get_one_clear_error(override, message):
    with pytest.raises(ConfigError) as e:
        from_dict({}, override)
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith(message), e.value.problems
