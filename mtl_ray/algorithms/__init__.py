"""Meta-learning algorithms as pure functions over parameter dicts (``torch.func``). Never imports ray."""

from __future__ import annotations

from torch import nn

from mtl_ray.algorithms.base import ACC, LOSS, FunctionalAlgorithm, MetaAlgorithm, Params, ShardResult
from mtl_ray.algorithms.gradient import ANIL, MAML, MetaSGD
from mtl_ray.algorithms.metric import ProtoNet, RelationNetwork
from mtl_ray.algorithms.reptile import Reptile
from mtl_ray.config import Config

__all__ = ["ACC", "ALGORITHMS", "ANIL", "LOSS", "MAML", "FunctionalAlgorithm", "MetaAlgorithm", "MetaSGD",
           "Params", "ProtoNet", "RelationNetwork", "Reptile", "ShardResult", "build_algorithm",
           "uses_head"]

ALGORITHMS: dict[str, type[FunctionalAlgorithm]] = {
    cls.name: cls for cls in (MAML, MetaSGD, Reptile, ANIL, ProtoNet, RelationNetwork)
}


def uses_head(name: str) -> bool:
    """Whether the algorithm's model needs a ``ways``-output head (metric learners do not)."""
    return name not in (ProtoNet.name, RelationNetwork.name)


def build_algorithm(cfg: Config, model: nn.Module, kind: str, ways: int) -> FunctionalAlgorithm:
    a = cfg.algorithm
    if a.name not in ALGORITHMS:
        raise ValueError(f"algorithm.name: got {a.name!r}, expected one of {', '.join(ALGORITHMS)}")
    kwargs = dict(kind=kind, inner_lr=a.inner_lr, inner_steps=a.inner_steps, first_order=a.first_order,
                  chunk_size=a.task_chunk_size)
    cls = ALGORITHMS[a.name]
    if cls in (ProtoNet, RelationNetwork):
        return cls(model, ways=ways, **kwargs)
    return cls(model, **kwargs)
