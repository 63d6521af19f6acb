"""Meta-learning algorithms as pure functions over parameter dicts (``torch.func``). Never imports ray."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mtl_ray.algorithms.base import ACC, LOSS, FunctionalAlgorithm, MetaAlgorithm, Params, ShardResult
from mtl_ray.algorithms.gradient import ANIL, MAML, MetaSGD
from mtl_ray.algorithms.metric import ProtoNet, RelationNetwork
from mtl_ray.algorithms.mtl import MTL
from mtl_ray.algorithms.reptile import Reptile
from mtl_ray.config import Config
from mtl_ray.data import build_task_source
from mtl_ray.data.base import TaskSource
from mtl_ray.models import HEAD_PREFIX, body_params, build_model, initial_params

__all__ = [
    "ACC",
    "ALGORITHMS",
    "ANIL",
    "LOSS",
    "MAML",
    "MTL",
    "FunctionalAlgorithm",
    "Learner",
    "MetaAlgorithm",
    "MetaSGD",
    "Params",
    "ProtoNet",
    "RelationNetwork",
    "Reptile",
    "ShardResult",
    "TaskShape",
    "build_algorithm",
    "build_learner",
    "initial_meta_params",
    "linear_probe",
    "uses_head",
]

ALGORITHMS: dict[str, type[FunctionalAlgorithm]] = {
    cls.name: cls for cls in (MAML, MetaSGD, Reptile, ANIL, ProtoNet, RelationNetwork, MTL)
}


def uses_head(name: str) -> bool:
    """Whether the algorithm's model needs a ``ways``-output head (metric learners do not)."""
    return name not in (ProtoNet.name, RelationNetwork.name)


def build_algorithm(cfg: Config, model: nn.Module, kind: str, ways: int) -> FunctionalAlgorithm:
    a = cfg.algorithm
    if a.name not in ALGORITHMS:
        raise ValueError(f"algorithm.name: got {a.name!r}, expected one of {', '.join(ALGORITHMS)}")
    kwargs = dict(kind=kind, inner_lr=a.inner_lr, inner_steps=a.inner_steps, first_order=a.first_order,
                  chunk_size=a.task_chunk_size, compile=a.compile, norm=cfg.model.norm)
    cls = ALGORITHMS[a.name]
    if cls in (ProtoNet, RelationNetwork):
        return cls(model, ways=ways, **kwargs)
    return cls(model, **kwargs)


@dataclass(frozen=True)
class TaskShape:
    """What a model must fit: task kind, one input's shape and the number of outputs (ways)."""

    kind: str
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


def build_learner(cfg: Config, source: TaskSource | None = None, shape: TaskShape | None = None) -> Learner:
    """Model skeleton and algorithm for ``shape``; builds the task source from ``cfg.data`` when
    neither a source nor a shape is given."""
    if shape is None:
        source = build_task_source(cfg) if source is None else source
        shape = TaskShape.of(source)
    out = shape.ways if uses_head(cfg.algorithm.name) else 0
    model = build_model(cfg, shape.x_shape, out)
    return Learner(shape, model, build_algorithm(cfg, model, shape.kind, shape.ways), source)


def initial_meta_params(cfg: Config, learner: Learner, init: Params | None = None) -> Params:
    """The meta-parameters at step 0: model weights seeded by ``cfg.seed`` plus algorithm extras.

    ``init`` (a pretrained body) replaces the body's entries, and then the head starts at zero: every
    class starts equal, and one inner step on a support set already gives a prototype-like classifier
    over the pretrained features instead of undoing a random head.
    """
    params = initial_params(learner.model, cfg.seed)
    for k, v in (init or {}).items():
        if k not in params or params[k].shape != v.shape:
            got = "missing" if k not in params else tuple(params[k].shape)
            raise ValueError(f"initial weights {k!r}: shape {tuple(v.shape)}, the model has {got}")
        params[k] = v.detach().clone().to(params[k].dtype)
    if init:
        params = {k: torch.zeros_like(v) if k.startswith(HEAD_PREFIX) else v for k, v in params.items()}
    return learner.algorithm.init_params(params)


def linear_probe(cfg: Config, params: Params, shape: TaskShape) -> tuple[Config, Params]:
    """Score a pretrained body "pretrain-only": the config and meta-parameters of ANIL with a zero head.

    The Baseline of Chen, Liu, Kira, Wang, Huang, "A Closer Look at Few-shot Classification", ICLR
    2019: the body stays as pretrained; on each support set a zero-initialised linear head over its
    features takes ``pretrain.probe_steps`` full-batch gradient steps of size ``pretrain.probe_lr``.
    ``shape.ways`` sets the head's outputs.
    """
    probe = cfg.replace(**{"algorithm.name": ANIL.name, "algorithm.inner_lr": cfg.pretrain.probe_lr,
                           "algorithm.eval_inner_steps": cfg.pretrain.probe_steps, "algorithm.first_order": True,
                           "model.init": ""})
    learner = build_learner(probe, shape=shape)
    return probe, initial_meta_params(probe, learner, init=body_params(params))  # given a body: a zero head
