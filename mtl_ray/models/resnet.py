"""ResNet-12, the few-shot field's standard backbone, functional and exact under ``torch.func.vmap(grad(...))``.

Lee, Maji, Ravichandran, Soatto. "Meta-Learning with Differentiable Convex Optimization" (MetaOptNet), CVPR 2019;
Oreshkin, Rodriguez, Lacoste. "TADAM: Task dependent adaptive metric for improved few-shot learning", NeurIPS 2018.
Four residual blocks; each is three 3x3 convs (no bias: batch norm follows each) with batch norm after every conv
and leaky ReLU (slope 0.1) after the first two, a 1x1 conv + batch norm shortcut, the sum, leaky ReLU and a 2x2
max-pool. Widths 64-160-320-640 (``model.widths``).

Batch norm is :func:`mtl_ray.models.layers.batch_norm` (no running buffers; statistics from the first ``ref``
rows under ``model.norm=support``, docs/architecture.md "Normalisation"), so the vmapped meta-gradient equals a
per-task loop to second order (tests/models/test_resnet.py, tests/algorithms/test_grid.py).

DropBlock (Ghiasi, Lin, Le. "DropBlock: A regularization method for convolutional networks", NeurIPS 2018),
``model.dropblock`` > 0, in the last two blocks as MetaOptNet has it, runs only when the caller hands in one
integer key per example (``drop_keys``): supervised pretraining does (:func:`pretrain_drop_keys`), meta-training,
evaluation and serving do not, so they never drop. The mask is a counter-based hash of (key, block, channel,
position), not a draw from torch's global generator, so it is the same on any device, in any batch and for any
number of workers. Meta-training does not drop because its masks would have to come from each task's coordinates
through ``vmap``, which the algorithms do not pass to the model.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mtl_ray.config import Config, ModelConfig
from mtl_ray.models.layers import BN_EPS, STEM_MAX_PATCH, batch_norm

SLOPE = 0.1  # leaky ReLU slope (MetaOptNet, TADAM)
BLOCKS = 4
DROP_BLOCKS = (2, 3)  # DropBlock in the last two blocks (MetaOptNet's resnet12)
CONV_IMPLS = ("folded", "native")
# Peak RSS of one vmapped 5-way 1+15 84x84 MAML task over what activation_floats counts times the memory estimate's
# graph factor: 1.69 / 1.72 second order (1 / 5 inner steps), 1.45 / 1.41 first order (docs/benchmarks.md,
# "Backbones: speed and memory"); the rest is backward's own buffers (conv and leaky ReLU gradients, the pool's).
MEASURED_OVER_COUNTED = 1.69


class Conv(nn.Conv2d):
    """A bias-free conv initialised as MetaOptNet does (Kaiming normal, fan-out, leaky ReLU gain)."""

    def __init__(self, cin: int, cout: int, k: int):
        super().__init__(cin, cout, k, padding=k // 2, bias=False)

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="leaky_relu")


def _norm(cout: int) -> nn.BatchNorm2d:
    # holds weight (init 1) and bias (init 0) only; the statistics are computed by layers.batch_norm
    return nn.BatchNorm2d(cout, track_running_stats=False)


def folded_stem(x: torch.Tensor, weights: list[torch.Tensor], gammas: list[torch.Tensor], betas: list[torch.Tensor],
                *, ref: int | None, ref_grad: bool, eps: float = BN_EPS) -> list[torch.Tensor]:
    """``batch_norm(conv(x))`` for several bias-free convs of one few-channel input, each one conv, no norm pass.

    ``x [N, C, H, W]``; ``weights[i] [O_i, C, k_i, k_i]`` (odd ``k_i <= 3``, padding ``k_i // 2``), ``gammas[i],
    betas[i] [O_i]`` -> ``[N, O_i, H, W]`` each. Equal to ``batch_norm(F.conv2d(x, w, padding=k // 2), gamma, beta,
    ref=ref, ref_grad=ref_grad)`` in exact arithmetic (float64: tests/models/test_resnet.py): channel ``o``'s conv
    output ``w_o . p`` over 3x3 patches ``p`` (zero padding included; a 1x1 kernel is a 3x3 one with zeros around
    its centre) has mean ``w_o . mu`` and variance ``w_o^T Sigma w_o``, with ``mu`` and ``Sigma`` the patch mean and
    covariance of ``x[:ref]`` (``K x K``, ``K = 9 C``, as :func:`mtl_ray.models.layers.folded_block` computes
    them), shared by all the convs. The norm then folds into each conv (``w' = s w``, bias ``beta - s mean``), so
    the block's largest tensors are written once and no elementwise pass of the norm or of its first and
    second-order backward runs over them. One conv per weight, not one stacked conv sliced afterwards: each slice's
    backward fills a zero tensor of the stacked size.
    """
    with torch.autocast(x.device.type, enabled=False):  # statistics in the input's precision, also under bf16
        stats = x if ref is None else x[:ref]
        cols = F.unfold(stats, 3, padding=1)  # [R, K, L]: the input only
        mu = cols.mean(dim=(0, 2))  # [K]
        centred = cols - mu[:, None]
        cov = torch.einsum("nkl,njl->kj", centred, centred) / (cols.shape[0] * cols.shape[2])  # [K, K]
        folded = []
        for w, gamma, beta in zip(weights, gammas, betas, strict=True):
            flat = F.pad(w, [(3 - w.shape[-1]) // 2] * 4).reshape(w.shape[0], -1)  # [O, K]
            var = ((flat @ cov) * flat).sum(1).clamp_min(0.0)  # [O]
            mean = flat @ mu  # [O]
            if ref is not None and not ref_grad:
                var, mean = var.detach(), mean.detach()
            scale = gamma * torch.rsqrt(var + eps)
            folded.append((w * scale[:, None, None, None], beta - scale * mean))
    return [F.conv2d(x, w, b, padding=orig.shape[-1] // 2) for (w, b), orig in zip(folded, weights, strict=True)]


# ------------------------------------------------------------------------------------------------ DropBlock

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for ``0 <= x < 2**32`` in int64 without overflow (16-bit halves)."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' "lowbias32" finaliser) on int64 tensors holding values in ``[0, 2**32)``."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def dropblock_mask(keys: torch.Tensor, salt: int, shape: tuple[int, int, int], rate: float,
                   size: int) -> torch.Tensor:
    """DropBlock's keep mask ``[N, C, H, W]`` (0 or 1) for examples with integer ``keys [N]`` (int64, >= 0).

    Seeds (block centres) fall with probability ``gamma = rate / size**2 * H*W / ((H-size+1)*(W-size+1))`` at each
    of the ``(H-size+1) x (W-size+1)`` positions whose ``size x size`` block fits (Ghiasi et al. 2018, eq. 1); each
    seed drops its block. Example ``i``'s mask is a function of ``keys[i]``, ``salt`` and the position only: the same
    in any batch, on any device.
    """
    c, h, w = shape
    hr, wr = h - size + 1, w - size + 1
    gamma = rate / size ** 2 * (h * w) / (hr * wr)
    k = keys.to(torch.int64)
    lo, hi = k & _M32, (k >> 32) & 0x7FFFFFFF
    seed = _mix32(_mix32(lo ^ _mix32(torch.full_like(lo, salt & _M32))) ^ hi)  # [N]
    counter = torch.arange(c * hr * wr, device=k.device, dtype=torch.int64).view(1, c, hr, wr)
    u = _mix32(_mix32(counter) ^ seed.view(-1, 1, 1, 1))  # [N, C, Hr, Wr], uniform on [0, 2**32)
    seeds = (u < int(gamma * 2.0 ** 32)).to(torch.float32)
    dropped = F.max_pool2d(F.pad(seeds, [size - 1] * 4), size, stride=1)  # [N, C, H, W]
    return 1.0 - dropped


def pretrain_drop_keys(seed: int, step: int, indices: np.ndarray) -> torch.Tensor:
    """Supervised pretraining's DropBlock keys ``[N]``: one per (seed, step, training example index).

    Indices within one step are distinct (sampled without replacement), so every example of a step has its own
    mask, and a worker's share of the batch gets the masks it would get on one worker.
    """
    salt = int(np.random.SeedSequence([seed, 0xD0B1, step]).generate_state(1)[0]) & 0x7FFFFFFF
    return torch.as_tensor(np.asarray(indices, dtype=np.int64) + (salt << 32))


def drop_block(x: torch.Tensor, keys: torch.Tensor, salt: int, rate: float, size: int) -> torch.Tensor:
    """``x [N, C, H, W]`` with DropBlock's blocks zeroed and the rest scaled by ``numel / kept`` (MetaOptNet)."""
    mask = dropblock_mask(keys.to(x.device), salt, tuple(x.shape[1:]), rate, size).to(x.dtype)  # type: ignore[arg-type]
    return x * (mask * (mask.numel() / mask.sum().clamp_min(1.0)))


# ------------------------------------------------------------------------------------------------ the network


class ResBlock(nn.Module):
    """``[N, Cin, H, W] -> [N, Cout, H//2, W//2]``: three 3x3 conv + norm (leaky ReLU after the first two), a
    1x1 conv + norm shortcut, sum, leaky ReLU, 2x2 max-pool; DropBlock when a rate and keys are given."""

    def __init__(self, cin: int, cout: int, *, impl: str = "folded", dropblock: float = 0.0,
                 dropblock_size: int = 5):
        super().__init__()
        self.conv1, self.norm1 = Conv(cin, cout, 3), _norm(cout)
        self.conv2, self.norm2 = Conv(cout, cout, 3), _norm(cout)
        self.conv3, self.norm3 = Conv(cout, cout, 3), _norm(cout)
        self.shortcut, self.shortcut_norm = Conv(cin, cout, 1), _norm(cout)
        # An input with few channels (the image): conv1 and the shortcut as folded convs (folded_stem). Measured on
        # one second-order MAML task, 5-way 1+15, 84x84 RGB, widths 64-160-320-640, 1 thread: 35-37 s CPU and
        # 5.9 GiB peak RSS, against 45-46 s and 6.4-6.7 GiB with plain F.conv2d + batch_norm ("native").
        self.folded = impl == "folded" and cin * 3 * 3 <= STEM_MAX_PATCH
        self.dropblock, self.dropblock_size = dropblock, dropblock_size

    def forward(self, x: torch.Tensor, ref: int | None = None, ref_grad: bool = True,
                drop_keys: torch.Tensor | None = None, salt: int = 0) -> torch.Tensor:
        if self.folded:
            z, skip = folded_stem(x, [self.conv1.weight, self.shortcut.weight], [self.norm1.weight,
                                  self.shortcut_norm.weight], [self.norm1.bias, self.shortcut_norm.bias],
                                  ref=ref, ref_grad=ref_grad)
            z = F.leaky_relu(z, SLOPE)
        else:
            z = F.leaky_relu(self._conv_norm(self.conv1, self.norm1, x, ref, ref_grad), SLOPE)
            skip = self._conv_norm(self.shortcut, self.shortcut_norm, x, ref, ref_grad)
        z = F.leaky_relu(self._conv_norm(self.conv2, self.norm2, z, ref, ref_grad), SLOPE)
        z = self._conv_norm(self.conv3, self.norm3, z, ref, ref_grad) + skip
        # max-pool before the leaky ReLU: equal (it is strictly increasing) and it touches 4x fewer elements
        z = F.leaky_relu(F.max_pool2d(z, 2), SLOPE)
        if self.dropblock > 0 and drop_keys is not None:
            z = drop_block(z, drop_keys, salt, self.dropblock, self.dropblock_size)
        return z

    @staticmethod
    def _conv_norm(conv: nn.Conv2d, norm: nn.BatchNorm2d, x: torch.Tensor, ref: int | None,
                   ref_grad: bool) -> torch.Tensor:
        y = F.conv2d(x, conv.weight, None, padding=conv.padding)
        return batch_norm(y, norm.weight, norm.bias, ref=ref, ref_grad=ref_grad)


class ResNetBody(nn.ModuleList):
    """The residual blocks, then a global average pool: ``[N, C, S, S] -> [N, widths[-1]]``."""

    def forward(self, x: torch.Tensor, ref: int | None = None, ref_grad: bool = True,
                drop_keys: torch.Tensor | None = None) -> torch.Tensor:
        for i, block in enumerate(self):
            x = block(x, ref, ref_grad, drop_keys, salt=i)
        return x.mean(dim=(2, 3))


class ResNet12(nn.Module):
    """ResNet-12 (Lee et al. 2019; Oreshkin et al. 2018): ``x [N, C, S, S] -> [N, out]`` (``[N, widths[-1]]``
    without a head).

    Features are the global average pool of the last block (``feature_dim = widths[-1]``), as in TADAM,
    Meta-Baseline (Chen et al. 2021) and P>M>F (Hu et al. 2022). MetaOptNet flattens its ``640 x 5 x 5`` map
    instead (16,000 features at 84x84); the average keeps the head and the prototypes the same size at any
    image size and is what the pretrain-then-meta-learn recipes this project follows use.

    ``drop_keys [N]`` (int64): DropBlock's per-example keys; without them (every meta-learning and evaluation
    call) nothing is dropped (see the module docstring).
    """

    image_input: ClassVar[bool] = True  # ``[C, S, S]`` inputs
    config_keys: ClassVar[frozenset[str]] = frozenset({"name", "init", "widths", "conv_impl", "norm", "dropblock",
                                                       "dropblock_size"})

    @classmethod
    def from_config(cls, m: ModelConfig, x_shape: tuple[int, ...], out_features: int) -> ResNet12:
        return cls(x_shape[0], out_features, widths=m.widths, impl=m.conv_impl, dropblock=m.dropblock,
                   dropblock_size=m.dropblock_size)

    @staticmethod
    def config_problems(cfg: Config) -> list[str]:
        """Widths (four positive), 2 ** 4 pixels a side for the four pools, the conv form, DropBlock's range and a
        block that fits the feature maps of the blocks it drops in."""
        m, d = cfg.model, cfg.data
        p: list[str] = []
        if len(m.widths) != BLOCKS or any(w < 1 for w in m.widths):
            p.append(f"model.widths: got {list(m.widths)}, expected {BLOCKS} positive integers, one per residual "
                     "block (e.g. [64, 160, 320, 640])")
        if d.image_size < 2 ** BLOCKS:
            p.append(f"data.image_size: got {d.image_size}, expected >= {2 ** BLOCKS} for resnet12's {BLOCKS} "
                     "pooling blocks (raise the image size or use model.name=conv4 with fewer model.blocks)")
        if m.conv_impl not in CONV_IMPLS:
            p.append(f"model.conv_impl: got {m.conv_impl!r} with model.name=resnet12, expected one of: "
                     f"{', '.join(CONV_IMPLS)}")
        if not 0.0 <= m.dropblock < 1.0:
            p.append(f"model.dropblock: got {m.dropblock}, expected a drop rate in [0, 1) (0: off)")
        if m.dropblock_size < 1:
            p.append(f"model.dropblock_size: got {m.dropblock_size}, expected a positive block side")
        elif m.dropblock > 0 and d.image_size >= 2 ** BLOCKS:
            smallest = d.image_size >> BLOCKS  # the last block's feature map side
            if m.dropblock_size > smallest:
                p.append(f"model.dropblock_size: got {m.dropblock_size}, expected <= {smallest} (the last block's "
                         f"feature map side at data.image_size={d.image_size}); lower it (MetaOptNet: 5 at 84, "
                         "2 at 32)")
        return p

    @staticmethod
    def activation_floats(cfg: Config, x_shape: tuple[int, ...], out_features: int) -> tuple[float, float]:
        """(floats a forward pass keeps per example, per task besides them), counted from what autograd saves.

        A block keeps 9 maps at its input resolution (each conv's output, batch norm's output and leaky ReLU's for
        the first two convs; the third conv's and the shortcut conv's outputs; the sum the pool reads; the two
        norms whose outputs only the sum reads are freed), 7 when folded (the norm's passes are gone), and at its
        output resolution the pool's output, its int64 indices (2 floats) and the leaky ReLU's. Per task: the
        folded stem's 3x3 patches of the support images (its statistics). Times :data:`MEASURED_OVER_COUNTED`, fitted
        to measured peak memory (second order within 3%, first order 20% over, at 1 and 5 inner steps).
        """
        m, d = cfg.model, cfg.data
        side, cin, floats, per_task = x_shape[-1], x_shape[0], 0.0, 0.0
        for w in m.widths:
            folded = m.conv_impl == "folded" and cin * 9 <= STEM_MAX_PATCH
            if folded:
                per_task += d.ways * d.shots * 9 * cin * side ** 2
            floats += w * ((7 if folded else 9) * side ** 2 + 4 * (side // 2) ** 2)
            side, cin = side // 2, w
        floats += m.widths[-1] if m.widths else 0
        return floats * MEASURED_OVER_COUNTED + out_features, per_task * MEASURED_OVER_COUNTED

    def __init__(self, in_channels: int, out_features: int, *, widths: tuple[int, ...] = (64, 160, 320, 640),
                 impl: str = "folded", dropblock: float = 0.0, dropblock_size: int = 5):
        super().__init__()
        cins = (in_channels, *widths[:-1])
        self.body = ResNetBody([
            ResBlock(cin, cout, impl=impl, dropblock=dropblock if i in DROP_BLOCKS else 0.0,
                     dropblock_size=dropblock_size)
            for i, (cin, cout) in enumerate(zip(cins, widths, strict=True))
        ])
        self.feature_dim = widths[-1]
        self.head = nn.Linear(self.feature_dim, out_features) if out_features else None

    def forward(self, x: torch.Tensor, ref: int | None = None, ref_grad: bool = True,
                drop_keys: torch.Tensor | None = None) -> torch.Tensor:
        z = self.body(x, ref, ref_grad, drop_keys)
        return self.head(z) if self.head is not None else z
