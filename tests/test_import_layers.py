"""The package's layers import only from the layers before them; algorithms never import ray."""

from __future__ import annotations

import ast
from pathlib import Path

from mtl_ray.algorithms.registry import ALGORITHMS

PKG = Path(__file__).resolve().parents[1] / "mtl_ray"
LAYER = {"config": 0, "metrics": 0, "runtime": 0, "atomic": 0, "data": 1, "models": 2, "algorithms": 3,
         "components": 4, "distributed": 5, "tracking": 6, "api": 6, "serving": 6, "recipes": 7, "tune": 8, "cli": 9}
# mtl_ray.components: the config checks read from the registries of data, models and algorithms, and the public
# from_dict/load_config; everything that builds a config from user input sits above it.
LAYER["memory"] = 5  # mtl_ray.memory: the memory estimate, from the config, the data sizes and the chunking
LAYER["checkpoint"] = 5  # mtl_ray.checkpoint: the checkpoint format, read by the driver, the API and the recipes
LAYER["ray_session"] = 5  # mtl_ray.ray_session: join or start Ray (worker actors, Ray Train, Tune)
LAYER["config_keys"] = 0  # mtl_ray.config_keys: the keys, types and docs of mtl_ray.config (`mtl-ray config show`)
ALGORITHM_NAMES = tuple(ALGORITHMS)  # every registered algorithm.name ...
ALGORITHM_CLASSES = tuple(cls.__name__ for cls in ALGORITHMS.values())  # ... and its class


def _layer_of(module: str) -> int:
    part = module.split(".")[1] if "." in module else "config"
    return LAYER[part]


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return out


def _modules():
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        if name == "mtl_ray":
            continue
        yield name, path


def test_every_module_has_a_layer():
    for name, _ in _modules():
        _layer_of(name)


def test_lower_layers_never_import_higher_ones():
    bad = []
    for name, path in _modules():
        mine = _layer_of(name)
        for imp in _imports(path):
            if imp.startswith("mtl_ray.") and _layer_of(imp) > mine:
                bad.append(f"{name} imports {imp}")
    assert not bad, bad


def test_the_names_come_from_the_registry():
    assert {"maml", "protonet", "mtl"} <= set(ALGORITHM_NAMES) and "RelationNetwork" in ALGORITHM_CLASSES


def test_algorithms_models_data_never_import_ray():
    bad = [f"{name} imports {imp}" for name, path in _modules() if _layer_of(name) <= LAYER["components"]
           for imp in _imports(path) if imp == "ray" or imp.startswith("ray.")]
    assert not bad, bad


def test_distributed_never_names_a_specific_algorithm():
    bad = []
    for path in (PKG / "distributed").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Name | ast.Attribute):
                ident = node.id if isinstance(node, ast.Name) else node.attr
                if ident.lower() in ALGORITHM_NAMES or ident in ALGORITHM_CLASSES:
                    bad.append(f"{path.name}: {ident}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in ALGORITHM_NAMES:
                bad.append(f"{path.name}: {node.value!r}")  # e.g. cfg.algorithm.name == "mtl"
    assert not bad, bad


def test_the_check_catches_a_violation(tmp_path):
    """The rule itself can fail: an upward import is detected."""
    f = tmp_path / "x.py"
    f.write_text("from mtl_ray.distributed.driver import MetaTrainer\nimport ray\n")
    imps = _imports(f)
    assert any(_layer_of(i) > LAYER["algorithms"] for i in imps if i.startswith("mtl_ray."))
    assert "ray" in imps
