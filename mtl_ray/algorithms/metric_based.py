"""Metric-based learners: the support set defines a classifier without gradient steps.

* Prototypical Networks — Snell, Swersky, Zemel. "Prototypical Networks for Few-shot Learning",
  NeurIPS 2017. Logits are negative squared Euclidean distances to class-mean embeddings.
* Relation Networks — Sung, Yang, Zhang, Xiang, Torr, Hospedales. "Learning to Compare: Relation
  Network for Few-Shot Learning", CVPR 2018. A learned module scores (query, class) feature pairs
  in (0, 1), trained with MSE against one-hot targets; class features are sums over the shots.
* Meta-Baseline — Chen, Liu, Xu, Darrell, Wang. "Meta-Baseline: Exploring Simple Meta-Learning for
  Few-Shot Learning", ICCV 2021. Logits are ``tau * cos(f(x_q), c_n)`` to the class-mean embeddings
  ``c_n``, with a learned temperature ``tau`` (init 10), meta-trained from a pretrained classifier's
  body (``model.init``) or from scratch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mtl_ray.algorithms.base import EXTRA_PREFIX, SUPPORT_X, FunctionalAlgorithm, Params, State
from mtl_ray.algorithms.gradient import sub
from mtl_ray.config import AlgorithmConfig
from mtl_ray.models import RelationNet


def one_hot(y: torch.Tensor, ways: int, dtype: torch.dtype) -> torch.Tensor:
    """``y [M]`` -> ``[M, ways]`` (vmap-safe: a comparison, not ``F.one_hot``)."""
    return (y.unsqueeze(-1) == torch.arange(ways, device=y.device)).to(dtype)


class EmbeddingLearner(FunctionalAlgorithm):
    """A classifier built in closed form on the body's embeddings of the support set: no head, no inner steps."""

    uses_head = False
    has_inner_loop = False
    supports_regression = False  # its scores are per class

    def embed(self, params: Params, x: torch.Tensor, state: State | None = None) -> torch.Tensor:
        """Embeddings ``[M, D]`` of ``x``; with an adapted ``state``, normalised as its queries are."""
        # get_submodule, not self.model.body: a Module's attribute is typed ``Tensor | Module``, this a Module.
        return self.forward(self.model.get_submodule("body"), sub(params, "body."), x, state or {}).flatten(1)


class ProtoNet(EmbeddingLearner):
    """Class prototypes from the support set's embeddings (``ways`` of them); no head, no inner steps."""

    name = "protonet"

    def adapt(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, steps: int = 0) -> State:
        """Prototypes ``[N, D]``: the mean embedding of each class's support examples."""
        z = self.embed(params, support_x)  # [N*K, D]
        onehot = one_hot(support_y, self.ways, z.dtype)  # [N*K, N]
        protos = (onehot.t() @ z) / onehot.sum(0).clamp_min(1.0).unsqueeze(-1)
        return self.keep_support({"prototypes": protos}, support_x)

    def predict(self, params: Params, state: State, query_x: torch.Tensor) -> torch.Tensor:
        """Logits ``[Q, N]`` = ``-||f(x_q) - c_n||^2``."""
        zq = self.embed(params, query_x, state)  # [Q, D]
        return -(zq.unsqueeze(1) - state["prototypes"].unsqueeze(0)).pow(2).sum(-1)


def starting_scalar(value: float, like: Params) -> torch.Tensor:
    """A 0-d meta-parameter holding ``value``, in the dtype of the model's weights in ``like`` (the default one
    when it has none)."""
    dtype = next(iter(like.values())).dtype if like else torch.get_default_dtype()
    return torch.tensor(float(value), dtype=dtype)


def check_positive(what: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what}: got {value!r}, expected a finite value > 0")
    return value


class MetaBaseline(ProtoNet):
    """ProtoNet's class means scored by cosine similarity times a learned temperature ``params["meta.temperature"]``.

    Chen et al. 2021, eq. 1: ``p(y = n | x) = softmax_n(tau * cos(f(x), c_n))`` with ``c_n`` the mean embedding of
    class ``n``'s support examples (not normalised before averaging). The temperature starts at ``temperature``
    (``algorithm.temperature``; the paper's 10) and is a meta-parameter like the body. Logits are invariant to any
    positive rescaling of the embedding; only its direction matters.
    """

    name = "meta_baseline"
    TEMPERATURE = EXTRA_PREFIX + "temperature"

    def __init__(self, model: nn.Module, *, temperature: float = 10.0, **kwargs: Any):  # FunctionalAlgorithm's
        super().__init__(model, **kwargs)
        self.temperature = check_positive("temperature", temperature)

    @classmethod
    def config_kwargs(cls, a: AlgorithmConfig) -> dict[str, Any]:
        return {"temperature": a.temperature}

    def init_params(self, model_params: Params) -> Params:
        return {**model_params, self.TEMPERATURE: starting_scalar(self.temperature, model_params)}

    def predict(self, params: Params, state: State, query_x: torch.Tensor) -> torch.Tensor:
        """Logits ``[Q, N]`` = ``tau * cos(f(x_q), c_n)``."""
        zq = F.normalize(self.embed(params, query_x, state), dim=-1)  # [Q, D]
        protos = F.normalize(state["prototypes"], dim=-1)  # [N, D]
        return params[self.TEMPERATURE] * (zq @ protos.t())


class RelationNetwork(FunctionalAlgorithm):
    """A learned relation module scores (query, class) pairs; builds its own :class:`RelationNet`."""

    name = "relationnet"
    uses_head = False
    has_inner_loop = False
    supports_regression = False  # scores are per class
    accepts_init = False  # its embedding (two pooled blocks of four) has another layout than a pretrained body
    model_class = RelationNet
    model_names = ("conv4",)  # RelationNet reads conv4's settings (model.channels, downsample, conv_impl)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """MSE between relation scores ``[Q, N]`` and one-hot targets (Sung et al. 2018, eq. 3)."""
        return F.mse_loss(out, one_hot(y, self.ways, out.dtype))

    def encode(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model.get_submodule("body"), sub(params, "body."), (x,))  # [M, C, s, s]

    def adapt(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, steps: int = 0) -> State:
        """Class feature maps ``[N, C, s, s]``: sums of each class's support embeddings."""
        f = self.encode(params, support_x)
        onehot = one_hot(support_y, self.ways, f.dtype)  # [N*K, N]
        summed = onehot.t() @ f.flatten(1)
        return self.keep_support({"class_features": summed.view(self.ways, *f.shape[1:])}, support_x)

    def predict(self, params: Params, state: State, query_x: torch.Tensor) -> torch.Tensor:
        """Relation scores ``[Q, N]`` in (0, 1).

        Under norm="support" the relation module's statistics come from the support examples' pairs with
        the classes, which run in front of the queries' pairs (as the embedding's come from the support set).
        """
        support = state.get(SUPPORT_X)
        s = 0 if support is None else support.shape[0]
        x = query_x if support is None else torch.cat([support, query_x])
        f = functional_call(self.model.get_submodule("body"), sub(params, "body."), (x,),
                            self.norm_kwargs(s) if s else {})
        fc = state["class_features"]  # [N, C, s, s]
        m, n = f.shape[0], fc.shape[0]  # f: [S+Q, C, s, s]
        pairs = torch.cat([fc.unsqueeze(0).expand(m, *fc.shape), f.unsqueeze(1).expand(m, n, *f.shape[1:])],
                          dim=2).flatten(0, 1)  # [(S+Q)*N, 2C, s, s]
        z = functional_call(self.model.get_submodule("relation"), sub(params, "relation."), (pairs,),
                            self.norm_kwargs(s * n) if s else {})
        z = torch.relu(functional_call(self.model.get_submodule("fc1"), sub(params, "fc1."), (z.flatten(1),)))
        scores = torch.sigmoid(functional_call(self.model.get_submodule("fc2"), sub(params, "fc2."), (z,)))
        scores = scores.view(m, n)
        return scores[s:]
