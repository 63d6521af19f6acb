"""Process-level tuning: glibc's heap keeps freed blocks, so a training step does not page-fault them again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# In a fresh process: malloc, touch and free a 64 MiB block three times; print the page faults of each round.
# glibc directly (torch's CPU allocator calls it too) because the heap policy is what tune_allocator sets.
_PROBE = """
import ctypes, ctypes.util, resource
from mtl_ray.runtime import tune_allocator
applied = tune_allocator()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def faults(n=64 << 20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(n); libc.memset(p, 1, n); libc.free(p)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(applied, *[faults() for _ in range(3)])
"""
PAGES = (64 << 20) // 4096  # faults of one round when the block went back to the OS at the last free

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt tuning is glibc-only")


def _probe(tune: str) -> tuple[str, list[int]]:
    env = {**os.environ, "MTL_RAY_TUNE_MALLOC": tune}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    applied, *faults = out.stdout.split()
    return applied, [int(f) for f in faults]


@glibc_only
def test_tuned_heap_reuses_a_freed_block_without_page_faults():
    # A trim threshold that ctypes silently masked to 0 (1 << 40 did) trims the heap at every free: ~PAGES here.
    applied, faults = _probe("1")
    assert applied == "True"
    assert faults[0] > PAGES // 2  # the first round does fault: the probe counts what it should
    assert max(faults[1:]) < PAGES // 10, f"page faults per round {faults}: freed memory went back to the OS"


@glibc_only
def test_untuned_heap_returns_the_block_to_the_os():
    applied, faults = _probe("0")
    assert applied == "False"
    assert min(faults) > PAGES // 2  # glibc mmaps a block this large and unmaps it on free
