"""Optimisation-based learners: MAML, first-order MAML, Meta-SGD and ANIL.

* MAML — Finn, Abbeel, Levine. "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
  Networks", ICML 2017. ``first_order=True`` drops the second-order term (FOMAML, same paper §5.2).
* Meta-SGD — Li, Zhou, Chen, Li. "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning",
  arXiv:1707.09835, 2017. Per-parameter inner rates ``alpha`` (same shapes as the weights) are
  meta-parameters updated by the outer loop.
* ANIL — Raghu, Raghu, Bengio, Vinyals. "Rapid Learning or Feature Reuse? Towards Understanding
  the Effectiveness of MAML", ICLR 2020. The inner loop adapts only the head.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch.func import functional_call, grad

from mtl_ray.algorithms.base import EXTRA_PREFIX, FunctionalAlgorithm, Params, State
from mtl_ray.models import HEAD_PREFIX


def sgd_steps(loss_of: Callable[[Params], torch.Tensor], fast: Params,
              lrs: Mapping[str, torch.Tensor | float], steps: int, first_order: bool) -> Params:
    """``steps`` plain gradient steps ``fast <- fast - lr * d loss / d fast``.

    With ``first_order`` the inner gradient is a constant to the outer derivative (FOMAML), so the
    meta-gradient has no second-order term; otherwise it is differentiated through.
    """
    for _ in range(steps):
        g = grad(loss_of)(fast)
        if first_order:
            g = {k: v.detach() for k, v in g.items()}
        fast = {k: fast[k] - lrs[k] * g[k] for k in fast}
    return fast


def sub(params: Mapping[str, torch.Tensor], prefix: str) -> Params:
    """Entries under ``prefix`` with the prefix removed (to apply a submodule functionally)."""
    n = len(prefix)
    return {k[n:]: v for k, v in params.items() if k.startswith(prefix)}


class MAML(FunctionalAlgorithm):
    """Adapt all weights with ``inner_steps`` SGD steps of size ``inner_lr`` on the support set.

    ``support_x [N*K, ...]``, ``support_y [N*K]`` -> adapted weights (same shapes as ``params``).
    """

    name = "maml"

    def inner_rates(self, params: Params, fast: Params) -> Mapping[str, torch.Tensor | float]:
        return dict.fromkeys(fast, self.inner_lr)

    def adapt(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, steps: int) -> State:
        fast = self.model_params(params)
        lrs = self.inner_rates(params, fast)

        def support_loss(p: Params) -> torch.Tensor:
            return self.loss(self.apply(p, support_x), support_y)

        return self.keep_support(sgd_steps(support_loss, fast, lrs, steps, self.first_order), support_x)

    def predict(self, params: Params, state: State, query_x: torch.Tensor) -> torch.Tensor:
        return self.forward(self.model, self.weights(state), query_x, state)


class MetaSGD(MAML):
    """MAML with learned per-parameter inner rates ``params["meta.lr.<name>"]`` (init: ``inner_lr``)."""

    name = "metasgd"
    LR_PREFIX = EXTRA_PREFIX + "lr."

    def init_params(self, model_params: Params) -> Params:
        rates = {self.LR_PREFIX + k: torch.full_like(v, self.inner_lr) for k, v in model_params.items()}
        return {**model_params, **rates}

    def inner_rates(self, params: Params, fast: Params) -> Mapping[str, torch.Tensor | float]:
        return {k: params[self.LR_PREFIX + k] for k in fast}


class ANIL(MAML):
    """Almost No Inner Loop: the body is meta-learned, only ``head.*`` adapts per task."""

    name = "anil"

    def features(self, params: Params, x: torch.Tensor, state: State | None = None) -> torch.Tensor:
        """Body features ``[M, D]`` of ``x``; with an adapted ``state``, normalised as its queries are."""
        # get_submodule, not self.model.body: a Module's attribute is typed ``Tensor | Module``, this a Module.
        return self.forward(self.model.get_submodule("body"), sub(params, "body."), x, state or {}).flatten(1)

    def head(self, head_params: Params, z: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model.get_submodule("head"), sub(head_params, HEAD_PREFIX), (z,))

    def adapt(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, steps: int) -> State:
        z = self.features(params, support_x)  # computed once; the inner loop touches only the head
        fast = {k: v for k, v in params.items() if k.startswith(HEAD_PREFIX)}

        def support_loss(h: Params) -> torch.Tensor:
            return self.loss(self.head(h, z), support_y)

        head = sgd_steps(support_loss, fast, dict.fromkeys(fast, self.inner_lr), steps, self.first_order)
        return self.keep_support(head, support_x)

    def predict(self, params: Params, state: State, query_x: torch.Tensor) -> torch.Tensor:
        return self.head(self.weights(state), self.features(params, query_x, state))
