"""Every command and code block in README.md is checked here, so the README cannot drift.

``test_readme_section_runs_as_typed`` runs every ```bash line exactly as written, in order, in one shell
session (exports and ``source`` carry over), in a fresh copy of the repository with ``../shared/data``
beside it, with ``$MTL_RAY_OVERRIDES`` set to a few steps per run (the README says so). Servers
(``mlflow ui``, ``mlflow models serve``) are started, asked a question over HTTP and stopped. A block after
``<!-- readme-test: not run: WHY -->`` is not run (the cloud: Docker, AWS); ``make test`` is what runs
this file. Every command is also parsed by the tool that would run it (``mtl-ray`` and the job scripts by
the real CLI parser, ``ray`` and ``mlflow`` by their click trees, ``make`` against the Makefile), with its
configs and overrides checked, so the commands not run here are checked too. ```python blocks must
compile, their ``mtl_ray`` imports resolve and the methods they call exist with those arguments.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from miniatures import mini_imagenet_table

from mtl_ray import cli
from mtl_ray.components import from_dict, load_config
from mtl_ray.config import Config, ConfigError
from mtl_ray.data import check_data
from mtl_ray.data.lake import LAKE_ZIP
from mtl_ray.tune.deploy import load_deploy
from mtl_ray.tune.pipeline import load_pipeline
from mtl_ray.tune.spec import load_sweep

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
SEPARATORS = {"&&", "||", ";", "&", "|"}
MTL_RAY = ".venv/bin/mtl-ray"
MLFLOW = ".venv/bin/mlflow"
VENV_PROGRAMS = {"mlflow": MLFLOW}  # the prose writes `mlflow ...` for the venv's mlflow
PROGRAMS = ("make", MTL_RAY, MLFLOW, "ray", "docker")
SHELL = ("source", "export", "unzip")  # shell set-up lines: only run (test_readme_section_runs_as_typed)
ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")  # `VAR=value cmd ...`: the command is cmd


# --------------------------------------------------------------------------- reading the README


def fenced_blocks(text: str, lang: str) -> list[str]:
    return [m.group(2) for m in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```", text, re.M | re.S) if m.group(1) == lang]


def split_commands(line: str) -> list[list[str]]:
    """One shell line -> its commands (``#`` comments dropped, split at ``&&``, ``;``, ``&``, ``|``)."""
    out: list[list[str]] = [[]]
    for tok in shlex.split(line, comments=True):
        if tok in SEPARATORS:
            out.append([])
        elif out[-1] or not ASSIGNMENT.match(tok):  # leading VAR=value tokens set the environment only
            out[-1].append(tok)
    return [c for c in out if c]


def bash_commands(text: str) -> list[list[str]]:
    cmds = []
    for block in fenced_blocks(text, "bash"):
        for line in re.sub(r"\\\n", " ", block).splitlines():
            cmds += split_commands(line)
    return cmds


def inline_commands(text: str, programs: tuple[str, ...]) -> list[list[str]]:
    """Commands quoted inline in the prose (`` `mlflow models serve ...` ``), ``<placeholders>`` filled in."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    spans = [re.sub(r"<[^>]*>", "X", s) for s in re.findall(r"`([^`\n]+)`", prose)]
    cmds = [c for s in spans if s.split()[0] in programs for c in split_commands(s) if len(c) > 1]
    return [[VENV_PROGRAMS.get(c[0], c[0]), *c[1:]] for c in cmds
            if c[1:3] != ["job", "submit"] or "--" in c]  # `ray job submit` alone names the command only


COMMANDS = bash_commands(README)
PYTHON_BLOCKS = fenced_blocks(README, "python")


def _id(cmd: list[str]) -> str:
    return " ".join(cmd)[:90]


def commands(*prefix: str, extra: list[list[str]] = ()) -> list[Any]:
    unique = {tuple(c): c for c in [*COMMANDS, *extra] if c[: len(prefix)] == list(prefix)}
    return [pytest.param(c, id=_id(c)) for c in unique.values()]


def test_readme_commands_were_found_and_every_one_is_checked_here():
    assert PYTHON_BLOCKS, "no ```python blocks found in README.md"
    unchecked = [_id(c) for c in COMMANDS if c[0] not in (*PROGRAMS, *SHELL)]
    assert not unchecked, f"README commands no test here checks (add a check to tests/test_readme.py): {unchecked}"
    for prefix in (["make", "train"], ["make", "test"], [MTL_RAY, "train"], [MTL_RAY, "eval"], [MTL_RAY, "tune"],
                   ["ray", "job", "submit"]):
        assert commands(*prefix), f"no `{' '.join(prefix)}` command parsed from README.md"


def test_readme_parser_sees_continuations_and_comments():
    text = "```bash\nmtl-ray train a.yaml \\\n    x=1   # comment\nmake a && make b &\n```\n"
    assert bash_commands(text) == [["mtl-ray", "train", "a.yaml", "x=1"], ["make", "a"], ["make", "b"]]


def test_every_program_the_readme_runs_from_the_venv_is_installed():
    for prog in sorted({c[0] for c in COMMANDS if c[0].startswith(".venv/")}):
        here = REPO / prog if (REPO / ".venv").is_dir() else Path(sys.executable).parent / Path(prog).name
        assert here.is_file(), f"README runs {prog}, which does not exist ({here})"


# --------------------------------------------------------------------------- make


def makefile_targets() -> dict[str, str]:
    """``{target: recipe}`` of the Makefile's explicit rules."""
    targets: dict[str, str] = {}
    current: list[str] = []
    for line in (REPO / "Makefile").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+(?:[ \t]+[A-Za-z0-9_.-]+)*)[ \t]*:(?!=)", line)
        if m:
            current = m.group(1).split()
            for t in current:
                targets.setdefault(t, "")
        elif line.startswith("\t"):
            for t in current:
                targets[t] += line[1:] + "\n"
        elif line.strip() and not line.startswith("#"):
            current = []
    return targets


@pytest.mark.parametrize("cmd", commands("make", extra=inline_commands(README, ("make",))))
def test_make_command_names_a_makefile_target(cmd):
    targets = makefile_targets()
    goals = [a for a in cmd[1:] if "=" not in a]
    assigns = dict(a.split("=", 1) for a in cmd[1:] if "=" in a)
    assert goals, cmd
    for goal in goals:
        assert goal in targets, f"README runs `make {goal}`; the Makefile has no such target ({sorted(targets)})"
    if assigns.get("ARGS", "...") != "...":  # `make train ARGS="optim.steps=200"`: passed on, and valid
        for goal in goals:
            recipe = targets[goal]
            assert "$(ARGS)" in recipe, f"make {goal} ignores ARGS:\n{recipe}"
            m = re.search(r"mtl-ray train (\S+\.ya?ml)", recipe)
            assert m, recipe
            check_mtl_ray(["train", m.group(1), *shlex.split(assigns["ARGS"])])  # overrides and options
    if "test" in goals and ".ci/run" in README:  # "CI runs exactly this (bash .ci/run)"
        assert re.search(r"^make test\b", (REPO / ".ci" / "run").read_text(), re.M)


# --------------------------------------------------------------------------- mtl-ray and the job scripts


@dataclass
class Checked:
    """A command's configs after the static checks, with the splits its data checks cover."""

    configs: list[tuple[Config, list[str] | None]] = field(default_factory=list)
    lake: Path | None = None


def repo_file(path: str, what: str) -> Path:
    p = REPO / path
    assert p.is_file(), f"README names {what} {path!r}, which does not exist in the repository"
    return p


def parse_or_fail(parser: argparse.ArgumentParser, argv: list[str], known: bool = False):
    try:
        return parser.parse_known_args(argv) if known else parser.parse_args(argv)
    except SystemExit:  # argparse printed the problem to stderr (shown by pytest)
        pytest.fail(f"{parser.prog} rejects the README's arguments {argv}")


def mtl_ray_args(argv: list[str]) -> argparse.Namespace:
    """``argv`` (after the program) parsed exactly as ``mtl_ray.cli.main`` does, without running anything."""
    parser = cli._parser()
    args, extra = parse_or_fail(parser, argv, known=True)
    bad = [x for x in extra if x.startswith("-") or "=" not in x]
    assert not bad, f"mtl-ray {args.command}: unrecognized arguments {bad}"
    if extra:
        assert hasattr(args, "overrides"), f"mtl-ray {args.command} takes no key=value overrides: {extra}"
        args.overrides = [*args.overrides, *extra]
    if args.command in ("train", "pretrain"):
        args.config, args.overrides = cli._split_overrides(args.config, args.overrides)
    return args


def run_dirs_of_readme_trainings() -> dict[str, str]:
    """``{--run-dir: config}`` of the README's ``mtl-ray train`` commands (what ``eval RUN`` reads back)."""
    out = {}
    for (cmd,) in (p.values for sub in ("train", "pretrain") for p in commands(MTL_RAY, sub)):
        args = mtl_ray_args(cmd[1:])
        if args.run_dir and args.config:
            out[args.run_dir] = args.config
    return out


def check_mtl_ray(argv: list[str]) -> Checked:
    if argv == ["--version"]:
        return Checked()
    args = mtl_ray_args(argv)
    out = Checked()
    if args.command in ("train", "pretrain"):
        assert args.config, "README trains without a config file"
        out.configs.append((load_config(repo_file(args.config, "config"), args.overrides), None))
    elif args.command == "tune":
        spec = load_sweep(repo_file(args.sweep, "sweep file"), args.overrides)
        out.configs.append((spec.base, None))
    elif args.command == "eval":  # the checkpoint is the user's run; its config is the one that trained it
        trained = run_dirs_of_readme_trainings().get(args.checkpoint.rstrip("/"))
        base = load_config(REPO / trained) if trained else Config()
        out.configs.append((from_dict(base.to_dict(), args.overrides), [args.split]))
        assert args.episodes >= 1
        if args.lake:
            out.lake = Path(args.lake)
            assert out.lake.name == LAKE_ZIP, f"--lake {args.lake}: the package reads Lake's runs from {LAKE_ZIP}"
    elif args.command == "pipeline":  # both training stages' configs, as the pipeline builds them
        pipe = load_pipeline(repo_file(args.pipeline, "pipeline file"), args.overrides)
        out.configs += [(pipe.pretrain.config, None), (pipe.meta_train.config, None)]
    elif args.command == "deploy":  # the checkpoint is the user's run; the deploy file is checked as read
        load_deploy(repo_file(args.deploy_file, "deploy file"), args.overrides)
    elif args.command == "validate":
        for path in args.configs:
            repo_file(path, "config")
    elif args.command == "config":
        assert args.config_command == "show", args
        if args.config:
            out.configs.append((load_config(repo_file(args.config, "config"), args.overrides), None))
    elif args.command == "data":
        assert args.data_command == "convert" and args.image_size > 0, args  # src/out are the user's paths
    else:  # a new subcommand in the README needs a check here
        pytest.fail(f"no README check for `mtl-ray {args.command}`")
    return out


JOB_COMMANDS = {"jobs/meta_train.py": "train", "jobs/pretrain.py": "pretrain", "jobs/tune.py": "tune",
                "jobs/pipeline.py": "pipeline"}


def check_job(entrypoint: list[str]) -> Checked:
    """``python jobs/X.py ARGS``: the job runs ``mtl-ray COMMAND ARGS`` (``cli.main(command=...)``); check that."""
    assert entrypoint[0] == "python" and len(entrypoint) > 1, f"no README check for job entrypoint {entrypoint}"
    script = repo_file(entrypoint[1], "job script")
    assert entrypoint[1] in JOB_COMMANDS, f"{entrypoint[1]}: not a job script of this repository"
    assert f'command="{JOB_COMMANDS[entrypoint[1]]}"' in script.read_text(), f"{script} runs another command"
    return check_mtl_ray([JOB_COMMANDS[entrypoint[1]], *entrypoint[2:]])


# ray and mlflow: parsed by their own click command trees


def click_parse(group, argv: list[str], prog: str) -> dict[str, Any]:
    """Parse ``argv`` down a click command tree (options checked, nothing invoked); the leaf's params."""
    import click

    try:
        ctx = group.make_context(prog, list(argv))
        cmd = group
        while isinstance(cmd, click.Group):
            state = vars(ctx)
            rest = [*state.get("_protected_args", state.get("protected_args", [])), *ctx.args]
            sub, cmd, rest = cmd.resolve_command(ctx, rest)
            ctx = cmd.make_context(sub, rest, parent=ctx)
    except click.ClickException as e:
        pytest.fail(f"`{prog} {' '.join(argv)}` from the README: {e.format_message()}")
    return ctx.params


def check_ray(argv: list[str]) -> Checked:
    from ray.scripts.scripts import cli as ray_cli

    params = click_parse(ray_cli, argv, "ray")
    if argv[:2] == ["job", "submit"]:
        if params.get("working_dir"):
            assert (REPO / params["working_dir"]).is_dir(), params["working_dir"]
        return check_job(list(params["entrypoint"]))
    if "cluster_config_file" in params:  # ray up / dashboard / down ...
        repo_file(params["cluster_config_file"], "cluster config")
    return Checked()


def check_command(cmd: list[str]) -> Checked:
    if cmd[0] == MTL_RAY:
        return check_mtl_ray(cmd[1:])
    if cmd[0] == "ray":
        return check_ray(cmd[1:])
    pytest.fail(f"no README check for {cmd}")


CONFIG_COMMANDS = [*commands(MTL_RAY), *commands("ray", extra=inline_commands(README, ("ray",)))]


@pytest.mark.parametrize("cmd", CONFIG_COMMANDS)
def test_command_parses_and_its_files_and_overrides_are_valid(cmd):
    """Files it names exist, flags exist, every key=value is a known config key with a valid value."""
    try:
        check_command(cmd)
    except ConfigError as e:
        pytest.fail(f"README command `{_id(cmd)}`: {e}")


@pytest.mark.parametrize("cmd", [*commands(MTL_RAY), *commands("ray", "job", "submit")])
def test_command_passes_the_data_checks_on_the_shared_data(cmd, omniglot_root, shared_data):
    """What ``mtl-ray`` checks before starting (e.g. ``data.ways`` vs a split's classes) holds on real data."""
    checked = check_command(cmd)
    for cfg, splits in checked.configs:
        if cfg.data.source == "parquet":  # data.path is the user's file (made by `mtl-ray data convert`)
            continue
        cfg = cfg.replace(**{"data.root": str(omniglot_root), "data.download": False})
        assert check_data(cfg, splits) == [], f"README command `{_id(cmd)}` fails the data checks"
    if checked.lake is not None and not checked.lake.is_absolute():  # ../shared/data/... next to the repo
        assert (REPO / checked.lake).resolve() == (shared_data / "omniglot" / LAKE_ZIP).resolve(), checked.lake
        assert (REPO / checked.lake).is_file(), checked.lake


def test_the_checks_fail_on_a_stale_readme():
    """A renamed config, an unknown key, a removed flag and a bad job argument are all caught."""
    bad = [
        [MTL_RAY, "train", "jobs/configs/sinusoid_renamed.yaml"],
        [MTL_RAY, "train", "jobs/configs/sinusoid_maml.yaml", "optim.stepz=5"],
        [MTL_RAY, "train", "jobs/configs/sinusoid_maml.yaml", "--run-directory", "runs/x"],
        [MTL_RAY, "eval", "runs/x", "data.shotz=5"],
        [MTL_RAY, "tune", "jobs/configs/sweep_sinusoid_maml.yaml", "optim.stepz=5"],
        ["ray", "job", "submit", "--", "python", "jobs/meta_train.py", "--cfg", "jobs/configs/omniglot_maml.yaml"],
        ["ray", "job", "submit", "--", "python", "jobs/meta_train.py", "jobs/configs/omniglot_maml.yaml",
         "scaling.workers=4"],
        ["ray", "job", "submit", "--", "python", "jobs/tune.py", "jobs/configs/sweep_missing.yaml"],
        ["ray", "job", "submit", "--", "python", "jobs/serve.py", "jobs/configs/omniglot_maml.yaml"],
        ["ray", "job", "submit", "--adress", "x", "--", "python", "jobs/meta_train.py"],
        ["ray", "up", "cluster_missing.yaml"],
    ]
    for cmd in bad:
        with pytest.raises((pytest.fail.Exception, ConfigError, AssertionError)):
            check_command(cmd)
    with pytest.raises(AssertionError):
        test_make_command_names_a_makefile_target(["make", "trian"])


@pytest.mark.parametrize("cmd", commands("docker"))
def test_docker_command_names_existing_files(cmd):
    p = argparse.ArgumentParser(prog="docker build")
    p.add_argument("-f", "--file")
    p.add_argument("-t", "--tag", action="append", default=[])
    p.add_argument("context")
    if cmd[1] == "build":
        args, _ = parse_or_fail(p, cmd[2:], known=True)
        assert (REPO / args.context).is_dir(), args.context
        repo_file(args.file or str(Path(args.context) / "Dockerfile"), "Dockerfile")
    elif cmd[1] == "push":  # pushes an image the README builds
        built = [t for c in commands("docker", "build") for t in parse_or_fail(p, c.values[0][2:], True)[0].tag]
        assert cmd[2] in built, (cmd, built)
    else:
        pytest.fail(f"no README check for {cmd}")


@pytest.mark.parametrize("cmd", commands(MLFLOW, extra=inline_commands(README, ("mlflow",))))
def test_mlflow_command_parses(cmd):
    from mlflow.cli import cli as mlflow_cli

    click_parse(mlflow_cli, cmd[1:], "mlflow")


# --------------------------------------------------------------------------- python blocks


def _resolve(obj: Any, parts: list[str]) -> Any:
    for part in parts:
        try:
            obj = getattr(obj, part)
        except AttributeError:
            if not inspect.ismodule(obj):
                raise
            obj = importlib.import_module(f"{obj.__name__}.{part}")
    return obj


def _check_call(call: ast.Call, owner: Any, instance: bool, path: str) -> Any:
    """``owner.attr(...)`` exists and accepts the call's arguments; the callee."""
    *chain, attr = path.split(".")[1:]
    holder = _resolve(owner, chain)
    assert hasattr(holder, attr), f"README calls {path}(...): {holder!r} has no attribute {attr!r}"
    fn = getattr(holder, attr)
    if not callable(fn):
        return fn
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn
    self_arg = [None] if instance and not chain and inspect.isfunction(inspect.getattr_static(holder, attr)) else []
    args = [*self_arg, *(None for a in call.args if not isinstance(a, ast.Starred))]
    kwargs = {k.arg: None for k in call.keywords if k.arg}
    try:
        sig.bind_partial(*args, **kwargs)
    except TypeError as e:
        pytest.fail(f"README calls {path}({ast.unparse(call)[len(ast.unparse(call.func)) + 1:]}: {e}")
    return fn


def _return_type(fn: Any) -> type | None:
    try:
        rt = typing.get_type_hints(fn).get("return")
    except Exception:  # unresolvable annotations: the result is not followed further
        return None
    return rt if isinstance(rt, type) else None


@pytest.mark.parametrize("block", [pytest.param(b, id=f"python-{i}") for i, b in enumerate(PYTHON_BLOCKS)])
def test_python_block_compiles_imports_resolve_and_calls_match_the_api(block):
    tree = ast.parse(compile(block, "README.md", "exec", flags=ast.PyCF_ONLY_AST))
    names: dict[str, Any] = {}  # name -> module/class it is bound to (imports)
    instances: dict[str, type] = {}  # variable -> the class of its value (from return annotations)
    for stmt in tree.body:
        if isinstance(stmt, ast.ImportFrom):
            module = importlib.import_module(stmt.module)
            for a in stmt.names:
                assert hasattr(module, a.name), f"README: `from {stmt.module} import {a.name}`: no such name"
                names[a.asname or a.name] = getattr(module, a.name)
            continue
        if isinstance(stmt, ast.Import):
            for a in stmt.names:
                names[a.asname or a.name.split(".")[0]] = importlib.import_module(a.name.split(".")[0])
            continue
        results = {}
        for node in ast.walk(stmt):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                path = ast.unparse(node.func)
                root = path.split(".")[0]
                if root in names:
                    results[node] = _check_call(node, names[root], False, path)
                elif root in instances:
                    results[node] = _check_call(node, instances[root], True, path)
        if isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name) and stmt.value in results:
            rt = _return_type(results[stmt.value])
            if rt is not None:
                instances[stmt.targets[0].id] = rt
    from_mtl_ray = [s for s in tree.body if isinstance(s, ast.ImportFrom) and s.module.startswith("mtl_ray")]
    assert not from_mtl_ray or instances, "no call on the imported mtl_ray API was followed"


def test_python_block_check_catches_a_renamed_method():
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        test_python_block_compiles_imports_resolve_and_calls_match_the_api(
            "from mtl_ray.api import FewShotLearner\nl = FewShotLearner.from_checkpoint('r')\nl.adapt_folders('x')\n")
    with pytest.raises(pytest.fail.Exception):
        test_python_block_compiles_imports_resolve_and_calls_match_the_api(
            "from mtl_ray.api import FewShotLearner\nl = FewShotLearner.from_checkpoint('r', inverted=True)\n")
    with pytest.raises(AssertionError):
        test_python_block_compiles_imports_resolve_and_calls_match_the_api("from mtl_ray.api import FewShotLearnr\n")


# --------------------------------------------------------------------------- end to end


def run_cli(argv: list[str], data_root: Path | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never the test session's Ray
    env["PYTHONUNBUFFERED"] = "1"
    if data_root is not None:
        env["MTL_RAY_DATA_DIR"] = str(data_root)
    proc = subprocess.run([sys.executable, "-m", "mtl_ray.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"mtl-ray {' '.join(argv)}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _with_option(argv: list[str], option: str, value: str) -> list[str]:
    if option in argv:
        i = argv.index(option)
        return [*argv[:i + 1], value, *argv[i + 2:]]
    return [*argv, option, value]


def _first(prefix: tuple[str, ...], pred) -> list[str]:
    for (cmd,) in (p.values for p in commands(*prefix)):
        if pred(mtl_ray_args(cmd[1:])):
            return cmd[1:]
    pytest.fail(f"README has no `{' '.join(prefix)}` command of the kind this test runs")


SMALL = ["optim.steps=5", "optim.val_every=5", "optim.val_tasks=8", "tracking.checkpoint_every=5",
         "tracking.log_every=5", "tracking.mlflow=false", "tracking.progress=false", "scaling.num_workers=0"]


@pytest.mark.slow
def test_mtl_ray_validate_accepts_every_shipped_config(omniglot_root, tmp_path, pretrained_stub):
    """``mtl-ray validate CONFIG...`` (README, Train locally) on every config and sweep in jobs/configs.

    Run where the meta-transfer configs' ``model.init: runs/omniglot_pretrain`` exists (as after the
    README's pretraining step); without it they fail validation with how to make it (tests/test_config.py).
    """
    configs = sorted(str(p) for p in (REPO / "jobs" / "configs").glob("*.yaml"))
    pretrain_cfg = load_config(REPO / "jobs" / "configs" / "omniglot_pretrain.yaml")
    t = pretrain_cfg.tracking
    pretrained_stub(pretrain_cfg, tmp_path / t.run_dir / t.run_name / "checkpoints")  # where pretraining puts it
    mini_imagenet_table(tmp_path, 84)  # the converted table the ResNet-12 config names, where it looks first (cwd)
    out = run_cli(["validate", *configs], data_root=omniglot_root, cwd=tmp_path).stdout
    assert out.split() == [w for c in configs for w in ("ok:", c)], out


# --------------------------------------------------------------------------- the README, run as typed

NOT_RUN = re.compile(r"<!-- readme-test: not run: ([^>]*?) -->\s*\Z")
# A few steps per run, a few tasks per validation, two trials per sweep: what the README says the test sets. One
# validation, at the last step.
SMOKE = ("optim.steps=2 optim.val_every=2 optim.val_tasks=4 optim.meta_batch_size=4 tracking.checkpoint_every=1 "
         "tracking.log_every=1 pretrain.steps=2 pretrain.val_every=1 pretrain.batch_size=16 sweep.num_samples=2 "
         "deploy.episodes=4 deploy.test_episodes=4")
# Ray's teardown of a finished sweep's trial actors: the SIGTERM it sends one still in interpreter clean-up is
# printed as an ignored exception (Ray's sigterm_handler raising SystemExit in a weakref callback). It follows
# the sweep's result and changes nothing; every other traceback fails the line.
RAY_TEARDOWN = re.compile(r"^.*Exception ignored in: <function WeakSet[^\n]*\n(?:.*\n)*?.*SystemExit: 1\n", re.M)
SERVERS = {("ui",): "/", ("models", "serve"): "/ping", ("server",): "/"}  # mlflow subcommand -> a path that answers
SKIP = {("make", "test"): "it is the command that runs this test (CI: bash .ci/run)"}


@dataclass(frozen=True)
class Section:
    """A README section's ```bash lines (continuations joined), in order; ``not_run``: why they are not run."""

    title: str
    lines: tuple[str, ...]
    not_run: str = ""


def readme_sections(text: str) -> list[Section]:
    out: list[Section] = []
    for m in re.finditer(r"^```bash[^\n]*\n(.*?)^```", text, re.M | re.S):
        before = text[:m.start()]
        titles = re.findall(r"^#+ (.+)$", before, re.M)
        why = NOT_RUN.search(before)
        lines = tuple(x for x in re.sub(r"\\\n", " ", m.group(1)).splitlines() if x.strip())
        out.append(Section(titles[-1] if titles else "top", lines, why.group(1) if why else ""))
    return out


def test_readme_sections_see_markers_and_continuations():
    text = ("# A\n```bash\nmake x \\\n  y=1\n```\n<!-- readme-test: not run: needs AWS -->\n```bash\nray up c.yaml\n"
            "```\n")
    want = [Section("A", ("make x    y=1",)), Section("A", ("ray up c.yaml",), "needs AWS")]
    assert readme_sections(text) == want


def test_only_rays_teardown_traceback_is_set_aside():
    teardown = ("(t pid=1) Exception ignored in: <function WeakSet.__init__.<locals>._remove at 0x7f>\n"
                "(t pid=1) Traceback (most recent call last):\n(t pid=1)   File \"worker.py\", in sigterm_handler\n"
                "(t pid=1) SystemExit: 1\n")
    other = "Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: bad\n"
    assert "Traceback" not in RAY_TEARDOWN.sub("", teardown)
    assert RAY_TEARDOWN.sub("", other + teardown) == other


def _program(line: str) -> list[str]:
    (cmd, *_) = split_commands(line) or [[]]
    return cmd


def _serves(cmd: list[str]) -> str | None:
    if cmd and cmd[0] == MLFLOW:
        for sub, path in SERVERS.items():
            if tuple(cmd[1:1 + len(sub)]) == sub:
                return path
    return None


@pytest.fixture(scope="module")
def readme_shell(tmp_path_factory, omniglot_root, shared_data):
    """A fresh copy of the repository (tracked and new files, timestamps kept so make sees the venv installed),
    its ``.venv`` linked in, a private ``../shared/data`` (links to the shared files plus the session's decoded
    Omniglot cache: the commands write caches where they read), and the shell state file the lines share."""
    import shutil

    base = tmp_path_factory.mktemp("readme")
    repo = base / "mtl-ray"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for f in files:
        if (REPO / f).is_file():
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, repo / f)
    # The copy's .venv is this one's, seen through links, with its own install stamp: `make` in the copy must not
    # reinstall (an editable install from the copy would repoint this environment at a directory deleted after).
    venv = REPO / ".venv" if (REPO / ".venv").is_dir() else Path(sys.executable).parents[1]
    (repo / ".venv").mkdir()
    for entry in venv.iterdir():
        if entry.name not in (".installed", "pyvenv.cfg"):
            (repo / ".venv" / entry.name).symlink_to(entry)
    shutil.copy2(venv / "pyvenv.cfg", repo / ".venv" / "pyvenv.cfg")
    (repo / ".venv" / ".installed").touch()  # newer than the copied pyproject.toml
    data = base / "shared" / "data"
    for entry in shared_data.iterdir():
        if entry.name != "omniglot":
            (data / entry.name).parent.mkdir(parents=True, exist_ok=True)
            (data / entry.name).symlink_to(entry)
    (data / "omniglot").mkdir(parents=True)
    for entry in [*shared_data.joinpath("omniglot").iterdir(), *omniglot_root.joinpath("omniglot").iterdir()]:
        if not (data / "omniglot" / entry.name).exists():
            (data / "omniglot" / entry.name).symlink_to(entry.resolve() if entry.is_symlink() else entry)
    env = {k: v for k, v in os.environ.items() if k not in (*SHELL_OWN, "RAY_ADDRESS", "MTL_RAY_DATA_DIR",
                                                            "MLFLOW_TRACKING_URI", "VIRTUAL_ENV")}
    home = base / "home"  # a fresh machine's: no ~/.ray token, no MLflow or pip state from earlier work
    home.mkdir()
    env.update({"MTL_RAY_OVERRIDES": SMOKE, "PYTHONUNBUFFERED": "1", "HOME": str(home)})
    state = base / "state.sh"
    state.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))
    return repo, state


# Variables bash sets itself: carried over, PWD would make `$PWD` the pytest process's directory, not the copy's.
SHELL_OWN = ("PWD", "OLDPWD", "SHLVL", "_")


def _run_line(repo: Path, state: Path, line: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``line`` in bash after the earlier lines' exports; its exports are kept for the next line."""
    own = " ".join(SHELL_OWN)
    script = (f'source "{state}"\n{line}\nstatus=$?\n(unset {own}; export -p) > "{state}.new"\nexit $status\n')
    proc = subprocess.run(["bash", "-c", script], cwd=repo, capture_output=True, text=True, timeout=timeout,
                          env={"PATH": os.defpath, "HOME": os.environ.get("HOME", "/tmp")}, start_new_session=True)
    if Path(f"{state}.new").is_file():
        Path(f"{state}.new").replace(state)
    return proc


def _request(repo: Path) -> bytes:
    """A 5-way 1-shot request of the README's shape: float32 [5, 1, 28, 28] support, labels, [3, 1, 28, 28] queries."""
    import numpy as np

    rng = np.random.default_rng(0)
    sx, qx = rng.random((5, 1, 28, 28), dtype=np.float32), rng.random((3, 1, 28, 28), dtype=np.float32)
    inputs = {"support_x": sx.tolist(), "support_y": list("abcde"), "query_x": qx.tolist()}
    return json.dumps({"inputs": inputs}).encode()


def _serve(repo: Path, state: Path, line: str, probe: str) -> str:
    """Start a server line, wait until ``probe`` answers, ask it one question (a model: a few predictions), stop it."""
    import contextlib
    import signal
    import time
    import urllib.request

    cmd = _program(line)
    port = cmd[cmd.index("--port") + 1] if "--port" in cmd else "5000"
    log = state.parent / f"server-{port}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(["bash", "-c", f'source "{state}"\n{line}'], cwd=repo, stdout=out,
                                stderr=subprocess.STDOUT, env={"PATH": os.defpath}, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{probe}", timeout=5).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"README server `{line}` did not answer on port {port}:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        if cmd[1:3] != ["models", "serve"]:
            return ""
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=_request(repo),
                                     headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=120).read())
        assert len(answer["predictions"]) == 3 and set(answer["predictions"]) <= set("abcde"), answer
        return json.dumps(answer)
    finally:  # the server's whole process group (MLflow's server starts workers of its own)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


SECTIONS = readme_sections(README)


def _outside(shared_data: Path) -> dict[str, list[str]]:
    """What the commands must not touch: this checkout's top level and the shared data's folders."""
    return {"repo": sorted(p.name for p in REPO.iterdir()),
            **{str(d): sorted(p.name for p in d.iterdir()) for d in shared_data.iterdir() if d.is_dir()}}


@pytest.mark.slow
@pytest.mark.parametrize("section", [pytest.param(s, id=f"{i}-{s.title[:40]}") for i, s in enumerate(SECTIONS)])
def test_readme_section_runs_as_typed(section: Section, readme_shell, shared_data):
    """Each line exits 0 with no traceback; the sections run in README order and share one shell session, in the
    copy: nothing lands in this checkout or in the shared data."""
    repo, state = readme_shell
    before = _outside(shared_data)
    if section.not_run:
        for line in section.lines:  # not run here, but parsed and checked like every command
            for cmd in split_commands(line):
                if cmd[0] in ("ray",):
                    check_ray(cmd[1:])
        pytest.skip(f"README says: not run: {section.not_run}")
    head = False  # a `ray start` this section ran and has not stopped yet
    try:
        for line in section.lines:
            cmd = _program(line)
            if tuple(cmd[:2]) in SKIP:
                continue
            if (probe := _serves(cmd)) is not None:
                _serve(repo, state, line, probe)
                continue
            head = head or cmd[:2] == ["ray", "start"]
            proc = _run_line(repo, state, line)
            head = head and cmd[:2] != ["ray", "stop"]
            text = proc.stdout + proc.stderr
            assert proc.returncode == 0, f"README line `{line}`: exit {proc.returncode}\n{text[-4000:]}"
            shown = RAY_TEARDOWN.sub("", text)
            assert "Traceback (most recent call last)" not in shown, f"README line `{line}` traceback:\n{text}"
    finally:  # a section that failed after `ray start` must not leave its head holding the ports for the next run
        if head:
            _run_line(repo, state, "ray stop --force")
    assert _outside(shared_data) == before, "a README command wrote outside its copy of the repository"
    assert not (repo / "mlflow.db").exists(), "a README command created ./mlflow.db (a stray MLflow store)"
    assert not (repo / "mlruns").exists(), "a README command created ./mlruns (a stray MLflow store)"
