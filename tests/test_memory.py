"""The memory estimate (mtl_ray/memory.py): it names no component (each states its own size), refuses a config that
cannot fit before anything starts (ResNet-12 second order at 84x84 among them) with the estimate in the message,
and sizes automatic task chunks from a memory budget. tests/test_bad_inputs.py runs the refusals through the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from mtl_ray import memory
from mtl_ray.algorithms.registry import ALGORITHMS
from mtl_ray.components import from_dict
from mtl_ray.data.imagetable import write_table
from mtl_ray.data.registry import SOURCES
from mtl_ray.models import MODELS

GB = 10**9


def _free(n: float):
    return lambda: (int(n), "a test's memory")


@pytest.fixture(scope="module")
def rgb_table(tmp_path_factory) -> Path:
    """A raw-uint8 table of 12 84x84 RGB images: what the estimate reads is its footer (3 channels, 12 rows)."""
    path = tmp_path_factory.mktemp("rgb") / "rgb84.parquet"
    rng = np.random.default_rng(0)
    write_table(path, [f"c{i % 6}" for i in range(12)], rng.integers(0, 256, (12, 3, 84, 84), dtype=np.uint8))
    return path


def _resnet(table: Path, **algorithm) -> object:
    return from_dict({"data": {"source": "parquet", "path": str(table), "ways": 5, "shots": 1, "queries": 15,
                               "image_size": 84},
                      "model": {"name": "resnet12"},
                      "algorithm": {"name": "maml", "inner_steps": 5, "inner_lr": 0.01, **algorithm},
                      "optim": {"meta_batch_size": 32, "val_every": 0}})


def test_memory_py_names_no_component():
    """Sizes come from the components (ModelClass.activation_floats, SourceSpec.input_shape / count_images and the
    algorithm capabilities): a new backbone or source needs no branch in memory.py."""
    tree = ast.parse(Path(memory.__file__).read_text())
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    idents = ({n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
              | {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)})
    names = set(MODELS) | set(SOURCES) | set(ALGORITHMS)
    classes = {c.__name__ for c in (*MODELS.values(), *ALGORITHMS.values())}
    assert not strings & names, strings & names
    assert not idents & classes, idents & classes


def test_every_model_and_source_states_its_size(rgb_table):
    cfg = from_dict({"data": {"source": "parquet", "path": str(rgb_table), "image_size": 84}})
    for name, cls in MODELS.items():
        per_example, per_task = cls.activation_floats(cfg.replace(**{"model.name": name}), (3, 84, 84), 5)
        assert per_example > 0 and per_task >= 0, name
    assert memory.x_shape_of(cfg) == (3, 84, 84) and memory.dataset_images(cfg) == 12  # the table's footer
    assert memory.x_shape_of(cfg.replace(**{"data.source": "sinusoid", "model.name": "mlp"})) == (1,)
    omni = cfg.replace(**{"data.source": "omniglot", "data.image_size": 28,
                          "data.archives": ("images_background", "images_evaluation")})
    assert memory.x_shape_of(omni) == (1, 28, 28) and memory.dataset_images(omni) == 19280 + 13180


def test_resnet12_second_order_estimate_is_fitted_to_what_it_takes():
    """bench/backbones.py measured 8.8 GB (1 inner step) and 11.5 GB (5) of peak RSS for one vmapped second-order
    5-way 1+15 84x84 task, 7.6 / 7.4 GB first order (docs/benchmarks.md): the estimate stays within 30%."""
    cfg = _resnet(Path("unused.parquet"))  # no table: x_shape given below
    measured = {(False, 1): 8.8, (False, 5): 11.5, (True, 1): 7.6, (True, 5): 7.4}
    for (first_order, steps), gb in measured.items():
        c = cfg.replace(**{"algorithm.first_order": first_order, "algorithm.inner_steps": steps})
        est = memory.task_cost(c, "train", steps, (3, 84, 84)).chunk + 100 * 2**20  # + a first call
        assert 0.7 < est / (gb * GB) < 1.3, (first_order, steps, est / GB)


def test_resnet12_second_order_with_a_big_meta_batch_is_refused_with_the_estimate(rgb_table):
    cfg = _resnet(rgb_table, task_chunk_size=32)  # 32 second-order ResNet-12 tasks in one vmap call
    (msg,) = memory.memory_problems(cfg, available=_free(64 * GB))
    assert "memory: a training step with optim.meta_batch_size=32 (32 per shard of 5-way 1+15 84x84 images" in msg
    assert "GB here" in msg and "expected at most the 64.0 GB available" in msg
    assert "set algorithm.task_chunk_size below 32" in msg
    need = float(msg.split("needs about ")[1].split(" GB")[0])
    assert 250 < need < 450  # ~10 GB a task


def test_automatic_chunks_fit_resnet12_where_a_whole_shard_would_not(rgb_table):
    cfg = _resnet(rgb_table)  # task_chunk_size=0: one task per vmap call fits, 32 at once would not
    e = memory.estimate_training(cfg, _free(64 * GB))[0]
    assert e.chunk_tasks == 1 and e.total < 20 * GB
    assert memory.memory_problems(cfg, available=_free(64 * GB)) == []
    # a machine where one task cannot fit: refused before anything starts, saying so
    (msg,) = memory.memory_problems(cfg, available=_free(4 * GB))
    assert "one task alone needs about" in msg and "or use a smaller model" in msg
    # a meta-batch whose inputs alone cannot fit is refused too (1+15 84x84 RGB: 13.5 MB a task)
    (msg,) = memory.memory_problems(cfg.replace(**{"optim.meta_batch_size": 100_000}), available=_free(64 * GB))
    assert "optim.meta_batch_size=100000" in msg and "lower optim.meta_batch_size" in msg


def test_the_chunk_budget_comes_from_the_config_or_the_memory_available():
    cfg = from_dict({"data": {"source": "sinusoid"}, "model": {"name": "mlp"}})
    assert memory.chunk_budget(cfg, available=_free(64 * GB)) == memory.CPU_CHUNK_BYTES  # the same on big machines
    assert memory.chunk_budget(cfg, available=_free(2 * GB)) == int(memory.AVAILABLE_SHARE * 2 * GB)
    two = cfg.replace(**{"scaling.num_workers": 2})  # each worker process gets its share
    assert memory.chunk_budget(two, available=_free(2 * GB)) == int(memory.AVAILABLE_SHARE * GB)
    assert memory.chunk_budget(cfg.replace(**{"algorithm.chunk_memory_mb": 300}), available=_free(GB)) == 300 * 2**20


def test_chunk_limit_is_the_tasks_the_budget_holds(rgb_table):
    cfg = _resnet(rgb_table, chunk_memory_mb=40_000)
    limit = memory.chunk_limit(cfg, "cpu", (3, 84, 84))
    task = memory.task_cost(cfg, "train", 5, (3, 84, 84)).chunk
    assert limit(True, 5) == 40_000 * 2**20 // task >= 3
    assert limit(False, 5) > limit(True, 5)  # evaluation keeps no outer graph
    assert memory.chunk_limit(cfg.replace(**{"algorithm.chunk_memory_mb": 1}), "cpu", (3, 84, 84))(True, 5) == 1


def test_float64_runs_take_twice_the_chunk_memory():
    cfg = _resnet(Path("unused.parquet"))
    fp32 = memory.task_cost(cfg, "train", 5, (3, 84, 84))
    fp64 = memory.task_cost(cfg.replace(**{"scaling.precision": "fp64"}), "train", 5, (3, 84, 84))
    assert fp64.chunk == 2 * fp32.chunk and fp64.inputs > fp32.inputs
