"""Recipe regression: a few steps of every shipped training config, on fixed seeds, reproduce stored losses.

So a refactor cannot change the numbers unseen (torchtune's recipe tests are the model). Each config runs
through the training recipe (:func:`mtl_ray.recipes.train.train`, float64, one thread, reference kernels) for
:data:`STEPS` outer steps with a smaller meta-batch; its per-step ``meta_train/loss`` and the final
``meta_val/loss`` must match ``tests/recipe_losses.json`` to :data:`RTOL`. Configs with ``model.init`` start
from a pretraining checkpoint of freshly seeded weights (deterministic). Pretraining (Ray Train) is covered
by tests/distributed/test_pretrain.py.

A change that is meant to change the numbers rewrites the file, and the diff shows by how much:

    MTL_RAY_DATA_DIR=../shared/data .venv/bin/python tests/test_recipe_regression.py --write
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from miniatures import mini_imagenet_table

from mtl_ray import metrics as M
from mtl_ray.components import load_config
from mtl_ray.config import Config
from mtl_ray.tracking.local import read_metrics

REPO = Path(__file__).resolve().parents[1]
STORED = Path(__file__).with_name("recipe_losses.json")
STEPS = 3
# float64 (scaling.precision=fp64), one thread, and reference kernels pinned in the process that computes the
# losses (KERNELS: torch's portable kernels, oneDNN's SSE4.1 code, MKL's reproducible mode), so every x86-64 CPU
# computes the same numbers. Without the pins the numbers depend on the CPU: in float32 two machines of the CI's kind
# differed by 3.4e-3 at step 2 and 5% at the final validation, and in float64 torch's AVX2 and portable kernels
# differ by 4e-4 at step 3 (Adam's first, sign-like step amplifies tiny differences).
RTOL = 1e-6
KERNELS = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE"}
SMALL = [f"optim.steps={STEPS}", "scaling.precision=fp64", "optim.meta_batch_size=4", "optim.val_tasks=4",
         "optim.max_minutes=0", "scaling.num_workers=0", "scaling.torch_threads=1", "tracking.mlflow=false",
         "tracking.progress=false", "tracking.checkpoint_every=0"]
CONFIGS = sorted(p.stem for p in (REPO / "jobs" / "configs").glob("*.yaml")
                 if not p.stem.startswith(("sweep_", "deploy_", "pipeline_")) and p.stem != "omniglot_pretrain")


def recipe_config(name: str, data_root: Path, work: Path) -> Config:
    cfg = load_config(REPO / "jobs" / "configs" / f"{name}.yaml", [*SMALL, f"data.root={data_root}"])
    if cfg.optim.val_every:  # once, at the end (configs without a validation split keep none)
        cfg = cfg.replace(**{"optim.val_every": STEPS})
    if cfg.model.init:
        cfg = cfg.replace(**{"model.init": str(_pretrained(cfg, work))})
    if cfg.model.name == "resnet12":  # the shipped widths take minutes a step in float64 on reference kernels
        cfg = cfg.replace(**{"model.widths": (4, 4, 4, 4)})
    if cfg.data.source == "parquet":  # a benchmark table: a miniature in its published layout, converted as users do
        cfg = cfg.replace(**{"data.path": str(mini_imagenet_table(work, cfg.data.image_size))})
    return cfg


def _pretrained(cfg: Config, work: Path) -> Path:
    """A pretraining checkpoint of freshly seeded weights that fits ``cfg``'s model (652 train classes)."""
    from mtl_ray.algorithms import TaskShape
    from mtl_ray.checkpoint import Checkpoint, save_checkpoint
    from mtl_ray.models import build_model, initial_params

    shape = TaskShape("classification", (1, cfg.data.image_size, cfg.data.image_size), 652)
    params = initial_params(build_model(cfg, shape.x_shape, shape.ways), 0)
    save_checkpoint(work / "pretrained", Checkpoint(step=1, params=params, optimizer={}, config=cfg, shape=shape,
                                                    stage="pretrain"))
    return work / "pretrained"


def losses(name: str, data_root: Path, work: Path) -> dict[str, list[float]]:
    """``{"meta_train/loss": [STEPS values], "meta_val/loss": [final]}`` of ``name`` through the training recipe."""
    from mtl_ray.recipes.train import train

    threads = torch.get_num_threads()
    try:
        train(recipe_config(name, data_root, work), work / name, model=False, out=io.StringIO())
    finally:
        torch.set_num_threads(threads)  # the recipe applies scaling.torch_threads to its process
    rows = read_metrics(work / name)
    return {M.META_TRAIN_LOSS: [r[M.META_TRAIN_LOSS] for r in rows],
            M.META_VAL_LOSS: [r[M.META_VAL_LOSS] for r in rows if M.META_VAL_LOSS in r]}


def _stored() -> dict[str, Any]:
    return json.loads(STORED.read_text())


def compute_all(data_root: Path, work: Path, out: Path) -> None:
    """Every config's losses, in a fresh process with :data:`KERNELS` pinned (they are read at import), as JSON."""
    env = {**os.environ, **KERNELS}
    subprocess.run([sys.executable, __file__, "--json", str(out), "--data-root", str(data_root), "--work", str(work)],
                   env=env, check=True, cwd=REPO)


@pytest.fixture(scope="module")
def computed(omniglot_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("recipes")
    compute_all(omniglot_root, work, work / "losses.json")
    return json.loads((work / "losses.json").read_text())


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_config_reproduces_its_stored_losses(name, computed):
    stored = _stored()
    assert name in stored, f"{name}: no stored losses; write them with the command in this file's docstring"
    got = computed[name]
    for key, want in stored[name].items():
        assert len(got[key]) == len(want), (name, key, got[key], want)
        for step, (g, w) in enumerate(zip(got[key], want, strict=True), start=1):
            assert math.isclose(g, w, rel_tol=RTOL), f"{name} {key} #{step}: got {g!r}, stored {w!r}"


def test_every_shipped_training_config_has_stored_losses():
    """A new config must come with its numbers, and a removed one must take them away."""
    assert sorted(_stored()) == CONFIGS


def test_a_changed_number_is_caught(omniglot_root, tmp_path):
    """The comparison can fail: another inner learning rate changes the first loss beyond the tolerance."""
    from mtl_ray.recipes.train import train

    cfg = recipe_config("sinusoid_maml", omniglot_root, tmp_path).replace(**{"algorithm.inner_lr": 0.02})
    threads = torch.get_num_threads()
    try:
        train(cfg, tmp_path / "changed", model=False, out=io.StringIO())
    finally:
        torch.set_num_threads(threads)
    first = read_metrics(tmp_path / "changed")[0][M.META_TRAIN_LOSS]
    assert not math.isclose(first, _stored()["sinusoid_maml"][M.META_TRAIN_LOSS][0], rel_tol=RTOL)


if __name__ == "__main__":  # --write: run every config and store its losses; --json OUT: write them to OUT
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description="the recipe regression's losses (see the module docstring)")
    ap.add_argument("--write", action="store_true", help=f"store them in {STORED.name} (pinned kernels)")
    ap.add_argument("--json", type=Path, help="write them to this file (run with KERNELS in the environment)")
    ap.add_argument("--data-root", type=Path, help="a data root holding omniglot/*.zip (default: $MTL_RAY_DATA_DIR)")
    ap.add_argument("--work", type=Path, help="a scratch directory (default: a temporary one)")
    args = ap.parse_args()
    if args.write:
        with tempfile.TemporaryDirectory() as tmp:
            shared = Path(os.environ.get("MTL_RAY_DATA_DIR", "data")).absolute()
            root = Path(tmp) / "data" / "omniglot"  # links to the archives: the decoded cache is written here
            root.mkdir(parents=True)
            for z in (shared / "omniglot").glob("*.zip"):
                (root / z.name).symlink_to(z)
            for name in ("fonts", "fashion-mnist"):
                (root.parent / name).symlink_to(shared / name)
            compute_all(root.parent, Path(tmp), STORED)
        print(f"wrote {STORED}: {', '.join(CONFIGS)}")
    else:
        assert args.json and args.data_root, "usage: python tests/test_recipe_regression.py --write"
        with tempfile.TemporaryDirectory() as tmp:
            work = args.work or Path(tmp)
            out = {name: losses(name, args.data_root, work) for name in CONFIGS}
        args.json.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
