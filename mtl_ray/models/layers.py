"""Functional layers that behave correctly under ``torch.func.vmap(grad(...))``.

Batch norm is written out by hand: torch 2.13's built-in batch norm under ``vmap(grad)`` gives a
silently wrong second-order meta-gradient (see ../shared/notes/torch-func-facts.md, functorch issue
534). Statistics are always the batch's own (per task under ``vmap``; the "transductive" mode that
MAML's reference implementation uses), so no running buffers exist and train/eval behave the same.

Convolutions default to ``F.conv2d`` ("native"). The im2col form (unfold + one batched GEMM) is kept
as an option, but bench/throughput.py measured it 1.6-1.8x slower end to end on a 2-core CPU with
torch 2.13: batch norm and ReLU at 28x28 dominate, not the grouped convolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-5


def batch_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = BN_EPS) -> torch.Tensor:
    """Batch-statistics norm over all dims but 1: ``x [N, C, ...]``, ``weight, bias [C]``.

    Folded into one per-channel scale and shift (``x * scale + shift``) after a single ``var_mean``
    pass: two full-size elementwise ops instead of six, which is most of Conv4's time under ``vmap``.
    """
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
    shape = [1, -1] + [1] * (x.dim() - 2)
    scale = torch.rsqrt(var + eps) * weight.view(shape)
    return torch.addcmul(bias.view(shape) - mean * scale, x, scale)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, stride: int, padding: int,
           impl: str) -> torch.Tensor:
    """``x [N, C, H, W]``, ``weight [O, C, k, k]`` -> ``[N, O, H', W']``."""
    if impl == "native":
        return F.conv2d(x, weight, bias, stride=stride, padding=padding)
    n, _, h, w = x.shape
    o, _, kh, kw = weight.shape
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (w + 2 * padding - kw) // stride + 1
    cols = F.unfold(x, (kh, kw), padding=padding, stride=stride)  # [N, C*k*k, L]
    out = cols.transpose(1, 2) @ weight.reshape(o, -1).t()  # [N, L, O]: one GEMM over N*L rows
    out = out + bias
    return out.transpose(1, 2).reshape(n, o, ho, wo)


class ConvBlock(nn.Module):
    """3x3 conv -> batch norm (batch statistics) -> ReLU -> 2x2 max-pool (or stride-2 conv)."""

    def __init__(self, cin: int, cout: int, *, downsample: str, pool: bool = True, impl: str = "im2col"):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, stride=2 if (downsample == "stride" and pool) else 1)
        self.norm = nn.BatchNorm2d(cout, track_running_stats=False)  # holds weight/bias only
        self.pool = pool and downsample == "pool"
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = conv2d(x, self.conv.weight, self.conv.bias, stride=self.conv.stride[0], padding=1, impl=self.impl)
        x = batch_norm(x, self.norm.weight, self.norm.bias)
        # max-pool before ReLU: equal (ReLU is monotone) and the ReLU touches 4x fewer elements.
        return F.relu(F.max_pool2d(x, 2) if self.pool else x)


def block_output_size(size: int, blocks: int, downsample: str, pooled: int | None = None) -> int:
    """Spatial size after ``blocks`` blocks of which the first ``pooled`` downsample."""
    pooled = blocks if pooled is None else pooled
    for _ in range(pooled):
        size = size // 2 if downsample == "pool" else (size + 1) // 2
    return size
