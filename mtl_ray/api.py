"""Python API for end users: load a trained meta-learner, adapt it to a support set, predict.

    learner = FewShotLearner.from_checkpoint("runs/omniglot_protonet/checkpoints/step_00002000.pt")
    adapted = learner.adapt(support_x, support_y)          # tensors [N*K, C, H, W], labels of any type
    labels = adapted.predict(query_x)                       # the support labels, one per query
    adapted = learner.adapt_folder("my_task/support/")      # one sub-folder of images per class
    names = adapted.predict_images(["q1.png", "q2.png"])
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtl_ray.algorithms import FunctionalAlgorithm, Learner, Params, TaskShape, build_learner, linear_probe, uses_head
from mtl_ray.config import Config, UserError
from mtl_ray.data.base import to_float_images
from mtl_ray.data.imagetable import IMAGE_SUFFIXES, decode_image
from mtl_ray.distributed.checkpoint import PRETRAIN_STAGE, load_checkpoint
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

    def predict_scores(self, query_x: torch.Tensor) -> torch.Tensor:
        """``query_x [Q, *x_shape]`` -> scores ``[Q, N]`` (logits, or values ``[Q, 1]`` for regression)."""
        lrn = self.learner
        x = lrn._check_x(query_x, "query_x")
        with _COMPUTE, torch.no_grad(), fp32_precision(lrn.cfg.scaling.precision):
            return self.algorithm.predict(self.params, self.state, x)

    def predict(self, query_x: torch.Tensor) -> list[Any] | torch.Tensor:
        """Predicted support labels per query (classification) or predicted values ``[Q, 1]``."""
        out = self.predict_scores(query_x)
        if self.learner.shape.kind == "regression":
            return out
        return [self.classes[i] for i in out.argmax(-1).tolist()]

    def predict_images(self, paths: Sequence[str | Path]) -> list[Any]:
        return self.predict(self.learner.load_images(paths))


class FewShotLearner:
    """A trained meta-learner, or a pretrained body (``pretrained=True``: a linear head is fine-tuned on each
    support set, as ``mtl-ray eval`` scores a ``mtl-ray pretrain`` run)."""

    def __init__(self, cfg: Config, params: Params, shape: TaskShape, *, device: str = "cpu", invert: bool = False,
                 pretrained: bool = False):
        self.cfg = cfg
        self.pretrained = pretrained
        self.default_steps = cfg.pretrain.probe_steps if pretrained else cfg.eval_inner_steps
        self.shape = shape
        self.device = torch.device(device)
        self.params = {k: v.to(self.device) for k, v in params.items()}
        self.invert = invert
        self._learners: dict[int, tuple[Learner, Params]] = {}

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, device: str = "cpu", invert: bool = False) -> FewShotLearner:
        """``invert=True`` for dark-ink-on-light images (e.g. scans) when trained on Omniglot (ink high)."""
        ck = load_checkpoint(path)
        return cls(ck.config, ck.params, ck.shape, device=device, invert=invert,
                   pretrained=ck.stage == PRETRAIN_STAGE)

    def _learner(self, ways: int) -> tuple[Learner, Params]:
        """The learner for ``ways`` classes and the meta-parameters it adapts from."""
        if ways not in self._learners:
            shape = TaskShape(self.shape.kind, self.shape.x_shape, ways)
            if self.pretrained:
                cfg, params = linear_probe(self.cfg, self.params, shape)
                self._learners[ways] = (build_learner(cfg, shape=shape),
                                        {k: v.to(self.device) for k, v in params.items()})
            else:
                self._learners[ways] = (build_learner(self.cfg, shape=shape), self.params)
        return self._learners[ways]

    def _check_x(self, x: torch.Tensor, what: str) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=torch.float32)
        if tuple(x.shape[1:]) != tuple(self.shape.x_shape):
            want = ', '.join(map(str, self.shape.x_shape))
            raise UserError(f"{what}: got shape {tuple(x.shape)}, expected [M, {want}]"
                            f" (the input shape this model was trained on)")
        return x.to(self.device)

    def adapt(self, support_x: torch.Tensor, support_y: Sequence[Any] | torch.Tensor,
              steps: int | None = None) -> AdaptedLearner:
        """Adapt to a support set. ``support_y`` may hold any hashable labels (ints, strings)."""
        x = self._check_x(support_x, "support_x")
        if self.shape.kind == "regression":
            y = torch.as_tensor(support_y, dtype=torch.float32).reshape(-1, 1).to(self.device)
            classes: tuple[Any, ...] = ()
            ways = 1
        else:
            labels = support_y.tolist() if isinstance(support_y, torch.Tensor) else list(support_y)
            if len(labels) != x.shape[0]:
                raise UserError(f"support_y: got {len(labels)} labels, expected one per support example ({x.shape[0]})")
            classes = tuple(sorted(set(labels), key=str))
            ways = len(classes)
            if uses_head(self.cfg.algorithm.name) and ways != self.shape.ways and not self.pretrained:
                raise UserError(f"support set: got {ways} classes, expected {self.shape.ways} (this "
                                f"{self.cfg.algorithm.name} model has a {self.shape.ways}-way head)")
            index = {c: i for i, c in enumerate(classes)}
            y = torch.tensor([index[v] for v in labels], dtype=torch.long, device=self.device)
        steps = self.default_steps if steps is None else steps
        # fp32_precision: the arithmetic `mtl-ray eval` uses
        with _COMPUTE, torch.no_grad(), fp32_precision(self.cfg.scaling.precision):
            learner, params = self._learner(ways)  # cached per way count, in a dict the threads share
            state = learner.algorithm.adapt(params, x, y, steps)
        return AdaptedLearner(self, learner.algorithm, params, state, classes)

    def load_images(self, paths: Sequence[str | Path]) -> torch.Tensor:
        """Image files -> ``[M, C, S, S]`` floats, preprocessed as in training."""
        c, s = self.shape.x_shape[0], self.shape.x_shape[-1]
        arrays = [decode_image(Path(p).read_bytes(), image_size=s, channels=c, invert=self.invert, name=str(p))
                  for p in paths]
        return to_float_images(np.stack(arrays))

    def adapt_folder(self, folder: str | Path, steps: int | None = None) -> AdaptedLearner:
        """Adapt to ``folder/<class name>/*.png|jpg``; predictions are the class names."""
        root = Path(folder)
        classes = sorted(d for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
        if not classes:
            raise UserError(f"{root}: got no class folders, expected {root}/<class>/<image>.png")
        paths, labels = [], []
        for d in classes:
            files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise UserError(f"{d}: no images (expected {', '.join(IMAGE_SUFFIXES)} files)")
            paths += files
            labels += [d.name] * len(files)
        return self.adapt(self.load_images(paths), labels, steps)
