"""Sweep files: validated before anything starts, every problem at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mtl_ray.config import ConfigError
from mtl_ray.tune.spec import load_sweep, to_tune_space, trial_config

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"


@pytest.mark.parametrize("name", ["sweep_omniglot_maml.yaml", "sweep_sinusoid_maml.yaml"])
def test_shipped_sweeps_validate(name):
    spec = load_sweep(CONFIGS / name)
    assert spec.space and spec.metric.startswith("meta_val/")
    space = to_tune_space(spec)
    assert set(space) == set(spec.space)


def _write(tmp_path, **body):
    body.setdefault("base", str(CONFIGS / "sinusoid_maml.yaml"))
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump(body))
    return p


def test_every_problem_is_listed_at_once(tmp_path):
    p = _write(tmp_path, metric="meta_train/loss", mode="up", search="bayes", trial_cpus=0, colour="red",
               space={"algorithm.inner_lr": {"loguniform": [0.0, 1.0]}, "optim.meta_batch_size": {"choice": [0, 8]},
                      "optim.outr_lr": {"choice": [0.1]}, "seed": {"gaussian": [0, 1]}})
    with pytest.raises(ConfigError) as e:
        load_sweep(p)
    text = str(e.value)
    for needle in ["sweep.colour: unknown key", "sweep.metric: got 'meta_train/loss', expected a meta-validation",
                   "sweep.mode: got 'up'", "sweep.search: got 'bayes'", "sweep.trial_cpus: got 0.0, expected > 0",
                   "sweep.space.algorithm.inner_lr.loguniform: got low=0.0, expected > 0",
                   "sweep.space.optim.meta_batch_size value 0: optim.meta_batch_size: got 0",
                   "sweep.space.optim.outr_lr value 0.1: optim.outr_lr: unknown key; did you mean 'outer_lr'?",
                   "sweep.space.seed: unknown domain 'gaussian'"]:
        assert needle in text, (needle, text)


def test_grid_needs_grid_search_and_optuna_refuses_grid(tmp_path):
    with pytest.raises(ConfigError, match="'grid' domains need search: grid or random"):
        load_sweep(_write(tmp_path, search="optuna", space={"optim.meta_batch_size": {"grid": [4, 8]}}))
    with pytest.raises(ConfigError, match=r"non-grid domains \['algorithm.inner_lr'\]"):
        load_sweep(_write(tmp_path, search="grid", space={"algorithm.inner_lr": {"choice": [0.1, 0.2]}}))


def test_trial_config_applies_sampled_values_and_overrides(tmp_path):
    spec = load_sweep(_write(tmp_path, overrides=["optim.steps=50"],
                             space={"algorithm.inner_lr": {"uniform": [0.01, 0.1]},
                                    "algorithm.inner_steps": {"randint": [1, 3]}}))
    assert spec.base.optim.steps == 50 and spec.space["algorithm.inner_steps"].values == (1, 2)
    cfg = trial_config(spec, {"algorithm.inner_lr": 0.05, "algorithm.inner_steps": 2, "ignored": 1})
    assert cfg.algorithm.inner_lr == 0.05 and cfg.algorithm.inner_steps == 2 and cfg.optim.steps == 50


def test_relative_paths_are_made_absolute_for_trials_that_start_in_their_own_dirs(tmp_path, monkeypatch):
    """A trial's working directory is its trial dir: ``model.init=runs/pretrain`` must not depend on it."""
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "t.parquet").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    spec = load_sweep(_write(tmp_path, space={"algorithm.inner_lr": {"choice": [0.1]}}),
                      ["model.init=runs/pretrain", "data.root=data", "data.path=tables/t.parquet"])
    assert spec.base.model.init == str(tmp_path / "runs" / "pretrain")
    assert spec.base.data.root == str(tmp_path / "data")
    assert spec.base.data.path == str(tmp_path / "tables" / "t.parquet")
    kept = load_sweep(_write(tmp_path, space={"algorithm.inner_lr": {"choice": [0.1]}}),
                      ["model.init=s3://bucket/pretrain", "data.path=only_under_the_data_root.parquet"])
    assert kept.base.model.init == "s3://bucket/pretrain"  # URIs and data-root-relative tables stay as given
    assert kept.base.data.path == "only_under_the_data_root.parquet"
