"""Functional layers that behave correctly under ``torch.func.vmap(grad(...))``.

Batch norm is written out by hand: torch 2.13's built-in batch norm under ``vmap(grad)`` gives a
silently wrong second-order meta-gradient (docs/architecture.md, "Facts this design rests on"; functorch
issue 534). There are no running buffers: statistics come from the input itself, from its first ``ref`` rows
when ``ref`` is given (the support set, which the algorithms put first: ``model.norm=support``,
docs/architecture.md "Normalisation"), else from all of its rows (``model.norm=transductive``, the
mode of MAML's reference implementation, in which a query's output depends on the other queries).

Convolutions (``model.conv_impl``):

* ``"folded"`` (default): a block whose input has few channels (the first block of an image model,
  ``C*3*3 <= STEM_MAX_PATCH``) runs as :func:`folded_block`: batch-norm statistics from the patch
  covariance, the norm folded into the conv weights, one GEMM, max-pool over pooling phases. The first
  block's activations are a model's largest tensors, and every elementwise pass of batch norm and its
  second-order backward over them is a full memory sweep (docs/benchmarks.md, "Vectorised meta-gradient
  vs a per-task loop", has its share of a meta-batch). Wider blocks use ``F.conv2d``.
* ``"native"``: ``F.conv2d`` and :func:`batch_norm` in every block.
* ``"im2col"``: unfold + one batched GEMM in every block (measured slower; kept to compare).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-5
# Largest patch (in_channels * 3 * 3) computed by folded_block under conv_impl="folded": up to an RGB image's.
STEM_MAX_PATCH = 27


def batch_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = BN_EPS,
               ref: int | None = None, ref_grad: bool = True) -> torch.Tensor:
    """Batch-statistics norm over all dims but 1: ``x [N, C, ...]``, ``weight, bias [C]``.

    The statistics are those of ``x[:ref]`` (all of ``x`` when ``ref`` is None), so with ``ref`` set an
    output row ``i >= ref`` depends on the reference rows and row ``i`` alone. ``ref_grad=False`` makes
    those reference statistics constants to differentiation (first-order learners, docs/architecture.md).
    Folded into one per-channel scale and shift (``x * scale + shift``) after a single ``var_mean``
    pass: two full-size elementwise ops instead of six, which is most of Conv4's time under ``vmap``.
    """
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x if ref is None else x[:ref], dim=dims, correction=0, keepdim=True)
    if ref is not None and not ref_grad:
        var, mean = var.detach(), mean.detach()
    shape = [1, -1] + [1] * (x.dim() - 2)
    scale = torch.rsqrt(var + eps) * weight.view(shape)
    return torch.addcmul(bias.view(shape) - mean * scale, x, scale)


def folded_block(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                 *, stride: int, pool: bool, eps: float = BN_EPS, ref: int | None = None,
                 ref_grad: bool = True) -> torch.Tensor:
    """``relu(maxpool2x2(batch_norm(conv(x))))`` (or without the pool) computed without a pass over the conv output.

    ``x [N, C, H, W]``, ``weight [O, C, k, k]`` (padding ``k // 2``), ``bias, gamma, beta [O]`` -> ``[N, O, H', W']``.
    Equal to :class:`ConvBlock`'s plain form in exact arithmetic (float64: 1e-14), for inputs with few channels:

    * Statistics: with patches ``p [M, K]`` (``K = C*k*k``, one row per output position of all ``N``
      images, zero padding included), channel ``o``'s conv output ``w_o . p + b_o`` has mean
      ``w_o . mu + b_o`` and variance ``w_o^T Sigma w_o`` (``mu``, ``Sigma``: patch mean and covariance,
      ``K x K``). These come from the input alone, so no full-size tensor enters the norm, its
      backward or its second-order backward.
    * Folding: ``gamma (w . p + b - mean) / sqrt(var + eps) + beta = w' . p + b'`` with ``w' = s w``,
      ``b' = beta + s (b - mean)``, ``s = gamma / sqrt(var + eps)``. The conv bias cancels: its
      gradient is exactly 0 (the plain form gives it rounding noise), but it stays in the graph, so
      DistributedDataParallel (pretraining) sees every parameter used.
    * Pooling: the GEMM ``[O, K+1] @ [K+1, N * 4 * H'W']`` (a ones row carries ``b'``) writes the
      outputs grouped by 2x2 window offset, so the pool is a max over 4 slabs, ties going to the first
      offset in row-major order as in ``F.max_pool2d``. Positions outside the pooled area (odd sizes)
      count in the statistics, as in the plain form.
    * ``ref``, ``ref_grad``: the statistics are those of the first ``ref`` images (all when None), constants to
      differentiation when ``ref_grad`` is False, as in :func:`batch_norm`.
    """
    n, _, h, w = x.shape
    o, k = weight.shape[0], weight.shape[-1]
    cols = F.unfold(x, k, padding=k // 2, stride=stride)  # [N, K, L]: the input only, never differentiated
    ho, wo = (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1
    with torch.autocast(x.device.type, enabled=False):  # statistics in the input's precision, also under bf16
        stats = cols if ref is None else cols[:ref]
        mu = stats.mean(dim=(0, 2))  # [K]
        centred = stats - mu[:, None]
        cov = torch.einsum("nkl,njl->kj", centred, centred) / (stats.shape[0] * ho * wo)  # [K, K]
        wf = weight.reshape(o, -1)  # [O, K]
        var = ((wf @ cov) * wf).sum(1).clamp_min(0.0)  # [O]
        mean = wf @ mu + bias  # [O]
        if ref is not None and not ref_grad:
            var, mean = var.detach(), mean.detach()
        scale = gamma * torch.rsqrt(var + eps)
        shift = beta + scale * (bias - mean)
        folded = torch.cat([wf * scale[:, None], shift[:, None]], 1)  # [O, K+1]
    if pool:  # columns ordered (window offset, image, pooled position)
        cols = cols.view(n, -1, ho, wo)
        ho, wo = ho // 2, wo // 2
        cols = cols[:, :, : 2 * ho, : 2 * wo].reshape(n, -1, ho, 2, wo, 2).permute(1, 3, 5, 0, 2, 4)
    else:
        cols = cols.transpose(0, 1)
    cols = cols.reshape(cols.shape[0], -1)
    y = folded @ torch.cat([cols, cols.new_ones(1, cols.shape[1])])  # [O, (4,) N * H'W']
    if pool:
        y = y.view(o, 4, n * ho * wo).max(dim=1).values
    # in x's dtype, as the plain block's norm gives: a bf16 GEMM (autocast) must not hand bf16 to the next conv
    return F.relu(y.view(o, n, ho, wo).transpose(0, 1)).to(x.dtype)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, stride: int, padding: int,
           impl: str) -> torch.Tensor:
    """``x [N, C, H, W]``, ``weight [O, C, k, k]`` -> ``[N, O, H', W']``."""
    if impl in ("native", "folded"):
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

    def __init__(self, cin: int, cout: int, *, downsample: str, pool: bool = True, impl: str = "folded"):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, stride=2 if (downsample == "stride" and pool) else 1)
        self.norm = nn.BatchNorm2d(cout, track_running_stats=False)  # holds weight/bias only
        self.pool = pool and downsample == "pool"
        self.impl = impl
        self.folded = impl == "folded" and cin * 3 * 3 <= STEM_MAX_PATCH

    def forward(self, x: torch.Tensor, ref: int | None = None, ref_grad: bool = True) -> torch.Tensor:
        """``x [N, C, H, W]`` -> ``[N, O, H', W']``, normalised with the statistics of ``x[:ref]`` (None: all)."""
        bias = self.conv.bias
        assert bias is not None, "the conv is built with a bias (nn.Conv2d's default)"
        if self.folded:
            return folded_block(x, self.conv.weight, bias, self.norm.weight, self.norm.bias,
                                stride=self.conv.stride[0], pool=self.pool, ref=ref, ref_grad=ref_grad)
        x = conv2d(x, self.conv.weight, bias, stride=self.conv.stride[0], padding=1, impl=self.impl)
        x = batch_norm(x, self.norm.weight, self.norm.bias, ref=ref, ref_grad=ref_grad)
        # max-pool before ReLU: equal (ReLU is monotone) and the ReLU touches 4x fewer elements.
        return F.relu(F.max_pool2d(x, 2) if self.pool else x)


class Blocks(nn.Sequential):
    """``nn.Sequential`` that hands the normalisation reference (``ref``, ``ref_grad``) to the blocks that normalise."""

    def forward(self, x: torch.Tensor, ref: int | None = None, ref_grad: bool = True) -> torch.Tensor:
        for layer in self:
            x = layer(x, ref, ref_grad) if isinstance(layer, ConvBlock) else layer(x)
        return x


def block_output_size(size: int, blocks: int, downsample: str, pooled: int | None = None) -> int:
    """Spatial size after ``blocks`` blocks of which the first ``pooled`` downsample."""
    pooled = blocks if pooled is None else pooled
    for _ in range(pooled):
        size = size // 2 if downsample == "pool" else (size + 1) // 2
    return size


class CosineHead(nn.Module):
    """A cosine-similarity classifier: ``logits = s * (z / ||z||) @ (W / ||W_row||)^T`` for ``z [N, D]``, ``W [C, D]``.

    Chen, Liu, Kira, Wang, Huang, "A Closer Look at Few-shot Classification", ICLR 2019 (Baseline++): each class's
    logit is the cosine similarity of the feature to that class's weight vector, times a scale ``s``, which reduces
    intra-class variation of the features. ``learn_scale``: ``s`` is a parameter (``scale``, 0-d) starting at
    ``scale``, as in Gidaris & Komodakis, "Dynamic Few-Shot Visual Learning without Forgetting", CVPR 2018; else a
    fixed constant (Chen et al.: 2 for up to 200 classes, 10 beyond). No bias: it would undo the normalisation.
    """

    def __init__(self, in_features: int, out_features: int, *, scale: float = 10.0, learn_scale: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.start_scale = in_features, out_features, float(scale)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.scale: nn.Parameter | float = nn.Parameter(torch.tensor(self.start_scale)) if learn_scale else scale
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # nn.Linear's weight initialisation
        if isinstance(self.scale, nn.Parameter):
            with torch.no_grad():
                self.scale.fill_(self.start_scale)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``[N, D] -> [N, C]``."""
        return self.scale * (F.normalize(z, dim=-1) @ F.normalize(self.weight, dim=-1).t())
