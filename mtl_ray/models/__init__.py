"""Models: skeletons whose parameters are handled as dicts (see ``mtl_ray.models.nets``)."""

from __future__ import annotations

import torch
from torch import nn

from mtl_ray.config import Config
from mtl_ray.models.nets import HEAD_PREFIX, MLP, Conv4, RelationNet

__all__ = [
    "BODY_PREFIX",
    "HEAD_PREFIX",
    "MLP",
    "Conv4",
    "RelationNet",
    "body_params",
    "build_model",
    "initial_params",
    "modulated_layers",
]

BODY_PREFIX = "body."


def build_model(cfg: Config, x_shape: tuple[int, ...], out_features: int) -> nn.Module:
    """The model for a config. ``out_features`` 0 builds a body without a head (metric learners)."""
    m = cfg.model
    if cfg.algorithm.name == "relationnet":
        return RelationNet(x_shape[0], x_shape[-1], channels=m.channels, downsample=m.downsample,
                           impl=m.conv_impl)
    if m.name == "mlp":
        in_features = 1
        for s in x_shape:
            in_features *= s
        return MLP(in_features, m.hidden_sizes, out_features)
    if m.name == "conv4":
        return Conv4(x_shape[0], x_shape[-1], out_features, channels=m.channels, blocks=m.blocks,
                     downsample=m.downsample, impl=m.conv_impl)
    raise ValueError(f"model.name: got {m.name!r}, expected 'mlp' or 'conv4'")


def initial_params(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Freshly initialised parameters, a pure function of ``seed`` (independent of global RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for mod in model.modules():
            if hasattr(mod, "reset_parameters") and mod is not model:
                mod.reset_parameters()
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
