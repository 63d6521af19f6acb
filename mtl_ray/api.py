"""Python API for end users: load a trained meta-learner, adapt it to a support set, predict.

    learner = FewShotLearner.from_checkpoint("runs/omniglot_protonet/checkpoints/step_00002000.pt")
    adapted = learner.adapt(support_x, support_y)          # tensors [N*K, C, H, W], labels of any type
    labels = adapted.predict(query_x)                       # the support labels, one per query
    adapted = learner.adapt_folder("my_task/support/")      # one sub-folder of images per class
    names = adapted.predict_images(["q1.png", "q2.png"])

A query's answer depends on the support set and that query only: each query is scored in a call of its own
shape (support set + the query), so it is bit-for-bit the same alone, in any request and in any order. Models
trained with ``model.norm=transductive`` normalise a batch of queries with its own statistics, so their answer
for a query depends on the other queries; predicting with them needs ``transductive=True`` in that call.

Inputs are pixels as the task source reads them, floats in [0, 1] (``load_images`` makes them from files); a model
trained with channel statistics (``data.channel_mean``/``data.channel_std``, recorded from a converted table) has
them applied here exactly as in training, so an image gets the same answer through the API, the served model and
``mtl-ray eval``.

Classes: head unit / output ``i`` is the ``i``-th distinct label in the order of first appearance in
``support_y`` (as ``mtl-ray eval`` lays its tasks out: class 0's examples first), whatever the labels are
called; :meth:`FewShotLearner.adapt_folder` takes class folders in natural order ("2" before "10").
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtl_ray.algorithms import FunctionalAlgorithm, Learner, Params, TaskShape, build_learner, pretrain_probe, uses_head
from mtl_ray.algorithms.finetune import FineTune, api_seed
from mtl_ray.checkpoint import PRETRAIN_STAGE, load_checkpoint
from mtl_ray.config import Config, UserError
from mtl_ray.data.base import to_float_images
from mtl_ray.data.fetch import DataError
from mtl_ray.data.imagetable import IMAGE_SUFFIXES, decode_image
from mtl_ray.data.normalise import normalise
from mtl_ray.runtime import fp32_precision

__all__ = ["AdaptedLearner", "FewShotLearner"]

# torch.func's transforms keep process-wide state, so two threads adapting at once (MAML's inner loop is
# torch.func.grad) break each other: 8 threads x 20 adapt + predict on one sinusoid MAML model raised "One of the
# differentiated Tensors does not require grad" 29 times and silently returned different predictions 92 times out of
# 160. fp32_precision sets process-wide flags too. MLflow's scoring server runs each request in a thread of its own
# (asyncio.to_thread), so every computation below holds this lock: concurrent calls are correct, one at a time.
_COMPUTE = threading.Lock()


@dataclass(frozen=True)
class AdaptedLearner:
    """A learner adapted to one support set; ``classes[i]`` is the user label of output ``i``."""

    learner: FewShotLearner
    algorithm: FunctionalAlgorithm
    params: Params  # the meta-parameters adapted from (a pretrained body gets a zero head per way count)
    state: dict[str, torch.Tensor]
    classes: tuple[Any, ...]
    steps: int  # inner steps the adaptation took
    inner_lr: float  # their step size
    finetune: FineTune | None = None  # test-time fine-tuning that made ``state`` instead (algorithm.finetune_*)

    def __repr__(self) -> str:
        what = f"{len(self.classes)} classes {list(self.classes)!r}" if self.classes else "regression"
        how = f"steps={self.steps}, inner_lr={self.inner_lr:g}" if self.finetune is None else self.finetune.describe()
        return f"AdaptedLearner({self.algorithm.name}, {what}, {how}, norm={self.algorithm.norm})"

    def _scores(self, x: torch.Tensor) -> torch.Tensor:
        if self.finetune is not None:  # the fine-tuned body and head
            return self.finetune.predict(self.algorithm, self.state, x)
        return self.algorithm.predict(self.params, self.state, x)

    def predict_scores(self, query_x: torch.Tensor, *, transductive: bool = False) -> torch.Tensor:
        """``query_x [Q, *x_shape]`` -> scores ``[Q, N]`` (logits, or values ``[Q, 1]`` for regression).

        Each query is scored alone (with the support set that normalises it), so its scores are the same
        bits whatever else the call holds. A ``model.norm=transductive`` model scores the queries together,
        with their own statistics, and only when ``transductive=True`` says that is what the caller wants.
        """
        lrn = self.learner
        x = lrn._check_x(query_x, "query_x")
        if self.algorithm.transductive and not transductive:
            raise UserError(
                "predict: this model was trained with model.norm=transductive: it normalises the queries of a call "
                "with their own statistics, so a query's answer depends on the other queries in the call (one query "
                "per call is far less accurate); expected a model trained with model.norm=support. Pass "
                "transductive=True to accept batch-dependent answers for this call, or retrain with model.norm=support")
        with _COMPUTE, torch.no_grad(), fp32_precision(lrn.cfg.scaling.precision):
            if transductive and self.algorithm.transductive:
                return self._scores(x)
            # one call per query, all of one shape: BLAS kernels round differently for different matrix sizes
            return torch.cat([self._scores(x[i:i + 1]) for i in range(len(x))])

    def predict(self, query_x: torch.Tensor, *, transductive: bool = False) -> list[Any] | torch.Tensor:
        """Predicted support labels per query (classification) or predicted values ``[Q, 1]``."""
        out = self.predict_scores(query_x, transductive=transductive)
        if self.learner.shape.kind == "regression":
            return out
        return [self.classes[i] for i in out.argmax(-1).tolist()]

    def predict_images(self, paths: Sequence[str | Path], *, transductive: bool = False) -> list[Any] | torch.Tensor:
        return self.predict(self.learner.load_images(paths), transductive=transductive)


def natural_key(name: str) -> tuple:
    """Sort key putting "class2" before "class10": digit runs compare as numbers, the rest case-insensitively."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t.casefold()) for t in re.split(r"(\d+)", name) if t)


def _check_steps(steps: Any) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int | float) or steps < 0 or not float(steps).is_integer():
        raise UserError(f"steps: got {steps!r}, expected a whole number >= 0 of inner steps (or None for the "
                        "model's eval_inner_steps)")
    return int(steps)


def _check_lr(inner_lr: Any, what: str = "inner_lr") -> float:
    if isinstance(inner_lr, bool) or not isinstance(inner_lr, int | float) or not math.isfinite(inner_lr) \
            or inner_lr < 0:
        raise UserError(f"{what}: got {inner_lr!r}, expected a finite number >= 0 (or None for the model's own)")
    return float(inner_lr)


def _check_finetune(steps: Any, lr: Any, augment: Any, cfg: Config) -> tuple[int, float, bool]:
    """``adapt``'s test-time fine-tuning arguments, None taking the model's ``algorithm.finetune_*``."""
    a = cfg.algorithm
    if steps is None:
        steps = a.finetune_steps
    elif isinstance(steps, bool) or not isinstance(steps, int | float) or steps < 0 or not float(steps).is_integer():
        raise UserError(f"finetune_steps: got {steps!r}, expected a whole number >= 0 of test-time fine-tuning steps "
                        "(0: off; None for the model's algorithm.finetune_steps)")
    lr = a.finetune_lr if lr is None else _check_lr(lr, "finetune_lr")
    if augment is None:
        augment = a.finetune_augment and int(steps) > 0  # nothing to augment without steps
    elif not isinstance(augment, bool):
        raise UserError(f"finetune_augment: got {augment!r}, expected True or False (or None for the model's "
                        "algorithm.finetune_augment)")
    if augment and not steps:
        raise UserError("finetune_augment: got True with finetune_steps=0, expected False (it augments test-time "
                        "fine-tuning, which is off); pass finetune_steps > 0")
    return int(steps), float(lr), bool(augment)


class FewShotLearner:
    """A trained meta-learner, or a pretrained body (``pretrained=True``: a linear head is fine-tuned on each
    support set, as ``mtl-ray eval`` scores a ``mtl-ray pretrain`` run)."""

    def __init__(self, cfg: Config, params: Params, shape: TaskShape, *, device: str = "cpu", invert: bool = False,
                 pretrained: bool = False):
        self.cfg = cfg
        self.pretrained = pretrained
        # a pretrained body adapts as pretrain.probe says: the linear probe's steps, or none (cosine class means)
        probe_steps = cfg.pretrain.probe_steps if cfg.pretrain.probe == "linear" else 0
        self.default_steps = probe_steps if pretrained else cfg.eval_inner_steps
        self.shape = shape
        self.device = torch.device(device)
        # float32 whatever the run trained in (scaling.precision=fp64 checkpoints hold float64 weights)
        self.params = {k: v.to(self.device, torch.float32 if v.is_floating_point() else None)
                       for k, v in params.items()}
        self.invert = invert
        self._learners: dict[tuple[int, float, tuple[int, float, bool]], tuple[Learner, Params]] = {}

    @property
    def default_inner_lr(self) -> float:
        return self.cfg.pretrain.probe_lr if self.pretrained else self.cfg.algorithm.inner_lr

    def __repr__(self) -> str:
        what = f"pretrained body + {self.cfg.pretrain.probe} probe" if self.pretrained else self.cfg.algorithm.name
        finetune = FineTune.from_config(self.cfg)  # the model's default adaptation (a deployed model's chosen one)
        how = finetune.describe() if finetune else f"steps={self.default_steps}, inner_lr={self.default_inner_lr:g}"
        return (f"FewShotLearner({what}, x_shape={tuple(self.shape.x_shape)}, ways={self.shape.ways}, "
                f"adapt: {how}, norm={self.cfg.model.norm})")

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str = "cpu", invert: bool = False) -> FewShotLearner:
        """``invert=True`` for dark-ink-on-light images (e.g. scans) when trained on Omniglot (ink high)."""
        ck = load_checkpoint(path)
        return cls(ck.config, ck.params, ck.shape, device=device, invert=invert,
                   pretrained=ck.stage == PRETRAIN_STAGE)

    def _learner(self, ways: int, inner_lr: float,
                 finetune: tuple[int, float, bool] = (0, 0.01, False)) -> tuple[Learner, Params]:
        """The learner for ``ways`` classes adapting at ``inner_lr`` (or fine-tuned with ``finetune``: steps, lr,
        augment) and the meta-parameters it adapts from."""
        key = (ways, inner_lr, finetune)
        if key not in self._learners:
            shape = TaskShape(self.shape.kind, self.shape.x_shape, ways)
            tuned = dict(zip(("algorithm.finetune_steps", "algorithm.finetune_lr", "algorithm.finetune_augment"),
                             finetune, strict=True))
            if self.pretrained:
                cfg, params = pretrain_probe(self.cfg.replace(**{"pretrain.probe_lr": inner_lr, **tuned}),
                                             self.params, shape)
                self._learners[key] = (build_learner(cfg, shape=shape),
                                       {k: v.to(self.device) for k, v in params.items()})
            else:
                cfg = self.cfg.replace(**{"algorithm.inner_lr": inner_lr, **tuned})
                self._learners[key] = (build_learner(cfg, shape=shape), self.params)
        return self._learners[key]

    def _check_x(self, x: torch.Tensor, what: str) -> torch.Tensor:
        want = ', '.join(map(str, self.shape.x_shape))
        try:
            x = torch.as_tensor(x, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as e:
            raise UserError(f"{what}: got {type(x).__name__} that is not an array of numbers ({e}), expected a "
                            f"float tensor [M, {want}]") from None
        if x.dim() != len(self.shape.x_shape) + 1 or tuple(x.shape[1:]) != tuple(self.shape.x_shape):
            raise UserError(f"{what}: got shape {tuple(x.shape)}, expected [M, {want}]"
                            f" (the input shape this model was trained on; one example: x[None])")
        if x.shape[0] == 0:
            raise UserError(f"{what}: got 0 examples (shape {tuple(x.shape)}), expected [M, {want}] with M >= 1")
        if not torch.isfinite(x).all():
            raise UserError(f"{what}: got non-finite values (NaN or inf), expected finite floats; check the "
                            "preprocessing")
        return self._normalised(x.to(self.device))

    def _normalised(self, x: torch.Tensor) -> torch.Tensor:
        """Image pixels in [0, 1] -> what the model saw in training: the run's ``data.channel_mean``/``channel_std``
        applied as the task source applied them (:func:`mtl_ray.data.normalise.normalise`); vectors as they are."""
        d = self.cfg.data
        if len(self.shape.x_shape) != 3:
            return x
        return normalise(x, d.channel_mean, d.channel_std)

    def adapt(self, support_x: torch.Tensor, support_y: Sequence[Any] | torch.Tensor,
              steps: int | None = None, *, inner_lr: float | None = None, finetune_steps: int | None = None,
              finetune_lr: float | None = None, finetune_augment: bool | None = None) -> AdaptedLearner:
        """Adapt to a support set ``support_x [S, *x_shape]``, ``support_y [S]``.

        ``support_y`` may hold any hashable labels (ints, strings); output ``i`` is the ``i``-th distinct label
        in order of first appearance. ``steps``: inner steps; None takes the model's ``algorithm.eval_inner_steps``
        (the steps `mtl-ray eval` adapts with, not the training ``inner_steps``; for a pretrained body
        ``pretrain.probe_steps``). ``inner_lr``: the inner step size; None takes the model's ``algorithm.inner_lr``
        (pretrained body: ``pretrain.probe_lr``). Metric learners (protonet, relationnet, meta_baseline, r2d2) take
        no steps.

        Test-time fine-tuning (Hu et al. 2022, P>M>F; mtl_ray/algorithms/finetune.py): ``finetune_steps > 0``
        fine-tunes the body and a prototype-initialised linear head on the support set for that many full-batch
        SGD steps of size ``finetune_lr`` instead (``finetune_augment``: each step adds an augmented copy of the
        support set, drawn from the run's ``seed``, so the same support set always gives the same answers), for any
        model and any number of classes. None takes the model's ``algorithm.finetune_steps`` / ``finetune_lr`` /
        ``finetune_augment`` (what ``mtl-ray eval`` uses).
        """
        x = self._check_x(support_x, "support_x")
        steps = self.default_steps if steps is None else _check_steps(steps)
        lr = self.default_inner_lr if inner_lr is None else _check_lr(inner_lr)
        finetune = _check_finetune(finetune_steps, finetune_lr, finetune_augment, self.cfg)
        if self.shape.kind == "regression":
            y = self._regression_targets(support_y, x.shape[0])
            classes: tuple[Any, ...] = ()
            ways = 1
        else:
            labels = self._labels(support_y, x.shape[0])
            classes = tuple(dict.fromkeys(labels))  # first appearance: the documented order
            ways = len(classes)
            if ways < 2:
                raise UserError(f"support_y: got {ways} distinct label(s) {list(classes)!r}, expected at least 2 "
                                "classes to tell apart")
            if uses_head(self.cfg.algorithm.name) and ways != self.shape.ways and not self.pretrained \
                    and not finetune[0]:  # fine-tuning starts a head of its own
                raise UserError(f"support set: got {ways} classes, expected {self.shape.ways} (this "
                                f"{self.cfg.algorithm.name} model has a {self.shape.ways}-way head)")
            index = {c: i for i, c in enumerate(classes)}
            y = torch.tensor([index[v] for v in labels], dtype=torch.long, device=self.device)
        # fp32_precision: the arithmetic `mtl-ray eval` uses
        with _COMPUTE, torch.no_grad(), fp32_precision(self.cfg.scaling.precision):
            # cached per (ways, inner_lr, fine-tuning), in a dict the threads share
            learner, params = self._learner(ways, lr, finetune)
            if learner.finetune is None:
                state = learner.algorithm.adapt(params, x, y, steps)
            else:  # the same augmentation for every call: an answer depends on the support set and the query only
                state = learner.finetune.adapt_one(learner.algorithm, params, x, y, api_seed(self.cfg.seed))
        return AdaptedLearner(self, learner.algorithm, params, state, classes, steps, lr, learner.finetune)

    @staticmethod
    def _labels(support_y: Any, count: int) -> list[Any]:
        """Classification labels as a flat list of hashable values, one per support example."""
        if isinstance(support_y, torch.Tensor | np.ndarray):
            if support_y.ndim != 1:
                raise UserError(f"support_y: got an array of shape {tuple(support_y.shape)}, expected [S] (one label "
                                "per support example); flatten it or pass a list")
            labels = support_y.tolist()
        elif isinstance(support_y, str | bytes) or not isinstance(support_y, Sequence):
            raise UserError(f"support_y: got {type(support_y).__name__} {support_y!r:.60}, expected a list of "
                            f"{count} labels (one per support example)")
        else:
            labels = list(support_y)
        bad = [v for v in labels if not isinstance(v, Hashable) or (isinstance(v, float) and math.isnan(v))]
        if bad:
            raise UserError(f"support_y: got the label {bad[0]!r} ({type(bad[0]).__name__}), expected hashable labels "
                            "such as ints or strings (one per support example, not lists or NaN)")
        if len(labels) != count:
            raise UserError(f"support_y: got {len(labels)} labels, expected one per support example ({count})")
        return labels

    def _regression_targets(self, support_y: Any, count: int) -> torch.Tensor:
        try:
            y = torch.as_tensor(support_y, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as e:
            raise UserError(f"support_y: got {type(support_y).__name__} that is not numbers ({e}), expected "
                            f"{count} float targets") from None
        if y.numel() != count or y.dim() > 2 or (y.dim() == 2 and y.shape[1] != 1):
            raise UserError(f"support_y: got shape {tuple(y.shape)}, expected [{count}] or [{count}, 1] (one target "
                            "per support example)")
        if not torch.isfinite(y).all():
            raise UserError("support_y: got non-finite targets (NaN or inf), expected finite floats")
        return y.reshape(-1, 1).to(self.device)

    def load_images(self, paths: Sequence[str | Path]) -> torch.Tensor:
        """Image files -> ``[M, C, S, S]`` floats in [0, 1], decoded and resized as in training (``adapt`` and
        ``predict`` then apply the run's channel normalisation)."""
        if isinstance(paths, str | Path) or not paths:
            raise UserError(f"paths: got {paths!r}, expected a non-empty list of image files")
        c, s = self.shape.x_shape[0], self.shape.x_shape[-1]
        arrays = []
        for p in paths:
            try:
                data = Path(p).read_bytes()
            except OSError as e:
                raise DataError(f"{p}: cannot read the image ({e.strerror or e}); expected an existing PNG or JPEG "
                                "file; check the path") from None
            arrays.append(decode_image(data, image_size=s, channels=c, invert=self.invert, name=str(p)))
        return to_float_images(np.stack(arrays))

    def adapt_folder(self, folder: str | Path, steps: int | None = None, *, inner_lr: float | None = None,
                     finetune_steps: int | None = None, finetune_lr: float | None = None,
                     finetune_augment: bool | None = None) -> AdaptedLearner:
        """Adapt to ``folder/<class name>/*.png|jpg``; predictions are the class names.

        Classes are taken in natural order of their folder names ("2" before "10"), images in each likewise.
        """
        root = Path(folder)
        classes = sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: natural_key(d.name)) \
            if root.is_dir() else []
        if not classes:
            raise UserError(f"{root}: got no class folders, expected {root}/<class>/<image>.png")
        paths, labels = [], []
        for d in classes:
            files = sorted((f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES),
                           key=lambda f: natural_key(f.name))
            if not files:
                raise UserError(f"{d}: no images (expected {', '.join(IMAGE_SUFFIXES)} files)")
            paths += files
            labels += [d.name] * len(files)
        return self.adapt(self.load_images(paths), labels, steps, inner_lr=inner_lr, finetune_steps=finetune_steps,
                          finetune_lr=finetune_lr, finetune_augment=finetune_augment)
