"""What every recipe does first: check the whole config, choose the run directory, record the data root."""

from __future__ import annotations

import shlex
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from mtl_ray.components import from_dict
from mtl_ray.config import Config, ConfigError
from mtl_ray.data.fetch import data_root
from mtl_ray.tracking.rundir import CONFIG_FILE


def run_dir_for(cfg: Config, explicit: str | Path | None) -> Path:
    """``explicit`` (absolute), else ``tracking.run_dir/<tracking.run_name or name-time>``."""
    if explicit:
        return Path(explicit).absolute()
    name = cfg.tracking.run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return (Path(cfg.tracking.run_dir) / name).absolute()


def recorded_config(run_dir: Path) -> Config | None:
    """The config an earlier run wrote into ``run_dir/config.yaml`` (None when there is none, or it is unreadable:
    the run-directory checks then say why)."""
    try:
        return from_dict(yaml.safe_load((run_dir / CONFIG_FILE).read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ConfigError):
        return None


def with_data_root(cfg: Config, recorded: Config | None = None) -> Config:
    """``cfg`` with ``data.root`` resolved once, to an absolute path, so the run records where its data was.

    An empty ``data.root`` means ``$MTL_RAY_DATA_DIR``, else ``./data`` (:func:`mtl_ray.data.fetch.data_root`);
    resolving it here and writing it into ``config.yaml`` and every checkpoint lets ``--resume`` and
    ``mtl-ray eval`` find the data later without that environment (the Makefile sets it). When resuming,
    an empty ``data.root`` takes the ``recorded`` run's value.
    """
    if cfg.data.root:
        root = Path(cfg.data.root).expanduser()
    elif recorded is not None and recorded.data.root:
        root = Path(recorded.data.root)
    else:
        root = data_root("")
    return cfg.replace(**{"data.root": str(root.absolute())})


def resume_command(program: str, config_path: str | None, overrides: Sequence[str], run_dir: Path) -> str:
    """The exact command that continues a run: the same config and overrides, ``--run-dir`` and ``--resume``."""
    parts = [*([config_path] if config_path else []), *overrides, "--run-dir", str(run_dir), "--resume"]
    return f"{program} {shlex.join(parts)}"  # ``program`` as typed (e.g. "mtl-ray train"), the rest shell-quoted
