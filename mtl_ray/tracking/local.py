"""Local run records: metrics as JSON lines, and a progress display. No server needed."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from mtl_ray import metrics as M
from mtl_ray.atomic import WriteError, atomic_write_text

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
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
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


class Progress:
    """A tqdm bar on a terminal; otherwise (e.g. ``ray job`` logs) one line every ``every`` steps."""

    def __init__(self, total: int, initial: int = 0, every: int = 10, enabled: bool = True,
                 stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.every = every
        self.total = total
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, file=self.stream, dynamic_ncols=True, unit="step")

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(_fmt(metrics), refresh=False)
        elif (step % self.every == 0 or step == self.total
              or any(k.startswith(("meta_val/", "pretrain/val_")) for k in metrics)):
            print(f"step {step}/{self.total}  {_fmt(metrics)}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
