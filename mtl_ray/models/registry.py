"""The models a config may name (``model.name``): one line each, name -> model class.

Adding a model (a backbone): its class (with the :class:`ModelClass` attributes), its test and one line in
:data:`MODELS`. The config checks (:mod:`mtl_ray.components`), :func:`mtl_ray.models.build_model` and the
float64 vmap-vs-loop grid (tests/algorithms/test_grid.py) read everything else from the class.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

from torch import nn

from mtl_ray.config import Config, ModelConfig
from mtl_ray.models.nets import MLP, Conv4
from mtl_ray.models.resnet import ResNet12


class ModelClass(Protocol):
    """What a registered model class provides besides being an ``nn.Module`` with ``body`` (and ``head``).

    Its forward pass is ``(x, ref=None, ref_grad=True)``: normalised with the first ``ref`` rows' statistics
    (``mtl_ray.models.layers``), and must stay exact under ``torch.func.vmap(grad(...))`` (torch's built-in
    batch norm is not: use :func:`mtl_ray.models.layers.batch_norm`).
    """

    image_input: ClassVar[bool]  # needs ``[C, S, S]`` image inputs (conv4); False: any input (mlp flattens)
    config_keys: ClassVar[frozenset[str]]  # the model.* keys it reads (the others are not logged as MLflow params)

    @classmethod
    def from_config(cls, m: ModelConfig, x_shape: tuple[int, ...], out_features: int) -> nn.Module:
        """The model for one input of ``x_shape`` and ``out_features`` outputs (0: a body without a head)."""
        ...

    @staticmethod
    def config_problems(cfg: Config) -> list[str]:
        """Static problems of ``cfg`` for this model (e.g. images too small for its pooling)."""
        ...

    @staticmethod
    def activation_floats(cfg: Config, x_shape: tuple[int, ...], out_features: int) -> tuple[float, float]:
        """(floats one forward pass keeps per example, floats per task besides them), for inputs of ``x_shape``
        and ``out_features`` outputs: what :mod:`mtl_ray.memory` multiplies by examples, graph depth and bytes.
        Fitted to measured peak memory (docs/benchmarks.md, "Memory estimate"); within ~30% is enough."""
        ...


MODELS: dict[str, type[ModelClass]] = {
    "mlp": MLP,
    "conv4": Conv4,
    "resnet12": ResNet12,
}
