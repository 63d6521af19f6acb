"""``mtl-ray``: train, pretrain, tune, evaluate, convert data, check and show configs.

This module only parses: each command calls its recipe (:mod:`mtl_ray.recipes`), which checks the whole
config (static and data-dependent checks) before starting anything. A user's mistake exits 2 with every
problem listed, never a traceback. ``key=value`` arguments override config fields.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from mtl_ray import __version__
from mtl_ray.components import load_config
from mtl_ray.config import Config, ConfigError, UserError

EXIT_CONFIG = 2
OVERRIDES_ENV = "MTL_RAY_OVERRIDES"  # key=value overrides after the command line's (README, "Benchmarks")
OVERWRITE_HELP = ("a --run-dir holding an earlier run is refused; this deletes that run's checkpoints, metrics.jsonl, "
                  "config.yaml and MLflow run id first (docs/runs.md)")


def program() -> str:
    """How this process was started, as a user would type it again (for the "continue with" line)."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else "mtl-ray"
    if argv0.endswith(("cli.py", "__main__.py")) or argv0 == "-m":
        return f"{sys.executable} -m mtl_ray.cli"
    return argv0


def _run_args(p: argparse.ArgumentParser, what: str, example: str) -> None:
    p.add_argument("config", nargs="?", help=f"YAML config ({what})")
    p.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")
    p.add_argument("--run-dir", help="run directory (default: tracking.run_dir/<tracking.run_name or name-time>)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --run-dir")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def _parser(prog: str = "mtl-ray") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Distributed meta-learning on Ray (docs/architecture.md)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _run_args(sub.add_parser("train", help="meta-train from a YAML config"), "default: built-in defaults",
              "optim.steps=100")
    _run_args(sub.add_parser("pretrain", help="supervised pretraining on Ray Train (for model.init / algorithm mtl)"),
              "its data, model and pretrain sections", "pretrain.steps=500")

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

    dp = sub.add_parser("deploy", help="Ray Tune search over how a trained model adapts to a target domain "
                                       "(test-time fine-tuning, inner_lr); writes a deployed checkpoint")
    dp.add_argument("checkpoint", help="a .pt checkpoint or a run directory (its latest checkpoint)")
    dp.add_argument("deploy_file", help="deploy YAML, e.g. jobs/configs/deploy_fashion.yaml")
    dp.add_argument("overrides", nargs="*", help="key=value for the model's config; deploy.KEY=value for the file")
    dp.add_argument("--out", help="deployed directory (default: <run dir>/deploy-<name>)")
    dp.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")

    pl = sub.add_parser("pipeline", help="pretrain -> meta-train from it -> deployment search per target domain")
    pl.add_argument("pipeline", help="pipeline YAML, e.g. jobs/configs/pipeline_omniglot.yaml")
    pl.add_argument("overrides", nargs="*", help="key=value for both training configs; deploy.KEY=value for the "
                                                 "deploy files")
    pl.add_argument("--run-dir", help="pipeline directory (default: <tracking.run_dir>/<pipeline>-<time>)")
    pl.add_argument("--resume", action="store_true", help="continue an interrupted pipeline in --run-dir")

    d = sub.add_parser("data", help="data utilities")
    dsub = d.add_subparsers(dest="data_command", required=True)
    from mtl_ray.data.converters import DEFAULT_IMAGE_SIZE, FORMATS

    c = dsub.add_parser("convert", help="a dataset as published (or a folder of class/xxx.png images) -> Parquet "
                                        "image table (layouts: docs/datasets.md)")
    c.add_argument("src", help="the dataset's folder (--format folder: one sub-folder of images per class)")
    c.add_argument("out", help="output .parquet file")
    c.add_argument("--format", default="folder", choices=FORMATS,
                   help="the layout of SRC (default folder); the benchmarks keep their published class splits")
    c.add_argument("--image-size", type=int, default=None,
                   help="side of the stored square images (default: " +
                        ", ".join(f"{k} {v}" for k, v in DEFAULT_IMAGE_SIZE.items()) + ")")
    c.add_argument("--split-from", default=None,
                   help="folder holding the split lists when they are not inside SRC (mini-imagenet: train.csv ...; "
                        "tiered-imagenet: class-list csvs; cifar-fs: splits/bertinetto/*.txt)")
    c.add_argument("--channels", type=int, default=None, choices=[1, 3], help="--format folder: 1 (default) or 3")
    c.add_argument("--invert", action="store_true", help="--format folder: invert (dark ink on light paper -> ink "
                                                          "high)")
    c.add_argument("--domain", default=None, help="--format folder: value for the domain column")

    v = sub.add_parser("validate", help="check configs and sweep files (static and data checks) and exit")
    v.add_argument("configs", nargs="+")

    cfg = sub.add_parser("config", help="show config keys")
    csub = cfg.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="every key with its value, type, default and one-line doc")
    show.add_argument("config", nargs="?", help="YAML config (default: the built-in defaults)")
    show.add_argument("overrides", nargs="*", help="key=value overrides")
    return p


def file_kind(path: str) -> str:
    """``sweep`` (a ``base`` and a ``space``), ``deploy`` (a ``space`` without a base), ``pipeline`` (a
    ``meta_train`` stage) or ``config`` (anything else, unreadable files included: the config check says why)."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return "config"
    if not isinstance(raw, dict):
        return "config"
    if "meta_train" in raw:
        return "pipeline"
    if "space" in raw:
        return "sweep" if "base" in raw else "deploy"
    return "config"


def _split_overrides(config: str | None, overrides: Sequence[str]) -> tuple[str | None, list[str]]:
    """argparse puts a leading key=value into ``config``; move it back."""
    items = [*([config] if config else []), *overrides]
    if items and "=" in items[0] and not items[0].endswith((".yaml", ".yml")):
        return None, items
    return (items[0] if items else None), items[1:]


def env_overrides(*, sweep: bool = False, deploy: bool = False) -> list[str]:
    """``$MTL_RAY_OVERRIDES`` as key=value overrides (``sweep.*`` keys only for a sweep, ``deploy.*`` only for a
    deployment search or a pipeline): they follow the command line's, so e.g.
    ``MTL_RAY_OVERRIDES="optim.steps=3 pretrain.steps=3"`` smoke-runs any documented command."""
    try:
        items = shlex.split(os.environ.get(OVERRIDES_ENV, ""))
    except ValueError as e:
        raise ConfigError([f"${OVERRIDES_ENV}: got {os.environ[OVERRIDES_ENV]!r}, which does not split into words "
                           f"({e}); expected key=value items separated by spaces"]) from None
    bad = [x for x in items if "=" not in x]
    if bad:
        raise ConfigError([f"${OVERRIDES_ENV}: got {x!r}, expected key=value (e.g. optim.steps=3)" for x in bad])
    return [x for x in items if (sweep or not x.startswith("sweep.")) and (deploy or not x.startswith("deploy."))]


def _run(args: argparse.Namespace, prog: str) -> int:
    """``train`` / ``pretrain``: load, resolve the data root, check everything, then run the recipe."""
    from mtl_ray.recipes.common import recorded_config, resume_command, run_dir_for, with_data_root

    path, overrides = _split_overrides(args.config, args.overrides)
    cfg = load_config(path, [*overrides, *env_overrides()])
    if args.resume and not args.run_dir and not cfg.tracking.run_name:
        raise ConfigError(["--resume: got no run to resume; expected --run-dir DIR (or tracking.run_name=NAME)"])
    run_dir = run_dir_for(cfg, args.run_dir)
    cfg = with_data_root(cfg, recorded_config(run_dir) if args.resume else None)
    if args.command == "pretrain":
        from mtl_ray.recipes.pretrain import check_pretrain_config, pretrain

        pretrain(check_pretrain_config(cfg), run_dir, resume=args.resume, overwrite=args.overwrite)
        return 0
    from mtl_ray.recipes.train import check_config, train

    again = resume_command(prog if args.job else f"{prog} train", path, overrides, run_dir)
    train(check_config(cfg), run_dir, resume=args.resume, overwrite=args.overwrite, resume_command=again)
    return 0


def _tune(args: argparse.Namespace, prog: str) -> int:
    from mtl_ray.tune.sweep import sweep

    sweep(args.sweep, [*args.overrides, *env_overrides(sweep=True)], args.sweep_dir, resume=args.resume)
    return 0


def _eval(args: argparse.Namespace, prog: str) -> int:
    from mtl_ray.recipes.evaluate import evaluate

    evaluate(args.checkpoint, overrides=args.overrides, split=args.split, episodes=args.episodes, lake=args.lake)
    return 0


def _deploy(args: argparse.Namespace, prog: str) -> int:
    from mtl_ray.tune.deploy import deploy

    overrides = [*args.overrides, *env_overrides(deploy=True)]
    deploy(args.checkpoint, args.deploy_file, overrides, args.out, overwrite=args.overwrite)
    return 0


def _pipeline(args: argparse.Namespace, prog: str) -> int:
    from mtl_ray.tune.pipeline import run_pipeline

    run_pipeline(args.pipeline, [*args.overrides, *env_overrides(deploy=True)], args.run_dir, resume=args.resume)
    return 0


def _data(args: argparse.Namespace, prog: str) -> int:
    from mtl_ray.data.converters import convert

    done = convert(args.format, args.src, args.out, image_size=args.image_size, split_from=args.split_from,
                   channels=args.channels, invert=args.invert, domain=args.domain)
    print(done.summary())
    return 0


def check_file(path: str) -> Config | None:
    """Every check of a config, sweep, deploy or pipeline file (None but for a config); one ConfigError with every
    problem."""
    kind = file_kind(path)
    if kind == "sweep":
        from mtl_ray.tune.spec import check_sweep, load_sweep

        if problems := check_sweep(load_sweep(path)):
            raise ConfigError(problems)
        return None
    if kind == "deploy":  # its data checks need the model it deploys: `mtl-ray deploy` runs them
        from mtl_ray.tune.deploy import load_deploy

        load_deploy(path)
        return None
    if kind == "pipeline":
        from mtl_ray.tune.pipeline import check_pipeline, load_pipeline

        if problems := check_pipeline(load_pipeline(path)):
            raise ConfigError(problems)
        return None
    from mtl_ray.recipes.common import with_data_root
    from mtl_ray.recipes.train import check_config

    return check_config(with_data_root(load_config(path)))


def _validate(args: argparse.Namespace, prog: str) -> int:
    bad = 0
    for path in args.configs:
        try:
            check_file(path)
            print(f"ok: {path}")
        except ConfigError as e:
            bad += 1
            print(f"{path}: {e}", file=sys.stderr)
    return EXIT_CONFIG if bad else 0


def _config(args: argparse.Namespace, prog: str) -> int:
    from mtl_ray.config_keys import format_keys, keys

    path, overrides = _split_overrides(args.config, args.overrides)
    print(format_keys(keys(load_config(path, overrides) if path or overrides else None)))
    return 0


COMMANDS = {"train": _run, "pretrain": _run, "tune": _tune, "eval": _eval, "deploy": _deploy, "pipeline": _pipeline,
            "data": _data, "validate": _validate, "config": _config}


def main(argv: Sequence[str] | None = None, *, command: str | None = None, prog: str | None = None) -> int:
    """Parse ``argv`` (default: the process's arguments) and run the command; returns the exit code.

    ``jobs/*.py`` run one ``command`` ("train", "pretrain", "tune") under their own ``prog`` (the job script, as
    the "continue with" line names it): ``python jobs/meta_train.py CONFIG ...`` is ``mtl-ray train CONFIG ...``.
    """
    prog = prog or program()
    parser = _parser("mtl-ray" if command is None else prog)
    if command is not None:  # the job script is the command: its usage line names the script alone
        choices = next(a for a in parser._actions if a.dest == "command").choices
        assert isinstance(choices, dict)
        choices[command].prog = prog
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args([command, *argv] if command else argv)
    args.job = command is not None
    bad = [x for x in extra if x.startswith("-") or "=" not in x]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:  # key=value given after options
        if not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return COMMANDS[args.command](args, prog)
    except UserError as e:  # config, data, checkpoint and evaluation errors name the value and the fix
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
