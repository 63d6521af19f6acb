"""The meta-transfer pipeline in one command: pretrain -> meta-train from it -> deployment search per target.

P>M>F (Hu et al., CVPR 2022) in mtl-ray's terms: supervised pretraining on Ray Train
(:mod:`mtl_ray.recipes.pretrain`), meta-training that starts from the pretrained body (``model.init``,
:mod:`mtl_ray.recipes.train`), then, for each target domain, a Ray Tune search over how the model adapts at test
time (:mod:`mtl_ray.tune.deploy`), whose winner is recorded in a deployed checkpoint. A pipeline file::

    name: omniglot_pmf
    pretrain: omniglot_pretrain.yaml                       # a config (relative to this file) ...
    meta_train: {config: omniglot_protonet.yaml, overrides: [optim.steps=300]}   # ... or one with overrides
    deploy: [deploy_omniglot.yaml, deploy_fashion.yaml]   # deploy files (the targets)

``key=value`` on the command line applies to both training configs (``pretrain.*`` matters to the first,
``optim.*`` to the second), ``deploy.KEY=value`` to every deploy file. Everything is checked before anything
starts. The stages run into ``RUN_DIR/pretrain``, ``RUN_DIR/meta_train`` and ``RUN_DIR/deploy-<name>``;
``--resume`` continues an interrupted pipeline: finished stages are kept, an unfinished training stage resumes
from its latest checkpoint, a search that had not finished runs again (its directory appears only when done).
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from mtl_ray.atomic import atomic_write
from mtl_ray.checkpoint import latest_checkpoint, load_checkpoint
from mtl_ray.components import load_config
from mtl_ray.config import Config, ConfigError, read_yaml
from mtl_ray.tune.deploy import DeployResult, DeploySpec, check_deploy, deploy, load_deploy

PIPELINE_FILE = "pipeline.yaml"
_TOP = {"name", "pretrain", "meta_train", "deploy"}


@dataclass(frozen=True)
class Stage:
    config: Config
    path: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Pipeline:
    name: str
    pretrain: Stage
    meta_train: Stage
    deploy: tuple[tuple[str, DeploySpec], ...]  # (file, spec) per target
    deploy_overrides: tuple[str, ...]
    source: str


def _stage(raw: Any, key: str, here: Path, overrides: Sequence[str], problems: list[str]) -> Stage | None:
    if isinstance(raw, str):
        ref, own = raw, []
    elif isinstance(raw, Mapping) and isinstance(raw.get("config"), str) and set(raw) <= {"config", "overrides"} \
            and isinstance(raw.get("overrides") or [], list):
        ref, own = raw["config"], [str(o) for o in raw.get("overrides") or []]
    else:
        problems.append(f"pipeline.{key}: got {raw!r}, expected a config path or {{config: PATH, overrides: "
                        "[key=value, ...]}}")
        return None
    path = Path(ref) if Path(ref).is_absolute() else here / ref
    try:
        return Stage(load_config(path, [*own, *overrides]), str(path), (*own, *overrides))
    except ConfigError as e:
        problems += [f"pipeline.{key} ({path.name}): {q}" for q in e.problems]
        return None


def load_pipeline(path: str | Path, overrides: Sequence[str] = ()) -> Pipeline:
    """Read a pipeline file and every file it names; one ConfigError with every static problem."""
    p = Path(path)
    raw = read_yaml(p, "pipeline file", "jobs/configs/pipeline_omniglot.yaml")
    if not isinstance(raw, Mapping):
        raise ConfigError([f"pipeline file {str(p)!r}: got a {type(raw).__name__}, expected a mapping"])
    problems = [f"pipeline.{k}: unknown key; expected one of {sorted(_TOP)}" for k in raw if k not in _TOP]
    problems += [f"override {o!r}: expected key=value" for o in overrides if "=" not in o]
    deploy_overrides = tuple(o for o in overrides if o.startswith("deploy."))
    train_overrides = [o for o in overrides if "=" in o and o not in deploy_overrides]
    pre = _stage(raw.get("pretrain"), "pretrain", p.parent, train_overrides, problems)
    meta = _stage(raw.get("meta_train"), "meta_train", p.parent, train_overrides, problems)
    files = raw.get("deploy") or []
    files = [files] if isinstance(files, str) else files
    if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
        problems.append(f"pipeline.deploy: got {raw.get('deploy')!r}, expected a list of deploy files "
                        "(e.g. [deploy_fashion.yaml])")
        files = []
    specs: list[tuple[str, DeploySpec]] = []
    for f in files:
        fp = Path(f) if Path(f).is_absolute() else p.parent / f
        try:
            specs.append((str(fp), load_deploy(fp, deploy_overrides)))
        except ConfigError as e:
            problems += [f"pipeline.deploy ({fp.name}): {q}" for q in e.problems]
    names = [s.name for _, s in specs]
    problems += [f"pipeline.deploy: two deploy files are named {n!r}; expected one name per target (set name: in "
                 "one of them)" for n in sorted({n for n in names if names.count(n) > 1})]
    if pre is not None and meta is not None:
        if dataclasses.replace(pre.config.model, init="") != dataclasses.replace(meta.config.model, init=""):
            problems.append(f"pipeline.meta_train: its model section ({meta.config.model}) differs from "
                            f"pretrain's ({pre.config.model}); expected the same backbone (meta-training starts "
                            "from the pretrained weights)")
        if meta.config.model.init:
            problems.append(f"pipeline.meta_train: got model.init={meta.config.model.init!r}, expected none (the "
                            "pipeline starts meta-training from its own pretraining stage)")
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    assert pre is not None and meta is not None
    return Pipeline(name=str(raw.get("name") or p.stem), pretrain=pre, meta_train=meta, deploy=tuple(specs),
                    deploy_overrides=deploy_overrides, source=str(p))


def check_pipeline(pipe: Pipeline) -> list[str]:
    """The checks that read the data (every stage's), before anything runs."""
    from mtl_ray.data import check_data
    from mtl_ray.memory import memory_problems
    from mtl_ray.recipes.pretrain import check_pretrain_config

    problems: list[str] = []
    try:
        check_pretrain_config(pipe.pretrain.config)
    except ConfigError as e:
        problems += [f"pretrain: {q}" for q in e.problems]
    meta = pipe.meta_train.config
    problems += [f"meta_train: {q}" for q in (memory_problems(meta) or check_data(meta))]
    for _, spec in pipe.deploy:
        problems += [f"deploy {spec.name}: {q}" for q in check_deploy(spec, meta)]
    return list(dict.fromkeys(problems))


def _finished(run_dir: Path, steps: int) -> bool:
    """``run_dir`` holds a checkpoint at ``steps`` (or beyond)."""
    ck = latest_checkpoint(run_dir) if (run_dir / "checkpoints").is_dir() else None
    return ck is not None and load_checkpoint(ck).step >= steps


def run_pipeline(pipeline_path: str, overrides: Sequence[str] = (), run_dir: str | None = None, *,
                 resume: bool = False, out: TextIO | None = None) -> dict[str, DeployResult]:
    """``mtl-ray pipeline``: check, then pretrain -> meta-train -> deploy into ``run_dir``."""
    from mtl_ray.recipes.common import with_data_root
    from mtl_ray.recipes.pretrain import pretrain
    from mtl_ray.recipes.train import train

    out = sys.stdout if out is None else out
    pipe = load_pipeline(pipeline_path, overrides)
    if resume and not run_dir:
        raise ConfigError(["--resume: got no pipeline to resume; expected --run-dir DIR of an earlier pipeline"])
    root = (Path(run_dir) if run_dir else
            Path(pipe.meta_train.config.tracking.run_dir) / f"{pipe.name}-{time.strftime('%Y%m%d-%H%M%S')}").absolute()
    problems = check_pipeline(pipe)
    if resume and not root.is_dir():
        problems.append(f"--resume: got --run-dir {str(root)!r}, which does not exist; expected the directory of "
                        "an earlier pipeline (drop --resume to start one)")
    if not resume and root.exists() and any(root.iterdir()):
        problems.append(f"--run-dir: got {str(root)!r}, which holds an earlier pipeline; expected a new directory "
                        "(or --resume to continue it)")
    if problems:
        raise ConfigError(problems)
    pre_dir, meta_dir = root / "pretrain", root / "meta_train"
    pre_cfg = with_data_root(pipe.pretrain.config)
    print(f"pipeline {pipe.name}: {root}", file=out, flush=True)

    print(f"[1/3] pretrain ({Path(pipe.pretrain.path).name}) -> {pre_dir}", file=out, flush=True)
    if resume and _finished(pre_dir, pre_cfg.pretrain.steps):
        print("  done earlier: kept", file=out, flush=True)
    else:
        from mtl_ray.recipes.pretrain import check_pretrain_config

        pretrain(check_pretrain_config(pre_cfg), pre_dir, resume=resume and pre_dir.exists(), out=out)

    meta_cfg = with_data_root(pipe.meta_train.config.replace(**{"model.init": str(pre_dir)}))
    print(f"[2/3] meta-train ({Path(pipe.meta_train.path).name}, from the pretrained body) -> {meta_dir}", file=out,
          flush=True)
    if resume and _finished(meta_dir, meta_cfg.optim.steps):
        print("  done earlier: kept", file=out, flush=True)
    else:
        from mtl_ray.recipes.train import check_config

        again = f"mtl-ray pipeline {shlex.join([pipeline_path, *overrides, '--run-dir', str(root), '--resume'])}"
        train(check_config(meta_cfg), meta_dir, resume=resume and meta_dir.exists(), resume_command=again, out=out)

    results: dict[str, DeployResult] = {}
    for i, (path, spec) in enumerate(pipe.deploy, 1):
        target = root / f"deploy-{spec.name}"
        print(f"[3/3] deployment search {i}/{len(pipe.deploy)} ({Path(path).name}) -> {target}", file=out,
              flush=True)
        if resume and target.is_dir():
            print("  done earlier: kept", file=out, flush=True)
            continue
        results[spec.name] = deploy(str(meta_dir), path, list(pipe.deploy_overrides), target, out=out)
    record = {"pipeline": pipe.source, "overrides": list(overrides), "pretrain": str(pre_dir),
              "meta_train": str(meta_dir),
              "deployed": {name: {"checkpoint": r.checkpoint, "chosen": r.chosen, "val_acc": r.val_acc,
                                  "test_acc": r.test_acc} for name, r in results.items()}}
    atomic_write(root / PIPELINE_FILE, yaml.safe_dump(record, sort_keys=False))
    print(f"pipeline {pipe.name} done: {root}", file=out, flush=True)
    for name, r in results.items():
        print(f"  {name}: {' '.join(f'{k}={v}' for k, v in r.chosen.items())}  val {100 * r.val_acc:.2f}%  "
              f"test {100 * r.test_acc:.2f}%  -> mtl-ray eval {r.out_dir}", file=out, flush=True)
    return results
