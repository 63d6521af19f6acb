"""Normalisation modes (``model.norm``): a query's prediction depends on the support set and itself only.

Under ``support`` (the default) the statistics that normalise a query come from the task's support set, so
predicting a query alone, in any subset or in any order gives the same answer (up to the rounding of BLAS
kernels, which differs by matrix size; ``mtl_ray.api`` scores queries one shape at a time for bit-equality).
``transductive`` normalises each batch with its own statistics: the answer then depends on the batch.
"""

from __future__ import annotations

import pytest
import torch

from mtl_ray.algorithms import ALGORITHMS, TaskShape, build_learner, initial_meta_params
from mtl_ray.algorithms.base import SUPPORT_X
from mtl_ray.components import from_dict
from mtl_ray.data.base import TaskBatch
from mtl_ray.models import body_params

WAYS, SHOTS, QUERIES, SIZE = 3, 2, 4, 16
SHAPE = TaskShape("classification", (1, SIZE, SIZE), WAYS)
IMAGE_ALGORITHMS = sorted(ALGORITHMS)  # every registered algorithm has an image form


def _learner(name: str, impl: str = "folded", norm: str = "support", dtype=torch.float64):
    cfg = {"model": {"channels": 6, "conv_impl": impl, "norm": norm},
           "algorithm": {"name": name, "inner_steps": 2, "inner_lr": 0.3}}
    if name == "mtl":  # MTL needs a pretrained body: any body of the right layout will do here
        cfg["model"]["init"] = "unused-in-this-test"
    c = from_dict(cfg)
    learner = build_learner(c, shape=SHAPE)
    learner.model.to(dtype)
    params = {k: v.to(dtype) for k, v in initial_meta_params(c, learner).items()}
    if name == "mtl":
        # a body that is not at init, so scale/shift matter
        params.update({k: v + 0.05 * torch.randn_like(v) for k, v in body_params(params).items()})
    return learner.algorithm, params


def _task(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.rand(WAYS * SHOTS, 1, SIZE, SIZE, generator=g, dtype=dtype)
    sy = torch.arange(WAYS).repeat_interleave(SHOTS)
    qx = torch.rand(WAYS * QUERIES, 1, SIZE, SIZE, generator=g, dtype=dtype)
    return sx, sy, qx


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("impl", ["folded", "native"])
@pytest.mark.parametrize("name", IMAGE_ALGORITHMS)
def test_a_query_is_predicted_the_same_alone_in_any_subset_and_any_order(name, impl, dtype, atol):
    alg, params = _learner(name, impl, dtype=dtype)
    sx, sy, qx = _task(dtype)
    state = alg.adapt(params, sx, sy, 2)
    assert SUPPORT_X in state  # the statistics travel with the adapted state
    with torch.no_grad():
        whole = alg.predict(params, state, qx)
        alone = torch.cat([alg.predict(params, state, qx[i:i + 1]) for i in range(len(qx))])
        perm = torch.randperm(len(qx), generator=torch.Generator().manual_seed(1))
        shuffled = alg.predict(params, state, qx[perm])[perm.argsort()]
        subset = alg.predict(params, state, qx[[5, 1, 9]])
    assert whole.shape == (len(qx), WAYS)
    torch.testing.assert_close(alone, whole, rtol=0, atol=atol)
    torch.testing.assert_close(shuffled, whole, rtol=0, atol=atol)
    torch.testing.assert_close(subset, whole[[5, 1, 9]], rtol=0, atol=atol)


@pytest.mark.parametrize("name", ["maml", "protonet", "relationnet"])
def test_transductive_mode_is_what_it_says_a_query_depends_on_the_others(name):
    """The opt-in mode really is transductive (so the default's independence is not an accident of the data)."""
    alg, params = _learner(name, norm="transductive")
    sx, sy, qx = _task(torch.float64)
    state = alg.adapt(params, sx, sy, 2)
    assert SUPPORT_X not in state
    with torch.no_grad():
        whole = alg.predict(params, state, qx)
        half = alg.predict(params, state, qx[:WAYS * QUERIES // 2])
    assert (half - whole[: len(half)]).abs().max() > 1e-6


@pytest.mark.parametrize("name", IMAGE_ALGORITHMS)
def test_every_meta_parameter_that_is_not_frozen_gets_a_meta_gradient(name):
    """A parameter the forward pass never reads gets a zero meta-gradient and never trains. RelationNet's embedding
    was registered as ``encoder.body.*`` while the algorithm read ``body.*``: it stayed at its initialisation."""
    alg, params = _learner(name)
    sx, sy, qx = _task(torch.float64)
    qy = torch.arange(WAYS).repeat_interleave(QUERIES)
    grads = alg.meta_gradient(params, TaskBatch(sx[None], sy[None], qx[None], qy[None])).grads
    want = {k for k in params if not alg.is_frozen(k)}
    assert set(grads) == want
    # Conv biases in front of batch norm have an exactly zero meta-gradient in exact arithmetic; all else moves.
    dead = [k for k in want if grads[k].abs().max() == 0 and not k.endswith("conv.bias")]
    assert not dead, f"{name}: no meta-gradient reaches {dead}"
