"""Meta-learning algorithms as pure functions over parameter dicts (``torch.func``). Never imports ray.

The package's face: the algorithms (:mod:`~mtl_ray.algorithms.registry`), the learner builder
(:mod:`~mtl_ray.algorithms.learner`) and the pretrain-only probe (:mod:`~mtl_ray.algorithms.probe`).
"""

from __future__ import annotations

from mtl_ray.algorithms.base import ACC, LOSS, FunctionalAlgorithm, MetaAlgorithm, Params, ShardResult
from mtl_ray.algorithms.closed_form import R2D2
from mtl_ray.algorithms.gradient import ANIL, MAML, MetaSGD
from mtl_ray.algorithms.learner import (
    Learner,
    TaskShape,
    build_algorithm,
    build_learner,
    check_param_shapes,
    initial_meta_params,
)
from mtl_ray.algorithms.metric_based import MetaBaseline, ProtoNet, RelationNetwork
from mtl_ray.algorithms.mtl import MTL
from mtl_ray.algorithms.probe import cosine_probe, linear_probe, pretrain_probe, probe_description
from mtl_ray.algorithms.registry import ALGORITHMS, algorithm_class, uses_head
from mtl_ray.algorithms.reptile import Reptile

__all__ = [
    "ACC",
    "ALGORITHMS",
    "ANIL",
    "LOSS",
    "MAML",
    "MTL",
    "R2D2",
    "FunctionalAlgorithm",
    "Learner",
    "MetaAlgorithm",
    "MetaBaseline",
    "MetaSGD",
    "Params",
    "ProtoNet",
    "RelationNetwork",
    "Reptile",
    "ShardResult",
    "TaskShape",
    "algorithm_class",
    "build_algorithm",
    "build_learner",
    "check_param_shapes",
    "cosine_probe",
    "initial_meta_params",
    "linear_probe",
    "pretrain_probe",
    "probe_description",
    "uses_head",
]
