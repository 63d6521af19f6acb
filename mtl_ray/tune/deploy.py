"""Deployment search: Ray Tune chooses how a trained model adapts to a target domain, and the model keeps it.

P>M>F (Hu et al., "Pushing the limits of simple pipelines for few-shot learning", CVPR 2022, Sec. 3.3) picks
the test-time fine-tuning learning rate (and its steps) per target domain on a few labelled validation
episodes. Here every trial is a Tune trial (its own actor) that scores the trained checkpoint on the same
validation episodes of the target domain (``split``, step 0, indices ``0..episodes-1``: every trial meets the
same tasks, so trials differ only in their values) with its sampled adaptation settings. The winner is written
as a *deployed* checkpoint whose config carries the chosen values (and the target's keys), so ``mtl-ray eval``,
:class:`mtl_ray.api.FewShotLearner` and the served MLflow model adapt with them, and it is scored once more on
fresh test episodes, which say whether the validation score was luck. A deploy file::

    name: fashion                        # default: the file's stem; the output is <run dir>/deploy-<name>
    target: [data.source=fashion_mnist]  # key=value making the target domain's episodes (empty: the training one)
    split: val                           # where trials are scored; the winner is re-scored on test
    episodes: 100                        # validation episodes per trial
    test_episodes: 600                   # fresh test episodes for the winner
    search: grid                         # grid | random | optuna
    num_samples: 1                       # per grid point (grid) or in all (random, optuna)
    max_concurrent_trials: 0             # 0: as many as the cluster's CPUs allow
    trial_cpus: 1
    space:
      algorithm.finetune_steps: {grid: [0, 20, 50]}
      algorithm.finetune_lr: {grid: [0.003, 0.01, 0.03]}

Only keys that change how a trained model adapts may be searched (:data:`DEPLOY_KEYS`); anything that changes
the weights is training's business (``mtl-ray tune``). docs/transfer.md shows what the search buys.
"""

from __future__ import annotations

import csv
import io
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, cast

import yaml

from mtl_ray import metrics as M
from mtl_ray.atomic import atomic_write
from mtl_ray.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from mtl_ray.components import from_dict
from mtl_ray.config import Config, ConfigError, read_yaml
from mtl_ray.tune.spec import SEARCHES, Domain, SweepSpec, _domain, _yaml_value, to_tune_space

DEPLOY_KEYS = ("algorithm.finetune_steps", "algorithm.finetune_lr", "algorithm.finetune_augment",
               "algorithm.inner_lr", "algorithm.eval_inner_steps")
DEPLOY_FILE = "deploy.yaml"
TRIALS_CSV = "trials.csv"
SETTINGS = "settings"  # a grid search's one Tune key: the distinct settings, each a dict of DEPLOY_KEYS
_TOP = {"name", "target", "split", "episodes", "test_episodes", "search", "num_samples", "max_concurrent_trials",
        "trial_cpus", "space"}


@dataclass(frozen=True)
class DeploySpec:
    name: str
    space: dict[str, Domain]
    target: tuple[str, ...] = ()
    split: str = "val"
    episodes: int = 100
    test_episodes: int = 600
    search: str = "grid"
    num_samples: int = 1
    max_concurrent_trials: int = 0
    trial_cpus: float = 1.0
    source: str = ""  # the YAML file, for messages
    overrides: tuple[str, ...] = field(default=())  # key=value for the checkpoint's config (after ``target``)


@dataclass(frozen=True)
class DeployRow:
    trial_id: str
    params: dict[str, Any]
    acc: float | None
    ci95: float | None
    status: str


@dataclass(frozen=True)
class DeployResult:
    out_dir: Path
    checkpoint: str
    chosen: dict[str, Any]
    val_acc: float
    val_ci95: float
    test_acc: float
    test_ci95: float
    rows: list[DeployRow]
    serve: str | None = None

    def lines(self) -> list[str]:
        chosen = " ".join(f"{k}={_fmt(v)}" for k, v in self.chosen.items())
        return [f"chosen: {chosen}",
                f"validation: {100 * self.val_acc:.2f}% ± {100 * self.val_ci95:.2f}%  "
                f"fresh test episodes: {100 * self.test_acc:.2f}% ± {100 * self.test_ci95:.2f}% (95% CI)",
                f"deployed checkpoint: {self.checkpoint}"]


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------------- the file


def load_deploy(path: str | Path, overrides: Sequence[str] = ()) -> DeploySpec:
    """Read and check a deploy file; ``deploy.KEY=value`` replaces a top-level key of the file, any other
    ``key=value`` applies to the checkpoint's config (like ``mtl-ray eval``'s). Every problem at once."""
    p = Path(path)
    raw = read_yaml(p, "deploy file", "jobs/configs/deploy_fashion.yaml")
    if not isinstance(raw, Mapping):
        raise ConfigError([f"deploy file {str(p)!r}: got a {type(raw).__name__}, expected a mapping"])
    own = [o for o in overrides if o.startswith("deploy.") and "=" in o]
    rest = tuple(o for o in overrides if o not in own)
    raw = {**raw, **{o.split("=", 1)[0].removeprefix("deploy."): _yaml_value(o.split("=", 1)[1]) for o in own}}
    problems = [f"deploy.{k}: unknown key; expected one of {sorted(_TOP)}" for k in raw if k not in _TOP]
    bad_overrides = [o for o in rest if "=" not in o]
    problems += [f"override {o!r}: expected key=value" for o in bad_overrides]

    def pick(key: str, default: Any, kind: type, low: float | None = None) -> Any:
        v: Any = raw.get(key, default)
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, kind) or isinstance(v, bool) or (kind is float and not math.isfinite(cast(float, v))):
            want = "finite number" if kind is float else kind.__name__
            problems.append(f"deploy.{key}: got {v!r}, expected a {want}")
            return default
        if low is not None and cast(float, v) < low:
            problems.append(f"deploy.{key}: got {v!r}, expected >= {low:g}")
            return default
        return v

    split = pick("split", "val", str)
    if split not in ("train", "val", "test"):
        problems.append(f"deploy.split: got {split!r}, expected val (or train/test)")
    episodes = pick("episodes", 100, int, 2)
    test_episodes = pick("test_episodes", 600, int, 2)
    search = pick("search", "grid", str)
    if search not in SEARCHES:
        problems.append(f"deploy.search: got {search!r}, expected one of {list(SEARCHES)}")
    num_samples = pick("num_samples", 1, int, 1)
    max_conc = pick("max_concurrent_trials", 0, int, 0)
    trial_cpus = pick("trial_cpus", 1.0, float)
    if trial_cpus <= 0:
        problems.append(f"deploy.trial_cpus: got {trial_cpus}, expected > 0 (e.g. 0.5)")
    target = raw.get("target") or []
    if not isinstance(target, list) or not all(isinstance(t, str) and "=" in t for t in target):
        problems.append(f"deploy.target: got {target!r}, expected a list of key=value strings, "
                        "e.g. [data.source=fashion_mnist]")
        target = []
    space: dict[str, Domain] = {}
    space_raw = raw.get("space")
    if not isinstance(space_raw, Mapping) or not space_raw:
        problems.append(f"deploy.space: got {space_raw!r}, expected a mapping of adaptation keys to domains, "
                        "e.g. {algorithm.finetune_lr: {grid: [0.003, 0.01]}}")
    else:
        for key, dom in space_raw.items():
            if str(key) not in DEPLOY_KEYS:
                problems.append(f"deploy.space.{key}: got a key that is not an adaptation setting; expected one of "
                                f"{list(DEPLOY_KEYS)} (what changes the weights is searched with mtl-ray tune)")
                continue
            d = _domain(str(key), dom, problems)
            if d is not None:
                space[str(key)] = d
    if search == "optuna" and any(d.kind == "grid" for d in space.values()):
        problems.append("deploy.space: 'grid' domains need search: grid or random (Optuna samples; use 'choice')")
    if search == "grid" and any(d.kind != "grid" for d in space.values()):
        problems.append(f"deploy.search: got 'grid' with non-grid domains "
                        f"{sorted(k for k, d in space.items() if d.kind != 'grid')}; expected only {{grid: [...]}} "
                        "domains (or search: random)")
    problems = [q.replace("sweep.space.", "deploy.space.") for q in problems]
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    return DeploySpec(name=str(raw.get("name") or p.stem), space=space, target=tuple(target), split=split,
                      episodes=episodes, test_episodes=test_episodes, search=search, num_samples=num_samples,
                      max_concurrent_trials=max_conc, trial_cpus=trial_cpus, source=str(p), overrides=rest)


def deploy_base(spec: DeploySpec, model_cfg: Config) -> Config:
    """The config every trial starts from: the trained model's, with the target's keys and the overrides."""
    return from_dict(model_cfg.to_dict(), [*spec.target, *spec.overrides])


def check_deploy(spec: DeploySpec, model_cfg: Config) -> list[str]:
    """What a trial or the final test scoring would refuse, found before Ray starts: the target's keys, every
    value of the space (alone), and the target's data in ``split`` and ``test``."""
    from mtl_ray.data import check_data, is_regression

    try:
        base = deploy_base(spec, model_cfg)
    except ConfigError as e:
        return [f"deploy.target/overrides: {q}" for q in e.problems]
    problems: list[str] = []
    if is_regression(base):
        problems.append(f"data.source: got {base.data.source!r}, a regression source; expected a classification "
                        "target (the search scores accuracy)")
    for combo in _corners(spec):  # every listed value (a range's ends) with every other key's: a trial's settings
        try:
            trial_settings(base, combo)
        except ConfigError as e:
            shown = ", ".join(f"{k}={v!r}" for k, v in combo.items())
            problems += [f"deploy.space with {shown}: {q}" for q in e.problems]
    if not problems:
        problems += check_data(base, list(dict.fromkeys([spec.split, "test"])))
    return list(dict.fromkeys(problems))


def _corners(spec: DeploySpec) -> list[dict[str, Any]]:
    """Every combination of the space's listed values (ranges: both ends)."""
    import itertools

    keys = list(spec.space)
    return [dict(zip(keys, vs, strict=True)) for vs in itertools.product(*(spec.space[k].values for k in keys))]


def distinct_settings(spec: DeploySpec, base: Config) -> list[dict[str, Any]]:
    """A grid's points with :func:`trial_settings` applied, each distinct one once (the first of those that differ
    only in settings without effect), in the grid's order (the first key slowest)."""
    out: list[dict[str, Any]] = []
    seen: list[dict[str, Any]] = []
    for combo in _corners(spec):
        a = trial_settings(base, combo).algorithm
        settings = {k: getattr(a, k.split(".", 1)[1]) for k in spec.space}
        # without fine-tuning steps its learning rate and augmentation change nothing: one trial for all of them
        effect = {k: v for k, v in settings.items() if a.finetune_steps or not k.startswith("algorithm.finetune_")
                  or k == "algorithm.finetune_steps"}
        if effect not in seen:
            seen.append(effect)
            out.append(settings)
    return out


def trial_settings(base: Config, values: Mapping[str, Any]) -> Config:
    """``base`` with a trial's values; ``algorithm.finetune_augment`` counts only with fine-tuning steps (as in
    :meth:`mtl_ray.api.FewShotLearner.adapt`): a trial without steps has nothing to augment."""
    values = {k: _plain_value(v) for k, v in values.items()}
    steps = values.get("algorithm.finetune_steps", base.algorithm.finetune_steps)
    if not steps and values.get("algorithm.finetune_augment"):
        values["algorithm.finetune_augment"] = False
    return base.replace(**values)


def _as_sweep(spec: DeploySpec, base: Config) -> SweepSpec:
    """The search space as a :class:`SweepSpec`, whose Tune-space and trial-config code this reuses."""
    return SweepSpec(name=spec.name, base=base, space=spec.space, search=spec.search, num_samples=spec.num_samples,
                     source=spec.source)


# ---------------------------------------------------------------------------- one trial


def score(checkpoint: str, cfg_overrides: Sequence[str], split: str, episodes: int) -> tuple[float, float]:
    """Mean accuracy and its 95% CI half-width of ``checkpoint`` on ``episodes`` episodes of ``split``."""
    from mtl_ray.recipes.evaluate import evaluate

    out = evaluate(checkpoint, overrides=list(cfg_overrides), split=split, episodes=episodes, out=io.StringIO())
    return out[M.META_TEST_ACC], out[M.META_TEST_ACC + "_ci95"]


def _overrides(spec: DeploySpec, values: Mapping[str, Any], base: Config) -> list[str]:
    """What a trial passes to ``mtl-ray eval``'s scoring: the target, the overrides and its settings."""
    tuned = trial_settings(base, {k: v for k, v in values.items() if k in spec.space})
    a = tuned.algorithm
    settings = {k: getattr(a, k.split(".", 1)[1]) for k in spec.space}
    return [*spec.target, *spec.overrides, *(f"{k}={_plain(v)}" for k, v in settings.items())]


def _plain(v: Any) -> Any:
    v = v.item() if hasattr(v, "item") else v
    return str(v).lower() if isinstance(v, bool) else v


def deploy_trial(params: dict[str, Any], *, checkpoint: str, spec: DeploySpec, base: Config) -> None:
    """The Tune function trainable: one scoring of the checkpoint with the trial's adaptation settings."""
    from ray import tune

    acc, ci = score(checkpoint, _overrides(spec, params.get(SETTINGS) or params, base), spec.split, spec.episodes)
    tune.report({M.DEPLOY_VAL_ACC: acc, M.DEPLOY_VAL_ACC + "_ci95": ci})


# ---------------------------------------------------------------------------- the search


def default_out_dir(checkpoint: str, spec: DeploySpec) -> Path:
    """``<run dir>/deploy-<name>`` beside the run's checkpoints (or beside the ``.pt`` file)."""
    p = Path(checkpoint).absolute()
    run_dir = p if p.is_dir() else (p.parent.parent if p.parent.name == "checkpoints" else p.parent)
    return run_dir / f"deploy-{spec.name}"


def deploy(checkpoint: str, deploy_path: str, overrides: Sequence[str] = (), out_dir: str | Path | None = None, *,
           overwrite: bool = False, out: TextIO | None = None) -> DeployResult:
    """``mtl-ray deploy``: check everything, run the Tune search, write the deployed checkpoint into ``out_dir``.

    Nothing is written until the search has finished: the deployed directory appears whole (renamed into
    place) or not at all, and an existing one is replaced only with ``overwrite``.
    """
    out = sys.stdout if out is None else out
    spec = load_deploy(deploy_path, overrides)
    ck = load_checkpoint(checkpoint)
    problems = check_deploy(spec, ck.config)
    target = Path(out_dir).absolute() if out_dir else default_out_dir(checkpoint, spec)
    if target.exists() and not overwrite:
        problems.append(f"--out: got {str(target)!r}, which exists; expected a new directory (pass --overwrite to "
                        "replace it, or --out DIR)")
    if problems:
        raise ConfigError(problems)
    base = deploy_base(spec, ck.config)
    sweep = _as_sweep(spec, base)
    source = _source_path(checkpoint)
    print(f"deployment search {spec.name}: {source} on {base.data.source}/{spec.split}, {spec.episodes} episodes "
          f"per trial, space {', '.join(spec.space)}", file=out, flush=True)
    rows = run_trials(spec, sweep, source, target.parent)
    scored = [r for r in rows if r.acc is not None and math.isfinite(r.acc)]
    if not scored:
        raise RuntimeError(f"deployment search {spec.name}: no trial reported {M.DEPLOY_VAL_ACC} "
                           f"({[(r.trial_id, r.status) for r in rows]})")
    best = max(scored, key=lambda r: r.acc)  # type: ignore[arg-type, return-value]  # the first of equals
    deployed_cfg = trial_settings(base, best.params).replace(name=f"{ck.config.name}-{spec.name}")
    chosen = {k: getattr(deployed_cfg.algorithm, k.split(".", 1)[1]) for k in spec.space}
    test_acc, test_ci = score(source, _overrides(spec, chosen, base), "test", spec.test_episodes)
    result = _write(target, ck, deployed_cfg, spec, chosen, best, (test_acc, test_ci), rows, source, overwrite)
    for line in table_lines(spec, rows) + result.lines():
        print(line, file=out, flush=True)
    serve = log_deployed(deployed_cfg, result)
    if serve:
        print(f"serve it: {serve}", file=out, flush=True)
    return DeployResult(**{**result.__dict__, "serve": serve})


def _plain_value(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def _source_path(checkpoint: str) -> str:
    """The ``.pt`` file a run directory's latest checkpoint is (trials must all score the same file)."""
    from mtl_ray.checkpoint import latest_checkpoint

    p = Path(checkpoint)
    return str(p.absolute()) if p.is_file() else str(latest_checkpoint(checkpoint))


def run_trials(spec: DeploySpec, sweep: SweepSpec, checkpoint: str, storage: Path) -> list[DeployRow]:
    """Run the Tune search; one :class:`DeployRow` per trial, in Tune's trial order."""
    from ray import tune

    from mtl_ray.ray_session import connect
    from mtl_ray.tune.sweep import _fit_without_tensorboard, _result_loggers

    connect(sweep.base, min_cpus=spec.trial_cpus)
    search_alg = None
    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=sweep.base.seed)
    if spec.search == "grid":  # the distinct settings, in order: e.g. no augmentation choice without steps to augment
        space: dict[str, Any] = {SETTINGS: tune.grid_search(distinct_settings(spec, sweep.base))}
    else:
        space = to_tune_space(sweep)
    trial = tune.with_parameters(deploy_trial, checkpoint=checkpoint, spec=spec, base=sweep.base)
    trainable = tune.with_resources(trial, {"cpu": spec.trial_cpus})
    with tempfile.TemporaryDirectory(prefix=".deploy-", dir=storage) as tune_dir:  # Tune's own files: scratch
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(metric=M.DEPLOY_VAL_ACC, mode="max", num_samples=spec.num_samples,
                                        search_alg=search_alg,
                                        max_concurrent_trials=spec.max_concurrent_trials or None),
            run_config=tune.RunConfig(name="tune", storage_path=tune_dir, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=1),
                                      callbacks=_result_loggers()))
        grid = _fit_without_tensorboard(tuner)
        rows = []
        for i, r in enumerate(grid):
            m = r.metrics or {}
            acc = m.get(M.DEPLOY_VAL_ACC)
            values = r.config.get(SETTINGS) or r.config
            rows.append(DeployRow(trial_id=str(m.get("trial_id") or i), params={k: values.get(k) for k in spec.space},
                                  acc=None if acc is None else float(acc),
                                  ci95=None if acc is None else float(m.get(M.DEPLOY_VAL_ACC + "_ci95", math.nan)),
                                  status="ERROR" if r.error else "DONE"))
    return rows


def table_lines(spec: DeploySpec, rows: Sequence[DeployRow]) -> list[str]:
    head = ["trial", *spec.space, "val acc", "status"]
    body = [[r.trial_id, *(_fmt(_plain_value(r.params[k])) for k in spec.space),
             "-" if r.acc is None else f"{100 * r.acc:.2f}% ± {100 * (r.ci95 or 0):.2f}%", r.status] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    return ["  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) for cells in [head, *body]]


def _write(target: Path, ck: Checkpoint, cfg: Config, spec: DeploySpec, chosen: dict[str, Any], best: DeployRow,
           test: tuple[float, float], rows: Sequence[DeployRow], source: str, overwrite: bool) -> DeployResult:
    """The deployed directory, built beside ``target`` and renamed into place whole."""
    from mtl_ray.tracking.rundir import CONFIG_FILE

    val_acc, val_ci = float(best.acc or 0.0), float(best.ci95 or 0.0)
    metrics = {M.DEPLOY_VAL_ACC: val_acc, M.DEPLOY_VAL_ACC + "_ci95": val_ci,
               M.DEPLOY_TEST_ACC: test[0], M.DEPLOY_TEST_ACC + "_ci95": test[1]}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename: the directory as any other would be
    try:
        deployed = Checkpoint(step=ck.step, params=ck.params, optimizer={}, config=cfg, shape=ck.shape,
                              skipped_steps=ck.skipped_steps, tasks_seen=ck.tasks_seen, metrics=metrics, stage=ck.stage)
        name = Path(save_checkpoint(tmp / "checkpoints", deployed)).name
        record = {"deployed_from": source, "deploy_file": spec.source, "target": list(spec.target),
                  "chosen": chosen, "split": spec.split, "episodes": spec.episodes,
                  "test_episodes": spec.test_episodes, **metrics,
                  "space": {k: {d.kind: list(d.values)} for k, d in spec.space.items()}}
        atomic_write(tmp / DEPLOY_FILE, f"# mtl-ray deploy {spec.source}: evaluate with `mtl-ray eval {target}`\n"
                     + yaml.safe_dump(record, sort_keys=False))
        atomic_write(tmp / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        atomic_write(tmp / TRIALS_CSV, trials_csv(spec, rows))
        if target.exists() and overwrite:
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return DeployResult(out_dir=target, checkpoint=str(target / "checkpoints" / name), chosen=chosen,
                        val_acc=val_acc, val_ci95=val_ci, test_acc=test[0], test_ci95=test[1], rows=list(rows))


def trials_csv(spec: DeploySpec, rows: Sequence[DeployRow]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial_id", *spec.space, M.DEPLOY_VAL_ACC, M.DEPLOY_VAL_ACC + "_ci95", "status"])
    for r in rows:
        w.writerow([r.trial_id, *(_plain_value(r.params[k]) for k in spec.space),
                    "" if r.acc is None else f"{r.acc:.6g}", "" if r.ci95 is None else f"{r.ci95:.6g}", r.status])
    return buf.getvalue()


def log_deployed(cfg: Config, result: DeployResult) -> str | None:
    """An MLflow run for the deployed model (its chosen values, both scores, the trial table and the pyfunc
    model, registered as ``mtl-ray-<name>``); returns the command that serves it (None without MLflow)."""
    if not cfg.tracking.mlflow:
        return None
    from mtl_ray.tracking.mlflow_run import MlflowRun

    run = MlflowRun(cfg, result.out_dir, tags={"stage": "deploy"}, stage="meta", system_metrics=False)
    if run.run_id is None:
        return None
    run.on_metrics(0, {M.DEPLOY_VAL_ACC: result.val_acc, M.DEPLOY_TEST_ACC: result.test_acc})
    run.log_artifact(result.out_dir / DEPLOY_FILE)
    run.log_artifact(result.out_dir / TRIALS_CSV)
    info = run.log_model(result.checkpoint, step=0)
    run.finish(status="FINISHED", checkpoint=result.checkpoint)
    return run.serve_command(info)
