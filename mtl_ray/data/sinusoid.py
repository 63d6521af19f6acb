"""Sinusoid regression tasks exactly as in MAML (Finn et al., ICML 2017, section 5.1).

Each task is ``y = A sin(x - phi)`` with amplitude ``A ~ U[0.1, 5]``, phase ``phi ~ U[0, pi]`` and
inputs ``x ~ U[-5, 5]``; ``shots`` support points and ``queries`` query points per task.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from mtl_ray.config import Config
from mtl_ray.data.base import SourceSpec, TaskBatch, TaskKind, task_rng

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, np.pi)
X_RANGE = (-5.0, 5.0)


class SinusoidTaskSource:
    kind: TaskKind = "regression"
    x_shape: tuple[int, ...] = (1,)  # annotated as TaskSource declares them: a source of any input shape
    ways: int = 1

    def __init__(self, *, seed: int, shots: int, queries: int):
        self.seed = seed
        self.shots = shots
        self.queries = queries
        self.md5s: dict[str, str] = {}  # generated tasks read no files

    def num_classes(self, split: str) -> int:  # infinitely many tasks; no classes to run out of
        return 0

    def task_params(self, split: str, step: int, index: int) -> tuple[float, float, np.ndarray]:
        """(amplitude, phase, x [shots + queries]) of one task."""
        rng = task_rng(self.seed, split, step, index)
        amp = rng.uniform(*AMPLITUDE)
        phase = rng.uniform(*PHASE)
        x = rng.uniform(*X_RANGE, size=self.shots + self.queries)
        return amp, phase, x

    def sample(self, split: str, step: int, indices: Sequence[int]) -> TaskBatch:
        xs, ys = [], []
        for i in indices:
            amp, phase, xi = self.task_params(split, step, int(i))
            xs.append(xi)
            ys.append(amp * np.sin(xi - phase))
        x = torch.from_numpy(np.stack(xs)).float().unsqueeze(-1)  # [T, K+Q, 1]
        y = torch.from_numpy(np.stack(ys)).float().unsqueeze(-1)
        k = self.shots
        return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])


def build(cfg: Config) -> SinusoidTaskSource:
    return SinusoidTaskSource(seed=cfg.seed, shots=cfg.data.shots, queries=cfg.data.queries)


SOURCE = SourceSpec(kind="regression", images=False, build=build, input_shape=lambda cfg: (1,),
                    config_keys=frozenset({"source", "shots", "queries"}))
