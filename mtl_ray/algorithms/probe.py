"""The pretrain-only baselines: a pretrained body scored without meta-training, as the config and meta-parameters
of an algorithm that adapts it per task (``pretrain.probe``): ANIL with a zero head ("linear") or Meta-Baseline at
step 0 ("cosine")."""

from __future__ import annotations

from mtl_ray.algorithms.base import Params
from mtl_ray.algorithms.gradient import ANIL
from mtl_ray.algorithms.learner import TaskShape, build_learner, initial_meta_params
from mtl_ray.algorithms.metric_based import MetaBaseline
from mtl_ray.config import Config
from mtl_ray.models import HEAD_PREFIX, body_params

PRETRAINED_SCALE = HEAD_PREFIX + "scale"  # a pretrained cosine head's learned scale (mtl_ray/models/layers.py)


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


def cosine_probe(cfg: Config, params: Params, shape: TaskShape) -> tuple[Config, Params]:
    """Score a pretrained body by cosine similarity to the support set's class means: Meta-Baseline at step 0.

    The evaluation of Chen, Liu, Xu, Darrell, Wang, "Meta-Baseline: Exploring Simple Meta-Learning for Few-Shot
    Learning", ICCV 2021 ("Classifier-Baseline"): the frozen body's embeddings, logits ``tau * cos(f(x_q), c_n)``
    with ``c_n`` class ``n``'s mean support embedding; no gradient steps, any number of ways. ``tau`` changes the
    loss, not the accuracy: it is the pretrained cosine head's learned scale when the body was pretrained with one
    (``pretrain.head=cosine``, the scale its features were trained under), else ``algorithm.temperature``.
    """
    scale = params.get(PRETRAINED_SCALE)
    temperature = float(scale) if scale is not None and float(scale) > 0 else cfg.algorithm.temperature
    probe = cfg.replace(**{"algorithm.name": MetaBaseline.name, "algorithm.inner_steps": 0,
                           "algorithm.eval_inner_steps": 0, "algorithm.temperature": temperature, "model.init": ""})
    learner = build_learner(probe, shape=shape)
    return probe, initial_meta_params(probe, learner, init=body_params(params))


PROBES = {"linear": linear_probe, "cosine": cosine_probe}  # pretrain.probe -> how a pretrained body is scored


def pretrain_probe(cfg: Config, params: Params, shape: TaskShape) -> tuple[Config, Params]:
    """The ``pretrain.probe`` probe's config and meta-parameters for a pretrained checkpoint's ``params``."""
    return PROBES[cfg.pretrain.probe](cfg, params, shape)


def probe_description(cfg: Config) -> str:
    """What a probe's config (one :func:`pretrain_probe` returned) does, for eval's summary line."""
    if cfg.algorithm.name == MetaBaseline.name:
        return f"pretrained body + cosine nearest class mean, tau {cfg.algorithm.temperature:g}"
    return f"pretrained body + linear head, lr {cfg.algorithm.inner_lr:g}"
