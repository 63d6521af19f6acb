"""The pretrain-only baseline: a linear probe on a pretrained body, as the config and meta-parameters of ANIL."""

from __future__ import annotations

from mtl_ray.algorithms.base import Params
from mtl_ray.algorithms.gradient import ANIL
from mtl_ray.algorithms.learner import TaskShape, build_learner, initial_meta_params
from mtl_ray.config import Config
from mtl_ray.models import body_params


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
