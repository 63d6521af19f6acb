"""What a trial tells Tune and MLflow, without running a sweep."""

from __future__ import annotations

import numpy as np

from mtl_ray.tune.sweep import _report_order, trial_run_name


def test_trial_run_name_shows_its_number_and_hyperparameters():
    params = {"algorithm.inner_lr": 0.4, "optim.outer_lr": np.float64(0.001), "algorithm.inner_steps": 3}
    assert trial_run_name("6a2d0_00003", params) == "trial 3: inner_lr=0.4 outer_lr=0.001 inner_steps=3"
    assert trial_run_name("odd", {"optim.outer_lr": 0.00012345}) == "trial odd: outer_lr=0.0001234"


def test_the_sweeps_metric_comes_first_in_what_tune_shows():
    report = {"meta_train/loss": 1.0, "meta_train/grad_norm": 2.0, "meta_val/acc": 0.5, "meta_val/loss": 0.7,
              "step": 20}
    assert list(_report_order("meta_val/loss", report))[:3] == ["meta_val/loss", "meta_val/acc", "meta_train/loss"]
    assert _report_order("meta_val/loss", report) == report
