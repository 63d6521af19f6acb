"""Meta-learning from pretrained weights (``model.init``): read a checkpoint's body, check it fits first.

Any checkpoint works as a source (a ``mtl-ray pretrain`` run's, or a meta-training one's); only its
``body.*`` weights are taken, since its head was trained for other classes.
"""

from __future__ import annotations

from mtl_ray.algorithms import Params, uses_head
from mtl_ray.config import Config
from mtl_ray.distributed.checkpoint import CheckpointError, load_checkpoint
from mtl_ray.models import BODY_PREFIX, body_params, build_model


def init_body(cfg: Config) -> Params | None:
    """The body weights ``model.init`` names (None when it is empty)."""
    return body_params(load_checkpoint(cfg.model.init).params) if cfg.model.init else None


def check_init(cfg: Config) -> list[str]:
    """Why ``model.init`` cannot start this config (empty when it can, or when it is unset)."""
    if not cfg.model.init:
        return []
    try:
        ck = load_checkpoint(cfg.model.init)
    except CheckpointError as e:
        return [f"model.init: {e} (write one with `mtl-ray pretrain CONFIG --run-dir DIR`, then model.init=DIR)"]
    body = body_params(ck.params)
    m = ck.config.model
    written = f"model.name={m.name} channels={m.channels} blocks={m.blocks} downsample={m.downsample}"
    if not body:
        return [f"model.init: {cfg.model.init!r} holds no {BODY_PREFIX}* weights; expected a checkpoint of "
                "`mtl-ray pretrain` or `mtl-ray train`"]
    size = ck.shape.x_shape[-1]
    if len(ck.shape.x_shape) == 3 and size != cfg.data.image_size:
        return [f"data.image_size: got {cfg.data.image_size}, expected {size} (model.init was trained on "
                f"{size}x{size} images); set data.image_size={size}"]
    out = cfg.data.ways if uses_head(cfg.algorithm.name) else 0
    want = body_params(dict(build_model(cfg, ck.shape.x_shape, out).named_parameters()))
    bad = [f"{k}: checkpoint {tuple(body[k].shape) if k in body else 'missing'}, model {tuple(v.shape)}"
           for k, v in want.items() if k not in body or body[k].shape != v.shape]
    if bad:
        return [f"model.init: its body does not fit this config's model ({'; '.join(bad[:3])}); it was written with "
                f"{written}: use the same model settings"]
    return []
