"""Per-channel input normalisation: a dataset's channel mean and standard deviation, computed once when its table
is written, applied to every image a model sees.

Pixels enter as floats in [0, 1] (``uint8 / 255``, :func:`mtl_ray.data.base.to_float_images`); a model trained on a
table with recorded statistics sees ``(x - mean[c]) / std[c]`` per channel ``c`` (the usual ImageNet-style
normalisation of the few-shot papers, e.g. Chen et al. 2019, Tian et al. 2020, with each dataset's own numbers).
The statistics travel with the run (``data.channel_mean`` / ``data.channel_std`` in its config and checkpoints), so
meta-training, evaluation, the Python API, the served model and pretraining all apply the same numbers to the same
pixels: :func:`normalise` is the one implementation they call.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# What a run records when its inputs are not normalised: one value broadcast over every channel, the identity.
IDENTITY: tuple[tuple[float, ...], tuple[float, ...]] = ((0.0,), (1.0,))
_CHUNK = 4096  # images per accumulation step (bounds the float64 temporaries of a 60,000-image table)


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation of uint8 images ``[N, C, H, W]``, as pixel values in
    [0, 1]: ``(mean [C], std [C])``. Sums are exact integers (no float drift over many images); a constant channel
    gets std 1 (nothing to scale)."""
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"channel_stats: got dtype {x.dtype} with shape {tuple(x.shape)}, expected uint8 "
                         "[N, C, H, W] with N >= 1")
    c = x.shape[1]
    total = np.zeros(c, np.int64)
    squares = np.zeros(c, np.int64)
    for start in range(0, x.shape[0], _CHUNK):
        part = x[start:start + _CHUNK].astype(np.int64)
        total += part.sum(axis=(0, 2, 3))
        squares += (part * part).sum(axis=(0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / n
    var = np.maximum(squares / n - mean * mean, 0.0)
    std = np.sqrt(var)
    std = np.where(std > 0, std, 255.0)  # a constant channel: leave its scale alone (255 / 255 = 1)
    return tuple(float(v) / 255.0 for v in mean), tuple(float(v) / 255.0 for v in std)


def is_identity(mean: Sequence[float], std: Sequence[float]) -> bool:
    """Whether ``(mean, std)`` leaves inputs as they are (empty, or all zeros and ones)."""
    return all(v == 0.0 for v in mean) and all(v == 1.0 for v in std)


def normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float], *, inplace: bool = False) -> torch.Tensor:
    """``x [..., C, H, W]`` float pixels in [0, 1] -> ``(x - mean[c]) / std[c]``; a length-1 ``mean``/``std``
    applies to every channel. Returns ``x`` itself when the statistics are the identity (or empty), so a run without
    them computes exactly what it did before they existed. ``inplace``: overwrite ``x`` (a tensor the caller owns;
    the same bits, without two more tensors of its size)."""
    if is_identity(mean, std):
        return x
    shape = (-1, 1, 1)
    m = torch.tensor(list(mean), dtype=x.dtype, device=x.device).reshape(shape)
    s = torch.tensor(list(std), dtype=x.dtype, device=x.device).reshape(shape)
    return x.sub_(m).div_(s) if inplace else (x - m) / s


def stats_problems(mean: Sequence[float], std: Sequence[float], channels: int, where: str) -> list[str]:
    """Why ``(mean, std)`` cannot normalise ``channels``-channel images (empty when it can)."""
    if len(mean) != len(std):
        return [f"{where}: got {len(mean)} channel mean(s) and {len(std)} std(s), expected one of each per channel"]
    if len(mean) not in (0, 1, channels):
        return [f"{where}: got {len(mean)} channel statistics for {channels}-channel images, expected {channels} "
                "(or 1 for all channels); set data.channel_mean/data.channel_std to match the data, or leave them "
                "empty to take the table's"]
    return []
