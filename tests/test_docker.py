"""docker/Dockerfile cannot drift from pyproject.toml: base image Ray/Python, torch, constraints, ignore file.

No Docker engine runs here, so these read the files: the FROM tag, the pins and the ignore patterns (matched
with Docker's rules: relative to the context root, `*` within one path segment, `**` across segments, a match
on a directory excludes everything below it, `!` re-includes, the last matching line wins).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
# `docker build -f docker/Dockerfile .` (BuildKit) reads <Dockerfile>.dockerignore before a root .dockerignore.
IGNORE_FILE = DOCKERFILE.with_name(DOCKERFILE.name + ".dockerignore")
CONSTRAINTS = ROOT / "docker" / "constraints.txt"
FROM_TAG = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3\d+)-gpu$")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirements(extras: tuple[str, ...] = ()) -> dict[str, Requirement]:
    project = _pyproject()
    lines = list(project["dependencies"])
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    reqs = [Requirement(line) for line in lines]
    return {r.name.lower(): r for r in reqs}


def _exact_pin(spec: SpecifierSet) -> str:
    (only,) = list(spec)
    assert only.operator == "==", f"expected an exact pin, got {spec}"
    return only.version


def _dockerfile_lines() -> list[str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")  # join continuation lines
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _arg_defaults() -> dict[str, str]:
    args = {}
    for ln in _dockerfile_lines():
        m = re.match(r"ARG\s+(\w+)=(\S*)", ln)
        if m:
            args[m[1]] = m[2]
    return args


def base_image() -> str:
    """The first FROM's image, with ${ARG} defaults substituted."""
    args = _arg_defaults()
    for ln in _dockerfile_lines():
        if ln.upper().startswith("FROM "):
            image = ln.split()[1]
            return re.sub(r"\$\{?(\w+)\}?", lambda m: args[m[1]], image)
    raise AssertionError("no FROM in docker/Dockerfile")


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``path`` (relative to the context root) out of the build context."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]  # the path and its parent directories
    result = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip().strip("/")
        if any(_pattern_regex(pattern).fullmatch(c) for c in candidates):
            result = not negate
    return result


def ignore_patterns() -> list[str]:
    lines = IGNORE_FILE.read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def test_base_image_matches_pinned_ray_and_python() -> None:
    m = FROM_TAG.match(base_image())
    assert m, f"FROM should be rayproject/ray:<ray>-py3XY-gpu, got {base_image()!r}"
    ray_pin = _exact_pin(_requirements()["ray"].specifier)
    assert m["ray"] == ray_pin, f"Dockerfile uses Ray {m['ray']}, pyproject pins {ray_pin}"
    lower = [s.version for s in SpecifierSet(_pyproject()["requires-python"]) if s.operator == ">="]
    assert lower, "requires-python needs a >= lower bound"
    assert m["py"] == lower[0].replace(".", ""), f"Dockerfile uses py{m['py']}, project targets Python {lower[0]}"
    # The build's own check at the end must look for the same version.
    assert f"ray.__version__ == '{ray_pin}'" in DOCKERFILE.read_text()


def test_torch_pin_is_in_the_project_range() -> None:
    torch = _arg_defaults()["TORCH_VERSION"]
    assert torch in _requirements()["torch"].specifier, f"torch {torch} is outside pyproject's range"


def test_constraints_pin_every_dependency_within_its_range() -> None:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            r = Requirement(line)
            pins[r.name.lower()] = _exact_pin(r.specifier)
    reqs = _requirements(("tune",))
    assert "torch" not in pins, "torch is pinned in the Dockerfile as a CUDA build, not in constraints.txt"
    assert set(pins) == set(reqs) - {"torch"}, "constraints.txt and pyproject.toml list different packages"
    for name, version in pins.items():
        assert version in reqs[name].specifier, f"{name}=={version} is outside pyproject's {reqs[name].specifier}"


@pytest.mark.parametrize(
    "path",
    [".venv/bin/python", ".git/HEAD", "runs/maml/metrics.jsonl", "mlruns/0/meta.yaml", "mlflow.db",
     "data/omniglot/images_background.zip", "mtl_ray/__pycache__/config.cpython-311.pyc", "tests/test_cli.py"],
)
def test_ignore_file_excludes(path: str) -> None:
    assert ignored(path, ignore_patterns()), f"{path} would be sent to the build and copied into the image"


@pytest.mark.parametrize(
    "path",
    ["pyproject.toml", "README.md", "mtl_ray/__init__.py", "mtl_ray/data/omniglot.py", "jobs/meta_train.py",
     "docker/constraints.txt"],
)
def test_ignore_file_keeps_what_the_build_needs(path: str) -> None:
    assert (ROOT / path).exists(), path
    assert not ignored(path, ignore_patterns()), f"{path} is needed by docker/Dockerfile but ignored"


def test_ignore_matcher_follows_docker_rules() -> None:
    assert ignored("data/x", ["data"]) and not ignored("mtl_ray/data/x", ["data"])  # anchored at the root
    assert ignored("a/b/mlruns/c", ["**/mlruns"]) and ignored("mlruns", ["**/mlruns"])
    assert not ignored("a/b.py", ["*.py"]) and ignored("b.py", ["*.py"])  # * stays within one segment
    assert not ignored("keep.md", ["*.md", "!keep.md"]) and ignored("drop.md", ["*.md", "!keep.md"])
