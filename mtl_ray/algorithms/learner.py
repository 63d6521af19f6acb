"""What a process needs to compute meta-gradients for a config: the task shape, the model and the algorithm,
and the meta-parameters at step 0."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from mtl_ray.algorithms.base import FunctionalAlgorithm, Params
from mtl_ray.algorithms.finetune import FineTune
from mtl_ray.algorithms.registry import algorithm_class
from mtl_ray.config import Config
from mtl_ray.data import build_task_source
from mtl_ray.data.base import TaskKind, TaskSource
from mtl_ray.models import HEAD_PREFIX, build_model, initial_params


@dataclass(frozen=True)
class TaskShape:
    """What a model must fit: task kind, one input's shape and the number of outputs (ways)."""

    kind: TaskKind
    x_shape: tuple[int, ...]
    ways: int

    @staticmethod
    def of(source: TaskSource) -> TaskShape:
        return TaskShape(source.kind, tuple(source.x_shape), int(source.ways))


@dataclass(frozen=True)
class Learner:
    """Everything a process needs to compute meta-gradients for a config (``source`` may be None
    when only adapting and predicting, e.g. from a checkpoint)."""

    shape: TaskShape
    model: nn.Module
    algorithm: FunctionalAlgorithm
    source: TaskSource | None = None
    # algorithm.finetune_steps > 0: test-time fine-tuning, how validation, eval, the API and serving adapt instead of
    # algorithm.adapt/predict (mtl_ray/algorithms/finetune.py); None: as trained
    finetune: FineTune | None = None


def build_algorithm(cfg: Config, model: nn.Module, kind: TaskKind, ways: int) -> FunctionalAlgorithm:
    """The ``algorithm.name`` algorithm over ``model`` for tasks of ``kind`` with ``ways`` classes."""
    a = cfg.algorithm
    cls = algorithm_class(a.name)
    return cls(model, kind=kind, inner_lr=a.inner_lr, inner_steps=a.inner_steps, first_order=a.first_order,
               chunk_size=a.task_chunk_size, compile=a.compile, norm=cfg.model.norm, ways=ways,
               **cls.config_kwargs(a))


def build_learner(cfg: Config, source: TaskSource | None = None, shape: TaskShape | None = None) -> Learner:
    """Model skeleton and algorithm for ``shape``; builds the task source from ``cfg.data`` when
    neither a source nor a shape is given."""
    if shape is None:
        source = build_task_source(cfg) if source is None else source
        shape = TaskShape.of(source)
    cls = algorithm_class(cfg.algorithm.name)
    model = build_model(cfg, shape.x_shape, shape.ways if cls.uses_head else 0, cls=cls.model_class)
    return Learner(shape, model, build_algorithm(cfg, model, shape.kind, shape.ways), source,
                   FineTune.from_config(cfg))


def check_param_shapes(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], what: str,
                       *, partial: bool = False) -> list[str]:
    """One problem per entry of ``got`` whose shape differs from ``expected``'s or that ``expected`` lacks, and
    (unless ``partial``: ``got`` may hold a subset, e.g. a pretrained body) per entry of ``expected`` that ``got``
    lacks, each naming ``what`` (e.g. "model.init 'runs/pre'"), the key, both shapes and the fix; empty when
    they fit."""
    problems = []
    for k in sorted(got.keys() | (set() if partial else expected.keys())):
        have = tuple(got[k].shape) if k in got else "missing"
        want = tuple(expected[k].shape) if k in expected else "none (the model has no such entry)"
        if have != want:
            problems.append(f"{what} {k!r}: got shape {have}, expected {want}; use weights written for this "
                            "config's model (same model.* settings and task shape)")
    return problems


def initial_meta_params(cfg: Config, learner: Learner, init: Params | None = None) -> Params:
    """The meta-parameters at step 0: model weights seeded by ``cfg.seed`` plus algorithm extras.

    ``init`` (a pretrained body) replaces the body's entries, and then the head starts at zero: every
    class starts equal, and one inner step on a support set already gives a prototype-like classifier
    over the pretrained features instead of undoing a random head.
    """
    params = initial_params(learner.model, cfg.seed)
    problems = check_param_shapes(params, init or {}, "initial weights", partial=True)
    if problems:
        raise ValueError("; ".join(problems))
    for k, v in (init or {}).items():
        params[k] = v.detach().clone().to(params[k].dtype)
    if init:
        params = {k: torch.zeros_like(v) if k.startswith(HEAD_PREFIX) else v for k, v in params.items()}
    return learner.algorithm.init_params(params)
