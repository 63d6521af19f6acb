"""Differentiable closed-form base learners on a meta-learned embedding.

* R2-D2 — Bertinetto, Henriques, Torr, Vedaldi. "Meta-learning with differentiable closed-form
  solvers", ICLR 2019. Per task, ridge regression from the support set's embeddings to one-hot
  targets, solved exactly in its Woodbury form (an ``S x S`` system, ``S`` the support examples, not
  ``D x D`` in the embedding's width); the query logits are the regression's outputs scaled by a
  learned ``alpha``. The ridge penalty ``lambda`` is meta-learned too. The whole solve is
  differentiated through, so the embedding is trained for the head it will get.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mtl_ray.algorithms.base import EXTRA_PREFIX, Params, State
from mtl_ray.algorithms.metric_based import EmbeddingLearner, check_positive, one_hot, starting_scalar
from mtl_ray.config import AlgorithmConfig


def with_bias(z: torch.Tensor) -> torch.Tensor:
    """``z [M, D]`` -> ``[M, D + 1]``: a column of ones appended, the regression's bias (Bertinetto et al., §3.1)."""
    return torch.cat([z, torch.ones_like(z[:, :1])], dim=1)


def ridge_weights(x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``W = argmin ||X W - Y||^2 + lam ||W||^2 = X^T (X X^T + lam I)^{-1} Y`` for ``x [S, D]``, ``y [S, N]``.

    The Woodbury form of ``(X^T X + lam I)^{-1} X^T Y``: equal for any ``lam > 0``, and a system of the support
    set's size ``S`` (5 to 25 in few-shot tasks) instead of the embedding's ``D`` (64 to 640 here). Its matrix is
    symmetric positive definite, so the solve is well posed; ``vmap``-safe and differentiable in ``x`` and ``lam``.
    """
    s = x.shape[0]
    gram = x @ x.t() + lam * torch.eye(s, dtype=x.dtype, device=x.device)
    return x.t() @ torch.linalg.solve(gram, y)


class R2D2(EmbeddingLearner):
    """Ridge regression on the embedding per task; logits ``alpha * [f(x_q), 1] W`` with ``alpha``, ``lambda`` learned.

    Meta-parameters besides the body: ``meta.ridge.scale`` (``alpha``, starting at ``algorithm.temperature``) and
    ``meta.ridge.log_lambda`` (``log lambda``, starting at ``log algorithm.ridge_lambda``: ``lambda`` stays positive
    whatever the outer steps do). The paper's output is ``alpha X_q W + beta`` with a scalar ``beta`` too; it is left
    out here because the loss is softmax cross-entropy, which a shift of every logit by the same ``beta`` leaves
    unchanged: its gradient is ``sum_n (p_n - y_n) = 0`` for every task, so it would never move from its start.
    """

    name = "r2d2"
    SCALE = EXTRA_PREFIX + "ridge.scale"
    LOG_LAMBDA = EXTRA_PREFIX + "ridge.log_lambda"

    def __init__(self, model: nn.Module, *, temperature: float = 10.0, ridge_lambda: float = 1.0,
                 **kwargs: Any):  # FunctionalAlgorithm's keyword arguments
        super().__init__(model, **kwargs)
        self.scale = check_positive("temperature", temperature)
        self.ridge_lambda = check_positive("ridge_lambda", ridge_lambda)

    @classmethod
    def config_kwargs(cls, a: AlgorithmConfig) -> dict[str, Any]:
        return {"temperature": a.temperature, "ridge_lambda": a.ridge_lambda}

    def init_params(self, model_params: Params) -> Params:
        return {**model_params, self.SCALE: starting_scalar(self.scale, model_params),
                self.LOG_LAMBDA: starting_scalar(math.log(self.ridge_lambda), model_params)}

    def adapt(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, steps: int = 0) -> State:
        """The ridge solution ``W [D + 1, N]`` from the support set's embeddings (with the bias column)."""
        x = with_bias(self.embed(params, support_x))  # [S, D + 1]
        w = ridge_weights(x, one_hot(support_y, self.ways, x.dtype), params[self.LOG_LAMBDA].exp())
        return self.keep_support({"ridge_weights": w}, support_x)

    def predict(self, params: Params, state: State, query_x: torch.Tensor) -> torch.Tensor:
        """Logits ``[Q, N]`` = ``alpha * [f(x_q), 1] W``: each query's from its own embedding and ``W`` alone."""
        xq = with_bias(self.embed(params, query_x, state))  # [Q, D + 1]
        return params[self.SCALE] * (xq @ state["ridge_weights"])
