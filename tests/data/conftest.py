"""Fixtures for the glyph, Fashion-MNIST and multi-domain tests: the shared fonts and Fashion-MNIST (read-only), one
rendered glyph cache per session, and a writable data root that links them beside the session's Omniglot."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mtl_ray.components import from_dict
from mtl_ray.data import fashion_mnist, glyphs


@pytest.fixture(scope="session")
def fonts_dir(shared_data: Path) -> Path:
    """``shared/data/fonts`` (read-only): the Noto fonts, in ``noto-core/``."""
    folder = shared_data / "fonts"
    if not (folder / "noto-core" / "NotoSansGeorgian-Regular.ttf").is_file():
        pytest.skip(f"shared fonts not found under {folder}")
    return folder


@pytest.fixture(scope="session")
def fashion_dir(shared_data: Path) -> Path:
    """``shared/data/fashion-mnist`` (read-only): the four IDX files."""
    folder = shared_data / "fashion-mnist"
    missing = [n for n in fashion_mnist.UPSTREAM_GZ_MD5 if not (folder / n).is_file()]
    if missing:
        pytest.skip(f"shared Fashion-MNIST files not found: {missing} in {folder}")
    return folder


@pytest.fixture(scope="session")
def glyph_cache(fonts_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache directory holding the default glyph table (every script of the shared fonts, 28 px), rendered once.
    Pass it as ``data.cache_dir`` so nothing is written anywhere else (never under the shared fonts)."""
    cache = tmp_path_factory.mktemp("glyph_cache")
    glyphs.load_glyph_table(from_dict({"data": {"source": "glyphs", "fonts": str(fonts_dir),
                                                "cache_dir": str(cache)}}).data)
    return cache


@pytest.fixture(scope="session")
def domains_root(omniglot_root: Path, fonts_dir: Path, fashion_dir: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root with ``omniglot/`` (the session's, its cache built), ``fonts/`` and ``fashion-mnist/`` (the
    shared ones) linked in: every image source's default location, with nothing shared written to."""
    root = tmp_path_factory.mktemp("domains_root")
    os.symlink(omniglot_root / "omniglot", root / "omniglot")
    os.symlink(fonts_dir, root / "fonts")
    os.symlink(fashion_dir, root / "fashion-mnist")
    return root
