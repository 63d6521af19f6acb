"""``mtl-ray``: train, pretrain, tune, evaluate, convert data, validate configs.

Every command validates its whole config (static and data-dependent checks) before starting
anything and exits 2 with every problem listed. ``key=value`` arguments override config fields.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from mtl_ray.config import Config, ConfigError, UserError, from_dict, load_config

EXIT_CONFIG = 2
OVERWRITE_HELP = ("a --run-dir holding an earlier run is refused; this deletes that run's checkpoints, metrics.jsonl, "
                  "config.yaml and MLflow run id first (docs/runs.md)")


def check_config(cfg: Config) -> Config:
    """Run the checks that need the data and ``model.init``; raise one ConfigError with every problem."""
    from mtl_ray.data import check_data
    from mtl_ray.distributed.transfer import check_init
    from mtl_ray.memory import memory_problems

    memory = memory_problems(cfg)  # first: the data checks load the data at these sizes, which may not fit either
    problems = (memory or check_data(cfg)) + check_init(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def validate(cfg_path: str | None, overrides: Sequence[str]) -> Config:
    """Load a config and run every check; raise one ConfigError with every problem."""
    return check_config(load_config(cfg_path, overrides))


def validate_pretrain(cfg_path: str | None, overrides: Sequence[str]) -> Config:
    """Load a config for ``mtl-ray pretrain`` and check its data; raise one ConfigError with every problem."""
    from mtl_ray.data import check_pretrain_data
    from mtl_ray.memory import memory_problems

    cfg = load_config(cfg_path, overrides)
    problems = memory_problems(cfg, pretrain=True) or check_pretrain_data(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def run_dir_for(cfg: Config, explicit: str | None) -> Path:
    if explicit:
        return Path(explicit).absolute()
    name = cfg.tracking.run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return (Path(cfg.tracking.run_dir) / name).absolute()


def train(cfg: Config, run_dir: Path, *, resume: bool = False, overwrite: bool = False, out=None):
    """Meta-train ``cfg`` into ``run_dir``; the shared body of ``mtl-ray train`` and jobs/meta_train.py.

    A ``run_dir`` holding an earlier run needs ``resume`` (continue it) or ``overwrite`` (replace it).
    The MLflow run also gets the trained meta-learner as a pyfunc model (``mtl_ray.serving``).
    """
    from mtl_ray.tracking.run import run_training

    return run_training(cfg, run_dir, resume=resume, overwrite=overwrite, on_finish=log_model, out=out)


def pretrain(cfg: Config, run_dir: Path, *, resume: bool = False, overwrite: bool = False, out=None):
    """Pretrain ``cfg`` on Ray Train into ``run_dir``; the shared body of ``mtl-ray pretrain`` and jobs/pretrain.py."""
    from mtl_ray.tracking.run import run_pretraining

    return run_pretraining(cfg, run_dir, resume=resume, overwrite=overwrite, out=out)


def tune_command(sweep_path: str, overrides: Sequence[str], sweep_dir: str | None, *, resume: bool = False,
                 out=sys.stdout):
    """Validate the sweep (base config, every value of its space, the data) before Ray starts; run it."""
    from mtl_ray.tune.spec import check_sweep, load_sweep
    from mtl_ray.tune.sweep import resume_problem, run_sweep

    spec = load_sweep(sweep_path, list(overrides))
    problems = check_sweep(spec)
    if problems:
        raise ConfigError(problems)
    if resume and not sweep_dir:
        raise ConfigError(["--resume: got no sweep to resume; expected --sweep-dir DIR of an earlier sweep"])
    if resume and (problem := resume_problem(Path(sweep_dir))):
        raise ConfigError([problem])
    path = (Path(sweep_dir) if sweep_dir else
            Path(spec.base.tracking.run_dir) / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}").absolute()
    return run_sweep(spec, path, resume=resume, out=out)


def log_model(tracker, summary) -> None:
    """Log the final checkpoint as an MLflow pyfunc few-shot model into the run (skipped without one)."""
    if not summary.checkpoint or "://" in summary.checkpoint or tracker.run_id is None:
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keeps job logs readable
    # MLflow's advice about a pickled python_model does not apply: the model is our own code, shipped with it.
    logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)
    try:
        from mtl_ray.serving import log_fewshot_model
    except ImportError:  # serving is optional
        return

    def log() -> None:
        import mlflow

        mlflow.set_tracking_uri(tracker.uri)
        with mlflow.start_run(run_id=tracker.run_id):
            log_fewshot_model(summary.checkpoint)

    tracker.guard(log)


def evaluate(ckpt_path: str, *, overrides: Sequence[str], split: str, episodes: int, lake: str | None,
             out=sys.stdout) -> dict[str, float]:
    from mtl_ray import metrics as M
    from mtl_ray.algorithms import TaskShape, linear_probe
    from mtl_ray.data import check_data
    from mtl_ray.data.lake import WAYS, default_lake_path, load_lake_runs
    from mtl_ray.distributed.checkpoint import PRETRAIN_STAGE, load_checkpoint
    from mtl_ray.distributed.evaluate import check_params, evaluate_tasks, lake_error, mean_ci95
    from mtl_ray.distributed.executor import LocalExecutor

    ck = load_checkpoint(ckpt_path)
    cfg = from_dict(ck.config.to_dict(), overrides)
    params, shape, method = ck.params, ck.shape, cfg.algorithm.name
    if ck.stage == PRETRAIN_STAGE:  # "pretrain-only": a linear head fine-tuned on each support set
        shape = TaskShape(ck.shape.kind, ck.shape.x_shape, WAYS if lake is not None else cfg.data.ways)
        cfg, params = linear_probe(cfg, ck.params, shape)
        method = f"pretrained body + linear head, lr {cfg.algorithm.inner_lr:g}"
    method += f", model.norm={cfg.model.norm}"  # transductive scores depend on the queries scored together
    steps = cfg.eval_inner_steps
    result: dict[str, float] = {"step": float(ck.step)}
    if lake is not None:
        path = Path(lake) if lake else default_lake_path(cfg.data.root)
        runs = load_lake_runs(path, cfg.data.image_size)
        err = lake_error(cfg, params, shape, runs, steps)
        print(f"Lake 20-way within-alphabet one-shot, {len(runs)} runs: error {err:.2f}% "
              f"(accuracy {100 - err:.2f}%)  [{method}, step {ck.step}, {steps} inner steps]", file=out)
        result["lake/error_pct"] = err
        return result
    from mtl_ray.memory import memory_problems

    problems = memory_problems(cfg, episodes=episodes) or check_data(cfg, [split])
    if problems:
        raise ConfigError(problems)
    executor = LocalExecutor(cfg)
    check_params(executor.worker.learner, params, f"checkpoint {ckpt_path}")
    per_task = evaluate_tasks(executor, params, split, episodes, steps, max_shard_tasks=cfg.optim.meta_batch_size)
    d = cfg.data
    task = "regression" if cfg.data.source == "sinusoid" else f"{d.ways}-way {d.shots}-shot"
    print(f"meta-test on {d.source}/{split}: {episodes} episodes, {task}, {steps} inner steps, step {ck.step} "
          f"[{method}]", file=out)
    for name, values in per_task.items():
        mean, half = mean_ci95(values)
        key = M.META_TEST_ACC if name == "acc" else M.META_TEST_LOSS if name == "loss" else f"meta_test/{name}"
        scale, unit = (100.0, "%") if name == "acc" else (1.0, "")
        print(f"  {key}: {mean * scale:.2f}{unit} ± {half * scale:.2f}{unit} (95% CI)", file=out)
        result[key], result[key + "_ci95"] = mean, half
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtl-ray", description="Distributed meta-learning on Ray")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="meta-train from a YAML config")
    t.add_argument("config", nargs="?", help="YAML config (default: built-in defaults)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.steps=100")
    t.add_argument("--run-dir", help="run directory (default: tracking.run_dir/<name>-<time>)")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --run-dir")
    t.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    pt = sub.add_parser("pretrain", help="supervised pretraining on Ray Train (for model.init / algorithm mtl)")
    pt.add_argument("config", nargs="?", help="YAML config (its data, model and pretrain sections)")
    pt.add_argument("overrides", nargs="*", help="key=value overrides, e.g. pretrain.steps=500")
    pt.add_argument("--run-dir", help="run directory (default: tracking.run_dir/<name>-<time>)")
    pt.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --run-dir")
    pt.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    s = sub.add_parser("tune", help="sweep hyperparameters with Ray Tune (each trial: its own worker actors)")
    s.add_argument("sweep", help="sweep YAML, e.g. jobs/configs/sweep_omniglot_maml.yaml")
    s.add_argument("overrides", nargs="*", help="key=value overrides of the base config, e.g. optim.steps=500")
    s.add_argument("--sweep-dir", help="sweep directory (default: <base tracking.run_dir>/<sweep>-<time>)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted sweep in --sweep-dir")

    e = sub.add_parser("eval", help="meta-test a checkpoint")
    e.add_argument("checkpoint", help="a .pt checkpoint or a run directory (its latest checkpoint)")
    e.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.source=digits data.shots=5")
    e.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    e.add_argument("--episodes", type=int, default=600)
    e.add_argument("--lake", nargs="?", const="", default=None,
                   help="score Lake's 20-way one-shot runs (zip or folder; default <data root>/omniglot/...)")

    d = sub.add_parser("data", help="data utilities")
    dsub = d.add_subparsers(dest="data_command", required=True)
    c = dsub.add_parser("convert", help="folder of class/xxx.png images -> Parquet image table")
    c.add_argument("src", help="folder with one sub-folder of images per class")
    c.add_argument("out", help="output .parquet file")
    c.add_argument("--image-size", type=int, default=28)
    c.add_argument("--channels", type=int, default=1, choices=[1, 3])
    c.add_argument("--invert", action="store_true", help="invert (dark ink on light paper -> ink high)")
    c.add_argument("--domain", default=None, help="value for the domain column")

    v = sub.add_parser("validate", help="check configs (static and data checks) and exit")
    v.add_argument("configs", nargs="+")
    return p


RUNS = {"train": (validate, train), "pretrain": (validate_pretrain, pretrain)}  # command -> (check, run)


def _is_sweep(path: str) -> bool:
    """A sweep file has a top-level ``space`` (training configs never do)."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):  # not readable as YAML: validate() says why
        return False
    return isinstance(raw, dict) and "space" in raw


def _split_overrides(items: Sequence[str]) -> tuple[str | None, list[str]]:
    """argparse puts a leading key=value into ``config``; move it back."""
    items = list(items)
    if items and "=" in items[0] and not items[0].endswith((".yaml", ".yml")):
        return None, items
    return (items[0] if items else None), items[1:]


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    bad = [x for x in extra if x.startswith("-") or "=" not in x]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:  # key=value given after options
        if not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        if args.command in RUNS:
            check, run = RUNS[args.command]
            path, overrides = _split_overrides([*([args.config] if args.config else []), *args.overrides])
            cfg = check(path, overrides)
            if args.resume and not args.run_dir and not cfg.tracking.run_name:
                raise ConfigError(["--resume: got no run to resume; "
                                   "expected --run-dir DIR (or tracking.run_name=NAME)"])
            run(cfg, run_dir_for(cfg, args.run_dir), resume=args.resume, overwrite=args.overwrite)
        elif args.command == "tune":
            tune_command(args.sweep, args.overrides, args.sweep_dir, resume=args.resume)
        elif args.command == "eval":
            if args.episodes < 1:
                raise ConfigError([f"--episodes: got {args.episodes}, expected >= 1"])
            evaluate(args.checkpoint, overrides=args.overrides, split=args.split, episodes=args.episodes,
                     lake=args.lake)
        elif args.command == "data":
            from mtl_ray.data.imagetable import convert_folder

            out = convert_folder(args.src, args.out, image_size=args.image_size, channels=args.channels,
                                 invert=args.invert, domain=args.domain)
            print(f"wrote {out}")
        elif args.command == "validate":
            bad = 0
            for path in args.configs:
                try:
                    if _is_sweep(path):
                        from mtl_ray.tune.spec import check_sweep, load_sweep

                        if problems := check_sweep(load_sweep(path)):
                            raise ConfigError(problems)
                    else:
                        validate(path, [])
                    print(f"ok: {path}")
                except ConfigError as e:
                    bad += 1
                    print(f"{path}: {e}", file=sys.stderr)
            return EXIT_CONFIG if bad else 0
    except UserError as e:  # config, data, checkpoint and evaluation errors name the value and the fix
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main())
