"""Test-time fine-tuning: the body and a prototype-initialised linear head, fitted to each task's support set.

Hu, Li, Stühmer, Kim, Hospedales. "Pushing the Limits of Simple Pipelines for Few-Shot Learning: External Data and
Fine-Tuning Make a Difference", CVPR 2022 (P>M>F): pretrain, meta-train a ProtoNet from the pretrained backbone,
then on each test task fine-tune the backbone on its (augmented) support set. Here fine-tuning is an adaptation mode
of any trained model (``algorithm.finetune_steps > 0``): whatever algorithm trained it, its body's features feed a
linear head initialised from the support set's class means, as in fo-Proto-MAML (Triantafillou et al.,
"Meta-Dataset", ICLR 2020): ``W_n = 2 c_n``, ``b_n = -||c_n||^2``, so that ``W z + b = -||z - c_n||^2 + ||z||^2``,
ProtoNet's logits up to a per-query constant. The body and the head then take ``steps`` full-batch SGD steps of size
``lr`` on the support set's cross-entropy, and the queries are scored with the fine-tuned body and head.

Scores are ``W z + b - ||z||^2``: the per-query constant ``||z||^2`` is subtracted, which changes no probability, loss
or gradient (softmax and cross-entropy are invariant to it) but makes 0 steps give exactly ProtoNet's logits
``-||z - c_n||^2`` (the same numbers up to rounding), so a metric learner's scores keep their meaning.

Normalisation follows ``norm`` as everywhere (:meth:`FunctionalAlgorithm.forward`): each fine-tuning step's forward
pass normalises its own batch (as MAML's inner loop does), and under ``norm="support"`` the queries are normalised
with the support set's statistics through the fine-tuned body, so a query's answer depends on the support set and
that query only.

Augmentation (``augment``): each step's batch is the support set plus a copy of it augmented by
:mod:`mtl_ray.data.augment` (crop, flip, colour jitter), with new parameters every step, drawn from the task's
seed (:func:`finetune_seed`: a child of :func:`~mtl_ray.data.base.task_rng`'s seed sequence, independent of the
episode's stream and of ``data.augment``'s). The augmented copies are made outside ``vmap`` (numpy draws, kornia ops
on the chunk's images at once: ``[T, steps, S, C, H, W]``) and enter the vmapped per-task function as inputs, so a
task's result is a pure function of its inputs and seed: the same alone, batched or chunked. The ops expect pixels in
[0, 1]; inputs arrive normalised (``data.channel_mean``/``channel_std``), so they are un-normalised first and
normalised again after.

Everything here is a pure function of parameter dicts (``torch.func``), vectorised over tasks with ``vmap`` in the
algorithm's chunks; it never imports ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from mtl_ray.algorithms.base import (
    SUPPORT_X,
    FunctionalAlgorithm,
    Metrics,
    Params,
    State,
    task_metrics,
)
from mtl_ray.config import Config
from mtl_ray.data.augment import AugmentParams, apply, draw
from mtl_ray.data.base import TaskBatch, task_rng
from mtl_ray.data.normalise import is_identity, normalise

BODY = "finetune.body."  # state entries: the fine-tuned body's weights (``body.`` prefix removed) ...
HEAD_W = "finetune.head.weight"  # ... the head's weights ``[N, D]``
HEAD_B = "finetune.head.bias"  # ... and biases ``[N]``
# the fine-tuning augmentation stream of an adaptation that has no task coordinates (the Python API, Lake's runs)
_API_STREAM = 0xF7E
Seed = np.random.SeedSequence | int


def finetune_seed(seed: int, split: str, step: int, index: int) -> np.random.SeedSequence:
    """The fine-tuning augmentation stream of task ``(seed, split, step, index)``: the second child of its
    :func:`~mtl_ray.data.base.task_rng` seed sequence (the first is ``data.augment``'s,
    :func:`mtl_ray.data.augment.augment_rng`), so the episode and its meta-training augmentation stay as they were."""
    seq = task_rng(seed, split, step, index).bit_generator.seed_seq
    assert isinstance(seq, np.random.SeedSequence)  # task_rng seeds from one
    return seq.spawn(2)[1]


def api_seed(seed: int, index: int = 0) -> np.random.SeedSequence:
    """The augmentation stream of adaptation ``index`` without task coordinates (a user's support set, a Lake run)."""
    return np.random.SeedSequence([seed, _API_STREAM, index])


def _one_hot(y: torch.Tensor, ways: int, dtype: torch.dtype) -> torch.Tensor:
    """``y [M]`` -> ``[M, ways]`` (vmap-safe: a comparison, not ``F.one_hot``)."""
    return (y.unsqueeze(-1) == torch.arange(ways, device=y.device)).to(dtype)


@dataclass(frozen=True)
class FineTune:
    """Test-time fine-tuning's settings: ``steps`` SGD steps of size ``lr``; ``augment``: add an augmented copy of
    the support set to each step's batch; ``channel_mean``/``channel_std``: the inputs' normalisation (undone for the
    augmentation, which works on pixels in [0, 1])."""

    steps: int
    lr: float
    augment: bool = False
    channel_mean: tuple[float, ...] = ()
    channel_std: tuple[float, ...] = ()

    @staticmethod
    def from_config(cfg: Config) -> FineTune | None:
        """``algorithm.finetune_*`` of ``cfg``; None when ``algorithm.finetune_steps`` is 0 (off)."""
        a = cfg.algorithm
        if a.finetune_steps <= 0:
            return None
        return FineTune(a.finetune_steps, a.finetune_lr, a.finetune_augment, tuple(cfg.data.channel_mean),
                        tuple(cfg.data.channel_std))

    def describe(self) -> str:
        return f"fine-tuned {self.steps} steps at lr {self.lr:g}{', augmented' if self.augment else ''}"

    # ---------------------------------------------------------------- per-task pure functions
    @staticmethod
    def embed(alg: FunctionalAlgorithm, body: Params, x: torch.Tensor, state: State) -> torch.Tensor:
        """Features ``[M, D]`` of ``x [M, ...]`` under body weights ``body``; with the support inputs in ``state``
        normalised by their statistics (:meth:`FunctionalAlgorithm.forward`), else by ``x``'s own."""
        return alg.forward(alg.model.get_submodule("body"), body, x, state).flatten(1)

    def adapt(self, alg: FunctionalAlgorithm, params: Params, support_x: torch.Tensor, support_y: torch.Tensor,
              views: torch.Tensor | None = None, steps: int | None = None) -> State:
        """One task: ``support_x [S, *x_shape]``, ``support_y [S]`` (labels ``0..ways-1``) -> the fine-tuned state:
        body weights under :data:`BODY`, head ``W [N, D]``/``b [N]`` (and the support inputs under norm="support").

        ``views [steps, S, *x_shape]``: step ``i`` trains on ``support_x`` and ``views[i]`` (augmented copies);
        None: on ``support_x`` alone. ``steps``: None takes :attr:`steps`.
        """
        if alg.kind != "classification":
            raise ValueError(f"test-time fine-tuning: got a {alg.kind} task, expected classification (its head "
                             "starts from class prototypes)")
        steps = self.steps if steps is None else steps
        body = alg.body_weights(params)
        z = self.embed(alg, body, support_x, {})  # [S, D], the support set's own statistics (as ProtoNet.adapt)
        onehot = _one_hot(support_y, alg.ways, z.dtype)  # [S, N]
        protos = (onehot.t() @ z) / onehot.sum(0).clamp_min(1.0).unsqueeze(-1)  # [N, D]
        fast = {**{BODY + k: v for k, v in body.items()}, HEAD_W: 2 * protos, HEAD_B: -protos.pow(2).sum(-1)}

        def support_loss(p: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            feats = self.embed(alg, {k[len(BODY):]: v for k, v in p.items() if k.startswith(BODY)}, x, {})
            return F.cross_entropy(feats @ p[HEAD_W].t() + p[HEAD_B], y)

        y2 = support_y if views is None else torch.cat([support_y, support_y])
        for i in range(steps):
            x = support_x if views is None else torch.cat([support_x, views[i]])
            g = grad(support_loss)(fast, x, y2)
            fast = {k: fast[k] - self.lr * g[k] for k in fast}
        return alg.keep_support(fast, support_x)

    @staticmethod
    def predict(alg: FunctionalAlgorithm, state: State, query_x: torch.Tensor) -> torch.Tensor:
        """Scores ``[Q, N]`` = ``W z + b - ||z||^2`` of the fine-tuned body's features ``z`` of ``query_x``."""
        body = {k[len(BODY):]: v for k, v in state.items() if k.startswith(BODY)}
        z = FineTune.embed(alg, body, query_x, {SUPPORT_X: state[SUPPORT_X]} if SUPPORT_X in state else {})
        return z @ state[HEAD_W].t() + state[HEAD_B] - z.pow(2).sum(-1, keepdim=True)

    # ---------------------------------------------------------------- augmentation (outside vmap)
    def views(self, support_x: torch.Tensor, seeds: Sequence[Seed]) -> torch.Tensor:
        """``support_x [T, S, C, H, W]`` (normalised inputs) -> augmented copies ``[T, steps, S, C, H, W]``, task
        ``t``'s from ``seeds[t]`` alone: step-major draws of ``steps * S`` images (:func:`~mtl_ray.data.augment.draw`);
        kornia applies them (imported on first use)."""
        t, s = support_x.shape[:2]
        if len(seeds) != t:
            raise ValueError(f"test-time fine-tuning: got {len(seeds)} augmentation seeds, expected one per task ({t})")
        if support_x.dim() != 5:
            raise ValueError(f"test-time fine-tuning augments images [T, S, C, H, W], got {tuple(support_x.shape)}")
        c, h, w = support_x.shape[2:]
        params = AugmentParams.cat([draw(np.random.default_rng(sd), self.steps * s, h, w) for sd in seeds])
        pixels = self._pixels(support_x)
        flat = pixels.unsqueeze(1).expand(t, self.steps, s, c, h, w).reshape(-1, c, h, w)
        out = normalise(apply(flat, params), self.channel_mean, self.channel_std)
        return out.reshape(t, self.steps, s, c, h, w)

    def _pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised inputs ``[..., C, H, W]`` -> pixels in [0, 1]: ``x * std[c] + mean[c]`` (identity when none)."""
        if is_identity(self.channel_mean, self.channel_std):
            return x
        m = torch.tensor(list(self.channel_mean), dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
        sd = torch.tensor(list(self.channel_std), dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
        return x * sd + m

    # ---------------------------------------------------------------- entry points
    def adapt_one(self, alg: FunctionalAlgorithm, params: Params, support_x: torch.Tensor, support_y: torch.Tensor,
                  seed: Seed | None = None) -> State:
        """One task outside ``vmap`` (the Python API, Lake's runs): its augmented copies from ``seed`` when
        :attr:`augment` (None: :func:`api_seed` of 0)."""
        views = None
        if self.augment:
            views = self.views(support_x.unsqueeze(0), [api_seed(0) if seed is None else seed])[0]
        return self.adapt(alg, params, support_x, support_y, views)

    def evaluate(self, alg: FunctionalAlgorithm, params: Params, batch: TaskBatch,
                 seeds: Sequence[Seed] | None = None) -> dict[str, torch.Tensor]:
        """Per-task metrics ``{name: [T]}`` of the fine-tuned body and head on each task's queries, vectorised over
        tasks in ``alg``'s chunks (each task's augmentation from its own ``seeds[t]``, so chunks change nothing)."""
        if self.augment and seeds is None:
            raise ValueError("test-time fine-tuning with augment: evaluate needs one seed per task (finetune_seed)")
        params = {k: v.detach() for k, v in params.items()}

        def score(p: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor,
                  views: torch.Tensor | None) -> Metrics:
            out = self.predict(alg, self.adapt(alg, p, sx, sy, views), qx)
            return task_metrics(alg.kind, out, qy, F.cross_entropy(out, qy))  # whatever alg.loss is

        def plain(p: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor) -> Metrics:
            return score(p, sx, sy, qx, qy, None)

        parts: list[Metrics] = []
        with torch.no_grad():  # torch.func.grad inside adapt still works: it ignores an outer no_grad
            for start, stop in alg.chunks(batch, False, self.steps):
                part = batch.slice(start, stop)
                if self.augment:
                    assert seeds is not None
                    views = self.views(part.support_x, seeds[start:stop])
                    parts.append(vmap(score, in_dims=(None, 0, 0, 0, 0, 0))(
                        params, part.support_x, part.support_y, part.query_x, part.query_y, views))
                else:
                    parts.append(vmap(plain, in_dims=(None, 0, 0, 0, 0))(
                        params, part.support_x, part.support_y, part.query_x, part.query_y))
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
