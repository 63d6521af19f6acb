"""multidomain: one domain per episode (Meta-Dataset's sampling), a pure function of the task's coordinates, held-out
domains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mtl_ray.components import from_dict
from mtl_ray.config import Config, ConfigError
from mtl_ray.data import TaskBatch, build_task_source, check_data, check_pretrain_data, load_source, multidomain
from mtl_ray.data.base import PoolTaskSource
from mtl_ray.data.fetch import DataError
from mtl_ray.data.imagetable import write_table

SCRIPTS = ["Georgian", "Armenian", "Runic", "Cherokee", "Tifinagh", "Ethiopic"]  # a few for speed


def _cfg(root: Path, cache: Path, seed: int = 0, **data: Any) -> Config:
    base = {"source": "multidomain", "root": str(root), "cache_dir": str(cache), "ways": 5, "shots": 1,
            "queries": 2, "scripts": SCRIPTS, "val_scripts": ["Runic"], "test_scripts": ["Cherokee"],
            "script_val_fraction": 0.0, "script_test_fraction": 0.0}
    return from_dict({"seed": seed, "data": {**base, **data}})


def _equal(a: TaskBatch, b: TaskBatch) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("support_x", "support_y", "query_x", "query_y"))


@pytest.fixture(scope="module")
def three(domains_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Config:
    """omniglot + glyphs + fashion_mnist, uniform weights, nothing held out."""
    return _cfg(domains_root, tmp_path_factory.mktemp("md_cache"), domains=["omniglot", "glyphs", "fashion_mnist"])


def test_an_episode_is_a_pure_function_of_its_coordinates(three: Config) -> None:
    src = build_task_source(three)
    whole = src.sample("train", 7, range(8))
    pieces = TaskBatch.stack([src.sample("train", 7, [0, 1, 2]), src.sample("train", 7, [3]),
                              src.sample("train", 7, [4, 5, 6, 7])])
    backwards = src.sample("train", 7, list(reversed(range(8))))
    assert _equal(whole, pieces)
    assert _equal(whole, TaskBatch.stack([backwards.slice(i, i + 1) for i in reversed(range(8))]))
    assert _equal(whole, build_task_source(three).sample("train", 7, range(8)))  # a fresh source: same tasks
    assert isinstance(src, multidomain.MultiDomainTaskSource)
    assert len(set(src.episode_domains("train", 7, range(8)))) > 1  # the batch mixes domains
    assert not _equal(whole, src.sample("train", 8, range(8)))
    other_seed = build_task_source(three.replace(seed=1)).sample("train", 7, range(8))
    assert not torch.equal(whole.query_x, other_seed.query_x)


def test_the_episode_is_the_chosen_domain_own_task(three: Config) -> None:
    src = build_task_source(three)
    assert isinstance(src, multidomain.MultiDomainTaskSource)
    domains = src.episode_domains("val", 3, range(12))
    for i, name in enumerate(domains):
        alone = build_task_source(three.replace(**{"data.source": name}))
        assert isinstance(alone, PoolTaskSource)
        alone.seed = multidomain.domain_seed(three.seed, name)  # the domain's stream inside multidomain
        assert _equal(src.sample("val", 3, [i]), alone.sample("val", 3, [i]))


def test_domain_frequencies_follow_the_weights(three: Config) -> None:
    cfg = three.replace(**{"data.domain_weights": [6.0, 3.0, 1.0]})
    src = build_task_source(cfg)
    assert isinstance(src, multidomain.MultiDomainTaskSource)
    n = 6000
    names = src.episode_domains("train", 0, range(n)) + src.episode_domains("train", 1, range(n))
    freq = {d: names.count(d) / len(names) for d in ("omniglot", "glyphs", "fashion_mnist")}
    # binomial sd over 12000 episodes is at most 0.0046: 0.025 is more than 5 sd
    assert abs(freq["omniglot"] - 0.6) < 0.025 and abs(freq["glyphs"] - 0.3) < 0.025
    assert abs(freq["fashion_mnist"] - 0.1) < 0.025
    uniform = build_task_source(three)
    assert isinstance(uniform, multidomain.MultiDomainTaskSource)
    u = uniform.episode_domains("train", 0, range(n))
    assert all(abs(u.count(d) / n - 1 / 3) < 0.03 for d in ("omniglot", "glyphs", "fashion_mnist"))


def test_held_out_domains_are_only_in_the_test_split(three: Config) -> None:
    cfg = three.replace(**{"data.test_domains": ["fashion_mnist"]})
    src = build_task_source(cfg)
    assert isinstance(src, multidomain.MultiDomainTaskSource)
    assert set(src.episode_domains("test", 0, range(200))) == {"fashion_mnist"}
    assert set(src.episode_domains("train", 0, range(2000))) == {"omniglot", "glyphs"}
    assert set(src.episode_domains("val", 0, range(500))) == {"omniglot", "glyphs"}
    assert src.num_classes("test") == 10  # every class of the held-out domain
    loaded = load_source(cfg)
    assert {n.split(":")[0] for n in loaded.splits["test"].names} == {"fashion_mnist"}
    assert {n.split(":")[0] for n in loaded.splits["train"].names} == {"omniglot", "glyphs"}
    assert "fashion_mnist all (10 classes, weight 1.00)" in loaded.describe("test")
    # without held-out domains the test split samples every domain's own test split
    plain = build_task_source(three)
    assert isinstance(plain, multidomain.MultiDomainTaskSource)
    assert [(d, s) for d, s, _ in plain.splits["test"]] == [("omniglot", "test"), ("glyphs", "test"),
                                                           ("fashion_mnist", "test")]


def test_the_union_serves_pretraining_and_the_data_checks(three: Config) -> None:
    loaded = load_source(three)
    per_domain = {d: load_source(three.replace(**{"data.source": d})) for d in ("omniglot", "glyphs", "fashion_mnist")}
    want = sum(len(ls.splits["train"].names) for ls in per_domain.values())  # omniglot's rotations are not classes
    assert per_domain["omniglot"].splits["train"].rotations == 4
    assert loaded.splits["train"].num_classes == want and loaded.splits["train"].rotations == 1
    assert loaded.splits["train"].names[0] == "omniglot:" + per_domain["omniglot"].splits["train"].names[0]
    assert loaded.md5s == {k: v for ls in per_domain.values() for k, v in ls.md5s.items()}
    assert check_data(three, ["train", "val", "test"]) == [] and check_pretrain_data(three) == []
    problems = check_data(three.replace(**{"data.ways": 12}), ["train"])
    assert any("domain fashion_mnist of the multidomain 'train' split" in p for p in problems), problems


def test_domains_must_give_one_image_shape(domains_root: Path, tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (30, 3, 28, 28), dtype=np.uint8)
    table = write_table(tmp_path / "rgb.parquet", [f"c{i % 6}" for i in range(30)], rgb)
    cfg = _cfg(domains_root, tmp_path, domains=["omniglot", "parquet"], path=str(table))
    with pytest.raises(DataError) as e:
        build_task_source(cfg)
    assert "the domains give different image shapes (omniglot (1, 28, 28), parquet (3, 28, 28))" in str(e.value)
    assert check_data(cfg) == [str(e.value)]


def test_static_checks_name_the_fix(domains_root: Path, tmp_path: Path) -> None:
    cases: dict[str, dict[str, Any]] = {
        "data.domains: got ['sinusoid', 'multidomain'], expected image sources": {"domains": ["omniglot", "sinusoid",
                                                                                               "multidomain"]},
        "data.domain_weights: got 1 weights [1.0], expected one per domain": {"domain_weights": [1.0]},
        "data.domain_weights: got [1.0, -1.0], expected non-negative": {"domain_weights": [1.0, -1.0]},
        "data.test_domains: got ['digits'], expected domains of data.domains": {"test_domains": ["digits"]},
        "data.test_domains: got all of data.domains": {"test_domains": ["omniglot", "glyphs"]},
        "data.domains: got ['glyphs'] more than once": {"domains": ["glyphs", "glyphs"]},
        "data.val_scripts and data.test_scripts share ['Runic']": {"test_scripts": ["Runic"]},  # the glyph domain's
        "data.path: empty, expected the Parquet file": {"domains": ["omniglot", "parquet"]},
    }
    for expected, data in cases.items():
        with pytest.raises(ConfigError) as e:
            _cfg(domains_root, tmp_path, **data)
        assert expected in str(e.value), (expected, str(e.value))
