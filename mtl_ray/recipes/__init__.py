"""Recipes: the one place that composes a run (config -> data -> learner -> executor -> tracking).

Every entry point runs the same recipe: ``mtl-ray`` (:mod:`mtl_ray.cli` only parses), the
``ray job submit`` scripts in ``jobs/`` and Ray Tune's trials (:mod:`mtl_ray.tune.sweep`).

- :mod:`mtl_ray.recipes.train`: check a meta-training config, train it into a run directory with its
  records (``metrics.jsonl``, progress, MLflow), log the trained learner as an MLflow model.
- :mod:`mtl_ray.recipes.pretrain`: the same for supervised pretraining on Ray Train.
- :mod:`mtl_ray.recipes.evaluate`: meta-test a checkpoint (held-out episodes, or Lake's one-shot runs).

Each module imports its heavy dependencies (torch, Ray, MLflow) itself; this package face imports
nothing, so ``mtl-ray --help`` stays fast. See docs/architecture.md.
"""
