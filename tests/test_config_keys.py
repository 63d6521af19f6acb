"""``mtl-ray config show`` and ``mtl-ray --version``: every key discoverable without reading config.py."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

from mtl_ray import __version__
from mtl_ray.cli import main
from mtl_ray.components import load_config
from mtl_ray.config import Config
from mtl_ray.config_keys import _field_docs, format_keys, keys

REPO = Path(__file__).resolve().parents[1]


def _leaf_names() -> list[str]:
    hints = typing.get_type_hints(Config)
    out = []
    for f in dataclasses.fields(Config):
        section = hints[f.name]
        if dataclasses.is_dataclass(section):
            out += [f"{f.name}.{sf.name}" for sf in dataclasses.fields(section)]
        else:
            out.append(f.name)
    return out


def test_every_config_key_is_listed_once_with_a_doc_and_a_type():
    listed = keys()
    assert [k.name for k in listed] == _leaf_names()
    undocumented = [k.name for k in listed if not k.doc.strip()]
    assert not undocumented, f"config keys without a one-line doc in mtl_ray/config.py: {undocumented}"
    assert all(k.type for k in listed)


def test_docs_come_from_the_comment_on_or_above_the_field():
    @dataclasses.dataclass
    class Example:
        a: int = 1  # on its line
        # above it,
        # on two lines
        b: int = 2
        c: int = 3

    assert _field_docs(Example) == {"a": "on its line", "b": "above it, on two lines", "c": ""}


def test_config_show_prints_the_config_values_and_marks_what_differs_from_the_default(capsys):
    assert main(["config", "show", str(REPO / "jobs/configs/sinusoid_maml.yaml"), "optim.steps=7"]) == 0
    out = capsys.readouterr().out
    cfg = load_config(REPO / "jobs/configs/sinusoid_maml.yaml", ["optim.steps=7"])
    assert f"optim.steps = 7  (int; default {Config().optim.steps})" in out
    assert 'data.source = "sinusoid"  (str; default "omniglot")' in out
    assert out.count("\n") >= len(_leaf_names())
    assert format_keys(keys(cfg)) == out.rstrip("\n")


def test_config_show_of_a_bad_config_is_one_clear_error(capsys):
    assert main(["config", "show", str(REPO / "jobs/configs/sinusoid_maml.yaml"), "optim.stepz=7"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid config") and "optim.stepz" in err and "Traceback" not in err


def test_version():
    proc = subprocess.run([sys.executable, "-m", "mtl_ray.cli", "--version"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"mtl-ray {__version__}"


def test_the_keys_each_component_says_it_reads_exist():
    """What a task source or a model reads (run params log only those) names real data.* / model.* keys."""
    from mtl_ray.algorithms.registry import ALGORITHMS
    from mtl_ray.config import DataConfig, ModelConfig
    from mtl_ray.data.registry import SOURCES
    from mtl_ray.models.registry import MODELS

    data_fields = {f.name for f in dataclasses.fields(DataConfig)}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for name, spec in SOURCES.items():
        assert spec.config_keys and spec.config_keys <= data_fields, (name, spec.config_keys - data_fields)
    models = [*MODELS.values(), *(a.model_class for a in ALGORITHMS.values() if a.model_class is not None)]
    for cls in models:
        assert cls.config_keys and cls.config_keys <= model_fields, (cls, cls.config_keys - model_fields)
