"""The evaluation recipe: meta-test a checkpoint on held-out episodes, or on Lake's one-shot runs.

``mtl-ray eval``'s body. A meta-training checkpoint adapts as it was trained; a pretraining one is
scored "pretrain-only" by ``pretrain.probe``: a linear head fine-tuned on each support set
(:func:`mtl_ray.algorithms.linear_probe`) or cosine nearest class means (:func:`mtl_ray.algorithms.cosine_probe`).
Episodes are the fixed tasks ``(split, step 0, index 0..N-1)``, so every checkpoint meets the same ones.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import torch

from mtl_ray import metrics as M
from mtl_ray.algorithms import (
    Params,
    TaskShape,
    build_learner,
    check_param_shapes,
    pretrain_probe,
    probe_description,
    uses_head,
)
from mtl_ray.algorithms.finetune import FineTune, api_seed
from mtl_ray.checkpoint import PRETRAIN_STAGE, load_checkpoint
from mtl_ray.components import from_dict
from mtl_ray.config import Config, ConfigError, UserError
from mtl_ray.data import is_regression
from mtl_ray.data.lake import WAYS, LakeRun, default_lake_path, lake_error_rate, load_lake_runs
from mtl_ray.models import HEAD_PREFIX


class EvalError(UserError):
    """A checkpoint cannot be scored as asked (e.g. a head of the wrong size for Lake's 20-way runs)."""


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95% confidence interval (NaN for one value)."""
    v = values.double().flatten()
    n = v.numel()
    half = 1.96 * float(v.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
    return float(v.mean()), half


def lake_predictions(cfg: Config, params: Params, shape: TaskShape, runs: list[LakeRun],
                     inner_steps: int) -> list[torch.Tensor]:
    """Predicted class indices ``[20]`` for each of Lake's 20-way one-shot runs."""
    ways = int(runs[0].support_y.numel())
    # test-time fine-tuning starts a head of its own from the prototypes: any number of ways
    if uses_head(cfg.algorithm.name) and shape.ways != ways and not cfg.algorithm.finetune_steps:
        raise EvalError(f"data.ways: the checkpoint was trained {shape.ways}-way with a {shape.ways}-output head, "
                        f"expected {ways} for Lake's {ways}-way runs; train with data.ways={ways} or use protonet")
    x_shape = tuple(runs[0].support_x.shape[1:])
    if x_shape != tuple(shape.x_shape):
        raise EvalError(f"image shape: Lake runs give {x_shape}, the checkpoint expects {tuple(shape.x_shape)}; "
                        f"load the runs at data.image_size={shape.x_shape[-1]}")
    learner = build_learner(cfg, shape=TaskShape(shape.kind, x_shape, ways))
    alg, finetune = learner.algorithm, learner.finetune
    preds = []
    with torch.no_grad():
        for r, run in enumerate(runs):
            if finetune is None:
                state = alg.adapt(params, run.support_x, run.support_y, inner_steps)
                preds.append(alg.predict(params, state, run.query_x).argmax(-1))
            else:  # run r's augmentation (algorithm.finetune_augment) from (seed, r)
                state = finetune.adapt_one(alg, params, run.support_x, run.support_y, api_seed(cfg.seed, r))
                preds.append(finetune.predict(alg, state, run.query_x).argmax(-1))
    return preds


def lake_error(cfg: Config, params: Params, shape: TaskShape, runs: list[LakeRun], inner_steps: int) -> float:
    """Percentage error over Lake's runs."""
    return lake_error_rate(lake_predictions(cfg, params, shape, runs, inner_steps), runs)


def check_params(expected: dict[str, torch.Tensor], params: dict[str, torch.Tensor], what: str) -> None:
    """Raise :class:`EvalError` when ``params`` do not fit the model built for this evaluation."""
    bad = check_param_shapes(expected, params, "entry")
    if bad:
        raise EvalError(f"{what}: the checkpoint's weights do not fit the evaluation model ({'; '.join(bad[:3])}). "
                        f"Head-based algorithms need the same data.ways and image size as in training; "
                        f"pass matching key=value overrides or use a metric learner (protonet).")


def _key(name: str) -> str:
    return M.META_TEST_ACC if name == "acc" else M.META_TEST_LOSS if name == "loss" else f"meta_test/{name}"


def _report(key: str, name: str, values: torch.Tensor, note: str, out: TextIO) -> dict[str, float]:
    """Print ``key``'s mean and 95% CI over ``values`` (accuracy in %) and return them by metric name."""
    mean, half = mean_ci95(values)
    scale, unit = (100.0, "%") if name == "acc" else (1.0, "")
    print(f"  {key}: {mean * scale:.2f}{unit} ± {half * scale:.2f}{unit} (95% CI{note})", file=out)
    return {key: mean, key + "_ci95": half}


def evaluate(ckpt_path: str, *, overrides: Sequence[str] = (), split: str = "test", episodes: int = 600,
             lake: str | None = None, out: TextIO | None = None) -> dict[str, float]:
    """Score the checkpoint at ``ckpt_path`` (a ``.pt`` file or a run directory: its latest checkpoint).

    ``lake``: None scores ``episodes`` episodes of ``split``; a path (or "" for the default under the data
    root) scores Lake's 20-way within-alphabet one-shot runs instead. Returns the printed numbers by metric name.
    """
    from mtl_ray.data import check_data
    from mtl_ray.distributed.evaluate import evaluate_tasks
    from mtl_ray.distributed.executor import LocalExecutor
    from mtl_ray.memory import memory_problems

    out = sys.stdout if out is None else out
    if episodes < 1:
        raise ConfigError([f"--episodes: got {episodes}, expected >= 1"])
    ck = load_checkpoint(ckpt_path)
    cfg = from_dict(ck.config.to_dict(), overrides)  # the run's data root travels with its config
    params, shape, method = ck.params, ck.shape, cfg.algorithm.name
    if ck.stage == PRETRAIN_STAGE:  # "pretrain-only": pretrain.probe, linear head or cosine class means per task
        shape = TaskShape(ck.shape.kind, ck.shape.x_shape, WAYS if lake is not None else cfg.data.ways)
        cfg, params = pretrain_probe(cfg, ck.params, shape)
        method = probe_description(cfg)
    finetune = FineTune.from_config(cfg)
    if finetune is not None:  # algorithm.finetune_steps > 0: body + prototype-initialised head fine-tuned per task
        method += f", test-time {finetune.describe()}"
    method += f", model.norm={cfg.model.norm}"  # transductive scores depend on the queries scored together
    steps = cfg.eval_inner_steps
    result: dict[str, float] = {"step": float(ck.step)}
    if lake is not None:
        path = Path(lake) if lake else default_lake_path(cfg.data.root)
        runs = load_lake_runs(path, cfg.data.image_size)
        err = lake_error(cfg, params, shape, runs, steps)
        print(f"Lake 20-way within-alphabet one-shot, {len(runs)} runs: error {err:.2f}% "
              f"(accuracy {100 - err:.2f}%)  [{method}, step {ck.step}, {steps} inner steps]", file=out)
        result[M.LAKE_ERROR_PCT] = err
        return result
    problems = memory_problems(cfg, episodes=episodes) or check_data(cfg, [split])
    if problems:
        raise ConfigError(problems)
    executor = LocalExecutor(cfg)
    learner = executor.worker.learner
    expected = learner.algorithm.init_params(dict(learner.model.named_parameters()))
    if finetune is not None:  # fine-tuning reads the body only (its head starts from the prototypes): any data.ways
        expected, params = ({k: v for k, v in d.items() if not k.startswith(HEAD_PREFIX)} for d in (expected, params))
    check_params(expected, params, f"checkpoint {ckpt_path}")
    per_task = evaluate_tasks(executor, params, split, episodes, steps, max_shard_tasks=cfg.optim.meta_batch_size)
    d = cfg.data
    task = "regression" if is_regression(cfg) else f"{d.ways}-way {d.shots}-shot"
    print(f"meta-test on {d.source}/{split}: {episodes} episodes, {task}, {steps} inner steps, step {ck.step} "
          f"[{method}]", file=out)
    for name, values in per_task.items():
        result.update(_report(_key(name), name, values, "", out))
    # a multi-domain source (mtl_ray/data/multidomain.py) says each episode's domain: the same numbers per domain,
    # as Meta-Dataset reports them (a mean over domains hides a domain the model fails on)
    episode_domains = getattr(learner.source, "episode_domains", None)
    if callable(episode_domains):
        domains = episode_domains(split, 0, range(episodes))
        for domain in sorted(set(domains)):
            keep = torch.tensor([d == domain for d in domains])
            for name, values in per_task.items():
                result.update(_report(f"{_key(name)}/{domain}", name, values[keep], f", {int(keep.sum())} episodes",
                                      out))
    return result
