"""Meta-transfer learning (Sun et al. 2019): the modulation, the frozen body, and the pretrain-only probes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from mtl_ray.algorithms import MTL, TaskShape, build_learner, initial_meta_params, linear_probe, pretrain_probe
from mtl_ray.components import from_dict
from mtl_ray.data.base import TaskBatch
from mtl_ray.models import modulated_layers
from mtl_ray.models.layers import batch_norm

SHAPE = TaskShape("classification", (1, 12, 12), 3)


def _mtl(**algorithm):
    cfg = from_dict({"data": {"ways": 3, "shots": 2, "queries": 2, "image_size": 12},
                     "model": {"channels": 4, "blocks": 3, "init": "pretrained.pt"},  # init is only read by the driver
                     "algorithm": {"name": "mtl", "inner_lr": 0.3, "inner_steps": 2, **algorithm}})
    learner = build_learner(cfg, shape=SHAPE)
    learner.model.double()
    params = {k: v.double() for k, v in initial_meta_params(cfg, learner).items()}
    return cfg, learner, params


def _batch(tasks: int = 3) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    sy = torch.arange(3).repeat_interleave(2).repeat(tasks, 1)
    return TaskBatch(torch.rand(tasks, 6, 1, 12, 12, generator=g, dtype=torch.float64), sy,
                     torch.rand(tasks, 6, 1, 12, 12, generator=g, dtype=torch.float64), sy.clone())


def _randomise(params, prefix, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: (v + 0.3 * torch.randn(v.shape, generator=g, dtype=v.dtype)) if k.startswith(prefix) else v
            for k, v in params.items()}


def test_scale_and_shift_start_at_identity_one_per_channel_of_each_batch_norm():
    _, learner, params = _mtl()
    alg = learner.algorithm
    assert isinstance(alg, MTL)
    assert alg.layers == ["body.0.norm", "body.1.norm", "body.2.norm"]
    assert not params["head.weight"].any() and not params["head.bias"].any()
    for layer in alg.layers:
        assert torch.equal(params[f"meta.ss.scale.{layer}"], torch.ones(4, dtype=torch.float64))
        assert torch.equal(params[f"meta.ss.shift.{layer}"], torch.zeros(4, dtype=torch.float64))
    x = _batch().support_x[0]
    plain = functional_call(learner.model.body, {k[5:]: v for k, v in params.items() if k.startswith("body.")}, (x,))
    assert torch.equal(alg.features(params, x), plain.flatten(1))  # identity modulation = the pretrained body


def test_modulation_scales_and_shifts_each_normalised_channel():
    """Block 0 by hand: conv, batch norm with weight*scale and bias+shift, max-pool, ReLU."""
    _, learner, params = _mtl()
    params = _randomise(params, "meta.ss.", 1)
    x = _batch().support_x[0]
    body = learner.algorithm.modulated_body(params)
    s, t = params["meta.ss.scale.body.0.norm"], params["meta.ss.shift.body.0.norm"]
    assert torch.equal(body["body.0.norm.weight"], params["body.0.norm.weight"] * s)
    assert torch.equal(body["body.0.norm.bias"], params["body.0.norm.bias"] + t)
    z = torch.nn.functional.conv2d(x, params["body.0.conv.weight"], params["body.0.conv.bias"], padding=1)
    var, mean = z.var(dim=(0, 2, 3), unbiased=False, keepdim=True), z.mean(dim=(0, 2, 3), keepdim=True)
    w, b = params["body.0.norm.weight"].view(1, -1, 1, 1), params["body.0.norm.bias"].view(1, -1, 1, 1)
    hand = ((z - mean) / torch.sqrt(var + 1e-5) * w) * s.view(1, -1, 1, 1) + b + t.view(1, -1, 1, 1)
    hand = torch.relu(torch.nn.functional.max_pool2d(hand, 2))
    block0 = learner.model.body[0]
    got = functional_call(block0, {k.removeprefix("body.0."): v for k, v in body.items() if k.startswith("body.0.")},
                          (x,))
    assert torch.allclose(got, hand, atol=1e-12)
    # a scaled and shifted conv output is cancelled by the normalisation (up to its eps): why the scale sits after it
    z = z * 10
    assert torch.allclose(batch_norm(z * 3.0 + 1.0, w.flatten(), b.flatten()), batch_norm(z, w.flatten(), b.flatten()),
                          atol=1e-4)


def test_meta_gradient_reaches_only_scale_and_shift_and_equals_a_loop():
    _, learner, params = _mtl()
    alg = learner.algorithm
    params = _randomise(params, "meta.ss.", 2)
    batch = _batch()
    got = alg.meta_gradient(params, batch).grads
    assert set(got) == {k for k in params if k.startswith("meta.ss.")}  # body and head initialisation frozen
    want = {k: torch.zeros_like(v) for k, v in got.items()}
    for t in range(batch.num_tasks):  # per-task autograd loop, second order through the 2 head steps
        p = {k: v.clone().requires_grad_(k in want) for k, v in params.items()}
        state = alg.adapt(p, batch.support_x[t], batch.support_y[t], alg.inner_steps)
        loss = alg.loss(alg.predict(p, state, batch.query_x[t]), batch.query_y[t])
        for k, g in zip(want, torch.autograd.grad(loss, [p[k] for k in want]), strict=True):
            want[k] += g
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-10), k
    assert all(float(got[k].abs().sum()) > 0 for k in got)  # every scale and shift is learned


def test_mlp_bodies_get_the_papers_form_on_their_linear_layers():
    cfg = from_dict({"data": {"source": "sinusoid"}, "model": {"name": "mlp", "init": "x.pt"},
                     "algorithm": {"name": "mtl", "inner_steps": 1}})
    learner = build_learner(cfg)
    assert modulated_layers(learner.model) == ["body.1", "body.3"]
    params = _randomise(initial_meta_params(cfg, learner), "meta.ss.", 3)
    body = learner.algorithm.modulated_body(params)
    s = params["meta.ss.scale.body.1"]
    assert torch.equal(body["body.1.weight"], params["body.1.weight"] * s[:, None])  # one scale per output unit


def test_linear_probe_is_anil_with_a_zero_head_on_the_pretrained_body():
    cfg = from_dict({"data": {"ways": 3, "image_size": 12}, "model": {"channels": 4, "blocks": 3},
                     "pretrain": {"probe_steps": 7, "probe_lr": 0.05}})
    full = initial_meta_params(cfg, build_learner(cfg, shape=SHAPE))
    pretrained = {**{k: torch.randn_like(v) for k, v in full.items() if k.startswith("body.")},
                  "head.weight": torch.randn(652, 4), "head.bias": torch.randn(652)}
    probe, params = linear_probe(cfg, pretrained, SHAPE)
    assert (probe.algorithm.name, probe.algorithm.inner_lr, probe.eval_inner_steps) == ("anil", 0.05, 7)
    assert all(torch.equal(params[k], pretrained[k]) for k in params if k.startswith("body."))
    assert params["head.weight"].shape == (3, 4) and not params["head.weight"].any() and not params["head.bias"].any()


def test_cosine_probe_is_the_pretrained_heads_scale_times_cosine_to_class_means_by_hand():
    """pretrain.probe=cosine: Meta-Baseline at step 0 on the frozen body (an MLP here: its embedding by hand)."""
    cfg = from_dict({"data": {"ways": 3, "image_size": 4}, "model": {"name": "mlp", "hidden_sizes": [5]},
                     "pretrain": {"probe": "cosine"}})
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(5, 16, generator=g), torch.randn(5, generator=g)  # float32, as a checkpoint holds them
    pretrained = {"body.1.weight": w, "body.1.bias": b, "head.weight": torch.randn(40, 5),
                  "head.scale": torch.tensor(4.5)}
    shape = TaskShape("classification", (1, 4, 4), 3)
    probe, params = pretrain_probe(cfg, pretrained, shape)
    assert (probe.algorithm.name, probe.eval_inner_steps, probe.algorithm.temperature) == ("meta_baseline", 0, 4.5)
    assert sorted(params) == ["body.1.bias", "body.1.weight", "meta.temperature"]  # the pretrained head is dropped
    alg = build_learner(probe, shape=shape).algorithm
    alg.model.double()
    sx, qx = torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64), torch.randn(4, 1, 4, 4, generator=g,
                                                                                   dtype=torch.float64)
    sy = torch.tensor([0, 0, 1, 1, 2, 2])
    params = {k: v.double() for k, v in params.items()}
    logits = alg.predict(params, alg.adapt(params, sx, sy), qx)

    def z(x: torch.Tensor) -> torch.Tensor:  # the MLP body by hand
        return torch.relu(x.flatten(1) @ w.double().t() + b.double())

    means = torch.stack([z(sx)[sy == n].mean(0) for n in range(3)])
    want = 4.5 * F.normalize(z(qx), dim=-1) @ F.normalize(means, dim=-1).t()
    assert torch.allclose(logits, want, atol=1e-12, rtol=0)
    no_head = pretrain_probe(cfg, {k: v for k, v in pretrained.items() if k.startswith("body.")}, shape)[0]
    assert no_head.algorithm.temperature == cfg.algorithm.temperature  # a linear head's body: algorithm.temperature
    assert pretrain_probe(cfg.replace(**{"pretrain.probe": "linear"}), pretrained, shape)[0].algorithm.name == "anil"


def test_mtl_before_meta_training_is_the_pretrain_only_probe():
    """Identity scale/shift and a zero head: MTL's adaptation and predictions equal the linear probe's."""
    cfg, learner, params = _mtl(inner_lr=0.05, inner_steps=7)
    body = {k: v for k, v in params.items() if k.startswith("body.")}
    probe_cfg, probe_params = linear_probe(cfg.replace(**{"pretrain.probe_steps": 7, "pretrain.probe_lr": 0.05}),
                                           body, SHAPE)
    probe = build_learner(probe_cfg, shape=SHAPE)
    probe.model.double()
    batch = _batch()
    got = learner.algorithm.evaluate(params, batch, 7)
    want = probe.algorithm.evaluate({k: v.double() for k, v in probe_params.items()}, batch, 7)
    assert torch.allclose(got["loss"], want["loss"], atol=1e-12) and torch.equal(got["acc"], want["acc"])
    moved = learner.algorithm.evaluate(_randomise(params, "meta.ss.", 4), batch, 7)
    assert not torch.allclose(moved["loss"], want["loss"])  # and the modulation does change the features
