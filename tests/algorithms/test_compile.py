"""algorithm.compile: torch.compile'd meta-gradients equal the eager ones, and a different one is an error."""

from __future__ import annotations

import pytest
import torch

from mtl_ray.algorithms import base as algorithms_base
from mtl_ray.algorithms import build_learner, initial_meta_params
from mtl_ray.algorithms.base import CompileMismatchError
from mtl_ray.components import from_dict
from mtl_ray.config import ConfigError
from mtl_ray.distributed.driver import MetaTrainer
from mtl_ray.distributed.executor import LocalExecutor


def _cfg(compile: bool, **algorithm):
    return from_dict({"data": {"source": "sinusoid", "shots": 10, "queries": 10}, "model": {"name": "mlp"},
                      "algorithm": {"name": "maml", "inner_lr": 0.01, "compile": compile, **algorithm},
                      "optim": {"meta_batch_size": 25, "steps": 5, "val_every": 0},
                      "tracking": {"checkpoint_every": 0, "mlflow": False}})


def test_compiled_sinusoid_meta_gradient_and_training_equal_eager(tmp_path):
    eager, compiled = build_learner(_cfg(False)), build_learner(_cfg(True))
    params = initial_meta_params(_cfg(False), eager)
    batch = eager.source.sample("train", 0, range(25))
    want = eager.algorithm.meta_gradient(params, batch)
    got = compiled.algorithm.meta_gradient(params, batch)
    for k, v in want.grads.items():
        assert torch.allclose(got.grads[k], v, rtol=1e-4, atol=1e-6), k
    assert compiled.algorithm._verified == {((25, 10, 1),) * 4}  # checked once against eager for this shape
    runs = {}
    for flag in (False, True):
        cfg = _cfg(flag)
        trainer = MetaTrainer.create(cfg, tmp_path / str(flag), executor=LocalExecutor(cfg))
        trainer.fit()
        runs[flag] = trainer.params
    for k, v in runs[False].items():
        assert torch.allclose(runs[True][k], v, rtol=1e-4, atol=1e-6), k


def _stand_in_compiler(change):
    """A ``torch.compile`` stand-in that applies ``change(key, grad, all grads)`` to each gradient it returns."""

    def compiler(fn, dynamic=False):
        def compiled(*args):
            grads, metrics = fn(*args)
            return {k: change(k, v, grads) for k, v in grads.items()}, metrics
        return compiled

    return compiler


def test_a_different_compiled_meta_gradient_is_an_error_not_a_wrong_update(monkeypatch):
    """torch 2.13's compiled second-order Conv4 gradient is 1-2% off in float32; compiling that takes
    minutes here, so a compiler that doubles the gradient stands in for it."""
    monkeypatch.setattr(algorithms_base.torch, "compile", _stand_in_compiler(lambda k, v, _: 2 * v))
    learner = build_learner(_cfg(True))
    params = initial_meta_params(_cfg(True), learner)
    with pytest.raises(CompileMismatchError,
                       match=r"is 0\.9\d* from the float64 eager one \(relative, worst in .*\), expected <= 0\.001 "
                             r".*compile=false"):
        learner.algorithm.meta_gradient(params, learner.source.sample("train", 0, range(4)))


def test_rounding_noise_on_a_zero_meta_gradient_is_not_a_mismatch(monkeypatch, omniglot_cfg):
    """Conv4's conv biases sit in front of batch-statistics norm: their true meta-gradient is 0, so the
    computed one is rounding noise. Noise of 1e-6 of the whole gradient's norm (float32 reassociation)
    passes; a 1% change of one weight does not."""
    cfg = omniglot_cfg(ways=3, shots=1, queries=1).replace(**{
        "model.name": "conv4", "model.channels": 8, "algorithm.name": "maml", "algorithm.compile": True})
    learner = build_learner(cfg)
    params = initial_meta_params(cfg, learner)
    batch = learner.source.sample("train", 0, range(2))
    want = build_learner(cfg.replace(**{"algorithm.compile": False})).algorithm.meta_gradient(params, batch).grads
    total = float(torch.sqrt(sum(v.square().sum() for v in want.values())))
    assert float(want["body.0.conv.bias"].norm()) < 1e-5 * total  # the premise: a zero meta-gradient

    def noisy(k, v, grads):
        return v + 1e-6 * total * torch.randn_like(v) / v.numel() ** 0.5
    monkeypatch.setattr(algorithms_base.torch, "compile", _stand_in_compiler(noisy))
    got = build_learner(cfg).algorithm.meta_gradient(params, batch).grads
    assert set(got) == set(want)

    def off(k, v, grads):
        return v * 1.01 if k == "body.1.conv.weight" else v
    monkeypatch.setattr(algorithms_base.torch, "compile", _stand_in_compiler(off))
    with pytest.raises(CompileMismatchError, match=r"worst in body.1.conv.weight"):
        build_learner(cfg).algorithm.meta_gradient(params, batch)


def test_the_check_measures_against_float64_not_against_eager_float32(monkeypatch):
    """With several inner steps eager float32 is itself far from float64 (5e-3 for 5-step Conv4), so a compiled
    gradient is judged by its distance from float64: as close as eager passes even when it differs from eager
    by more than the tolerance; further than COMPILE_SLACK x eager's distance fails. The tolerance is set
    below float32 rounding here so that a fast sinusoid model shows both cases."""
    monkeypatch.setattr(algorithms_base, "COMPILE_RTOL", 1e-12)
    learner = build_learner(_cfg(True))
    params = initial_meta_params(_cfg(True), learner)
    batch = learner.source.sample("train", 0, range(4))
    alg = learner.algorithm
    eager = alg._eager_chunk_grad()
    task = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
    want32 = eager(params, {}, *task)[0]
    b64 = batch.to(batch.support_x.device, torch.float64)
    ref = eager({k: v.double() for k, v in params.items()}, {}, b64.support_x, b64.support_y, b64.query_x,
                b64.query_y)[0]
    eager_err, _ = algorithms_base.compile_difference({k: v.double() for k, v in want32.items()}, ref)
    assert eager_err > 1e-12  # the premise: float32 rounding is above the (lowered) tolerance

    def exact(k, v, grads):  # what a more accurate compiler would return: float64's gradient, rounded once
        return ref[k].float()
    monkeypatch.setattr(algorithms_base.torch, "compile", _stand_in_compiler(exact))
    got = build_learner(_cfg(True)).algorithm.meta_gradient(params, batch).grads
    assert max(float((got[k] - want32[k]).abs().max()) for k in got) > 0  # differs from eager, and passed

    def worse(k, v, grads):  # ten times eager float32's error
        return (ref[k] + 10 * (v.double() - ref[k])).float()
    monkeypatch.setattr(algorithms_base.torch, "compile", _stand_in_compiler(worse))
    with pytest.raises(CompileMismatchError, match=r"float32 eager one's"):
        build_learner(_cfg(True)).algorithm.meta_gradient(params, batch)


def test_reptile_has_nothing_to_compile():
    with pytest.raises(ConfigError, match=r"algorithm.compile: got true with algorithm.name=reptile"):
        _cfg(True, name="reptile")
