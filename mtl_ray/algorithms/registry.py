"""The algorithms a config may name (``algorithm.name``): one line each, keyed by the class's ``name``.

Adding an algorithm: its module (a :class:`~mtl_ray.algorithms.base.FunctionalAlgorithm` subclass whose class
attributes state its capabilities), its test and one line in :data:`ALGORITHMS`. The config checks
(:mod:`mtl_ray.components`), :func:`~mtl_ray.algorithms.learner.build_learner` and the float64 vmap-vs-loop grid
(tests/algorithms/test_grid.py) read everything else from the class.
"""

from __future__ import annotations

from mtl_ray.algorithms.base import FunctionalAlgorithm
from mtl_ray.algorithms.closed_form import R2D2
from mtl_ray.algorithms.gradient import ANIL, MAML, MetaSGD
from mtl_ray.algorithms.metric_based import MetaBaseline, ProtoNet, RelationNetwork
from mtl_ray.algorithms.mtl import MTL
from mtl_ray.algorithms.reptile import Reptile

ALGORITHMS: dict[str, type[FunctionalAlgorithm]] = {cls.name: cls for cls in (
    MAML,
    MetaSGD,
    Reptile,
    ANIL,
    ProtoNet,
    RelationNetwork,
    MTL,
    MetaBaseline,
    R2D2,
)}


def algorithm_class(name: str) -> type[FunctionalAlgorithm]:
    """The class registered as ``name`` (:class:`ValueError` naming the known ones when there is none)."""
    cls = ALGORITHMS.get(name)
    if cls is None:
        raise ValueError(f"algorithm.name: got {name!r}, expected one of: {', '.join(ALGORITHMS)}")
    return cls


def uses_head(name: str) -> bool:
    """Whether the algorithm's model needs a ``ways``-output head (metric learners do not)."""
    return algorithm_class(name).uses_head
