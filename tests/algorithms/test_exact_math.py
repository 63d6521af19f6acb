"""Exact maths: hand-derived meta-gradients, equivalences, and vmap == per-task loop in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtl_ray.algorithms import (
    ANIL,
    MAML,
    Learner,
    MetaSGD,
    ProtoNet,
    Reptile,
    TaskShape,
    build_learner,
    initial_meta_params,
)
from mtl_ray.algorithms import base as algorithms_base
from mtl_ray.algorithms.base import AUTO_CHUNK_ELEMENTS, Params, chunks
from mtl_ray.components import from_dict
from mtl_ray.data.base import TaskBatch


class Scalar(nn.Module):
    """f(x) = w * x with one scalar weight (no bias): small enough to differentiate by hand."""

    def __init__(self, w: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([w], dtype=torch.float64))

    def forward(self, x):
        return x * self.w


def _regression_batch():
    sx = torch.tensor([[[1.0], [2.0]]], dtype=torch.float64)
    sy = torch.tensor([[[3.0], [1.0]]], dtype=torch.float64)
    qx = torch.tensor([[[0.5], [-1.0]]], dtype=torch.float64)
    qy = torch.tensor([[[2.0], [0.0]]], dtype=torch.float64)
    return TaskBatch(sx, sy, qx, qy)


def _hand(w: float, a: float, b: TaskBatch):
    """L(w) = mean((w x - y)^2): L' = 2 mean(x (w x - y)), L'' = 2 mean(x^2)."""
    sx, sy, qx, qy = (t[0, :, 0] for t in (b.support_x, b.support_y, b.query_x, b.query_y))
    ds = 2 * (sx * (w * sx - sy)).mean()
    d2s = 2 * (sx * sx).mean()
    w1 = w - a * ds
    dq = 2 * (qx * (w1 * qx - qy)).mean()
    return w1, dq * (1 - a * d2s), dq  # adapted weight, second-order meta-grad, first-order meta-grad


def test_maml_one_step_matches_hand_derivation():
    w, a, b = 0.7, 0.1, _regression_batch()
    _, want_so, want_fo = _hand(w, a, b)
    so = MAML(Scalar(w), kind="regression", inner_lr=a, inner_steps=1).meta_gradient({"w": torch.tensor([w])
                                                                                     .double()}, b)
    fo = MAML(Scalar(w), kind="regression", inner_lr=a, inner_steps=1, first_order=True).meta_gradient(
        {"w": torch.tensor([w]).double()}, b)
    assert so.num_tasks == 1
    assert torch.allclose(so.grads["w"], want_so.reshape(1), atol=1e-12)
    # first-order = the same expression with the second-order factor (1 - a L_s'') removed
    assert torch.allclose(fo.grads["w"], want_fo.reshape(1), atol=1e-12)
    assert not torch.allclose(so.grads["w"], fo.grads["w"])


def test_metasgd_with_constant_rates_equals_maml_and_learns_rates():
    w, a, b = 0.7, 0.1, _regression_batch()
    p = {"w": torch.tensor([w]).double()}
    maml = MAML(Scalar(w), kind="regression", inner_lr=a, inner_steps=2).meta_gradient(p, b)
    msgd_alg = MetaSGD(Scalar(w), kind="regression", inner_lr=a, inner_steps=2)
    mp = msgd_alg.init_params(p)
    assert torch.equal(mp["meta.lr.w"], torch.full((1,), a, dtype=torch.float64))
    msgd = msgd_alg.meta_gradient(mp, b)
    assert torch.allclose(msgd.grads["w"], maml.grads["w"], atol=1e-12)
    # d L_q / d alpha for one step: L_q'(w1) * (-L_s'(w)) -> non-zero, so the outer loop updates the rate
    one = MetaSGD(Scalar(w), kind="regression", inner_lr=a, inner_steps=1).meta_gradient(mp, b)
    sx, sy = b.support_x[0, :, 0], b.support_y[0, :, 0]
    ds = 2 * (sx * (w * sx - sy)).mean()
    _, _, dq = _hand(w, a, b)
    assert torch.allclose(one.grads["meta.lr.w"], (-dq * ds).reshape(1), atol=1e-12)


def test_reptile_update_is_initial_minus_adapted():
    w, a, b = 0.7, 0.1, _regression_batch()
    sx, sy = b.support_x[0, :, 0], b.support_y[0, :, 0]
    phi = torch.tensor(w, dtype=torch.float64)
    for _ in range(3):  # plain SGD on the support loss, recomputed here
        phi = phi - a * 2 * (sx * (phi * sx - sy)).mean()
    r = Reptile(Scalar(w), kind="regression", inner_lr=a, inner_steps=3).meta_gradient({"w": torch.tensor([w])
                                                                                        .double()}, b)
    assert torch.allclose(r.grads["w"], (w - phi).reshape(1), atol=1e-12)
    # an outer SGD step with rate eps is Reptile's theta + eps (phi - theta)
    eps = 0.5
    assert torch.allclose(w - eps * r.grads["w"], (w + eps * (phi - w)).reshape(1))


def test_protonet_loss_matches_hand_computation():
    class Identity(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten())

    alg = ProtoNet(Identity(), ways=2, kind="classification")
    sx = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]], dtype=torch.float64)  # class 0 twice, class 1 once
    sy = torch.tensor([0, 0, 1])
    qx = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    qy = torch.tensor([1])
    state = alg.adapt({}, sx, sy, 0)
    assert torch.allclose(state["prototypes"], torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64))
    d0, d1 = 1.0, 1.0 + 9.0  # squared distances of (1, 1) to (1, 0) and (0, 4)
    want = -torch.log_softmax(torch.tensor([-d0, -d1], dtype=torch.float64), 0)[1]
    loss = alg.loss(alg.predict({}, state, qx), qy)
    assert torch.allclose(loss, want)


def _image_batch(tasks: int, ways: int, shots: int, queries: int, size: int, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    sy = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    qy = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)
    return TaskBatch(torch.rand(tasks, ways * shots, 1, size, size, generator=g, dtype=torch.float64), sy,
                     torch.rand(tasks, ways * queries, 1, size, size, generator=g, dtype=torch.float64), qy)


def _loop_meta_gradient(alg, params, batch: TaskBatch):
    """The reference: an ordinary per-task autograd loop (no vmap)."""
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for t in range(batch.num_tasks):
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        state = alg.adapt(p, batch.support_x[t], batch.support_y[t], alg.inner_steps)
        loss = alg.loss(alg.predict(p, state, batch.query_x[t]), batch.query_y[t])
        grads = torch.autograd.grad(loss, list(p.values()), allow_unused=True)
        for k, g in zip(p, grads, strict=True):
            if g is not None:
                total[k] += g
    return total


def _rel_err(a: dict, b: dict) -> float:
    num = sum(((a[k] - b[k]) ** 2).sum() for k in b) ** 0.5
    return float(num.detach() / sum((b[k] ** 2).sum() for k in b) ** 0.5)


@pytest.mark.parametrize("name,impl,first_order,norm", [
    ("maml", "folded", False, "support"), ("maml", "native", False, "support"), ("maml", "im2col", False, "support"),
    ("maml", "folded", True, "support"), ("metasgd", "folded", False, "support"), ("anil", "folded", False, "support"),
    ("protonet", "folded", False, "support"), ("relationnet", "folded", False, "support"),
    ("maml", "folded", False, "transductive"), ("maml", "native", False, "transductive"),
    ("protonet", "folded", False, "transductive"), ("relationnet", "folded", False, "transductive"),
])
def test_vmapped_meta_gradient_equals_per_task_loop_float64_with_batchnorm(name, impl, first_order, norm):
    """Conv4 (with batch norm) second order, float64: the vectorised path equals a per-task loop.

    torch's built-in batch norm fails this at ~1e-3 relative (docs/architecture.md, "Facts this design rests on").
    """
    cfg = from_dict({"data": {"ways": 3, "shots": 2, "queries": 2, "image_size": 16},
                     "model": {"channels": 6, "conv_impl": impl, "norm": norm},
                     "algorithm": {"name": name, "inner_steps": 2, "inner_lr": 0.3, "first_order": first_order}})

    learner = build_learner(cfg, shape=TaskShape("classification", (1, 16, 16), 3))
    learner.model.double()
    params = {k: v.double() for k, v in initial_meta_params(cfg, learner).items()}
    batch = _image_batch(4, 3, 2, 2, 16)
    got = learner.algorithm.meta_gradient(params, batch).grads
    want = _loop_meta_gradient(learner.algorithm, params, batch)
    assert _rel_err(got, want) < 1e-10


def _float64_learners(name: str, inner_steps: int, *chunk_sizes: int) -> tuple[list[Learner], Params]:
    """Conv4 learners for 3-way 1-shot 2-query 16x16 tasks, one per ``task_chunk_size``, in float64; shared params."""
    cfg = from_dict({"data": {"ways": 3, "shots": 1, "queries": 2, "image_size": 16}, "model": {"channels": 4},
                     "algorithm": {"name": name, "inner_steps": inner_steps}})
    shape = TaskShape("classification", (1, 16, 16), 3)
    learners = [build_learner(cfg.replace(**{"algorithm.task_chunk_size": c}), shape=shape) for c in chunk_sizes]
    params = {k: v.double() for k, v in initial_meta_params(cfg, learners[0]).items()}
    for learner in learners:
        learner.model.double()
    return learners, params


def test_meta_gradient_is_independent_of_chunking():
    (whole, chunked), params = _float64_learners("maml", 1, 0, 2)
    batch = _image_batch(5, 3, 1, 2, 16)
    assert chunks(batch, 2) == [(0, 2), (2, 4), (4, 5)]
    a = whole.algorithm.meta_gradient(params, batch)
    b = chunked.algorithm.meta_gradient(params, batch)
    assert _rel_err(a.grads, b.grads) < 1e-12
    assert a.metrics["loss"] == pytest.approx(b.metrics["loss"])


def _zeros_batch(tasks: int, support: int, query: int, size: int = 28, device: str = "cpu") -> TaskBatch:
    img = (1, size, size)
    return TaskBatch(torch.zeros(tasks, support, *img, device=device), torch.zeros(tasks, support, dtype=torch.long),
                     torch.zeros(tasks, query, *img, device=device), torch.zeros(tasks, query, dtype=torch.long))


def test_auto_chunks_keep_each_chunk_within_the_cpu_budget():
    # 5-way 1-shot, 15 queries per class, 28x28: 80 images a task -> 8 tasks (501,760 elements) per chunk
    assert chunks(_zeros_batch(32, 5, 75), 0) == [(i, i + 8) for i in range(0, 32, 8)]
    # 1 query per class: the meta-batch of 32 (250,880 elements) is one chunk
    assert chunks(_zeros_batch(32, 5, 5), 0) == [(0, 32)]
    # near-equal chunks, never more tasks than fit, never fewer chunks than needed
    got = chunks(_zeros_batch(20, 5, 75), 0)
    assert got == [(0, 6), (6, 13), (13, 20)]
    per_task = 80 * 28 * 28
    assert all((b - a) * per_task <= AUTO_CHUNK_ELEMENTS for a, b in got)
    # a task larger than the budget still gets a chunk of its own; no tasks, no chunks
    assert chunks(_zeros_batch(2, 5, 1000), 0) == [(0, 1), (1, 2)]
    assert chunks(_zeros_batch(0, 5, 5), 0) == []
    # other devices take the whole shard; an explicit size wins over the budget
    assert chunks(_zeros_batch(32, 5, 75, device="meta"), 0) == [(0, 32)]
    assert chunks(_zeros_batch(32, 5, 75), 16) == [(0, 16), (16, 32)]


@pytest.mark.parametrize("name", ["maml", "reptile"])
def test_auto_chunked_meta_gradient_and_evaluation_equal_one_vmap_call(name, monkeypatch):
    (auto, whole), params = _float64_learners(name, 2, 0, 5)
    batch = _image_batch(5, 3, 1, 2, 16)
    per_task = 9 * 16 * 16  # (3 support + 6 query) images
    monkeypatch.setattr(algorithms_base, "AUTO_CHUNK_ELEMENTS", 2 * per_task)  # a budget this batch exceeds
    assert chunks(batch, 0) == [(0, 1), (1, 3), (3, 5)]
    seen: list[int] = []
    if name == "maml":
        inner = auto.algorithm.chunk_grad

        def spy(p, fixed, sx, *rest):
            seen.append(sx.shape[0])
            return inner(p, fixed, sx, *rest)

        monkeypatch.setattr(auto.algorithm, "chunk_grad", spy)
    a = auto.algorithm.meta_gradient(params, batch)
    b = whole.algorithm.meta_gradient(params, batch)
    assert seen == ([1, 2, 2] if name == "maml" else [])
    assert _rel_err(a.grads, b.grads) < 1e-12
    assert a.metrics["loss"] == pytest.approx(b.metrics["loss"])
    ea, eb = auto.algorithm.evaluate(params, batch, 2), whole.algorithm.evaluate(params, batch, 2)
    for k in eb:
        torch.testing.assert_close(ea[k], eb[k], rtol=1e-12, atol=1e-12)


def test_anil_adapts_only_the_head():
    cfg = from_dict({"data": {"source": "sinusoid"}, "model": {"name": "mlp"},
                     "algorithm": {"name": "anil", "inner_lr": 0.1, "inner_steps": 3}})
    learner = build_learner(cfg)
    assert isinstance(learner.algorithm, ANIL)
    params = initial_meta_params(cfg, learner)
    b = learner.source.sample("train", 0, [0])
    state = learner.algorithm.adapt(params, b.support_x[0], b.support_y[0], 3)
    assert set(state) == {k for k in params if k.startswith("head.")}
    assert all(not torch.equal(state[k], params[k]) for k in state)
