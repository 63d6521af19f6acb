"""Every registered model x algorithm, first and second order: the vectorised meta-gradient over tasks equals an
ordinary per-task Python loop in float64 (torch.func.vmap changes nothing but speed).

The grid comes from the registries and is every pair the config accepts, so a new component is checked by adding
its registry line. A model with torch's built-in ``nn.BatchNorm2d`` (training-mode statistics) fails it: its
second-order gradient under ``vmap`` is silently wrong (docs/architecture.md, "Facts this design rests on").
"""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from test_exact_math import _image_batch, _loop_meta_gradient, _rel_err
from torch import nn

from mtl_ray.algorithms import ALGORITHMS, TaskShape, build_learner, initial_meta_params
from mtl_ray.algorithms.base import FunctionalAlgorithm, Params
from mtl_ray.components import component_problems, from_dict
from mtl_ray.config import Config, ConfigError, ModelConfig
from mtl_ray.data import SOURCES
from mtl_ray.data.base import TaskBatch
from mtl_ray.models import MODELS

WAYS, SHOTS, QUERIES, SIZE, TASKS = 2, 1, 2, 16, 3
IMAGE_SHAPE = TaskShape("classification", (1, SIZE, SIZE), WAYS)
REGRESSION_SHAPE = TaskShape("regression", (1,), 1)
TOLERANCE = 1e-10  # float64; the built-in batch norm is ~1e-3 off


def _source_of(kind: str) -> str:
    return next(name for name, spec in SOURCES.items() if spec.kind == kind)


def _raw(model: str, algorithm: str, kind: str, first_order: bool) -> dict:
    return {"data": {"source": _source_of(kind), "ways": WAYS, "shots": SHOTS, "queries": QUERIES,
                     "image_size": SIZE},
            "model": {"name": model, "channels": 3, "blocks": 2, "hidden_sizes": [5], "widths": [2, 3, 3, 4],
                      "init": "any-body" if ALGORITHMS[algorithm].needs_init else ""},
            "algorithm": {"name": algorithm, "inner_steps": 2, "inner_lr": 0.3, "first_order": first_order}}


def _accepted(raw: dict) -> bool:
    try:
        from_dict(raw)
    except ConfigError:
        return False
    return True


def grid() -> list[tuple[str, str, str, bool]]:
    """``(model, algorithm, kind, first_order)`` for every registered pair the config accepts, on each task kind,
    in both orders where the algorithm has both (``second_order``)."""
    out = []
    for model in MODELS:
        for name, cls in ALGORITHMS.items():
            for kind in ("classification", "regression"):
                for first_order in ((False, True) if cls.second_order else (True,)):
                    if _accepted(_raw(model, name, kind, first_order)):
                        out.append((model, name, kind, first_order))
    return out


def _regression_batch(tasks: int, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(tasks, SHOTS + QUERIES + 2, 1, generator=g, dtype=torch.float64) * 4 - 2
    y = torch.sin(x) + 0.1 * torch.rand(x.shape, generator=g, dtype=torch.float64)
    return TaskBatch(x[:, :3], y[:, :3], x[:, 3:], y[:, 3:])


def _loop_reptile(alg: FunctionalAlgorithm, params: Params, batch: TaskBatch) -> Params:
    """Reptile's update is not a gradient: the reference is ``theta - phi`` per task, summed, in a loop."""
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for t in range(batch.num_tasks):
        phi = alg.weights(alg.adapt(params, batch.support_x[t], batch.support_y[t], alg.inner_steps))
        for k, v in phi.items():
            total[k] += params[k] - v
    return total


def _loop_reference(alg: FunctionalAlgorithm, params: Params, batch: TaskBatch) -> Params:
    if type(alg).meta_gradient is not FunctionalAlgorithm.meta_gradient:  # an update of its own (Reptile)
        return _loop_reptile(alg, params, batch)
    trainable = {k: v for k, v in params.items() if not alg.is_frozen(k)}
    fixed = {k: v for k, v in params.items() if alg.is_frozen(k)}

    class WithFixed:  # the loop's algorithm sees the frozen entries as constants, as meta_gradient does
        def __getattr__(self, item):
            return getattr(alg, item)

        def adapt(self, p, *rest):
            return alg.adapt({**fixed, **p}, *rest)

        def predict(self, p, *rest):
            return alg.predict({**fixed, **p}, *rest)

    return _loop_meta_gradient(WithFixed(), trainable, batch)


def grid_error(model: str, algorithm: str, kind: str, first_order: bool) -> float:
    """Relative distance between the vmapped meta-gradient and the per-task loop's, float64."""
    cfg = from_dict(_raw(model, algorithm, kind, first_order))
    shape, batch = ((IMAGE_SHAPE, _image_batch(TASKS, WAYS, SHOTS, QUERIES, SIZE)) if kind == "classification"
                    else (REGRESSION_SHAPE, _regression_batch(TASKS)))
    learner = build_learner(cfg, shape=shape)
    learner.model.double()
    params = {k: v.double() for k, v in initial_meta_params(cfg, learner).items()}
    g = torch.Generator().manual_seed(1)
    # off init: a body as pretrained (frozen under MTL), heads and rates not at their starting constants
    params = {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}
    got = learner.algorithm.meta_gradient(params, batch).grads
    want = _loop_reference(learner.algorithm, params, batch)
    assert got.keys() == want.keys()
    return _rel_err(got, want)


GRID = grid()


def test_the_grid_covers_every_registered_model_and_algorithm():
    assert {m for m, *_ in GRID} == set(MODELS)
    assert {a for _, a, *_ in GRID} == set(ALGORITHMS)
    assert {(k, fo) for *_, k, fo in GRID} == {(k, fo) for k in ("classification", "regression") for fo in (0, 1)}


@pytest.mark.parametrize("model,algorithm,kind,first_order", GRID,
                         ids=[f"{m}-{a}-{k}-{'first' if fo else 'second'}" for m, a, k, fo in GRID])
def test_vmapped_meta_gradient_equals_per_task_loop_float64(model, algorithm, kind, first_order):
    assert grid_error(model, algorithm, kind, first_order) < TOLERANCE


class BuiltinBatchNormNet(nn.Module):
    """A deliberately wrong model: torch's own ``nn.BatchNorm2d`` (batch statistics, no running buffers)."""

    image_input: ClassVar[bool] = True

    def __init__(self, image_size: int, out_features: int, channels: int = 3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels,
                                  track_running_stats=False), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(channels * image_size * image_size, out_features)

    def forward(self, x, ref=None, ref_grad=True):  # ``ref`` cannot be honoured by the built-in norm
        return self.head(self.body(x))

    @classmethod
    def from_config(cls, m: ModelConfig, x_shape: tuple[int, ...], out_features: int) -> BuiltinBatchNormNet:
        return cls(x_shape[-1], out_features, m.channels)

    @staticmethod
    def config_problems(cfg: Config) -> list[str]:
        return []


def test_the_grid_catches_a_model_with_torchs_builtin_batch_norm(monkeypatch):
    monkeypatch.setitem(MODELS, "builtin_bn", BuiltinBatchNormNet)
    assert not component_problems(from_dict(_raw("builtin_bn", "maml", "classification", False)))
    assert ("builtin_bn", "maml", "classification", False) in grid()  # registered: the grid takes it up
    # the config checks refuse it for regression (image input), so the grid skips that pair
    assert ("builtin_bn", "maml", "regression", False) not in grid()
    assert grid_error("builtin_bn", "maml", "classification", False) > 1e-6  # silently wrong under vmap
    assert grid_error("conv4", "maml", "classification", False) < TOLERANCE  # the hand-written norm is exact


def test_an_unregistered_name_is_refused_with_the_registered_ones():
    with pytest.raises(ConfigError, match=r"model\.name: got .builtin_bn., expected one of: mlp, conv4"):
        from_dict(_raw("builtin_bn", "maml", "classification", False))
