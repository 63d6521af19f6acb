"""conv_impl="folded": the first block's batch norm folded into one GEMM equals the plain block, to second order."""

from __future__ import annotations

import pytest
import torch

from mtl_ray.algorithms import TaskShape, build_learner, initial_meta_params
from mtl_ray.components import from_dict
from mtl_ray.data.base import TaskBatch
from mtl_ray.models.layers import STEM_MAX_PATCH, ConvBlock


def _blocks(cin: int, downsample: str, pool: bool) -> tuple[ConvBlock, ConvBlock]:
    torch.manual_seed(0)
    plain = ConvBlock(cin, 8, downsample=downsample, pool=pool, impl="native").double()
    with torch.no_grad():
        plain.norm.weight.normal_()  # negative scales too: the pool must not assume a monotone increasing norm
        plain.norm.bias.normal_()
    folded = ConvBlock(cin, 8, downsample=downsample, pool=pool, impl="folded").double()
    folded.load_state_dict(plain.state_dict())
    assert folded.folded and not plain.folded
    return plain, folded


def _input(kind: str, cin: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if kind == "random":
        return torch.rand(5, cin, size, size, generator=g, dtype=torch.float64)
    # Omniglot-like: strokes on a blank page, so many windows hold equal values (max-pool ties)
    x = torch.zeros(5, cin, size, size, dtype=torch.float64)
    x[:, :, size // 4: size // 2, 2: size - 3] = (torch.rand(5, cin, size // 2 - size // 4, size - 5, generator=g)
                                                   > 0.5).double()
    return x


def _second_order(block: ConvBlock, x: torch.Tensor, ref: int | None = None,
                  ref_grad: bool = True) -> tuple[torch.Tensor, ...]:
    """Output, the gradient of a weighted sum of it, and the gradient of a weighted sum of that gradient."""
    params = [block.conv.weight, block.conv.bias, block.norm.weight, block.norm.bias]
    out = block(x, ref, ref_grad)
    r = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    g1 = torch.autograd.grad((out * r).sum(), params, create_graph=True, allow_unused=True, materialize_grads=True)
    v = sum((g * torch.cos(torch.arange(g.numel(), dtype=g.dtype)).view_as(g)).sum() for g in g1)
    g2 = torch.autograd.grad(v, params, allow_unused=True, materialize_grads=True)
    return (out.detach(), *[g.detach() for g in g1], *g2)


@pytest.mark.parametrize("kind", ["random", "blank_and_strokes"])
@pytest.mark.parametrize("cin,size,downsample,pool", [
    (1, 28, "pool", True), (1, 15, "pool", True), (3, 16, "pool", True), (1, 16, "stride", True),
    (1, 15, "stride", True), (1, 12, "pool", False),
])
def test_folded_block_equals_conv_norm_pool_relu_to_second_order(kind, cin, size, downsample, pool):
    plain, folded = _blocks(cin, downsample, pool)
    x = _input(kind, cin, size)
    want, got = _second_order(plain, x), _second_order(folded, x)
    names = ["output"] + [f"d/d{p}" for p in ("w", "b", "gamma", "beta")] + [f"d2/d{p}" for p in ("w", "b", "gamma",
                                                                                                     "beta")]
    assert want[0].shape == got[0].shape
    for name, w, g in zip(names, want, got, strict=True):
        # the conv bias is cancelled by the norm: exactly 0 folded, rounding noise plain
        assert torch.allclose(g, w, rtol=1e-9, atol=1e-10 * max(float(w.abs().max()), 1.0)), name
    assert not got[2].any(), "the folded conv bias gets an exactly zero gradient"


@pytest.mark.parametrize("ref_grad", [True, False])
@pytest.mark.parametrize("downsample,pool", [("pool", True), ("stride", True), ("pool", False)])
def test_folded_block_equals_the_plain_one_with_reference_statistics(downsample, pool, ref_grad):
    """Statistics from the first rows only (model.norm=support), differentiated through or constants (first order)."""
    plain, folded = _blocks(1, downsample, pool)
    x = _input("random", 1, 16)
    want, got = _second_order(plain, x, 2, ref_grad), _second_order(folded, x, 2, ref_grad)
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        assert torch.allclose(g, w, rtol=1e-9, atol=1e-10 * max(float(w.abs().max()), 1.0)), i
    with_grad = _second_order(folded, x, 2, True)
    assert (not ref_grad) == (not torch.allclose(got[1], with_grad[1]))  # constants change the weight gradient


def test_only_narrow_inputs_are_folded():
    assert ConvBlock(1, 64, downsample="pool", impl="folded").folded
    assert STEM_MAX_PATCH >= 3 * 3 * 3
    assert ConvBlock(3, 64, downsample="pool", impl="folded").folded
    assert not ConvBlock(64, 64, downsample="pool", impl="folded").folded  # a 576-wide covariance would cost more


def _maml(impl: str, dtype: torch.dtype, channels: int, size: int):
    cfg = from_dict({"data": {"ways": 3, "shots": 2, "queries": 2, "image_size": size},
                     "model": {"channels": channels, "conv_impl": impl},
                     "algorithm": {"name": "maml", "inner_steps": 2, "inner_lr": 0.3}})
    learner = build_learner(cfg, shape=TaskShape("classification", (1, size, size), 3))
    learner.model.to(dtype)
    params = {k: v.to(dtype) for k, v in initial_meta_params(cfg, learner).items()}
    g = torch.Generator().manual_seed(0)
    sy, qy = torch.arange(3).repeat_interleave(2).repeat(4, 1), torch.arange(3).repeat_interleave(2).repeat(4, 1)
    batch = TaskBatch(torch.rand(4, 6, 1, size, size, generator=g, dtype=dtype), sy,
                      torch.rand(4, 6, 1, size, size, generator=g, dtype=dtype), qy)
    return learner.algorithm.meta_gradient(params, batch).grads


def _rel(got: dict, want: dict, skip: str = "body.0.conv.bias") -> float:
    keys = [k for k in want if k != skip]
    num = sum(float((got[k] - want[k]).double().square().sum()) for k in keys) ** 0.5
    return num / sum(float(want[k].double().square().sum()) for k in keys) ** 0.5


def test_folded_maml_meta_gradient_equals_native_float64_under_vmap():
    """Second-order MAML, 2 inner steps, per-task weights under vmap: folded == native conv + batch norm."""
    got, want = _maml("folded", torch.float64, 6, 16), _maml("native", torch.float64, 6, 16)
    assert _rel(got, want) < 1e-10
    assert not got["body.0.conv.bias"].any() and float(want["body.0.conv.bias"].abs().max()) < 1e-10


def test_folded_float32_stays_within_float32_rounding_of_native():
    """Full-width Conv4 on 28x28 in float32: the covariance statistics do not lose precision."""
    got, want = _maml("folded", torch.float32, 64, 28), _maml("native", torch.float32, 64, 28)
    ref = _maml("native", torch.float64, 64, 28)
    # as close to the float64 answer as native float32 is (a few times its error at most)
    assert _rel(got, ref) < 5 * _rel(want, ref) + 1e-6
