"""Meta-transfer learning: scale and shift a frozen pretrained body, meta-learn them and the head.

Sun, Liu, Chua, Schiele. "Meta-Transfer Learning for Few-Shot Learning", CVPR 2019. A body pretrained
on all source classes is frozen; per-channel scaling ``Φ_S1`` (init 1) and shifting ``Φ_S2`` (init
0) of its layers, and the classifier's initialisation, are meta-learned. The inner loop adapts the
classifier only (as in ANIL), on features of the scaled-and-shifted body. Here the classifier starts
at zero and stays there as the initialisation (see :meth:`MTL.is_frozen`), so before any
meta-training MTL is the pretrain-only baseline (a linear head fine-tuned on the support set) and the
outer loop learns only the scale and shift.

The paper scales each conv's filters and shifts its bias. In a body whose convs are followed by
batch-statistics normalisation (Conv4 here) those would be cancelled exactly (the normalisation is
invariant to a per-channel affine map of its input), so here the scale and shift act on the
normalised output of each layer instead (``weight * Φ_S1``, ``bias + Φ_S2`` of each batch norm),
where they change the features the way the paper intends. Bodies without normalisation (the MLP)
get the paper's form on their linear layers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mtl_ray.algorithms.base import EXTRA_PREFIX, Params, State
from mtl_ray.algorithms.gradient import ANIL
from mtl_ray.models import BODY_PREFIX, HEAD_PREFIX, body_params, modulated_layers


class MTL(ANIL):
    """ANIL's head-only inner loop on a frozen body modulated by meta-learned ``meta.ss.*`` parameters.

    ``params`` hold the frozen ``body.*`` weights and zero ``head.*`` initialisation (never given a
    meta-gradient) and, per modulated layer ``L`` with ``C`` output channels, ``meta.ss.scale.L [C]``
    and ``meta.ss.shift.L [C]``.
    """

    name = "mtl"
    needs_init = True  # it meta-learns the scale and shift of a pretrained, frozen body
    SCALE = EXTRA_PREFIX + "ss.scale."
    SHIFT = EXTRA_PREFIX + "ss.shift."

    def __init__(self, model: nn.Module, **kwargs: Any):  # FunctionalAlgorithm's keyword arguments
        super().__init__(model, **kwargs)
        self.layers = modulated_layers(model)

    def init_params(self, model_params: Params) -> Params:
        # The head starts at zero (as for every algorithm started from a pretrained body, and here even without
        # one): step 0 is then exactly the pretrain-only linear probe (:func:`mtl_ray.algorithms.linear_probe`).
        out = {k: torch.zeros_like(v) if k.startswith(HEAD_PREFIX) else v for k, v in model_params.items()}
        for layer in self.layers:
            channels = model_params[f"{layer}.weight"].shape[0]
            out[self.SCALE + layer] = torch.ones(channels)
            out[self.SHIFT + layer] = torch.zeros(channels)
        return out

    def is_frozen(self, key: str) -> bool:
        # The head stays at its zero initialisation too. Sun et al. meta-learn it, but in N-way episodes the
        # classes are permuted at random, so its meta-gradient is zero-mean noise, which Adam turns into
        # lr-sized steps that cost accuracy (docs/benchmarks.md, "Meta-transfer learning").
        return key.startswith((BODY_PREFIX, HEAD_PREFIX))

    def modulated_body(self, params: Params) -> Params:
        """The body's weights with every modulated layer's output scaled and shifted per channel."""
        body = body_params(params)
        for layer in self.layers:
            w, scale = body[f"{layer}.weight"], params[self.SCALE + layer]
            body[f"{layer}.weight"] = w * scale.view(-1, *([1] * (w.dim() - 1)))
            body[f"{layer}.bias"] = body[f"{layer}.bias"] + params[self.SHIFT + layer]
        return body

    def features(self, params: Params, x: torch.Tensor, state: State | None = None) -> torch.Tensor:
        return super().features({**params, **self.modulated_body(params)}, x, state)

    def body_weights(self, params: Params) -> Params:
        return super().body_weights(self.modulated_body(params))
