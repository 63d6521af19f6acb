"""The config's component checks, derived from the registries, and the one public way to build a config.

:mod:`mtl_ray.config` (layer 0) knows the config's types and the rules that need no component; it may not import
the registries. This module sits above them (between the algorithms and the distributed layer,
tests/test_import_layers.py): :func:`component_problems` checks every name choice (``data.source``, ``model.name``,
``algorithm.name``) and every combination of capabilities, reading each component's class attributes
(:class:`~mtl_ray.algorithms.base.FunctionalAlgorithm`, :class:`~mtl_ray.models.registry.ModelClass`,
:class:`~mtl_ray.data.base.SourceSpec`); :func:`from_dict` and :func:`load_config` raise one
:class:`~mtl_ray.config.ConfigError` with the static and the component problems together. Every entry point
builds its configs here, so none can skip the component checks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mtl_ray.algorithms.registry import ALGORITHMS
from mtl_ray.config import (
    Config,
    ConfigError,
    _choice,
    _positive,
    parse,
    read_config_file,
    set_checked_from_dict,
)
from mtl_ray.data.normalise import is_identity
from mtl_ray.data.registry import SOURCES
from mtl_ray.models.registry import MODELS

__all__ = ["component_problems", "from_dict", "load_config"]


def _expected(names: Sequence[str]) -> str:
    """``'mlp'`` for one name, ``one of: a, b`` for several."""
    return repr(names[0]) if len(names) == 1 else f"one of: {', '.join(names)}"


def component_problems(cfg: Config) -> list[str]:
    """Problems of the components ``cfg`` names and of how they combine, each naming got, expected and the fix.

    Unknown names are reported once (with the registered ones); the capability checks then skip that component.
    """
    d, m, a = cfg.data, cfg.model, cfg.algorithm
    p: list[str] = []
    _choice(p, "data.source", d.source, list(SOURCES))
    _choice(p, "model.name", m.name, list(MODELS))
    _choice(p, "algorithm.name", a.name, list(ALGORITHMS))
    source, model, alg = SOURCES.get(d.source), MODELS.get(m.name), ALGORITHMS.get(a.name)
    regression = source is not None and source.kind == "regression"

    if source is not None:
        p += source.check(d)
        if source.load is None and (d.augment or not is_identity(d.channel_mean, d.channel_std)):
            pools = [n for n, spec in SOURCES.items() if spec.load is not None]
            p.append(f"data.augment/data.channel_mean/data.channel_std: got {d.augment!r}/{list(d.channel_mean)}/"
                     f"{list(d.channel_std)} with data.source={d.source}, expected ''/[]/[] (they apply to the "
                     f"episodes of {', '.join(pools)})")
        if source.path and not d.path:
            p.append(f"data.path: empty, expected {source.path} when data.source={d.source}")
    if not regression and d.ways < 2:
        p.append(f"data.ways: got {d.ways}, expected >= 2 (a classification task needs two classes)")
    if a.finetune_steps > 0 and regression:
        p.append(f"algorithm.finetune_steps: got {a.finetune_steps} with data.source={d.source} (regression), expected "
                 "0: test-time fine-tuning starts a head from class prototypes (classification only); set it to 0")
    if cfg.optim.hard_tasks > 0 and source is not None and not source.samples_classes:
        sampling = [n for n, spec in SOURCES.items() if spec.samples_classes]
        why = ("regression tasks have no classes" if regression else
               f"{d.source}'s episodes cannot be sampled over given classes")
        p.append(f"optim.hard_tasks: got {cfg.optim.hard_tasks} with data.source={d.source}, expected 0: hard tasks "
                 f"are re-sampled from each task's failure class (its lowest query accuracy) and {why}; set "
                 f"optim.hard_tasks=0, or use a source that samples classes ({', '.join(sampling)})")
    if a.finetune_augment and source is not None and not source.images:
        p.append(f"algorithm.finetune_augment: got true with data.source={d.source}, expected false: it augments "
                 "images (crop, flip, colour jitter); set algorithm.finetune_augment=false")

    if model is not None:
        p += model.config_problems(cfg)
        # set but never read: refuse, do not ignore (a non-finite value has its own problem already)
        if m.dropblock and math.isfinite(m.dropblock) and "dropblock" not in model.config_keys:
            dropping = [n for n, cls in MODELS.items() if "dropblock" in cls.config_keys]
            p.append(f"model.dropblock: got {m.dropblock} with model.name={m.name}, expected 0 ({m.name} has no "
                     f"DropBlock; {', '.join(dropping)} has)")
        if source is not None and model.image_input and not source.images:
            takes_vectors = [n for n, cls in MODELS.items() if not cls.image_input]
            p.append(f"model.name: got {m.name!r} with data.source={d.source}, expected {_expected(takes_vectors)}")

    if alg is None:
        _positive(p, "algorithm.inner_steps", a.inner_steps)
        return p
    _positive(p, "algorithm.inner_steps", a.inner_steps, allow_zero=not alg.has_inner_loop)
    if a.compile and not alg.compilable:
        p.append(f"algorithm.compile: got true with algorithm.name={a.name}, expected false ({a.name}'s update is "
                 "not a meta-gradient; nothing to compile)")
    if alg.needs_init and not m.init:
        p.append(f"algorithm.name: got {a.name!r} with model.init empty; {a.name} adapts a pretrained body: set "
                 "model.init to a checkpoint or run dir of `mtl-ray pretrain`")
    if m.init and not alg.accepts_init:
        accepting = [n for n, cls in ALGORITHMS.items() if cls.accepts_init]
        p.append(f"model.init: {a.name} cannot start from a pretrained body (its model has a different layout); "
                 f"drop model.init or pick another algorithm ({', '.join(accepting)})")
    if regression and not alg.supports_regression:
        fits = [n for n, cls in ALGORITHMS.items() if cls.supports_regression]
        p.append(f"algorithm.name: got {a.name!r} with data.source={d.source} (regression); "
                 f"expected {_expected(fits)}")
    elif not regression and alg.model_names and m.name not in alg.model_names:
        p.append(f"model.name: got {m.name!r} with algorithm.name={a.name}, expected {_expected(alg.model_names)}")
    return p


def from_dict(raw: Mapping[str, Any] | None, overrides: Sequence[str] = ()) -> Config:
    """Build a checked :class:`Config`; raises one :class:`ConfigError` listing every static and component problem."""
    cfg, problems = parse(raw, overrides)
    if cfg is not None:
        problems += [q for q in component_problems(cfg) if q not in problems]
    if problems:
        raise ConfigError(problems)
    assert cfg is not None
    return cfg


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config file (or the defaults when ``path`` is None), apply overrides and check it all."""
    return from_dict(read_config_file(path), overrides)


set_checked_from_dict(from_dict)  # Config.replace re-checks through from_dict (see mtl_ray.config)
