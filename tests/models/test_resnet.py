"""ResNet-12 (Lee et al. 2019; Oreshkin et al. 2018) and Conv4 at 84x84 RGB (Finn et al. 2017's mini-ImageNet setting).

The vectorised meta-gradient equals a per-task loop in float64 at first and second order; under model.norm=support
a query's output does not depend on the other queries; the folded stem equals conv + batch norm to second order;
DropBlock's masks are a function of each example's key only; bad configs are refused with the standard message.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtl_ray.algorithms import TaskShape, build_learner, initial_meta_params
from mtl_ray.algorithms.base import SUPPORT_X
from mtl_ray.components import from_dict
from mtl_ray.config import ConfigError
from mtl_ray.data.base import TaskBatch
from mtl_ray.models import MODELS, build_model
from mtl_ray.models.resnet import (
    DROP_BLOCKS,
    ResBlock,
    ResNet12,
    dropblock_mask,
    pretrain_drop_keys,
)

REPO = Path(__file__).resolve().parents[2]
TINY = [3, 4, 4, 5]  # widths small enough for float64 second order at 84x84 in seconds
WAYS, SHOTS, QUERIES, TASKS = 2, 1, 2, 2
TOLERANCE = 1e-10  # float64, as the registry grid


def _loop_meta_gradient(alg, params, batch: TaskBatch) -> dict[str, torch.Tensor]:
    """The reference: an ordinary per-task autograd loop, no vmap (tests/algorithms/test_exact_math.py's)."""
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for t in range(batch.num_tasks):
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        state = alg.adapt(p, batch.support_x[t], batch.support_y[t], alg.inner_steps)
        loss = alg.loss(alg.predict(p, state, batch.query_x[t]), batch.query_y[t])
        for k, g in zip(p, torch.autograd.grad(loss, list(p.values()), allow_unused=True), strict=True):
            if g is not None:
                total[k] += g
    return total


def _rel_err(a: dict, b: dict) -> float:
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in b) ** 0.5
    return num / sum(float((b[k] ** 2).sum()) for k in b) ** 0.5


def _rgb_batch(tasks: int, ways: int, shots: int, queries: int, size: int, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    sy = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    qy = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)
    return TaskBatch(torch.rand(tasks, ways * shots, 3, size, size, generator=g, dtype=torch.float64), sy,
                     torch.rand(tasks, ways * queries, 3, size, size, generator=g, dtype=torch.float64), qy)


def _learner(model: dict, algorithm: str, first_order: bool = False, size: int = 84, norm: str = "support"):
    cfg = from_dict({"data": {"ways": WAYS, "shots": SHOTS, "queries": QUERIES, "image_size": size},
                     "model": {**model, "norm": norm},
                     "algorithm": {"name": algorithm, "inner_steps": 2, "inner_lr": 0.3, "first_order": first_order}})
    learner = build_learner(cfg, shape=TaskShape("classification", (3, size, size), WAYS))
    learner.model.double()
    params = {k: v.double() for k, v in initial_meta_params(cfg, learner).items()}
    g = torch.Generator().manual_seed(1)
    # off init (batch-norm scales and shifts at 1 and 0 would hide errors in their derivatives)
    params = {k: v + 0.1 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}
    return learner.algorithm, params


BACKBONES = {
    "resnet12-folded": {"name": "resnet12", "widths": TINY, "conv_impl": "folded"},
    "resnet12-native": {"name": "resnet12", "widths": TINY, "conv_impl": "native"},
    "conv4-32-rgb": {"name": "conv4", "channels": 32},  # MAML's mini-ImageNet Conv4 (Finn et al. 2017, §5.2)
}


CASES = [(b, a, fo) for b in BACKBONES for a, fo in (("maml", False), ("maml", True), ("protonet", False))
         if b != "resnet12-native" or a == "maml"]  # the native form with MAML only: the rest is the algorithms'


@pytest.mark.parametrize("backbone,algorithm,first_order", CASES,
                         ids=[f"{b}-{a}-{'first' if fo else 'second'}" for b, a, fo in CASES])
def test_vmapped_meta_gradient_equals_per_task_loop_at_84x84_rgb_float64(backbone, algorithm, first_order):
    alg, params = _learner(BACKBONES[backbone], algorithm, first_order)
    batch = _rgb_batch(TASKS, WAYS, SHOTS, QUERIES, 84)
    got = alg.meta_gradient(params, batch).grads
    want = _loop_meta_gradient(alg, params, batch)
    assert got.keys() == want.keys()
    assert _rel_err(got, want) < TOLERANCE
    assert all(bool(v.abs().max() > 0) for k, v in got.items() if not k.endswith("conv.bias")), "a dead weight"


def test_second_order_differs_from_first_order_on_resnet12():
    """The second-order check above is not a first-order one in disguise."""
    batch = _rgb_batch(TASKS, WAYS, SHOTS, QUERIES, 32)
    second = _learner(BACKBONES["resnet12-folded"], "maml", size=32)
    first = _learner(BACKBONES["resnet12-folded"], "maml", first_order=True, size=32)
    assert _rel_err(first[0].meta_gradient(first[1], batch).grads,
                    second[0].meta_gradient(second[1], batch).grads) > 1e-3


def _second_order(block: ResBlock, x: torch.Tensor, ref: int | None, ref_grad: bool) -> list[torch.Tensor]:
    """Output, the gradient of a weighted sum of it, and the gradient of a weighted sum of that gradient."""
    params = list(block.parameters())
    out = block(x, ref, ref_grad)
    r = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    g1 = torch.autograd.grad((out * r).sum(), params, create_graph=True)
    v = sum((g * torch.cos(torch.arange(g.numel(), dtype=g.dtype)).view_as(g)).sum() for g in g1)
    g2 = torch.autograd.grad(v, params)
    return [out.detach(), *[g.detach() for g in g1], *g2]


@pytest.mark.parametrize("ref,ref_grad", [(None, True), (2, True), (2, False)])
def test_folded_stem_equals_conv_then_batch_norm_to_second_order(ref, ref_grad):
    torch.manual_seed(0)
    native = ResBlock(3, 4, impl="native").double()
    with torch.no_grad():  # scales of both signs, non-zero shifts
        for name, p in native.named_parameters():
            if "norm" in name:
                p.normal_()
    folded = ResBlock(3, 4, impl="folded").double()
    folded.load_state_dict(native.state_dict())
    assert folded.folded and not native.folded
    assert not ResBlock(4, 4, impl="folded").folded  # only an image-sized input (C * 9 <= 27) is folded
    x = torch.rand(5, 3, 11, 11, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want, got = _second_order(native, x, ref, ref_grad), _second_order(folded, x, ref, ref_grad)
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        assert torch.allclose(g, w, rtol=1e-9, atol=1e-10 * max(float(w.abs().max()), 1.0)), i


@pytest.mark.parametrize("algorithm", ["maml", "protonet", "anil"])
def test_a_query_is_predicted_the_same_alone_and_in_any_batch_under_support_norm(algorithm):
    alg, params = _learner(BACKBONES["resnet12-folded"], algorithm, size=32)
    b = _rgb_batch(1, WAYS, SHOTS, 5, 32)
    qx = b.query_x[0]
    state = alg.adapt(params, b.support_x[0], b.support_y[0], 2)
    assert SUPPORT_X in state
    with torch.no_grad():
        whole = alg.predict(params, state, qx)
        alone = torch.cat([alg.predict(params, state, qx[i:i + 1]) for i in range(len(qx))])
        subset = alg.predict(params, state, qx[[7, 2]])
    torch.testing.assert_close(alone, whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(subset, whole[[7, 2]], rtol=0, atol=1e-12)
    # transductive: the same weights give answers that depend on the other queries (the check above is not vacuous)
    alg_t, _ = _learner(BACKBONES["resnet12-folded"], algorithm, size=32, norm="transductive")
    state_t = alg_t.adapt(params, b.support_x[0], b.support_y[0], 2)
    with torch.no_grad():
        assert (alg_t.predict(params, state_t, qx[:2]) - alg_t.predict(params, state_t, qx)[:2]).abs().max() > 1e-6


def test_shapes_widths_and_feature_dim():
    cfg = from_dict({"data": {"image_size": 84}, "model": {"name": "resnet12"}})
    full = build_model(cfg, (3, 84, 84), 5)
    assert isinstance(full, ResNet12) and MODELS["resnet12"] is ResNet12
    shapes = {k: tuple(v.shape) for k, v in full.named_parameters()}
    assert shapes["body.0.conv1.weight"] == (64, 3, 3, 3)
    assert shapes["body.1.shortcut.weight"] == (160, 64, 1, 1)
    assert shapes["body.3.conv3.weight"] == (640, 640, 3, 3)
    assert shapes["head.weight"] == (5, 640) and full.feature_dim == 640
    # MetaOptNet's ResNet-12 has 12.4M weights; no conv bias (batch norm follows each conv)
    assert round(sum(v.numel() for v in full.parameters()) / 1e6, 1) == 12.4
    assert not any(k.endswith("conv1.bias") for k in shapes)
    small = ResNet12(3, 0, widths=(2, 3, 4, 6))
    assert small.head is None and small.feature_dim == 6
    for size, n in ((84, 3), (32, 2), (17, 1)):
        assert small(torch.rand(n, 3, size, size)).shape == (n, 6)  # global average pool: any size >= 16
    assert ResNet12(1, 7, widths=(2, 3, 4, 6))(torch.rand(2, 1, 28, 28)).shape == (2, 7)
    assert ResNet12.config_keys >= {"widths", "dropblock", "dropblock_size", "conv_impl", "norm"}


@pytest.mark.parametrize("overrides,message", [
    ({"model": {"widths": [64, 160, 320]}}, r"model\.widths: got \[64, 160, 320\], expected 4 positive integers"),
    ({"model": {"widths": [8, 0, 8, 8]}}, r"model\.widths: got \[8, 0, 8, 8\], expected 4 positive"),
    ({"data": {"image_size": 12}}, r"data\.image_size: got 12, expected >= 16 for resnet12's 4 pooling blocks"),
    ({"model": {"conv_impl": "im2col"}}, r"model\.conv_impl: got 'im2col' with model\.name=resnet12, expected one of: "
                                         r"folded, native"),
    ({"model": {"dropblock": 1.0}}, r"model\.dropblock: got 1\.0, expected a drop rate in \[0, 1\)"),
    ({"model": {"dropblock": 0.1, "dropblock_size": 3}, "data": {"image_size": 32}},
     r"model\.dropblock_size: got 3, expected <= 2 \(the last block's feature map side at data\.image_size=32\)"),
    ({"model": {"dropblock_size": 0}}, r"model\.dropblock_size: got 0, expected a positive block side"),
])
def test_bad_configs_are_refused_naming_got_and_expected(overrides, message):
    raw = {"data": {"image_size": 84, **overrides.get("data", {})},
           "model": {"name": "resnet12", **overrides.get("model", {})}}
    with pytest.raises(ConfigError, match=message):
        from_dict(raw)


def test_dropblock_on_a_model_without_it_is_refused_not_ignored():
    with pytest.raises(ConfigError, match=r"model\.dropblock: got 0\.1 with model\.name=conv4, expected 0 \(conv4 has "
                                          r"no DropBlock; resnet12 has\)"):
        from_dict({"model": {"name": "conv4", "dropblock": 0.1}})
    assert from_dict({"data": {"image_size": 84}, "model": {"name": "resnet12", "dropblock": 0.1}}).model.dropblock


# ------------------------------------------------------------------------------------------------ DropBlock


def test_dropblock_masks_depend_on_each_examples_key_only():
    keys = pretrain_drop_keys(0, 7, np.array([5, 900, 13, 2]))
    whole = dropblock_mask(keys, 2, (6, 10, 10), 0.2, 3)
    assert whole.shape == (4, 6, 10, 10) and set(whole.unique().tolist()) <= {0.0, 1.0}
    alone = torch.cat([dropblock_mask(keys[i:i + 1], 2, (6, 10, 10), 0.2, 3) for i in range(4)])
    assert torch.equal(alone, whole)
    assert torch.equal(dropblock_mask(keys.flip(0), 2, (6, 10, 10), 0.2, 3), whole.flip(0))
    # other keys, another step, another block (salt): other masks
    assert not torch.equal(dropblock_mask(pretrain_drop_keys(0, 8, np.array([5, 900, 13, 2])), 2, (6, 10, 10), 0.2,
                                          3), whole)
    assert not torch.equal(dropblock_mask(keys, 3, (6, 10, 10), 0.2, 3), whole)
    assert not torch.equal(whole[0], whole[1])


def test_pretraining_keys_are_the_same_for_any_number_of_workers():
    """Pretraining's rank r takes ``batch_indices(...)[r::world]``: its keys must be those of one worker's batch."""
    idx = np.random.default_rng(0).choice(1000, size=12, replace=False)
    one = pretrain_drop_keys(3, 11, idx)
    for world in (2, 3):
        for rank in range(world):
            assert torch.equal(pretrain_drop_keys(3, 11, idx[rank::world]), one[rank::world])
    assert len(set(one.tolist())) == len(idx)  # every example of a step has its own mask
    assert pretrain_drop_keys(4, 11, idx).tolist() != one.tolist()  # and the seed changes them


def test_dropblock_drops_square_blocks_at_about_the_rate():
    rate, size = 0.1, 3
    mask = dropblock_mask(torch.arange(400), 0, (8, 10, 10), rate, size)
    assert abs(float(1 - mask.mean()) - rate) < 0.03  # Ghiasi et al.'s gamma gives about `rate` of units dropped
    # a map with one seed drops exactly one size x size square
    flat = mask.reshape(-1, 10, 10)
    single = [m for m in flat if int((m == 0).sum()) == size * size]
    assert single
    for m in single:
        rows, cols = torch.nonzero(m == 0, as_tuple=True)
        assert int(rows.max() - rows.min()) == size - 1 and int(cols.max() - cols.min()) == size - 1


def test_dropblock_runs_only_with_keys_in_the_last_two_blocks():
    torch.manual_seed(0)
    plain = ResNet12(3, 4, widths=(2, 3, 4, 8))
    dropping = ResNet12(3, 4, widths=(2, 3, 4, 8), dropblock=0.3, dropblock_size=2)
    dropping.load_state_dict(plain.state_dict())
    assert [b.dropblock for b in dropping.body] == [0.3 if i in DROP_BLOCKS else 0.0 for i in range(4)]
    x = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    keys = pretrain_drop_keys(0, 0, np.arange(6))
    with torch.no_grad():
        assert torch.equal(dropping(x), plain(x))  # no keys (meta-learning, evaluation, serving): no drop
        assert torch.equal(plain(x, drop_keys=keys), plain(x))  # rate 0: off
        dropped = dropping(x, drop_keys=keys)
        assert not torch.allclose(dropped, plain(x))
        assert torch.equal(dropping(x, drop_keys=keys), dropped)  # a function of the keys, not of torch's RNG
        torch.manual_seed(123)
        assert torch.equal(dropping(x, drop_keys=keys), dropped)


def test_pretraining_hands_the_model_its_keys_and_only_with_a_drop_rate():
    """``mtl-ray pretrain``'s forward pass (distributed.pretrain.train_forward) drops with the (seed, step, index)
    keys, so rank r of a split batch gets the masks its examples get in one worker's batch."""
    from mtl_ray.distributed.pretrain import train_forward

    cfg = from_dict({"seed": 3, "data": {"image_size": 32},
                     "model": {"name": "resnet12", "widths": [2, 3, 4, 8], "dropblock": 0.3, "dropblock_size": 2}})
    torch.manual_seed(0)
    model = build_model(cfg, (3, 32, 32), 5)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    idx = np.array([40, 7, 19, 3])
    with torch.no_grad():
        out = train_forward(model, cfg, 5, idx, x)
        assert torch.equal(out, model(x, drop_keys=pretrain_drop_keys(3, 5, idx)))
        assert not torch.allclose(out, model(x))
        assert not torch.allclose(train_forward(model, cfg, 6, idx, x), out)  # new masks every step
        off = cfg.replace(**{"model.dropblock": 0.0})
        assert torch.equal(train_forward(model, off, 5, idx, x), model(x))
    masks = [dropblock_mask(pretrain_drop_keys(3, 5, i), 2, (8, 2, 2), 0.3, 2) for i in (idx, idx[0::2], idx[1::2])]
    assert torch.equal(masks[1], masks[0][0::2]) and torch.equal(masks[2], masks[0][1::2])


# ------------------------------------------------------------------------------------------------ end to end


def _rgb_folders(root: Path, classes: int = 6, per_class: int = 4, size: int = 40) -> Path:
    """A folder of classes of small RGB PNGs (``mtl-ray data convert``'s input); each class its own colour."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        base = rng.integers(0, 256, size=3)
        for i in range(per_class):
            img = np.clip(base + rng.integers(-40, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img, "RGB").save(root / f"class_{c}" / f"{i}.png")
    return root


def _cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "mtl_ray.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("model", [["model.name=conv4", "model.channels=32"],
                                   ["model.name=resnet12", "model.widths=[4,4,4,4]"]])
def test_84x84_rgb_table_trains_through_the_cli(tmp_path, model):
    """Conv4 with 32 filters (MAML's mini-ImageNet setting) and ResNet-12 on an RGB Parquet table at 84x84."""
    table = tmp_path / "rgb.parquet"
    _cli("data", "convert", str(_rgb_folders(tmp_path / "images")), str(table), "--image-size", "84",
         "--channels", "3")
    run = tmp_path / "run"
    _cli("train", "data.source=parquet", f"data.path={table}", "data.image_size=84", "data.ways=2", "data.shots=1",
         "data.queries=1", "data.val_fraction=0.34", "data.test_fraction=0", *model, "algorithm.name=maml",
         "optim.steps=2", "optim.meta_batch_size=2", "optim.val_every=0", "optim.val_tasks=2",
         "scaling.num_workers=0", "tracking.mlflow=false", "tracking.progress=false", "--run-dir", str(run))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records and all(np.isfinite(v) for r in records for v in r.values() if isinstance(v, float))
    assert (run / "checkpoints").is_dir()
