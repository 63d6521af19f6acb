"""A converted table's channel normalisation travels with the run: the train recipe records the statistics in
config.yaml and the checkpoint, and the Python API and the served model apply them to a user's pixels exactly as the
training-time task source did (same bits); pretraining normalises the same way; checkpoints from before the
statistics existed keep seeing raw pixels. One learning check through the real CLI (convert, train, eval)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from test_cli import cli

from mtl_ray.api import FewShotLearner
from mtl_ray.checkpoint import embedded_config, latest_checkpoint, load_checkpoint
from mtl_ray.components import from_dict
from mtl_ray.data import build_task_source, task_rng
from mtl_ray.data.converters import convert
from mtl_ray.data.imagetable import read_image_table
from mtl_ray.recipes.train import train
from mtl_ray.serving import FewShotModel

SHAPES = ("disc", "square", "cross", "bar", "ring", "triangle")
COLOURS = ((230, 40, 40), (40, 200, 60), (50, 70, 230), (230, 200, 40), (200, 60, 220), (40, 210, 220),
           (250, 140, 30), (120, 120, 120))


def _shape_image(shape: str, colour: tuple[int, int, int], size: int, rng: np.random.Generator) -> np.ndarray:
    """A coloured shape on a dark, noisy background, a little shifted and scaled: ``[size, size, 3]`` uint8."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cy, cx = size / 2 + rng.uniform(-size / 10, size / 10, 2)
    r = size * rng.uniform(0.25, 0.35)
    dy, dx = yy - cy, xx - cx
    mask = {"disc": dy ** 2 + dx ** 2 < r ** 2,
            "square": (abs(dy) < r * 0.8) & (abs(dx) < r * 0.8),
            "cross": ((abs(dy) < r / 4) | (abs(dx) < r / 4)) & (abs(dy) < r) & (abs(dx) < r),
            "bar": (abs(dy) < r / 3) & (abs(dx) < r),
            "ring": (dy ** 2 + dx ** 2 < r ** 2) & (dy ** 2 + dx ** 2 > (r * 0.6) ** 2),
            "triangle": (dy < r * 0.7) & (dy > -r) & (abs(dx) < (dy + r) * 0.6)}[shape]
    img = rng.normal(30, 10, (size, size, 3))
    img[mask] = np.array(colour) + rng.normal(0, 10, (int(mask.sum()), 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_mini_imagenet(root: Path, per: int = 8, size: int = 32) -> Path:
    """A mini-ImageNet-layout miniature (train/val/test.csv + images/*.jpg) of visually distinct classes: each class a
    (shape, colour) pair; the test classes pair shapes and colours in ways the train classes never do."""
    rng = np.random.default_rng(0)
    pairs = [(s, c) for s in range(len(SHAPES)) for c in range(len(COLOURS))]
    order = rng.permutation(len(pairs))
    splits = {"train": order[:28], "val": order[28:33], "test": order[33:40]}
    (root / "images").mkdir(parents=True)
    for split, idx in splits.items():
        lines = ["filename,label"]
        for k in idx:
            s, c = pairs[k]
            syn = f"n{1000000 + k:08d}"
            for i in range(per):
                name = f"{syn}{i + 1:08d}.jpg"
                Image.fromarray(_shape_image(SHAPES[s], COLOURS[c], size, rng)).save(root / "images" / name,
                                                                                      quality=95)
                lines.append(f"{name},{syn}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mini")
    return convert("mini-imagenet", write_mini_imagenet(root / "mini"), root / "mini.parquet", image_size=16).path


@pytest.fixture(scope="module")
def run(table, tmp_path_factory) -> tuple[Path, dict]:
    cfg = from_dict({"data": {"source": "parquet", "path": str(table), "image_size": 16, "ways": 3, "shots": 2,
                              "queries": 3},
                     "model": {"name": "conv4", "channels": 8, "blocks": 2}, "algorithm": {"name": "protonet"},
                     "optim": {"steps": 3, "meta_batch_size": 2, "val_every": 0},
                     "tracking": {"checkpoint_every": 0, "progress": False, "mlflow": False}})
    run_dir = tmp_path_factory.mktemp("run")
    train(cfg, run_dir)
    return run_dir, yaml.safe_load((run_dir / "config.yaml").read_text())


def test_the_run_records_the_tables_statistics(table, run):
    run_dir, recorded = run
    t = read_image_table(table, 16)
    assert len(t.channel_mean) == 3
    assert tuple(recorded["data"]["channel_mean"]) == t.channel_mean
    assert tuple(recorded["data"]["channel_std"]) == t.channel_std
    ck = load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))
    assert (ck.config.data.channel_mean, ck.config.data.channel_std) == (t.channel_mean, t.channel_std)


def test_api_and_served_model_see_a_users_image_as_training_did(run, tmp_path):
    run_dir, _ = run
    ck = load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))
    source = build_task_source(ck.config)
    batch = source.sample("test", 0, [0])  # the training-time view: normalised
    sx, sy, qx, _ = source.pools["test"].episode(task_rng(ck.config.seed, "test", 0, 0), 3, 2, 3)  # its uint8 pixels
    # the user's images: the same pixels as files, loaded by the API ([0, 1], as the task source reads them)
    paths = []
    for i, im in enumerate(np.concatenate([sx, qx])):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(im.transpose(1, 2, 0)).save(paths[-1])
    learner = FewShotLearner.from_checkpoint(run_dir)
    pixels = learner.load_images(paths)
    assert torch.equal(pixels, torch.from_numpy(np.concatenate([sx, qx])).float() / 255)
    support, query = pixels[:len(sx)], pixels[len(sx):]
    adapted = learner.adapt(support, sy.tolist())
    scores = adapted.predict_scores(query)

    alg = adapted.algorithm  # the same model, fed the task source's tensors directly
    with torch.no_grad():
        state = alg.adapt(adapted.params, batch.support_x[0], batch.support_y[0], adapted.steps)
        want = torch.cat([alg.predict(adapted.params, state, batch.query_x[0][i:i + 1]) for i in range(len(qx))])
    assert torch.equal(scores, want)
    raw_scores = FewShotLearner(ck.config.replace(**{"data.channel_mean": [0.0], "data.channel_std": [1.0]}),
                                ck.params, ck.shape).adapt(support, sy.tolist()).predict_scores(query)
    assert not torch.allclose(raw_scores, want)  # without the statistics the answer would differ

    served = FewShotModel.from_learner(learner).predict(None, {
        "support_x": support.numpy(), "support_y": np.array(["a", "b", "c"])[sy], "query_x": query.numpy()})
    assert list(served) == list(np.array(["a", "b", "c"])[want.argmax(-1).numpy()])


def test_pretraining_batches_are_normalised_like_meta_training(table, run):
    from mtl_ray.distributed.pretrain import pretrain_data

    _, recorded = run
    cfg = from_dict(recorded)
    train_set, _ = pretrain_data(cfg)
    x, _ = train_set.batch(np.arange(4))
    m = torch.tensor(cfg.data.channel_mean).reshape(3, 1, 1)
    s = torch.tensor(cfg.data.channel_std).reshape(3, 1, 1)
    assert torch.equal(x, (torch.from_numpy(train_set.x[:4]).float() / 255 - m) / s)


def test_checkpoints_from_before_the_statistics_see_raw_pixels():
    old = from_dict({"data": {"source": "digits", "image_size": 16}}).to_dict()
    for key in ("channel_mean", "channel_std", "augment"):
        del old["data"][key]
    cfg = embedded_config(json.dumps(old))
    assert (cfg.data.channel_mean, cfg.data.channel_std) == ((0.0,), (1.0,))
    sine = from_dict({"data": {"source": "sinusoid"}, "model": {"name": "mlp"}}).to_dict()
    del sine["data"]["channel_mean"], sine["data"]["channel_std"]
    assert embedded_config(json.dumps(sine)).data.channel_mean == ()


@pytest.mark.slow
def test_converted_mini_imagenet_learns_held_out_classes_through_the_cli(tmp_path):
    """convert (mini-ImageNet layout) -> train ProtoNet Conv4 -> eval on the 7 held-out test classes, 5-way 1-shot."""
    src = write_mini_imagenet(tmp_path / "mini", per=10)
    out = cli("data", "convert", "--format", "mini-imagenet", str(src), str(tmp_path / "m.parquet"),
              "--image-size", "32")
    assert "28 train classes (280 images), 5 val classes (50 images), 7 test classes (70 images), 32x32 RGB" \
        in out.stdout
    run = tmp_path / "run"
    cli("train", "data.source=parquet", f"data.path={tmp_path / 'm.parquet'}", "data.image_size=32", "data.ways=5",
        "data.shots=1", "data.queries=3", "model.channels=16", "algorithm.name=protonet", "algorithm.inner_steps=0",
        "optim.steps=12", "optim.meta_batch_size=4", "optim.val_every=0", "optim.outer_lr=0.003",
        "tracking.mlflow=false", "tracking.progress=false", "--run-dir", str(run))
    text = cli("eval", str(run), "--episodes", "60").stdout
    acc = float(re.search(r"meta_test/acc: ([0-9.]+)%", text).group(1))
    assert "parquet/test" in text and acc > 60.0, text  # chance: 20%
