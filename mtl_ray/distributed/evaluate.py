"""Meta-testing: adapt on each task's support set, score its query set, report mean and 95% CI."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from mtl_ray.algorithms import Learner, Params, TaskShape, build_learner, uses_head
from mtl_ray.config import Config, UserError
from mtl_ray.data.lake import LakeRun, lake_error_rate
from mtl_ray.distributed.executor import Executor, shard


class EvalError(UserError):
    pass


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95% confidence interval."""
    v = values.double().flatten()
    n = v.numel()
    half = 1.96 * float(v.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
    return float(v.mean()), half


def evaluate_tasks(executor: Executor, params: Params, split: str, num_tasks: int, inner_steps: int,
                   step: int = 0, max_shard_tasks: int = 0) -> dict[str, torch.Tensor]:
    """Per-task metrics ``{name: [num_tasks]}`` on the fixed tasks ``(split, step, 0..num_tasks-1)``.

    Shards hold at most ``max_shard_tasks`` tasks (0: no limit): 600 MAML episodes with 15 queries per
    class adapted at once need over 24 GB, while a training meta-batch's worth is known to fit.
    Tasks are pure functions of their index, so the split does not change any result.
    """
    pieces = shard(range(num_tasks), executor.num_shards)
    if max_shard_tasks > 0:
        pieces = [p[i:i + max_shard_tasks] for p in pieces for i in range(0, len(p), max_shard_tasks)]
    parts = executor.evaluate(params, split, step, pieces, inner_steps)
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def check_params(learner: Learner, params: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise a clear error when ``params`` do not fit the model built for this evaluation."""
    want = learner.algorithm.init_params({k: v for k, v in learner.model.named_parameters()})
    bad = [f"{k}: checkpoint {tuple(params[k].shape) if k in params else 'missing'}, model {tuple(v.shape)}"
           for k, v in want.items() if k not in params or params[k].shape != v.shape]
    if bad:
        raise EvalError(f"{what}: the checkpoint's weights do not fit the evaluation model ({'; '.join(bad[:3])}). "
                        f"Head-based algorithms need the same data.ways and image size as in training; "
                        f"pass matching key=value overrides or use a metric learner (protonet).")


def lake_predictions(cfg: Config, params: Params, shape: TaskShape, runs: list[LakeRun],
                     inner_steps: int) -> list[torch.Tensor]:
    """Predicted class indices ``[20]`` for each of Lake's 20-way one-shot runs."""
    ways = int(runs[0].support_y.numel())
    if uses_head(cfg.algorithm.name) and shape.ways != ways:
        raise EvalError(f"data.ways: the checkpoint was trained {shape.ways}-way with a {shape.ways}-output head, "
                        f"expected {ways} for Lake's {ways}-way runs; train with data.ways={ways} or use protonet")
    x_shape = tuple(runs[0].support_x.shape[1:])
    if x_shape != tuple(shape.x_shape):
        raise EvalError(f"image shape: Lake runs give {x_shape}, the checkpoint expects {tuple(shape.x_shape)}; "
                        f"load the runs at data.image_size={shape.x_shape[-1]}")
    learner = build_learner(cfg, shape=TaskShape(shape.kind, x_shape, ways))
    alg = learner.algorithm
    preds = []
    with torch.no_grad():
        for run in runs:
            state = alg.adapt(params, run.support_x, run.support_y, inner_steps)
            preds.append(alg.predict(params, state, run.query_x).argmax(-1))
    return preds


def lake_error(cfg: Config, params: Params, shape: TaskShape, runs: list[LakeRun], inner_steps: int) -> float:
    """Percentage error over Lake's runs."""
    return lake_error_rate(lake_predictions(cfg, params, shape, runs, inner_steps), runs)
