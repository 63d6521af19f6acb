from __future__ import annotations

from pathlib import Path

import pytest
from miniatures import mini_imagenet_table

from mtl_ray.components import from_dict, load_config
from mtl_ray.config import Config, ConfigError
from mtl_ray.recipes.train import check_config


def checked(path: str | None, overrides: list[str]) -> Config:
    """What ``mtl-ray train`` checks before it starts: the static checks, then data and ``model.init``."""
    return check_config(load_config(path, overrides))


CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "jobs" / "configs").glob("*.yaml")
                 if not p.name.startswith(("sweep_", "deploy_", "pipeline_")))  # tests/tune: test_spec, test_deploy


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_passes_every_check(path, omniglot_root, tmp_path, pretrained_stub):
    overrides = [f"data.root={omniglot_root}"]  # a writable root: the check decodes (and caches) the archives
    init = load_config(path, overrides).model.init
    if init:  # meta-transfer configs name a pretraining run that does not exist yet: say how to make it
        with pytest.raises(ConfigError, match=r"model.init: .*no such checkpoint.*mtl-ray pretrain"):
            checked(str(path), [*overrides, f"model.init={tmp_path / 'absent'}"])
        overrides.append(f"model.init={pretrained_stub(load_config(path, overrides), tmp_path)}")
    if load_config(path, overrides).data.source == "parquet":  # a benchmark table the user converts first: say how
        with pytest.raises(ConfigError, match=r"data.path: .*mtl-ray data convert"):
            checked(str(path), overrides)
        overrides.append(f"data.path={mini_imagenet_table(tmp_path, load_config(path, overrides).data.image_size)}")
    cfg = checked(str(path), overrides)
    assert cfg.name == path.stem


def test_there_are_shipped_configs():
    assert len(CONFIGS) >= 3


def test_overrides_are_typed_and_applied():
    cfg = load_config(None, ["optim.outer_lr=0.01", "data.val_alphabets=[Greek, Latin]", "seed=7",
                             "algorithm.eval_inner_steps=null"])
    assert cfg.optim.outer_lr == 0.01 and cfg.seed == 7
    assert cfg.data.val_alphabets == ("Greek", "Latin")
    assert cfg.eval_inner_steps == cfg.algorithm.inner_steps


def test_exponent_floats_without_a_dot_are_numbers():
    """YAML 1.1 reads ``1e-3`` as a string; a float field still takes it, an int field still refuses it."""
    cfg = load_config(None, ["optim.outer_lr=1e-3", "algorithm.inner_lr=5E-1"])
    assert cfg.optim.outer_lr == 1e-3 and cfg.algorithm.inner_lr == 0.5
    with pytest.raises(ConfigError, match=r"optim.steps: got '1e3' \(str\), expected an integer"):
        load_config(None, ["optim.steps=1e3"])
    with pytest.raises(ConfigError, match=r"optim.outer_lr: got 'fast' \(str\), expected a number"):
        load_config(None, ["optim.outer_lr=fast"])


def test_all_static_problems_reported_at_once():
    with pytest.raises(ConfigError) as e:
        from_dict({"data": {"ways": 1, "shots": 0}, "optim": {"outer_lr": -1.0, "meta_batch_size": 0},
                   "algorithm": {"name": "mamll", "inner_lr": -0.1}})
    text = str(e.value)
    for needle in ["data.ways: got 1", "data.shots: got 0", "optim.outer_lr: got -1.0",
                   "optim.meta_batch_size: got 0", "algorithm.name: got 'mamll', expected one of: maml, metasgd",
                   "algorithm.inner_lr: got -0.1"]:
        assert needle in text, needle
    assert len(e.value.problems) == 6


def test_unknown_keys_and_types_are_named_with_a_suggestion():
    with pytest.raises(ConfigError) as e:
        from_dict({"optim": {"outr_lr": 0.1, "steps": "many"}, "bogus": 1}, ["data.wayz=3", "noequals"])
    text = str(e.value)
    assert "optim.outr_lr: unknown key; did you mean 'outer_lr'?" in text
    assert "optim.steps: got 'many' (str), expected an integer" in text
    assert "data.wayz: unknown key; did you mean 'ways'?" in text
    assert "bogus: unknown key" in text
    assert "override 'noequals': expected key=value" in text


def test_data_dependent_problems_join_static_ones_before_anything_starts(omniglot_root):
    with pytest.raises(ConfigError) as e:
        checked(None, [f"data.root={omniglot_root}", "data.ways=30", "data.shots=10", "data.queries=15"])
    text = str(e.value)
    assert "data.ways: got 30, expected <=" in text
    assert "data.shots + data.queries: got 25 (10 + 15), expected <= 20" in text


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_component_problems_come_from_the_registries_with_the_static_ones_in_one_error():
    from mtl_ray.algorithms import ALGORITHMS

    with pytest.raises(ConfigError) as e:
        from_dict({"data": {"source": "sinusoid"}, "model": {"name": "conv4"},
                   "algorithm": {"name": "protonet", "compile": False}, "optim": {"outer_lr": -1}})
    text = str(e.value)
    assert "optim.outer_lr: got -1.0, expected a value > 0" in text  # static
    assert "model.name: got 'conv4' with data.source=sinusoid, expected 'mlp'" in text
    fits = ", ".join(n for n, c in ALGORITHMS.items() if c.supports_regression)
    assert f"algorithm.name: got 'protonet' with data.source=sinusoid (regression); expected one of: {fits}" in text
    with pytest.raises(ConfigError) as e:
        from_dict({"data": {"source": "parquet"}, "model": {"name": "mlp", "init": "runs/pre"},
                   "algorithm": {"name": "relationnet"}})
    text = str(e.value)
    assert "model.name: got 'mlp' with algorithm.name=relationnet, expected 'conv4'" in text
    assert "model.init: relationnet cannot start from a pretrained body" in text
    assert "data.path: empty, expected the Parquet file to read" in text
    with pytest.raises(ConfigError) as e:
        from_dict({"algorithm": {"name": "reptile", "compile": True, "inner_steps": 0}})
    assert "algorithm.compile: got true with algorithm.name=reptile, expected false" in str(e.value)
    assert "algorithm.inner_steps: got 0, expected a value > 0" in str(e.value)
    with pytest.raises(ConfigError, match=r"algorithm\.name: got 'mtl' with model\.init empty"):
        from_dict({"algorithm": {"name": "mtl"}})
    assert from_dict({"algorithm": {"name": "protonet", "inner_steps": 0}}).algorithm.inner_steps == 0


def test_parse_is_the_non_raising_core_and_replace_rechecks_the_components():
    from mtl_ray.config import parse

    cfg, problems = parse({"model": {"name": "nosuch"}})
    assert cfg is not None and problems == []  # component names are not config.py's business
    assert parse({"model": {"nosuch": 1}})[0] is None
    with pytest.raises(ConfigError, match=r"model\.name: got 'nosuch', expected one of: mlp, conv4"):
        Config().replace(**{"model.name": "nosuch"})
