"""Sweep specifications: YAML -> a validated :class:`SweepSpec` (every problem reported at once).

A sweep file names a base training config and a search space over any of its keys::

    base: omniglot_maml.yaml            # relative to this file (or absolute)
    overrides: [optim.steps=600]        # applied to the base before sampling
    metric: meta_val/acc
    mode: max
    search: optuna                      # random | grid | optuna (TPE)
    num_samples: 8
    max_concurrent_trials: 2
    trial_cpus: 1                       # the trial's own process; its workers come from scaling.*
    scheduler: {name: asha, grace_period: 2, reduction_factor: 2}   # in validation rounds
    space:
      algorithm.inner_lr: {loguniform: [0.05, 1.0]}
      optim.outer_lr: {loguniform: [1.0e-4, 1.0e-2]}
      algorithm.inner_steps: {choice: [1, 2, 3]}   # randint: [low, high) as in numpy
      optim.meta_batch_size: {grid: [8, 16]}

Every value a domain can produce is checked against the config schema before anything starts
(both bounds of a range, every choice), so a sweep cannot fail in trial 7 on a typo.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mtl_ray import metrics as M
from mtl_ray.components import load_config
from mtl_ray.config import Config, ConfigError, read_yaml, with_absolute_paths

DOMAINS = ("loguniform", "uniform", "randint", "choice", "grid")
SEARCHES = ("random", "grid", "optuna")
SCHEDULERS = ("asha", "fifo")


@dataclass(frozen=True)
class Domain:
    kind: str  # one of DOMAINS
    values: tuple[Any, ...]  # (low, high) for ranges, the options for choice/grid


@dataclass(frozen=True)
class SweepSpec:
    name: str
    base: Config
    space: dict[str, Domain]
    metric: str = M.META_VAL_ACC
    mode: str = "max"
    search: str = "random"
    num_samples: int = 4
    max_concurrent_trials: int = 0  # 0: as many as the cluster's resources allow
    trial_cpus: float = 1.0
    scheduler: str = "asha"
    grace_period: int = 1  # ASHA: validation rounds before a trial can be stopped
    reduction_factor: int = 2
    max_failures: int = 2  # per trial: restarts from its last checkpoint
    source: str = ""  # the YAML file, for messages
    overrides: tuple[str, ...] = field(default=())

    @property
    def rounds(self) -> int:
        """Validation rounds per trial (Tune's ``training_iteration``)."""
        o = self.base.optim
        return max(1, -(-o.steps // o.val_every))


_TOP = {"base", "overrides", "metric", "mode", "search", "num_samples", "max_concurrent_trials", "trial_cpus",
        "scheduler", "space", "max_failures", "name"}


def _yaml_value(text: str) -> Any:
    """An override's value parsed as YAML (``2``, ``true``, ``[a, b]``), else the text itself."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_sweep(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> SweepSpec:
    """Read and validate a sweep file; ``overrides`` (key=value) apply to the base config, except ``sweep.KEY=value``,
    which replaces a top-level key of the sweep file itself (e.g. ``sweep.num_samples=2``)."""
    p = Path(path)
    raw = read_yaml(p, "sweep file", "jobs/configs/sweep_omniglot_maml.yaml")
    if not isinstance(raw, Mapping):
        raise ConfigError([f"sweep file {str(p)!r}: got a {type(raw).__name__}, expected a mapping"])
    own = [o for o in overrides if o.startswith("sweep.") and "=" in o]
    overrides = [o for o in overrides if o not in own]
    raw = {**raw, **{o.split("=", 1)[0].removeprefix("sweep."): _yaml_value(o.split("=", 1)[1]) for o in own}}
    problems = [f"sweep.{k}: unknown key; expected one of {sorted(_TOP)}" for k in raw if k not in _TOP]

    base_ref = raw.get("base")
    base: Config | None = None
    all_overrides = [*(raw.get("overrides") or []), *overrides]
    if not isinstance(base_ref, str):
        problems.append(f"sweep.base: got {base_ref!r}, expected the path of a training config YAML")
    else:
        base_path = Path(base_ref) if Path(base_ref).is_absolute() else p.parent / base_ref
        try:
            base = with_absolute_paths(load_config(base_path, all_overrides))  # trials run in their own dirs
        except ConfigError as e:
            problems += [f"sweep.base ({base_path.name}): {q}" for q in e.problems]

    def pick(key: str, default: Any, kind: type) -> Any:
        v = raw.get(key, default)
        ok = isinstance(v, kind) and not (kind in (int, float) and isinstance(v, bool))
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v, ok = float(v), True
        if kind is float and ok and not math.isfinite(v):
            problems.append(f"sweep.{key}: got {v!r}, expected a finite number")
            return default
        if not ok:
            problems.append(f"sweep.{key}: got {v!r}, expected a {kind.__name__}")
            return default
        return v

    metric = pick("metric", M.META_VAL_ACC, str)
    mode = pick("mode", "max", str)
    search = pick("search", "random", str)
    num_samples = pick("num_samples", 4, int)
    max_conc = pick("max_concurrent_trials", 0, int)
    trial_cpus = pick("trial_cpus", 1.0, float)
    max_failures = pick("max_failures", 2, int)
    if not metric.startswith("meta_val/"):
        problems.append(f"sweep.metric: got {metric!r}, expected a meta-validation metric such as "
                        f"{M.META_VAL_ACC!r} or {M.META_VAL_LOSS!r} (trials report at each validation)")
    if mode not in ("min", "max"):
        problems.append(f"sweep.mode: got {mode!r}, expected 'min' or 'max'")
    if search not in SEARCHES:
        problems.append(f"sweep.search: got {search!r}, expected one of {list(SEARCHES)}")
    if num_samples < 1:
        problems.append(f"sweep.num_samples: got {num_samples}, expected >= 1")
    if max_conc < 0 or max_failures < 0:
        problems.append(f"sweep: max_concurrent_trials={max_conc}, max_failures={max_failures}: expected >= 0")
    if trial_cpus <= 0:  # an empty first bundle is dropped from a placement group, shifting the others
        problems.append(f"sweep.trial_cpus: got {trial_cpus}, expected > 0 (e.g. 0.5)")

    sched_raw = raw.get("scheduler") or {"name": "asha"}
    if isinstance(sched_raw, str):
        sched_raw = {"name": sched_raw}
    scheduler = str(sched_raw.get("name", "asha"))
    if scheduler not in SCHEDULERS:
        problems.append(f"sweep.scheduler.name: got {scheduler!r}, expected one of {list(SCHEDULERS)}")
    grace = sched_raw.get("grace_period", 1)
    factor = sched_raw.get("reduction_factor", 2)
    unknown = set(sched_raw) - {"name", "grace_period", "reduction_factor"}
    if unknown:
        problems.append(f"sweep.scheduler: unknown keys {sorted(unknown)}; expected name, grace_period, "
                        "reduction_factor")
    if not isinstance(grace, int) or grace < 1 or not isinstance(factor, int) or factor < 2:
        problems.append(f"sweep.scheduler: got grace_period={grace!r}, reduction_factor={factor!r}; "
                        "expected integers >= 1 and >= 2")

    space: dict[str, Domain] = {}
    space_raw = raw.get("space")
    if not isinstance(space_raw, Mapping) or not space_raw:
        problems.append(f"sweep.space: got {space_raw!r}, expected a mapping of config keys to domains, "
                        "e.g. {algorithm.inner_lr: {loguniform: [0.01, 1.0]}}")
    else:
        for key, dom in space_raw.items():
            d = _domain(str(key), dom, problems)
            if d is not None:
                space[str(key)] = d
    for key, d in space.items():  # a continuous range over an int/bool/str key: every sampled value fails its trial
        tp = _key_type(key)
        if d.kind in ("uniform", "loguniform") and tp is not None and not _takes_floats(tp):
            kind = "an integer" if int in (tp, *typing.get_args(tp)) else f"a {getattr(tp, '__name__', tp)}"
            want = "randint: [low, high] (integers; high excluded) or choice: [...]" if kind == "an integer" else \
                "choice: [...]"
            problems.append(f"sweep.space.{key}.{d.kind}: got a continuous range {list(d.values)} over {kind} key "
                            f"(Tune samples values like {(d.values[0] + d.values[1]) / 2:g}, which every trial "
                            f"refuses); expected {want}")
    if base is not None:
        if base.optim.val_every <= 0:
            problems.append("optim.val_every: got 0, expected > 0 in a sweep (trials report and checkpoint at "
                            "each meta-validation)")
        for key, d in space.items():  # every value a domain can produce must make a valid config
            for v in d.values:
                try:
                    base.replace(**{key: v})
                except ConfigError as e:
                    problems += [f"sweep.space.{key} value {v!r}: {q}" for q in e.problems]
    if search == "optuna" and any(d.kind == "grid" for d in space.values()):
        problems.append("sweep.space: 'grid' domains need search: grid or random (Optuna samples; use 'choice')")
    if search == "grid" and any(d.kind != "grid" for d in space.values()):
        bad = sorted(k for k, d in space.items() if d.kind != "grid")
        problems.append(f"sweep.search: got 'grid' with non-grid domains {bad}; expected only "
                        "{grid: [...]} domains (or search: random)")
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    assert base is not None
    return SweepSpec(name=str(raw.get("name") or p.stem), base=base, space=space, metric=metric, mode=mode,
                     search=search, num_samples=num_samples, max_concurrent_trials=max_conc, trial_cpus=trial_cpus,
                     scheduler=scheduler, grace_period=grace, reduction_factor=factor, max_failures=max_failures,
                     source=str(p), overrides=tuple(all_overrides))


def _key_type(key: str) -> Any:
    """The config field type of a dotted key (None when there is no such field: the config check names it)."""
    section, _, name = key.rpartition(".")
    top = typing.get_type_hints(Config)
    if not section:
        return None if dataclasses.is_dataclass(top.get(name)) else top.get(name)
    owner = top.get(section)
    return typing.get_type_hints(owner).get(name) if dataclasses.is_dataclass(owner) else None


def _takes_floats(tp: Any) -> bool:
    return tp is float or float in typing.get_args(tp)


def check_sweep(spec: SweepSpec) -> list[str]:
    """The problems a trial would find when it starts (data-dependent checks, the memory estimate) for the base
    config and for every value a domain can produce, each varied alone, and for every numeric key at its largest
    value together (memory). :func:`load_sweep` made the static checks; this one reads the data."""
    from mtl_ray.checkpoint import check_init
    from mtl_ray.data import check_data, splits_used
    from mtl_ray.memory import memory_problems

    data_checked: dict[Any, list[str]] = {}

    def check(cfg: Config) -> list[str]:
        memory = memory_problems(cfg)
        if memory:  # the data checks load the data at these sizes; that is what does not fit
            return memory
        key = (cfg.data, tuple(splits_used(cfg)))
        if key not in data_checked:
            data_checked[key] = check_data(cfg)
        return data_checked[key]

    base = check(spec.base)
    problems = base + check_init(spec.base)
    for key, d in spec.space.items():
        for v in d.values:
            problems += [f"sweep.space.{key} value {v!r}: {q}" for q in check(spec.base.replace(**{key: v}))
                         if q not in base]
    numeric = {k: max(d.values) for k, d in spec.space.items()
               if len(spec.space) > 1 and all(isinstance(v, int | float) and not isinstance(v, bool) for v in d.values)}
    if len(numeric) > 1:
        try:
            corner = spec.base.replace(**numeric)
        except ConfigError:  # each value is valid alone; a combination a trial may also never sample
            corner = None
        if corner is not None:
            together = ", ".join(f"{k}={v!r}" for k, v in numeric.items())
            problems += [f"sweep.space with {together} together (each key's largest value): {q}"
                         for q in memory_problems(corner) if q not in problems and q not in base]
    return list(dict.fromkeys(problems))


def _domain(key: str, dom: Any, problems: list[str]) -> Domain | None:
    where = f"sweep.space.{key}"
    if not isinstance(dom, Mapping) or len(dom) != 1:
        problems.append(f"{where}: got {dom!r}, expected one of {{{', '.join(f'{d}: ...' for d in DOMAINS)}}}")
        return None
    (kind, values), = dom.items()
    if kind not in DOMAINS:
        problems.append(f"{where}: unknown domain {kind!r}; expected one of {list(DOMAINS)}")
        return None
    if not isinstance(values, list) or not values:
        problems.append(f"{where}.{kind}: got {values!r}, expected a non-empty list")
        return None
    if kind in ("loguniform", "uniform", "randint"):
        if len(values) != 2 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values) \
                or not values[0] < values[1]:
            problems.append(f"{where}.{kind}: got {values!r}, expected [low, high] numbers with low < high")
            return None
        if kind == "loguniform" and values[0] <= 0:
            problems.append(f"{where}.loguniform: got low={values[0]!r}, expected > 0")
            return None
        if kind == "randint":
            values = [int(values[0]), int(values[1]) - 1]  # Tune's randint excludes high; check what it yields
    return Domain(kind, tuple(values))


def to_tune_space(spec: SweepSpec) -> dict[str, Any]:
    """The search space as Ray Tune domains, keyed by dotted config key."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, d in spec.space.items():
        if d.kind == "loguniform":
            out[key] = tune.loguniform(*d.values)
        elif d.kind == "uniform":
            out[key] = tune.uniform(*d.values)
        elif d.kind == "randint":
            out[key] = tune.randint(d.values[0], d.values[1] + 1)  # stored inclusive; Tune's high is exclusive
        elif d.kind == "choice":
            out[key] = tune.choice(list(d.values))
        else:
            out[key] = tune.grid_search(list(d.values))
    return out


def trial_config(spec: SweepSpec, params: Mapping[str, Any]) -> Config:
    """The base config with one trial's sampled values applied (validated)."""
    return spec.base.replace(**{k: _plain(v) for k, v in params.items() if k in spec.space})


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):  # numpy scalars from samplers
        return v.item()
    return v
