"""Local run records: metrics as JSON lines, and a progress display. No server needed."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from mtl_ray import metrics as M
from mtl_ray.atomic import WriteError, atomic_write

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class JsonlMetrics:
    """Appends ``{"step": s, ...metrics}`` per step to ``<run_dir>/metrics.jsonl``.

    On resume from step ``s``, records after ``s`` (written before an interruption, then recomputed)
    are dropped first, so every step appears exactly once.
    """

    def __init__(self, run_dir: str | Path, resume_step: int = 0):
        self.path = Path(run_dir) / METRICS_FILE
        kept = [r for r in read_metrics(run_dir) if r["step"] <= resume_step]
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._f: TextIO = self.path.open("a")

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        try:
            self._f.write(json.dumps({"step": step, **metrics}) + "\n")
            self._f.flush()
        except OSError as e:
            raise WriteError(self.path, e, f"the records up to step {step - 1} are kept: free some space or make "
                                           "it writable, then continue with --resume") from e

    def close(self) -> None:
        self._f.close()


def _fmt(metrics: dict[str, float]) -> str:
    keys = [M.META_TRAIN_LOSS, M.META_TRAIN_ACC, M.META_VAL_LOSS, M.META_VAL_ACC, M.META_TRAIN_TASKS_PER_S,
            M.PRETRAIN_LOSS, M.PRETRAIN_ACC, M.PRETRAIN_VAL_ACC, M.PRETRAIN_IMAGES_PER_S]
    return "  ".join(f"{k.split('/', 1)[0].replace('meta_', '')} {k.split('/', 1)[1]} {metrics[k]:.4g}"
                     for k in keys if k in metrics)


def _clock(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """A tqdm bar on a terminal; otherwise (e.g. ``ray job`` logs) one line every ``every`` steps.

    The time left is the smaller of the steps still to run at this run's pace and what is left of the
    ``max_minutes`` budget (0: none), since the run stops at whichever comes first.
    """

    _FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"  # tqdm's own ETA ignores the budget

    def __init__(self, total: int, initial: int = 0, every: int = 10, enabled: bool = True,
                 stream: TextIO | None = None, max_minutes: float = 0.0):
        self.stream = stream or sys.stderr
        self.every = every
        self.total = total
        self.initial = initial
        self.enabled = enabled
        self.budget_s = 60.0 * max_minutes if max_minutes > 0 else float("inf")
        self.t0 = time.perf_counter()
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, file=self.stream, dynamic_ncols=True, unit="step",
                            bar_format=self._FORMAT)

    def eta_s(self, step: int) -> float:
        """Seconds left at ``step``: steps to go at the pace so far, or the budget left, whichever is less."""
        elapsed = time.perf_counter() - self.t0
        done = step - self.initial
        by_steps = (self.total - step) * elapsed / done if done > 0 else float("inf")
        return max(0.0, min(by_steps, self.budget_s - elapsed))

    def _left(self, step: int) -> str:
        eta = self.eta_s(step)
        return "" if eta == float("inf") else f"<{_clock(eta)}"

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(f"{self._left(step)}, {_fmt(metrics)}".lstrip(", "), refresh=False)
        elif (step % self.every == 0 or step == self.total
              or any(k.startswith(("meta_val/", "pretrain/val_")) for k in metrics)):
            left = self._left(step)
            print(f"step {step}/{self.total}{f'  left {left[1:]}' if left else ''}  {_fmt(metrics)}",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
