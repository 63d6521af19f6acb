"""Process-level tuning for compute processes (the in-process trainer and every Ray worker actor).

Vectorised meta-gradients allocate and free large activations every step. glibc serves such blocks
with fresh ``mmap`` calls and returns them on ``free``, so each step page-faults its whole working set
again. Keeping freed memory in the heap (``M_MMAP_MAX=0``, a high ``M_TRIM_THRESHOLD``) removes those
faults (docs/benchmarks.md, "The main job: glibc's heap and task chunks", has the numbers). The cost is
that a worker's resident memory stays at its peak.

Also here: the fp32 arithmetic of CUDA convolutions and matmuls (:func:`fp32_precision`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
from collections.abc import Iterator

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# Effectively never give the heap back to the OS mid-run. mallopt takes a C int: a larger Python int would be
# masked by ctypes (1 << 40 became 0, i.e. trim at every free), so argtypes are declared below and this fits.
_TRIM_THRESHOLD = 2**31 - 1

_done = False


def tune_allocator() -> bool:
    """Keep freed blocks in glibc's heap; True when applied. No-op elsewhere or if disabled.

    ``MTL_RAY_TUNE_MALLOC=0`` turns it off (e.g. to compare, or when memory is tight).
    """
    global _done
    if _done:
        return True
    if os.environ.get("MTL_RAY_TUNE_MALLOC", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    _done = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return _done


@contextlib.contextmanager
def fp32_precision(precision: str) -> Iterator[None]:
    """Full IEEE fp32 in CUDA convolutions and matmuls, unless ``precision == "tf32"`` (restored on exit).

    torch lets cuDNN convolutions use TensorFloat-32 (10-bit mantissa) by default on Ampere and
    later, which moves second-order meta-gradients by percents (docs/benchmarks.md, "GPU").
    No effect on CPU. Only the new ``fp32_precision`` API is used: torch rejects mixing it with the
    legacy ``allow_tf32`` flags.
    """
    mode = "tf32" if precision == "tf32" else "ieee"
    backends = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)  # type: ignore[attr-defined]
    before = [b.fp32_precision for b in backends]
    for b in backends:
        b.fp32_precision = mode
    try:
        yield
    finally:
        for b, old in zip(backends, before, strict=True):
            b.fp32_precision = old


class DropMessages(logging.Filter):
    """A logging filter that drops the records whose message starts with one of ``prefixes`` (and only those):
    how a library's known, harmless chatter is silenced without lowering its logger's level."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)
