"""Pretraining's cosine classifier (Baseline++, Chen et al. 2019) and its learning-rate schedule, by hand in float64."""

from __future__ import annotations

import math

import pytest
import torch

from mtl_ray.components import from_dict
from mtl_ray.config import ConfigError
from mtl_ray.distributed.pretrain import pretrain_lr
from mtl_ray.models import CosineHead, build_pretrain_model, initial_params

F64 = torch.float64


def test_cosine_head_is_scale_times_the_cosine_of_feature_and_class_weight_by_hand():
    head = CosineHead(2, 2, scale=10.0).double()
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, -2.0]], dtype=F64))  # unit rows: (.6, .8), (0, -1)
    z = torch.tensor([[1.0, 0.0], [0.0, 5.0]], dtype=F64)  # unit rows: (1, 0), (0, 1)
    want = 10.0 * torch.tensor([[0.6, 0.0], [0.8, -1.0]], dtype=F64)
    out = head(z)
    assert torch.allclose(out, want, atol=1e-14, rtol=0)
    assert torch.allclose(head(7.0 * z), want, atol=1e-14, rtol=0)  # only the feature's direction matters
    # d loss / d scale = sum of the cosines weighted by d loss / d logit: here loss = sum(logits), so sum of cosines
    out.sum().backward()
    assert isinstance(head.scale, torch.nn.Parameter)
    assert math.isclose(float(head.scale.grad), 0.6 + 0.0 + 0.8 - 1.0, abs_tol=1e-14)


def test_a_fixed_scale_is_no_parameter_and_a_learned_one_restarts_at_its_value():
    fixed = CosineHead(3, 4, scale=2.0, learn_scale=False)
    assert [n for n, _ in fixed.named_parameters()] == ["weight"] and fixed.scale == 2.0
    learned = CosineHead(3, 4, scale=2.0)
    with torch.no_grad():
        learned.scale.fill_(5.0)  # type: ignore[union-attr]
    learned.reset_parameters()
    assert float(learned.scale.detach()) == 2.0  # type: ignore[union-attr]


def test_pretrain_head_cosine_replaces_the_linear_head_and_keeps_the_body():
    cfg = from_dict({"model": {"channels": 4, "blocks": 2}, "data": {"image_size": 8}})
    linear = build_pretrain_model(cfg, (1, 8, 8), 7)
    cosine = build_pretrain_model(cfg.replace(**{"pretrain.head": "cosine", "pretrain.head_scale": 3.0}), (1, 8, 8), 7)
    lp, cp = initial_params(linear, 0), initial_params(cosine, 0)
    assert sorted(k for k in lp if k.startswith("head.")) == ["head.bias", "head.weight"]
    assert sorted(k for k in cp if k.startswith("head.")) == ["head.scale", "head.weight"]
    assert cp["head.weight"].shape == lp["head.weight"].shape == (7, 4 * 2 * 2) and float(cp["head.scale"]) == 3.0
    assert all(torch.equal(lp[k], cp[k]) for k in lp if k.startswith("body."))  # same seed, same body
    x = torch.randn(5, 1, 8, 8)
    assert cosine(x).abs().max() <= 3.0 + 1e-6  # |logit| <= scale


def _pretrain(**p):
    return from_dict({"pretrain": {"lr": 0.1, "steps": 10, **p}}).pretrain


def test_the_learning_rate_schedules_by_hand():
    assert [pretrain_lr(_pretrain(), s) for s in range(10)] == [0.1] * 10  # the default: today's constant rate
    cos = [pretrain_lr(_pretrain(schedule="cosine"), s) for s in range(10)]
    assert cos[0] == 0.1 and math.isclose(cos[5], 0.05, rel_tol=1e-12)  # half-way: half the rate
    assert all(math.isclose(c, 0.05 * (1 + math.cos(math.pi * s / 10)), rel_tol=1e-12) for s, c in enumerate(cos))
    warm = [pretrain_lr(_pretrain(schedule="cosine", warmup_steps=4), s) for s in range(10)]
    ramp = [0.025, 0.05, 0.075, 0.1]
    assert all(math.isclose(w, want, rel_tol=1e-12) for w, want in zip(warm[:4], ramp, strict=True))
    assert math.isclose(warm[4], 0.1) and math.isclose(warm[7], 0.05)  # cosine over the 6 steps after warm-up
    assert [pretrain_lr(_pretrain(warmup_steps=2), s) for s in range(4)] == [0.05, 0.1, 0.1, 0.1]
    assert pretrain_lr(_pretrain(schedule="cosine"), 12) == 0.0  # past pretrain.steps (a longer resume): 0, not < 0


@pytest.mark.parametrize(("override", "message"), [
    ("pretrain.schedule=step", "pretrain.schedule: got 'step', expected one of: constant, cosine"),
    ("pretrain.head=arcface", "pretrain.head: got 'arcface', expected one of: linear, cosine"),
    ("pretrain.probe=knn", "pretrain.probe: got 'knn', expected one of: linear, cosine"),
    ("pretrain.warmup_steps=10", "pretrain.warmup_steps: got 10, expected fewer than pretrain.steps=10"),
    ("pretrain.head_scale=0", "pretrain.head_scale: got 0"),
])
def test_bad_pretrain_settings_are_one_clear_error(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        from_dict({"pretrain": {"steps": 10}}, [override])
