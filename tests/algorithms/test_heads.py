"""Exact maths of the closed-form heads: Meta-Baseline's cosine classifier (Chen et al. 2021) and R2-D2's ridge
regression (Bertinetto et al. 2019), against hand computations, invariances and float64 finite differences."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtl_ray.algorithms import R2D2, MetaBaseline, ProtoNet, TaskShape, build_learner, initial_meta_params
from mtl_ray.algorithms.base import LOSS, Params
from mtl_ray.algorithms.closed_form import ridge_weights, with_bias
from mtl_ray.components import from_dict
from mtl_ray.config import ConfigError
from mtl_ray.data.base import TaskBatch

F64 = torch.float64
TAU, ALPHA, LAMBDA = MetaBaseline.TEMPERATURE, R2D2.SCALE, R2D2.LOG_LAMBDA


class Identity(nn.Module):
    """A body that is the identity: embeddings are the inputs, so the head's maths is all there is."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten())


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _meta_baseline(tau: float = 10.0, ways: int = 2) -> tuple[MetaBaseline, Params]:
    alg = MetaBaseline(Identity(), kind="classification", ways=ways, temperature=tau)
    return alg, {TAU: torch.tensor(tau, dtype=F64)}


def _r2d2(alpha: float = 10.0, lam: float = 1.0, ways: int = 2) -> tuple[R2D2, Params]:
    alg = R2D2(Identity(), kind="classification", ways=ways, temperature=alpha, ridge_lambda=lam)
    return alg, {ALPHA: torch.tensor(alpha, dtype=F64), LAMBDA: torch.tensor(math.log(lam), dtype=F64)}


def _conv4(name: str, **algorithm) -> tuple[R2D2 | MetaBaseline, Params]:
    """A small float64 Conv4 learner (norm=support) for 3-way 2-shot 12x12 tasks, its weights off their start."""
    cfg = from_dict({"data": {"ways": 3, "shots": 2, "queries": 2, "image_size": 12},
                     "model": {"channels": 4, "blocks": 2}, "algorithm": {"name": name, "inner_steps": 0,
                                                                            **algorithm}})
    learner = build_learner(cfg, shape=TaskShape("classification", (1, 12, 12), 3))
    learner.model.double()
    params = {k: v.double() for k, v in initial_meta_params(cfg, learner).items()}
    params = {k: v + 0.05 * torch.randn(v.shape, generator=_g(5), dtype=F64) for k, v in params.items()}
    return learner.algorithm, params  # type: ignore[return-value]


def _image_batch(tasks: int, seed: int = 0) -> TaskBatch:
    g = _g(seed)
    sy = torch.arange(3).repeat_interleave(2).repeat(tasks, 1)
    qy = torch.arange(3).repeat_interleave(2).repeat(tasks, 1)
    return TaskBatch(torch.rand(tasks, 6, 1, 12, 12, generator=g, dtype=F64), sy,
                     torch.rand(tasks, 6, 1, 12, 12, generator=g, dtype=F64), qy)


# ------------------------------------------------------------------ R2-D2: the ridge solution


@pytest.mark.parametrize("s,d", [(6, 9), (8, 3)])  # wider and narrower than the support set
def test_woodbury_ridge_solution_equals_the_primal_normal_equations(s, d):
    g = _g(0)
    x = torch.randn(s, d, generator=g, dtype=F64)
    y = F.one_hot(torch.arange(s) % 3, 3).to(F64)
    lam = torch.tensor(0.7, dtype=F64)
    primal = torch.linalg.solve(x.t() @ x + lam * torch.eye(d, dtype=F64), x.t() @ y)  # (X^T X + lam I)^-1 X^T Y
    torch.testing.assert_close(ridge_weights(x, y, lam), primal, rtol=0, atol=1e-12)
    # and it is the minimiser: the gradient of ||XW - Y||^2 + lam ||W||^2 vanishes there
    w = ridge_weights(x, y, lam)
    torch.testing.assert_close(x.t() @ (x @ w - y) + lam * w, torch.zeros_like(w), rtol=0, atol=1e-12)


def test_r2d2_tiny_case_by_hand():
    """Embeddings 1 and -1 of classes 0 and 1, with the bias column: X = [[1, 1], [-1, 1]], X^T X = 2 I, so
    W = (2 + lam)^-1 X^T Y = [[1, -1], [1, 1]] / 3 at lam = 1; the query 2 gives [2, 1] W = [1, -1/3], times alpha."""
    alg, params = _r2d2(alpha=4.0, lam=1.0)
    state = alg.adapt(params, torch.tensor([[1.0], [-1.0]], dtype=F64), torch.tensor([0, 1]))
    torch.testing.assert_close(state["ridge_weights"], torch.tensor([[1.0, -1.0], [1.0, 1.0]], dtype=F64) / 3,
                               rtol=0, atol=1e-15)
    logits = alg.predict(params, state, torch.tensor([[2.0]], dtype=F64))
    torch.testing.assert_close(logits, 4.0 * torch.tensor([[1.0, -1.0 / 3]], dtype=F64), rtol=0, atol=1e-14)
    want_loss = -torch.log_softmax(torch.tensor([4.0, -4.0 / 3], dtype=F64), 0)[0]
    torch.testing.assert_close(alg.loss(logits, torch.tensor([0])), want_loss, rtol=0, atol=1e-15)


def test_r2d2_adapt_solves_the_ridge_of_the_embeddings_with_a_bias_column():
    alg, params = _r2d2(lam=0.3, ways=3)
    g = _g(1)
    sx, sy = torch.randn(7, 5, generator=g, dtype=F64), torch.tensor([0, 1, 2, 0, 1, 2, 2])
    x, y = with_bias(sx), F.one_hot(sy, 3).to(F64)
    assert torch.equal(x[:, -1], torch.ones(7, dtype=F64))
    primal = torch.linalg.solve(x.t() @ x + 0.3 * torch.eye(6, dtype=F64), x.t() @ y)
    torch.testing.assert_close(alg.adapt(params, sx, sy)["ridge_weights"], primal, rtol=0, atol=1e-12)


def test_r2d2_with_a_vanishing_penalty_interpolates_its_support_set():
    """S <= D + 1 independent rows and lam -> 0: the ridge fits Y exactly, so the support set is scored one-hot."""
    alg, params = _r2d2(alpha=1.0, lam=1e-9, ways=3)
    sx, sy = torch.randn(6, 8, generator=_g(2), dtype=F64), torch.tensor([0, 0, 1, 1, 2, 2])
    out = alg.predict(params, alg.adapt(params, sx, sy), sx)
    torch.testing.assert_close(out, F.one_hot(sy, 3).to(F64), rtol=0, atol=1e-6)


def test_r2d2_is_invariant_to_the_order_of_the_support_set():
    alg, params = _r2d2(ways=3)
    g = _g(3)
    sx, sy, qx = torch.randn(6, 4, generator=g, dtype=F64), torch.tensor([0, 1, 2, 0, 1, 2]), torch.randn(5, 4,
                                                                                                         generator=g,
                                                                                                         dtype=F64)
    perm = torch.randperm(6, generator=g)
    a = alg.predict(params, alg.adapt(params, sx, sy), qx)
    b = alg.predict(params, alg.adapt(params, sx[perm], sy[perm]), qx)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["r2d2", "meta_baseline"])
def test_a_query_is_scored_from_the_support_set_and_itself_only(name):
    """Conv4 with batch norm (norm=support): a query's logits are the same alone as among any other queries, so
    neither the ridge solve nor the centroids nor the statistics see the other queries."""
    alg, params = _conv4(name)
    b = _image_batch(1)
    sx, sy, qx = b.support_x[0], b.support_y[0], b.query_x[0]
    state = alg.adapt(params, sx, sy)
    whole = alg.predict(params, state, qx)
    alone = torch.cat([alg.predict(params, state, qx[i:i + 1]) for i in range(len(qx))])
    other = torch.rand(9, *qx.shape[1:], generator=_g(4), dtype=F64)  # different company
    mixed = alg.predict(params, state, torch.cat([other[:4], qx[2:3], other[4:]]))[4]
    torch.testing.assert_close(alone, whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(mixed, whole[2], rtol=0, atol=1e-12)


def test_beta_is_left_out_because_cross_entropy_cannot_see_it():
    """R2-D2's scalar offset beta shifts every logit alike; the softmax cross-entropy's gradient in it is
    sum_n (p_n - y_n) = 0, so it could never be learned (closed_form.R2D2's docstring)."""
    alg, params = _r2d2(ways=3)
    g = _g(6)
    sx, sy = torch.randn(6, 4, generator=g, dtype=F64), torch.tensor([0, 1, 2, 0, 1, 2])
    qx, qy = torch.randn(5, 4, generator=g, dtype=F64), torch.tensor([0, 2, 1, 1, 0])
    beta = torch.tensor(0.3, dtype=F64, requires_grad=True)
    out = alg.predict(params, alg.adapt(params, sx, sy), qx)
    (d_beta,) = torch.autograd.grad(alg.loss(out + beta, qy), beta)
    assert abs(float(d_beta)) < 1e-15
    assert float(alg.loss(out + beta.detach(), qy)) == pytest.approx(float(alg.loss(out, qy)), abs=1e-14)


# ------------------------------------------------------------------ Meta-Baseline: the cosine classifier


def test_meta_baseline_tiny_case_and_its_temperature_gradient_by_hand():
    """Centroids (1, 0) and (0, 1) (class 0's is the mean of (2, 0) and (1, 0)); the query (3, 4) of class 0 has
    cosines 0.6 and 0.8, so L = log(1 + e^{0.2 tau}) and dL/dtau = (p_0 - 1) 0.6 + p_1 0.8 = 0.2 sigmoid(0.2 tau)."""
    tau = 10.0
    alg, params = _meta_baseline(tau)
    sx, sy = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=F64), torch.tensor([0, 0, 1])
    qx, qy = torch.tensor([[3.0, 4.0]], dtype=F64), torch.tensor([0])
    state = alg.adapt(params, sx, sy)
    torch.testing.assert_close(state["prototypes"], torch.tensor([[1.5, 0.0], [0.0, 1.0]], dtype=F64))
    torch.testing.assert_close(alg.predict(params, state, qx), torch.tensor([[6.0, 8.0]], dtype=F64), rtol=0,
                               atol=1e-14)
    res = alg.meta_gradient(params, TaskBatch(sx[None], sy[None], qx[None], qy[None]))
    assert res.metrics[LOSS] == pytest.approx(math.log1p(math.exp(0.2 * tau)), abs=1e-12)
    assert float(res.grads[TAU]) == pytest.approx(0.2 / (1 + math.exp(-0.2 * tau)), abs=1e-12)


def test_meta_baseline_temperature_gradient_is_the_mean_of_softmax_minus_onehot_dot_cosine():
    """dL/dtau for L = mean_q CE(tau cos_q, y_q) is mean_q sum_n (softmax(tau cos_q)_n - [n = y_q]) cos_qn, summed
    over a meta-batch's tasks as meta_gradient sums."""
    tau, ways, tasks = 7.5, 4, 3
    alg, params = _meta_baseline(tau, ways)
    g = _g(7)
    sx = torch.randn(tasks, ways * 2, 6, generator=g, dtype=F64)
    sy = torch.arange(ways).repeat_interleave(2).repeat(tasks, 1)
    qx = torch.randn(tasks, 10, 6, generator=g, dtype=F64)
    qy = torch.randint(0, ways, (tasks, 10), generator=g)
    want = 0.0
    for t in range(tasks):
        centroids = torch.stack([sx[t][sy[t] == n].mean(0) for n in range(ways)])  # [N, D]
        cos = (qx[t] @ centroids.t()) / (qx[t].norm(dim=1, keepdim=True) * centroids.norm(dim=1))  # [Q, N]
        p = torch.softmax(tau * cos, dim=1)
        want += float(((p - F.one_hot(qy[t], ways).to(F64)) * cos).sum(1).mean())
    got = alg.meta_gradient(params, TaskBatch(sx, sy, qx, qy)).grads[TAU]
    assert got.shape == () and float(got) == pytest.approx(want, abs=1e-12)


def test_meta_baseline_logits_depend_on_the_embeddings_direction_only():
    alg, params = _meta_baseline(3.0, ways=3)
    proto = ProtoNet(Identity(), kind="classification", ways=3)
    g = _g(8)
    sx, sy = torch.randn(6, 5, generator=g, dtype=F64), torch.tensor([0, 1, 2, 0, 1, 2])
    qx = torch.randn(4, 5, generator=g, dtype=F64)
    scale = torch.tensor([[0.01], [3.0], [250.0], [7.0]], dtype=F64)  # a positive factor per query

    def logits(a, s, q):
        return a.predict(params, a.adapt(params, s, sy), q)

    base = logits(alg, sx, qx)
    torch.testing.assert_close(logits(alg, 42.0 * sx, qx), base, rtol=0, atol=1e-12)  # every support embedding
    torch.testing.assert_close(logits(alg, sx, scale * qx), base, rtol=0, atol=1e-12)  # each query its own
    assert (logits(proto, sx, scale * qx) - logits(proto, sx, qx)).abs().max() > 1  # distances would not be
    assert base.abs().max() <= 3.0 + 1e-12  # |tau cos| <= tau
    torch.testing.assert_close(MetaBaseline.predict(alg, {TAU: torch.tensor(6.0, dtype=F64)},
                                                    alg.adapt(params, sx, sy), qx), 2 * base, rtol=0, atol=1e-12)


# ------------------------------------------------------------------ meta-gradients against finite differences


def _summed_loss(alg, params: Params, batch: TaskBatch) -> float:
    return float(alg.evaluate(params, batch, 0)[LOSS].sum())


@pytest.mark.parametrize("name,keys", [("r2d2", (ALPHA, LAMBDA)), ("meta_baseline", (TAU,))])
def test_meta_gradient_matches_float64_finite_differences(name, keys):
    """Through Conv4 with support-set batch norm, the solve and the cosine: each head meta-parameter's derivative,
    and the whole gradient along a random direction of every weight, equal central differences (h = 1e-6)."""
    alg, params = _conv4(name)
    batch = _image_batch(2)
    grads = alg.meta_gradient(params, batch).grads
    assert set(grads) == set(params)
    h = 1e-6
    for k in keys:
        up = _summed_loss(alg, {**params, k: params[k] + h}, batch)
        down = _summed_loss(alg, {**params, k: params[k] - h}, batch)
        fd = (up - down) / (2 * h)
        assert abs(float(grads[k]) - fd) <= 1e-6 * max(1.0, abs(fd)), (k, float(grads[k]), fd)
        assert abs(fd) > 1e-4, k  # the check is not vacuous
    g = _g(9)
    v = {k: torch.randn(p.shape, generator=g, dtype=F64) for k, p in params.items()}
    up = _summed_loss(alg, {k: p + h * v[k] for k, p in params.items()}, batch)
    down = _summed_loss(alg, {k: p - h * v[k] for k, p in params.items()}, batch)
    along = sum(float((grads[k] * v[k]).sum()) for k in params)
    assert along == pytest.approx((up - down) / (2 * h), rel=1e-6)


# ------------------------------------------------------------------ config and starting values


def _start(name: str, **algorithm) -> Params:
    cfg = from_dict({"algorithm": {"name": name, "inner_steps": 0, **algorithm}})
    return initial_meta_params(cfg, build_learner(cfg, shape=TaskShape("classification", (1, 28, 28), 5)))


def test_the_config_sets_the_starting_values_and_refuses_non_positive_ones():
    start = _start("r2d2", temperature=2.5, ridge_lambda=0.2)
    assert float(start[ALPHA]) == 2.5 and float(start[LAMBDA]) == pytest.approx(math.log(0.2))
    assert start[ALPHA].shape == () and start[ALPHA].dtype == torch.float32  # the model's dtype
    mb_params = _start("meta_baseline")
    assert float(mb_params[TAU]) == 10.0  # the paper's start
    assert float(_start("meta_baseline", temperature=4.0)[TAU]) == 4.0
    assert not any(k.startswith("head.") for k in mb_params)  # no head: the centroids are the classifier
    for key, bad in (("temperature", 0), ("temperature", -1.0), ("ridge_lambda", 0.0), ("ridge_lambda", -2)):
        with pytest.raises(ConfigError, match=rf"algorithm\.{key}: got {float(bad)!r}, expected a value > 0"):
            from_dict({"algorithm": {"name": "r2d2", "inner_steps": 0, key: bad}})
    with pytest.raises(ValueError, match="ridge_lambda"):
        R2D2(Identity(), kind="classification", ways=2, ridge_lambda=0.0)


def test_a_pretrained_body_starts_them_with_the_head_meta_parameters_at_their_starting_values():
    for name in ("meta_baseline", "r2d2"):
        cfg = from_dict({"model": {"channels": 4, "init": "runs/pre"}, "algorithm": {"name": name, "inner_steps": 0}})
        learner = build_learner(cfg, shape=TaskShape("classification", (1, 28, 28), 5))
        fresh = initial_meta_params(cfg, learner)
        body = {k: torch.full_like(v, 0.5) for k, v in fresh.items() if k.startswith("body.")}
        started = initial_meta_params(cfg, learner, init=body)
        assert all(torch.equal(started[k], body[k]) for k in body)
        assert {k: v for k, v in started.items() if k.startswith("meta.")}.keys() == \
            {k for k in fresh if k.startswith("meta.")} != set()
        assert all(torch.equal(started[k], fresh[k]) for k in fresh if k.startswith("meta."))
