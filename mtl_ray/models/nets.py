"""Model skeletons. Parameters live in dicts and are applied with ``torch.func.functional_call``.

Every model has a ``body`` (feature extractor) and, when ``out_features > 0``, a linear ``head``;
ANIL adapts only ``head.*`` and metric-based learners use the body alone. Forward passes take
``ref``: normalisation statistics come from the first ``ref`` rows of the input (the support set
under ``model.norm=support``), or from all rows when None (see :mod:`mtl_ray.models.layers`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from mtl_ray.config import Config, ModelConfig
from mtl_ray.models.layers import Blocks, ConvBlock, block_output_size

HEAD_PREFIX = "head."
# conv_impl native / im2col: the first block's norm is not folded away (fitted: docs/benchmarks.md, "Memory estimate")
UNFOLDED_BN_FACTOR = 2.0


def conv_block_floats(c_in: int, size: int, channels: int, blocks: int, downsample: str, impl: str,
                      pooled: int | None = None) -> tuple[float, int]:
    """(activation floats one example keeps in a forward pass, output side) of Conv4-style blocks.

    Each block keeps about two maps at conv resolution and two at its output resolution, plus the 3x3 patches
    of an unfolded block (fitted to resident set sizes: docs/benchmarks.md, "Memory estimate").
    """
    pooled = blocks if pooled is None else pooled
    floats = 0.0
    for i in range(blocks):
        cin = c_in if i == 0 else channels
        down = i < pooled
        conv_side = size if (downsample == "pool" or not down) else (size + 1) // 2
        out_side = size // 2 if (downsample == "pool" and down) else conv_side
        if impl == "im2col" or (impl == "folded" and cin * 9 <= 27):
            floats += 9 * cin * conv_side**2  # the unfolded 3x3 patches
        floats += channels * (2 * conv_side**2 + 2 * out_side**2)
        size = out_side
    return floats, size


class MLP(nn.Module):
    """``x [N, D] -> [N, out]``; 1-40-40-1 for sinusoid regression (Finn et al. 2017)."""

    image_input: ClassVar[bool] = False  # any input: images are flattened
    config_keys: ClassVar[frozenset[str]] = frozenset({"name", "init", "hidden_sizes"})  # the model.* keys it reads

    @classmethod
    def from_config(cls, m: ModelConfig, x_shape: tuple[int, ...], out_features: int) -> MLP:
        in_features = 1
        for s in x_shape:
            in_features *= s
        return cls(in_features, m.hidden_sizes, out_features)

    @staticmethod
    def config_problems(cfg: Config) -> list[str]:
        return []

    @staticmethod
    def activation_floats(cfg: Config, x_shape: tuple[int, ...], out_features: int) -> tuple[float, float]:
        """(floats a forward pass keeps per example, per task besides them): two per hidden unit, the outputs."""
        return 2.0 * sum(cfg.model.hidden_sizes) + out_features, 0.0

    def __init__(self, in_features: int, hidden_sizes: tuple[int, ...], out_features: int):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_features
        for h in hidden_sizes:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        self.body = Blocks(nn.Flatten(), *layers)
        self.feature_dim = prev
        self.head = nn.Linear(prev, out_features) if out_features else None

    def forward(self, x: torch.Tensor, ref: int | None = None, ref_grad: bool = True) -> torch.Tensor:
        z = self.body(x)  # no normalisation: ``ref`` changes nothing
        return self.head(z) if self.head is not None else z


class Conv4(nn.Module):
    """The standard 4-block conv net (Vinyals et al. 2016; Finn et al. 2017).

    ``x [N, C, S, S] -> [N, out]`` (or ``[N, feature_dim]`` without a head). Each block is a
    3x3 conv with ``channels`` filters, batch norm, ReLU and 2x2 max-pool (``downsample="pool"``) or
    a stride-2 conv (``"stride"``); ``pooled_blocks`` limits downsampling to the first blocks
    (Relation Networks keep the last two at full size).
    """

    image_input: ClassVar[bool] = True  # ``[C, S, S]`` inputs
    config_keys: ClassVar[frozenset[str]] = frozenset({"name", "init", "channels", "blocks", "downsample", "conv_impl",
                                                       "norm"})

    @classmethod
    def from_config(cls, m: ModelConfig, x_shape: tuple[int, ...], out_features: int) -> Conv4:
        return cls(x_shape[0], x_shape[-1], out_features, channels=m.channels, blocks=m.blocks,
                   downsample=m.downsample, impl=m.conv_impl)

    @staticmethod
    def config_problems(cfg: Config) -> list[str]:
        """Every pooling block halves the image: ``model.blocks`` of them need ``2 ** blocks`` pixels a side."""
        m, d = cfg.model, cfg.data
        if m.downsample == "pool" and d.image_size < 2 ** m.blocks:
            return [f"data.image_size: got {d.image_size}, expected >= {2 ** m.blocks} for {m.blocks} "
                    "pooling blocks (lower model.blocks or raise the image size)"]
        return []

    @staticmethod
    def activation_floats(cfg: Config, x_shape: tuple[int, ...], out_features: int) -> tuple[float, float]:
        """(floats a forward pass keeps per example, per task besides them), see :func:`conv_block_floats`."""
        m = cfg.model
        floats, _ = conv_block_floats(x_shape[0], x_shape[-1], m.channels, m.blocks, m.downsample, m.conv_impl)
        return floats * (1.0 if m.conv_impl == "folded" else UNFOLDED_BN_FACTOR) + out_features, 0.0

    def __init__(self, in_channels: int, image_size: int, out_features: int, *, channels: int = 64,
                 blocks: int = 4, downsample: str = "pool", impl: str = "folded",
                 pooled_blocks: int | None = None, flatten: bool = True):
        super().__init__()
        pooled = blocks if pooled_blocks is None else pooled_blocks
        self.body = Blocks(*[
            ConvBlock(in_channels if i == 0 else channels, channels, downsample=downsample,
                      pool=i < pooled, impl=impl)
            for i in range(blocks)
        ])
        self.flatten = flatten
        side = block_output_size(image_size, blocks, downsample, pooled)
        self.out_shape = (channels, side, side)
        self.feature_dim = channels * side * side
        self.head = nn.Linear(self.feature_dim, out_features) if out_features else None

    def forward(self, x: torch.Tensor, ref: int | None = None, ref_grad: bool = True) -> torch.Tensor:
        z = self.body(x, ref, ref_grad)
        if self.flatten:
            z = z.flatten(1)
        return self.head(z) if self.head is not None else z


class RelationNet(nn.Module):
    """Relation Network (Sung et al., CVPR 2018): embedding ``f`` and relation module ``g``.

    ``body``: Conv4 with the first two blocks pooled -> ``[N, 64, S/4, S/4]`` feature maps.
    ``relation``: two conv blocks on concatenated pairs ``[P, 128, S/4, S/4]`` -> FC(8) -> FC(1) ->
    sigmoid, giving relation scores in (0, 1).

    Not a ``model.name`` choice: the relationnet algorithm builds it (``RelationNetwork.model_class``) from
    conv4's settings (``model.channels``, ``model.downsample``, ``model.conv_impl``).
    """

    image_input: ClassVar[bool] = True
    config_keys: ClassVar[frozenset[str]] = frozenset({"name", "channels", "downsample", "conv_impl", "norm"})

    @classmethod
    def from_config(cls, m: ModelConfig, x_shape: tuple[int, ...], out_features: int) -> RelationNet:
        """``out_features`` is ignored: the relation module scores each (query, class) pair."""
        return cls(x_shape[0], x_shape[-1], channels=m.channels, downsample=m.downsample, impl=m.conv_impl)

    @staticmethod
    def activation_floats(cfg: Config, x_shape: tuple[int, ...], out_features: int) -> tuple[float, float]:
        """(floats per example: the embedding; per task: the relation module on every (example, class) pair)."""
        m, d = cfg.model, cfg.data
        body, side = conv_block_floats(x_shape[0], x_shape[-1], m.channels, 4, m.downsample, m.conv_impl, 2)
        rel, _ = conv_block_floats(2 * m.channels, side, m.channels, 2, m.downsample, m.conv_impl)
        pairs = d.ways * d.ways * (d.shots + d.queries)
        return body, pairs * (rel + 2 * m.channels * side**2)

    def __init__(self, in_channels: int, image_size: int, *, channels: int = 64, downsample: str = "pool",
                 impl: str = "folded", hidden: int = 8):
        super().__init__()
        # Only the encoder's body is registered (as ``body``): registering the encoder too named its weights
        # ``encoder.body.*``, which the algorithm's ``body.*`` lookup never found, so the embedding stayed at init.
        encoder = Conv4(in_channels, image_size, 0, channels=channels, blocks=4, downsample=downsample,
                        impl=impl, pooled_blocks=2, flatten=False)
        self.body = encoder.body
        c, s, _ = encoder.out_shape
        self.relation = Blocks(
            ConvBlock(2 * c, c, downsample=downsample, impl=impl),
            ConvBlock(c, c, downsample=downsample, impl=impl),
        )
        side = block_output_size(s, 2, downsample)
        self.fc1 = nn.Linear(c * side * side, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        self.feature_shape = (c, s, s)

    def forward(self, x: torch.Tensor, ref: int | None = None, ref_grad: bool = True) -> torch.Tensor:
        return self.body(x, ref, ref_grad)
