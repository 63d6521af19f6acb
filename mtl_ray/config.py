"""Configuration: YAML -> typed, frozen config objects, and the checks that need no component.

:func:`parse` reads a mapping, applies ``section.key=value`` overrides (values parsed as YAML scalars),
type-checks every field and runs the component-independent static checks (:func:`check_static`), returning the
config and *every* problem found, without raising. It knows no component names: which algorithms, models and task
sources exist, and what each can do, is in their registries, above this layer. The one public path for every entry
point is therefore :func:`mtl_ray.components.load_config` / :func:`mtl_ray.components.from_dict`: ``parse``, then
the component checks, raising one :class:`ConfigError` with both kinds. Checks that need the data (e.g. ``ways``
larger than the classes a split has) are added by :func:`mtl_ray.data.check_data`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DATA_DIR_ENV = "MTL_RAY_DATA_DIR"

OPTIMIZERS = ("adam", "sgd")
PRETRAIN_SCHEDULES = ("constant", "cosine")  # pretrain.schedule (mtl_ray/distributed/pretrain.py, pretrain_lr)
PRETRAIN_HEADS = ("linear", "cosine")  # pretrain.head (mtl_ray/models/layers.py, CosineHead)
PRETRAIN_PROBES = ("linear", "cosine")  # pretrain.probe (mtl_ray/algorithms/probe.py)
DOWNSAMPLE = ("pool", "stride")
CONV_IMPLS = ("folded", "native", "im2col")
# model.norm: where batch-norm statistics come from (docs/architecture.md, "Normalisation")
NORM_SUPPORT = "support"  # the task's support set, fixed at adaptation: a query's answer depends on nothing else
NORM_TRANSDUCTIVE = "transductive"  # each forward pass's own batch: a query's answer depends on the other queries
NORMS = (NORM_SUPPORT, NORM_TRANSDUCTIVE)
DATA_AUGMENTS = ("", "support")  # data.augment: off, or the support sets of meta-training tasks
REDUCE_FLAT, REDUCE_NODE = "flat", "node"  # scaling.reduce: shard sums straight to the driver, or summed per node
REDUCE_COLLECTIVE = "collective"  # scaling.reduce: replicas on a Ray Train worker group all-reduce meta-gradients
REDUCE_MODES = (REDUCE_FLAT, REDUCE_NODE, REDUCE_COLLECTIVE)


class UserError(ValueError):
    """Bad input from a user (config, data, checkpoint): the CLI prints it and exits 2, no traceback."""


class ConfigError(UserError):
    """Every problem found in a config, reported together."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid config ({len(self.problems)} problem(s)):\n{lines}")


@dataclass(frozen=True)
class DataConfig:
    """Where tasks come from and their shape (N-way K-shot with Q queries per class)."""

    source: str = "omniglot"  # the task source: a name registered in mtl_ray/data/registry.py
    root: str = ""  # data directory; "" means $MTL_RAY_DATA_DIR, else ./data
    download: bool = False  # fetch missing archives from the upstream URL
    ways: int = 5  # classes per task (N-way)
    shots: int = 1  # support examples per class (sinusoid: support points)
    queries: int = 15  # query examples per class (sinusoid: query points)
    image_size: int = 28  # images are resized to image_size x image_size
    # image sources: inputs become (pixel in [0, 1] - channel_mean[c]) / channel_std[c] (one value: every channel);
    # empty: the table's recorded statistics (mtl-ray data convert), else none. A run records what it used
    # ([0.0]/[1.0]: none), so eval, the Python API and the served model normalise alike (docs/datasets.md)
    channel_mean: tuple[float, ...] = ()
    channel_std: tuple[float, ...] = ()  # image sources: see channel_mean
    # image sources: "support" augments the support sets of meta-training tasks (random resized crop, flip, colour
    # jitter; each task's from its coordinates, mtl_ray/data/augment.py); "": off. Validation, eval never augment
    augment: str = ""
    archives: tuple[str, ...] = ("images_background_small1", "images_background_small2")  # omniglot: zips to read
    val_alphabets: tuple[str, ...] = ("Early_Aramaic",)  # omniglot: alphabets of the val split (the rest: train)
    test_alphabets: tuple[str, ...] = ("Korean", "Tagalog")  # omniglot: alphabets of the test split
    rotations: bool = True  # omniglot: 90/180/270-degree rotations of train classes as new classes
    path: str = ""  # parquet: the image table (mtl-ray data convert); relative paths also tried under data.root
    # parquet, digits, fashion_mnist: share of classes in val (a deterministic hash of the label)
    val_fraction: float = 0.0
    test_fraction: float = 0.0  # parquet, digits, fashion_mnist: share of classes in test (same hash)
    # glyphs: a folder of .ttf/.otf fonts, searched recursively (e.g. /usr/share/fonts); "": <data.root>/fonts
    fonts: str = ""
    # glyphs: where rendered glyph tables are cached; "": $XDG_CACHE_HOME/mtl-ray, else ~/.cache/mtl-ray
    cache_dir: str = ""
    scripts: tuple[str, ...] = ()  # glyphs: the scripts (writing systems) to use, e.g. [Latin, Georgian]; empty: all
    val_scripts: tuple[str, ...] = ()  # glyphs: scripts of the val split (besides those script_val_fraction picks)
    test_scripts: tuple[str, ...] = ()  # glyphs: scripts of the test split (besides those script_test_fraction picks)
    script_val_fraction: float = 0.15  # glyphs: share of the other scripts in val (a deterministic hash of the name)
    script_test_fraction: float = 0.2  # glyphs: share of the other scripts in test (same hash)
    glyph_chars: int = 40  # glyphs: at most this many characters per script (by a hash of the code point); 0: all
    glyph_examples: int = 20  # glyphs: examples per character (its fonts in turn, each with geometric jitter)
    # multidomain: the task sources an episode is drawn from, one per episode (Meta-Dataset's sampling)
    domains: tuple[str, ...] = ("omniglot", "glyphs")
    domain_weights: tuple[float, ...] = ()  # multidomain: each domain's chance per episode (normalised); empty: uniform
    # multidomain: domains held out: train and val never sample them, the test split samples only them (all classes)
    test_domains: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelConfig:
    name: str = "conv4"  # the backbone: a name registered in mtl_ray/models/registry.py
    hidden_sizes: tuple[int, ...] = (40, 40)  # mlp: widths of the hidden layers
    channels: int = 64  # conv4 filters per block
    blocks: int = 4  # conv4: conv + batch norm + ReLU (+ pool) blocks
    widths: tuple[int, ...] = (64, 160, 320, 640)  # resnet12: filters of its 4 residual blocks (Lee et al. 2019)
    # resnet12: DropBlock rate in its last two blocks (Ghiasi et al. 2018; MetaOptNet: 0.1), 0 off; applied in
    # `mtl-ray pretrain` only: meta-training, evaluation and serving never drop (mtl_ray/models/resnet.py)
    dropblock: float = 0.0
    dropblock_size: int = 5  # resnet12: DropBlock's block side (MetaOptNet: 5 at 84x84, 2 at 32x32)
    downsample: str = "pool"  # "pool": 2x2 max-pool per block (Vinyals et al.); "stride": stride-2 convs
    # "folded" (first block: batch norm folded into one GEMM, others F.conv2d), "native" (F.conv2d), "im2col"
    conv_impl: str = "folded"
    # Batch-norm statistics: "support" (the task's support set, the same in training, eval, the API and serving;
    # a query's prediction depends on the support set and itself only) or "transductive" (each batch's own, as in
    # MAML's reference code and the papers that report it: predictions depend on the other queries of a call).
    norm: str = NORM_SUPPORT
    # A checkpoint (file, run dir or pyarrow.fs URI) whose body weights start meta-training, usually one
    # `mtl-ray pretrain` wrote. Full mode: every algorithm but mtl fine-tunes them; algorithm.name=mtl freezes them.
    init: str = ""


@dataclass(frozen=True)
class AlgorithmConfig:
    name: str = "maml"  # the meta-learner: a name registered in mtl_ray/algorithms/registry.py
    inner_lr: float = 0.4  # step size of the inner loop (Meta-SGD: its initial per-parameter rates)
    inner_steps: int = 1  # inner-loop steps on the support set in meta-training (0 for metric learners)
    eval_inner_steps: int | None = None  # inner steps when validating, evaluating and serving; None: inner_steps
    first_order: bool = False  # drop the second-order terms of the meta-gradient (FOMAML)
    # test-time fine-tuning (Hu et al. 2022, P>M>F's last stage): validation, eval, the Python API and the served model
    # fine-tune the body and a prototype-initialised linear head on each support set for this many full-batch SGD
    # steps, then predict with them (mtl_ray/algorithms/finetune.py); 0: off, the algorithm adapts as it was trained
    finetune_steps: int = 0
    finetune_lr: float = 0.01  # step size of test-time fine-tuning (see finetune_steps), body and head alike
    # test-time fine-tuning: each step's batch is the support set plus a copy augmented as data.augment=support does
    # (crop, flip, colour jitter, drawn from the task's coordinates: fixed per task); image sources only
    finetune_augment: bool = False
    # tasks per vmap call; 0 (auto): as many as algorithm.chunk_memory_mb holds by mtl_ray/memory.py's per-task estimate
    task_chunk_size: int = 0
    # memory one vmap call's tensors may take with task_chunk_size=0, in MB; 0: CPU min(1024, a quarter of the memory
    # available per process), GPU half the device's memory (mtl_ray/memory.py); chunks change results only by rounding
    chunk_memory_mb: int = 0
    # torch.compile the meta-gradient; each new task shape is first checked against an eager float64 gradient and a
    # compiled one less accurate than eager float32 is an error. Pays for small, dispatch-bound models; speed-ups and
    # the check in docs/benchmarks.md ("Compiled").
    compile: bool = False
    # meta_baseline: the starting value of its learned temperature tau, the scale of its cosine logits (Chen et al.
    # 2021: 10); r2d2: the starting value of its learned scale alpha of the ridge outputs. Both meta-learned from there
    temperature: float = 10.0
    # r2d2: the starting value of its learned ridge regularisation lambda, > 0 (meta-learned as log lambda;
    # Bertinetto et al. 2019: 1)
    ridge_lambda: float = 1.0


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "adam"  # outer optimiser: adam or sgd
    outer_lr: float = 1e-3  # outer (meta) learning rate
    meta_batch_size: int = 32  # tasks per outer step, shared out among the workers
    steps: int = 1000  # outer steps
    grad_clip: float = 0.0  # max global norm of the meta-gradient; 0 disables
    val_every: int = 100  # meta-validate every N steps; 0 disables
    val_tasks: int = 64  # fixed val-split tasks per meta-validation
    max_minutes: float = 0.0  # wall-clock budget of one invocation; stops early (validated, checkpointed); 0: none
    # hard tasks per step (MTL's hard-task meta-batch, Sun et al. 2019): episodes re-sampled from the classes the
    # step's tasks got most wrong, then one more outer step on them; 0: off (docs/architecture.md, "Hard tasks")
    hard_tasks: int = 0


@dataclass(frozen=True)
class PretrainConfig:
    """Supervised many-way pretraining over every class of the train split (``mtl-ray pretrain``, Ray Train)."""

    num_workers: int = 2  # Ray Train data-parallel workers, each with scaling.cpus_per_worker / gpus_per_worker
    steps: int = 2000  # optimiser steps
    batch_size: int = 128  # global batch, split evenly over the workers
    optimizer: str = "adam"  # adam or sgd
    lr: float = 1e-3  # learning rate
    weight_decay: float = 0.0  # decoupled weight decay (AdamW) / L2 (SGD)
    holdout: int = 2  # examples per class kept out of training to measure pretrain/val_acc
    val_every: int = 200  # measure held-out accuracy (and report to Ray Train) every N steps
    max_failures: int = 2  # worker failures Ray Train recovers from (restart from the latest checkpoint)
    max_minutes: float = 0.0  # wall-clock budget; stops early (validated, checkpointed); 0: none
    # How `mtl-ray eval` scores a pretrained checkpoint ("pretrain-only"): a zero-initialised linear head on the
    # frozen body, fine-tuned on each support set with probe_steps full-batch gradient steps of size probe_lr.
    probe_steps: int = 100
    probe_lr: float = 0.1  # step size of the linear probe (see probe_steps)
    # How `mtl-ray eval` and the Python API score a pretrained body: "linear" (the probe of probe_steps/probe_lr;
    # Chen et al. 2019's Baseline) or "cosine" (nearest class mean by cosine similarity on the frozen body, no steps:
    # Chen et al. 2021's Classifier-Baseline evaluation, i.e. algorithm meta_baseline at step 0)
    probe: str = "linear"
    # learning rate over the steps: "constant" (pretrain.lr throughout) or "cosine" (annealed from pretrain.lr to 0
    # at pretrain.steps, Loshchilov & Hutter 2017, as in Tian et al. 2020's pretraining); a function of the step only
    schedule: str = "constant"
    warmup_steps: int = 0  # steps of linear warm-up from pretrain.lr/warmup_steps to pretrain.lr first; 0: none
    # the classifier over every train class: "linear" (nn.Linear) or "cosine" (scale * cos(feature, class weight),
    # Chen et al. 2019's Baseline++); only the body is handed on (model.init, eval), so this shapes pretraining only
    head: str = "linear"
    head_scale: float = 10.0  # cosine head: the scale of its logits (its starting value when head_scale_learned)
    head_scale_learned: bool = True  # cosine head: learn head_scale with the weights (Gidaris & Komodakis 2018)
    # random resized crop, flip and colour jitter of every training image (mtl_ray/data/augment.py), drawn from
    # (seed, step, place in the batch), on the worker's device; held-out images are never augmented
    augment: bool = False


@dataclass(frozen=True)
class ScalingConfig:
    num_workers: int = 0  # 0: in-process; N: N Ray worker actors
    cpus_per_worker: float = 1.0  # logical CPUs each worker actor (and Ray Train worker) reserves
    gpus_per_worker: float = 0.0  # GPUs each worker reserves; > 0 runs its inner loop on cuda
    torch_threads: int = 0  # 0: torch's default
    address: str = ""  # Ray to join ("auto": the one `ray start` runs here); "": $RAY_ADDRESS, else a new local Ray
    max_restarts: int = 3  # restarts Ray grants each worker actor (a lost worker is replaced after that)
    step_timeout_s: float = 600.0  # a step whose shards are not all back by then fails with an error
    # "fp32": IEEE fp32 (CUDA's TF32 shortcut off); "tf32": allow TensorFloat-32 in CUDA convolutions/matmuls
    # (faster, less exact: docs/benchmarks.md, "GPU"); "bf16": autocast the inner/outer forward passes (weights and
    # meta-gradients stay fp32); "fp64": float64 weights and inputs in training, validation and eval (slow; for
    # checking numerics: the same numbers on any CPU). CPU: tf32 is fp32.
    precision: str = "fp32"
    # how the workers' meta-gradients reach the driver: "flat", each worker's shard sum goes to the driver; "node",
    # the shard sums of the workers on one node are added there (in its object store) and one sum a node crosses to
    # the driver (docs/scaling.md); "collective", every worker of a Ray Train group holds the weights and optimiser
    # state and all-reduces meta-gradients with torch.distributed (gloo on CPU, NCCL on GPU), the driver only
    # coordinating (a lost worker restarts the group from the last checkpoint, up to scaling.max_restarts times).
    # The same weights in every mode, to float rounding.
    reduce: str = REDUCE_FLAT
    # elastic workers: 0, a fixed num_workers; M >= num_workers, start num_workers and add workers (up to M) on
    # resources that become free while training (a node joined: the autoscaler's, `ray start --address`); lost ones
    # are replaced as always. Tasks are pure functions of their coordinates: the weights are those of a fixed-size
    # run, to float rounding (docs/scaling.md, "Elastic workers")
    max_workers: int = 0


@dataclass(frozen=True)
class TrackingConfig:
    run_dir: str = "runs"  # where run directories go (and the default MLflow store, run_dir/mlflow.db)
    run_name: str = ""  # "" -> derived from the config name and a timestamp
    checkpoint_every: int = 100  # checkpoint every N steps (and always at the end); 0: only at the end
    checkpoint_uri: str = ""  # "" -> <run dir>/checkpoints; or a local dir / pyarrow.fs URI (s3://, gs://, ...)
    log_every: int = 10  # a progress line (and an MLflow metrics batch) every N steps
    progress: bool = True  # show progress (a bar on a terminal, lines in logs)
    experiment: str = "mtl-ray"  # MLflow experiment
    uri: str = ""  # MLflow tracking URI; "" -> $MLFLOW_TRACKING_URI, else sqlite under tracking.run_dir
    mlflow: bool = True  # log the run to MLflow (a local store by default; no server needed)


@dataclass(frozen=True)
class Config:
    name: str = "run"  # the run's name (default: the config file's stem); names run dirs and the registered model
    seed: int = 0  # seeds the initial weights and every task: (seed, split, step, index) -> task
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def replace(self, **overrides: Any) -> Config:
        """Apply ``{"section.key": value}`` overrides and re-check (the component checks too)."""
        if _checked_from_dict is None:
            raise RuntimeError("Config.replace re-checks through mtl_ray.components.from_dict, which is not imported "
                               "yet; build configs with mtl_ray.components.from_dict or load_config")
        return _checked_from_dict(self.to_dict(), [f"{k}={json.dumps(v)}" for k, v in overrides.items()])

    @property
    def eval_inner_steps(self) -> int:
        a = self.algorithm
        return a.inner_steps if a.eval_inner_steps is None else a.eval_inner_steps


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- parsing


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])}


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_NONFINITE = ("nan", "inf", "infinity")


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check ``value`` against a field type; return the coerced value (or None after a problem)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where, problems)
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if isinstance(value, str) or not isinstance(value, Iterable):
            value = [value] if value not in ("", None) else []
        items = [_coerce(v, item_tp, f"{where}[{i}]", problems) for i, v in enumerate(value)]
        return tuple(items)
    if tp is bool:
        if isinstance(value, bool):
            return value
        problems.append(f"{where}: got {value!r} ({type(value).__name__}), expected true or false")
        return None
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        problems.append(f"{where}: got {value!r} ({type(value).__name__}), expected an integer")
        return None
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads "1e-3" (no dot) as a string; people write it anyway
        if isinstance(value, str) and value.strip().lower().lstrip("+-") in _NONFINITE:
            return float(value)  # "nan", "inf", "Infinity" (json.dumps of inf): refused with a clear message below
        problems.append(f"{where}: got {value!r} ({type(value).__name__}), expected a number")
        return None
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        problems.append(f"{where}: got {value!r} ({type(value).__name__}), expected a string")
        return None
    raise TypeError(f"unsupported config field type {tp!r} at {where}")


def _unknown(key: str, known: Iterable[str], where: str) -> str:
    known = sorted(known)
    near = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return f"{where}{key}: unknown key{hint} (known: {', '.join(known)})"


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str], problems: list[str]) -> dict[str, Any]:
    """``["optim.outer_lr=0.01", "seed=3"]`` applied onto a nested dict (values parsed as YAML)."""
    out: dict[str, Any] = json.loads(json.dumps(dict(raw)))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r}: expected key=value, e.g. optim.outer_lr=0.001")
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            problems.append(f"override {item!r}: value is not valid YAML ({e.__class__.__name__})")
            continue
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                problems.append(f"override {item!r}: {part!r} is not a section")
                break
            node = nxt
        else:
            node[parts[-1]] = value
    return out


def parse(raw: Mapping[str, Any] | None, overrides: Sequence[str] = ()) -> tuple[Config | None, list[str]]:
    """``(config, problems)`` without raising: the config (None when a value has the wrong type, a key is unknown
    or an override is malformed) and every problem, static semantic ones included (:func:`check_static`).

    Not an entry point: :func:`mtl_ray.components.from_dict` adds the component checks and raises.
    """
    problems: list[str] = []
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        return None, [f"config: got a {type(raw).__name__}, expected a mapping of sections"]
    merged = apply_overrides(raw, overrides, problems)
    sections = _sections()
    top_hints = typing.get_type_hints(Config)
    kwargs: dict[str, Any] = {}
    for key, value in merged.items():
        if key in sections:
            cls = sections[key]
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                problems.append(f"{key}: got {value!r}, expected a mapping of {cls.__name__} fields")
                continue
            hints = typing.get_type_hints(cls)
            fields = {f.name for f in dataclasses.fields(cls)}
            sub: dict[str, Any] = {}
            for k, v in value.items():
                if k not in fields:
                    problems.append(_unknown(k, fields, f"{key}."))
                    continue
                sub[k] = _coerce(v, hints[k], f"{key}.{k}", problems)
            kwargs[key] = sub
        elif key in top_hints:
            kwargs[key] = _coerce(value, top_hints[key], key, problems)
        else:
            problems.append(_unknown(key, top_hints, ""))
    if problems:  # with the NaN/infinite floats among the values read, which check_static would report
        for section, name in float_fields():
            value = (kwargs.get(section) or {}).get(name) if section else kwargs.get(name)
            problems += [q for q in [_nonfinite_problem(section, name, value)] if q]
        return None, problems
    built = {k: sections[k](**v) if k in sections else v for k, v in kwargs.items()}
    cfg = Config(**built)
    return cfg, check_static(cfg)


# Config.replace re-checks through mtl_ray.components.from_dict (the component checks need the registries, above
# this layer-0 module, which may not import them). mtl_ray.components sets it when imported; every public way to
# build a Config lives there, so any Config made outside this module's parse finds it set.
_checked_from_dict: Callable[[Mapping[str, Any] | None, Sequence[str]], Config] | None = None


def set_checked_from_dict(fn: Callable[[Mapping[str, Any] | None, Sequence[str]], Config]) -> None:
    """Called once by :mod:`mtl_ray.components` with its ``from_dict``."""
    global _checked_from_dict
    _checked_from_dict = fn


def read_yaml(path: str | Path, what: str, example: str) -> Any:
    """A YAML file's content ({} when empty); a missing or unparsable file is a :class:`ConfigError`."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError([f"{what} {str(p)!r} is a directory, expected a YAML file such as {example}; pass the file"])
    if not p.is_file():
        raise ConfigError([f"{what} {str(p)!r} does not exist; pass a YAML file such as {example}"])
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"{what} {str(p)!r} is not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset "
                           f"{e.start}), expected a YAML file in UTF-8; save it as UTF-8 (or pass the right file)"]
                          ) from None
    except OSError as e:
        raise ConfigError([f"{what} {str(p)!r} cannot be read ({e.strerror or e}), expected a readable YAML file; "
                           "check its permissions"]) from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"{what} {str(p)!r} is not valid YAML: {e}"]) from None


def with_absolute_paths(cfg: Config) -> Config:
    """``cfg`` with its relative local paths (``model.init``, ``data.root``, ``data.path`` and ``data.fonts`` when
    they exist here, ``data.cache_dir``) made absolute against the current directory: for processes that run
    elsewhere, e.g. Tune trials, which start in their own trial directory."""
    changes: dict[str, str] = {}
    for key, value, must_exist in (("model.init", cfg.model.init, False), ("data.root", cfg.data.root, False),
                                   ("data.path", cfg.data.path, True), ("data.fonts", cfg.data.fonts, True),
                                   ("data.cache_dir", cfg.data.cache_dir, False)):
        p = Path(value).expanduser()
        if value and "://" not in value and not p.is_absolute() and (p.exists() or not must_exist):
            changes[key] = str(p.absolute())
    return cfg.replace(**changes) if changes else cfg


def read_config_file(path: str | Path | None) -> Any:
    """A config file's content (``{}`` for None: the defaults), named after the file when it sets no ``name``."""
    if path is None:
        return {}
    p = Path(path)
    raw = read_yaml(p, "config file", "jobs/configs/omniglot_maml.yaml")
    if isinstance(raw, Mapping) and "name" not in raw:
        raw = {"name": p.stem, **raw}
    return raw


# --------------------------------------------------------------------------- semantic checks


def _positive(problems: list[str], where: str, value: float, *, allow_zero: bool = False) -> None:
    bad = value < 0 if allow_zero else value <= 0
    if bad:
        want = ">= 0" if allow_zero else "> 0"
        problems.append(f"{where}: got {value!r}, expected a value {want}")


def _choice(problems: list[str], where: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        problems.append(f"{where}: got {value!r}, expected one of: {', '.join(choices)}")


def _is_float_type(tp: Any) -> bool:
    """``float``, ``float | None`` or ``tuple[float, ...]``."""
    if tp is float:
        return True
    if typing.get_origin(tp) in (typing.Union, types.UnionType, tuple):
        return any(_is_float_type(a) for a in typing.get_args(tp) if a is not Ellipsis)
    return False


def float_fields() -> list[tuple[str | None, str]]:
    """``(section or None, field)`` of every float field of :class:`Config`, from the dataclass schema."""
    out: list[tuple[str | None, str]] = []
    top = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        if dataclasses.is_dataclass(top[f.name]):
            hints = typing.get_type_hints(top[f.name])
            out += [(f.name, g.name) for g in dataclasses.fields(top[f.name]) if _is_float_type(hints[g.name])]
        elif _is_float_type(top[f.name]):
            out.append((None, f.name))
    return out


def _nonfinite(cfg: Config) -> tuple[list[str], Config]:
    """Problems for every NaN or infinite float field (``nan <= 0`` is False: every other check passes them), and
    ``cfg`` with those fields at their defaults, so the other checks do not report them a second time."""
    problems: list[str] = []
    sections: dict[str | None, dict[str, Any]] = {}
    for section, name in float_fields():
        problem = _nonfinite_problem(section, name, getattr(getattr(cfg, section) if section else cfg, name))
        if problem:
            problems.append(problem)
            sections.setdefault(section, {})[name] = _default(section, name)
    if not problems:
        return problems, cfg
    top = sections.pop(None, {})
    fixed = {s: dataclasses.replace(getattr(cfg, s), **v) for s, v in sections.items() if s is not None}
    return problems, dataclasses.replace(cfg, **fixed, **top)


def _nonfinite_problem(section: str | None, name: str, value: Any) -> str | None:
    values = value if isinstance(value, tuple) else (value,)
    if all(not isinstance(v, float) or math.isfinite(v) for v in values):
        return None
    return (f"{f'{section}.{name}' if section else name}: got {value!r}, expected a finite number (NaN and infinity "
            f"are not); e.g. the default {_default(section, name)!r}")


def _default(section: str | None, name: str) -> Any:
    owner = typing.get_type_hints(Config)[section] if section else Config
    f = next(f for f in dataclasses.fields(owner) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return f.default
    assert f.default_factory is not dataclasses.MISSING, f"{name}: every Config field has a default"
    return f.default_factory()


def check_static(cfg: Config) -> list[str]:
    """Checks that need no data and no component: types' ranges and choices of this module's own.

    Checks of names and capabilities of algorithms, models and task sources are
    :func:`mtl_ray.components.component_problems`; data-dependent ones :func:`mtl_ray.data.check_data`.
    """
    p, cfg = _nonfinite(cfg)
    d, m, a, o, s, t = cfg.data, cfg.model, cfg.algorithm, cfg.optim, cfg.scaling, cfg.tracking
    pt = cfg.pretrain
    _choice(p, "optim.optimizer", o.optimizer, OPTIMIZERS)
    _choice(p, "model.downsample", m.downsample, DOWNSAMPLE)
    _choice(p, "model.conv_impl", m.conv_impl, CONV_IMPLS)
    _choice(p, "model.norm", m.norm, NORMS)
    _positive(p, "data.shots", d.shots)
    _positive(p, "data.queries", d.queries)
    _positive(p, "data.image_size", d.image_size)
    if d.augment not in DATA_AUGMENTS:
        p.append(f"data.augment: got {d.augment!r}, expected 'support' (augment meta-training's support sets) or "
                 "'' (off)")
    if len(d.channel_mean) != len(d.channel_std):
        p.append(f"data.channel_mean/data.channel_std: got {len(d.channel_mean)} mean(s) and {len(d.channel_std)} "
                 "std(s), expected one of each per channel (or both empty: the table's own)")
    if any(v <= 0 for v in d.channel_std):
        p.append(f"data.channel_std: got {list(d.channel_std)}, expected every value > 0")
    for frac_name in ("val_fraction", "test_fraction"):
        v = getattr(d, frac_name)
        if not 0.0 <= v < 1.0:
            p.append(f"data.{frac_name}: got {v}, expected a fraction in [0, 1)")
    if d.val_fraction + d.test_fraction >= 1.0:
        p.append(f"data.val_fraction + data.test_fraction: got {d.val_fraction + d.test_fraction}, "
                 "expected < 1 so some classes remain for training")
    _positive(p, "algorithm.inner_lr", a.inner_lr, allow_zero=True)
    if a.finetune_steps < 0:
        p.append(f"algorithm.finetune_steps: got {a.finetune_steps}, expected a whole number >= 0 of test-time "
                 "fine-tuning steps (0: off); e.g. algorithm.finetune_steps=50")
    if a.finetune_lr < 0:
        p.append(f"algorithm.finetune_lr: got {a.finetune_lr!r}, expected a step size >= 0; e.g. the default 0.01")
    if a.finetune_augment and a.finetune_steps == 0:  # set but never read: refuse, do not ignore
        p.append("algorithm.finetune_augment: got true with algorithm.finetune_steps=0, expected false (it augments "
                 "test-time fine-tuning, which is off); set algorithm.finetune_steps > 0, or finetune_augment=false")
    if a.eval_inner_steps is not None:
        _positive(p, "algorithm.eval_inner_steps", a.eval_inner_steps, allow_zero=True)
    _positive(p, "algorithm.task_chunk_size", a.task_chunk_size, allow_zero=True)
    _positive(p, "algorithm.chunk_memory_mb", a.chunk_memory_mb, allow_zero=True)
    _positive(p, "algorithm.temperature", a.temperature)
    _positive(p, "algorithm.ridge_lambda", a.ridge_lambda)
    _positive(p, "optim.outer_lr", o.outer_lr)
    _positive(p, "optim.meta_batch_size", o.meta_batch_size)
    _positive(p, "optim.steps", o.steps)
    _positive(p, "optim.grad_clip", o.grad_clip, allow_zero=True)
    _positive(p, "optim.val_every", o.val_every, allow_zero=True)
    _positive(p, "optim.max_minutes", o.max_minutes, allow_zero=True)
    _positive(p, "optim.val_tasks", o.val_tasks)
    if o.hard_tasks < 0:
        p.append(f"optim.hard_tasks: got {o.hard_tasks}, expected a whole number >= 0 of hard tasks per step (0: off); "
                 "e.g. optim.hard_tasks=2, or 0 to train without them")
    _positive(p, "scaling.num_workers", s.num_workers, allow_zero=True)
    _positive(p, "scaling.cpus_per_worker", s.cpus_per_worker, allow_zero=True)
    _positive(p, "scaling.gpus_per_worker", s.gpus_per_worker, allow_zero=True)
    _positive(p, "scaling.torch_threads", s.torch_threads, allow_zero=True)
    _positive(p, "scaling.max_restarts", s.max_restarts, allow_zero=True)
    _positive(p, "scaling.step_timeout_s", s.step_timeout_s)
    _choice(p, "scaling.precision", s.precision, ("fp32", "tf32", "bf16", "fp64"))
    _choice(p, "scaling.reduce", s.reduce, REDUCE_MODES)
    if s.reduce == REDUCE_COLLECTIVE and s.num_workers < 1:
        p.append("scaling.reduce: got 'collective' with scaling.num_workers=0, expected >= 1 worker (the replicas "
                 "that all-reduce); set scaling.num_workers=N, or scaling.reduce=flat to train in this process")
    elif s.reduce == REDUCE_COLLECTIVE and o.meta_batch_size < s.num_workers:
        p.append(f"optim.meta_batch_size: got {o.meta_batch_size} with scaling.reduce=collective on "
                 f"{s.num_workers} workers, expected >= {s.num_workers} (every replica computes a share of each "
                 "meta-batch); raise optim.meta_batch_size or lower scaling.num_workers")
    if s.max_workers < 0:
        p.append(f"scaling.max_workers: got {s.max_workers}, expected 0 (a fixed number of workers) or the most "
                 "workers to grow to (>= scaling.num_workers)")
    elif s.max_workers and (s.max_workers < s.num_workers or s.num_workers == 0 or s.reduce == REDUCE_COLLECTIVE):
        why = ("a Ray Train group's size is fixed when it starts" if s.reduce == REDUCE_COLLECTIVE
               else f"at least scaling.num_workers={s.num_workers}, the workers it starts with (>= 1: in-process "
               "training has no workers to add to)")
        p.append(f"scaling.max_workers: got {s.max_workers} with scaling.num_workers={s.num_workers} and "
                 f"scaling.reduce={s.reduce}, expected 0 or {why}; set scaling.max_workers=0 for a fixed number "
                 "of workers" + (", or scaling.reduce=flat (or node) to add workers while training"
                                 if s.reduce == REDUCE_COLLECTIVE else ""))
    if s.reduce == REDUCE_COLLECTIVE and o.hard_tasks > 0:
        p.append(f"optim.hard_tasks: got {o.hard_tasks} with scaling.reduce=collective, expected 0: the replicas do "
                 "not exchange the failure classes hard tasks are drawn from; set optim.hard_tasks=0, or "
                 "scaling.reduce=flat (or node) to train with hard tasks")
    _positive(p, "pretrain.num_workers", pt.num_workers)
    _positive(p, "pretrain.steps", pt.steps)
    _positive(p, "pretrain.batch_size", pt.batch_size)
    _choice(p, "pretrain.optimizer", pt.optimizer, OPTIMIZERS)
    _positive(p, "pretrain.lr", pt.lr)
    _positive(p, "pretrain.weight_decay", pt.weight_decay, allow_zero=True)
    _positive(p, "pretrain.holdout", pt.holdout, allow_zero=True)
    _positive(p, "pretrain.val_every", pt.val_every, allow_zero=True)
    _positive(p, "pretrain.max_failures", pt.max_failures, allow_zero=True)
    _positive(p, "pretrain.max_minutes", pt.max_minutes, allow_zero=True)
    _positive(p, "pretrain.probe_steps", pt.probe_steps, allow_zero=True)
    _positive(p, "pretrain.probe_lr", pt.probe_lr, allow_zero=True)
    _choice(p, "pretrain.probe", pt.probe, PRETRAIN_PROBES)
    _choice(p, "pretrain.schedule", pt.schedule, PRETRAIN_SCHEDULES)
    _choice(p, "pretrain.head", pt.head, PRETRAIN_HEADS)
    _positive(p, "pretrain.head_scale", pt.head_scale)
    _positive(p, "pretrain.warmup_steps", pt.warmup_steps, allow_zero=True)
    if pt.warmup_steps >= pt.steps > 0:
        p.append(f"pretrain.warmup_steps: got {pt.warmup_steps}, expected fewer than pretrain.steps={pt.steps} "
                 "(warm-up is the first part of the schedule); lower it, e.g. to a tenth of the steps")
    if pt.num_workers > 0 and pt.batch_size % pt.num_workers:
        p.append(f"pretrain.batch_size: got {pt.batch_size}, expected a multiple of pretrain.num_workers="
                 f"{pt.num_workers} (each worker takes an equal share of the global batch)")
    _positive(p, "tracking.checkpoint_every", t.checkpoint_every, allow_zero=True)
    _positive(p, "tracking.log_every", t.log_every)
    return p
