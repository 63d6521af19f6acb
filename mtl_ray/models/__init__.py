"""Models: skeletons whose parameters are handled as dicts (see ``mtl_ray.models.nets``)."""

from __future__ import annotations

import torch
from torch import nn

from mtl_ray.config import Config
from mtl_ray.models.layers import CosineHead
from mtl_ray.models.nets import HEAD_PREFIX, MLP, Conv4, RelationNet
from mtl_ray.models.registry import MODELS, ModelClass

__all__ = [
    "BODY_PREFIX",
    "HEAD_PREFIX",
    "MLP",
    "MODELS",
    "Conv4",
    "CosineHead",
    "ModelClass",
    "RelationNet",
    "body_params",
    "build_model",
    "build_pretrain_model",
    "initial_params",
    "modulated_layers",
]

BODY_PREFIX = "body."


def build_model(cfg: Config, x_shape: tuple[int, ...], out_features: int,
                cls: type[ModelClass] | None = None) -> nn.Module:
    """The ``model.name`` model (or ``cls``, e.g. an algorithm's own) for inputs of ``x_shape``.

    ``out_features`` 0 builds a body without a head (metric learners).
    """
    if cls is None:
        cls = MODELS.get(cfg.model.name)
        if cls is None:
            raise ValueError(f"model.name: got {cfg.model.name!r}, expected one of: {', '.join(MODELS)}")
    return cls.from_config(cfg.model, x_shape, out_features)


def build_pretrain_model(cfg: Config, x_shape: tuple[int, ...], classes: int) -> nn.Module:
    """The model ``mtl-ray pretrain`` trains: the ``model.name`` body with a head over every one of ``classes``
    train classes, ``pretrain.head`` "linear" (``nn.Linear``) or "cosine" (:class:`CosineHead`, Baseline++)."""
    model = build_model(cfg, x_shape, classes)
    p = cfg.pretrain
    if p.head == "cosine":
        linear = model.get_submodule(HEAD_PREFIX.rstrip("."))
        assert isinstance(linear, nn.Linear), f"{cfg.model.name}: expected an nn.Linear head to replace"
        model.head = CosineHead(linear.in_features, classes, scale=p.head_scale, learn_scale=p.head_scale_learned)
    return model


def initial_params(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Freshly initialised parameters, a pure function of ``seed`` (independent of global RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for mod in model.modules():
            reset = getattr(mod, "reset_parameters", None)
            if callable(reset) and mod is not model:
                reset()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def body_params(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``body.*`` entries of a parameter dict (what a pretrained checkpoint hands on; its head is not)."""
    return {k: v for k, v in params.items() if k.startswith(BODY_PREFIX)}


def modulated_layers(model: nn.Module) -> list[str]:
    """Body layers whose output channels meta-transfer learning scales and shifts (``body.<i>.norm``, ...).

    The body's batch norms when it has any: a per-channel scale or shift of a conv that batch
    statistics normalise next would be cancelled by that normalisation. Otherwise its linear and
    conv layers (the MLP).
    """
    body = model.get_submodule(BODY_PREFIX.rstrip("."))
    norms = [n for n, m in body.named_modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    names = norms or [n for n, m in body.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return [BODY_PREFIX + n for n in names]
