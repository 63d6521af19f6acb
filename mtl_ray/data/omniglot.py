"""Omniglot (Lake et al. 2015) as one :class:`ClassPool` per split, decoded once into a cached image table.

Archives live at ``<data_root>/omniglot/<name>.zip`` (``data_root`` from :func:`fetch.data_root`).
The configured archives (``data.archives``) are md5-checked, decoded (1-bit 105x105 PNG -> 'L' ->
LANCZOS resize to ``image_size`` -> inverted so ink = 255) and written once to
``<data_root>/omniglot/cache/omniglot-<size>px-<key>.parquet`` where ``<key>`` is a hash prefix of the
archives' md5s; later loads read that table (the archives are then not opened). A class is
``Alphabet/characterNN`` with 20 drawers; its domain is the alphabet. Greek and Latin are in both
minimal background splits: when archives are combined, the first copy of each character is kept.

Splits are by alphabet: val = ``data.val_alphabets``, test = ``data.test_alphabets``, train = the
rest, all = everything. ``data.rotations`` adds 90/180/270-degree rotations as new classes to the
train split only.
"""

from __future__ import annotations

import hashlib
import zipfile
import zlib
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from mtl_ray.config import Config, DataConfig
from mtl_ray.data.base import IMAGE_KEYS, ClassPool, LoadedSource, SourceSpec
from mtl_ray.data.fetch import DataError, data_root, ensure_file
from mtl_ray.data.imagetable import decode_image, read_image_table, write_table

URL_TEMPLATE = "https://github.com/brendenlake/omniglot/raw/master/python/{name}.zip"
ARCHIVE_MD5: dict[str, str] = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
    "images_background_small1": "e704a628b5459e08445c13499850abc4",
    "images_background_small2": "b75a71a51d3b13f821f212756fe481fd",
}
# Images in each archive (its md5-pinned file above): what each process holds, for the memory estimate.
ARCHIVE_IMAGES: dict[str, int] = {"images_background": 19280, "images_evaluation": 13180,
                                  "images_background_small1": 2720, "images_background_small2": 3120}
ROTATIONS = 4


class OmniglotTable(NamedTuple):
    """Decoded Omniglot: ``images[label] -> [20, 1, S, S]`` uint8 (ink 255), ``domains[label]`` the
    alphabet, ``md5s`` ``{archive file name: md5}``, ``cache_path`` the table read."""

    images: dict[str, np.ndarray]
    domains: dict[str, str]
    md5s: dict[str, str]
    cache_path: Path


def omniglot_dir(cfg_root: str) -> Path:
    return data_root(cfg_root) / "omniglot"


def archive_path(cfg_root: str, name: str) -> Path:
    return omniglot_dir(cfg_root) / f"{name}.zip"


def cache_path(cfg_root: str, archives: Sequence[str], image_size: int) -> Path:
    """Where the decoded table of ``archives`` at ``image_size`` px is cached."""
    key = hashlib.md5("|".join(f"{a}:{ARCHIVE_MD5.get(a, '?')}" for a in archives).encode()).hexdigest()[:12]
    return omniglot_dir(cfg_root) / "cache" / f"omniglot-{image_size}px-{key}.parquet"


def _archive_md5(name: str) -> str:
    if name not in ARCHIVE_MD5:
        raise DataError(f"data.archives: got {name!r}, expected one of {', '.join(ARCHIVE_MD5)}")
    return ARCHIVE_MD5[name]


def decode_archives(paths: Sequence[Path], image_size: int) -> tuple[list[str], list[str], np.ndarray]:
    """Decode Omniglot zips into ``(labels, alphabets, images [N, 1, S, S] uint8)``, ink = 255.

    Members are ``<top>/<Alphabet>/<characterNN>/<file>.png``; a character already taken from an
    earlier archive is skipped (dedupe). Raises :class:`DataError` for an unreadable zip or image.
    """
    labels: list[str] = []
    alphabets: list[str] = []
    images: list[np.ndarray] = []
    seen: set[str] = set()
    for path in paths:
        taken: set[str] = set()
        found = 0
        try:
            with zipfile.ZipFile(path) as zf:
                for member in sorted(zf.namelist()):
                    parts = member.split("/")
                    if len(parts) != 4 or not parts[3].lower().endswith(".png"):
                        continue
                    found += 1
                    label = f"{parts[1]}/{parts[2]}"
                    if label in seen:
                        continue
                    taken.add(label)
                    images.append(decode_image(zf.read(member), image_size=image_size, channels=1, invert=True,
                                               resample=Image.Resampling.LANCZOS, name=f"{path}:{member}"))
                    labels.append(label)
                    alphabets.append(parts[1])
        except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, OSError, EOFError) as e:
            raise DataError(f"{path}: not a readable zip archive ({e.__class__.__name__}: {e}); delete it and "
                            f"re-download it from {URL_TEMPLATE.format(name=path.stem)} "
                            "(or set data.download=true)") from e
        if not found:
            raise DataError(f"{path}: no <Alphabet>/<character>/*.png images found; expected an Omniglot "
                            "archive such as images_background.zip")
        seen |= taken
    return labels, alphabets, np.stack(images)


@lru_cache(maxsize=8)
def _read_cache(path: str, mtime_ns: int, size: int, image_size: int) -> tuple[
        dict[str, np.ndarray], dict[str, str], dict[str, str]]:
    table = read_image_table(path, image_size)
    return table.images, table.domains, table.source_md5


def load_omniglot_table(data: DataConfig) -> OmniglotTable:
    """The decoded Omniglot table for ``data.archives`` at ``data.image_size`` (built on first use).

    With a cache file present whose recorded md5s match the known archive md5s, the archives are not
    read. Otherwise each archive is md5-checked (downloaded if ``data.download``), decoded and the
    cache written atomically; on any failure no cache file is left.
    """
    if not data.archives:
        raise DataError("data.archives: empty, expected at least one of " + ", ".join(ARCHIVE_MD5))
    expected = {f"{a}.zip": _archive_md5(a) for a in data.archives}
    cache = cache_path(data.root, data.archives, data.image_size)
    if cache.is_file():
        st = cache.stat()
        try:
            images, domains, md5s = _read_cache(str(cache), st.st_mtime_ns, st.st_size, data.image_size)
        except DataError:
            md5s = {}
        if md5s == expected:
            return OmniglotTable(images, domains, md5s, cache)
        # stale or damaged cache: rebuild it below (written atomically over the old one)
    paths: list[Path] = []
    errors: list[str] = []
    for a in data.archives:
        try:
            paths.append(ensure_file(archive_path(data.root, a), expected[f"{a}.zip"],
                                     URL_TEMPLATE.format(name=a), data.download))
        except DataError as e:
            errors.extend(e.problems)
    if errors:
        raise DataError("; ".join(errors), errors)
    labels, alphabets, x = decode_archives(paths, data.image_size)
    write_table(cache, labels, x, domains=alphabets, source_md5=expected)
    st = cache.stat()
    images, domains, md5s = _read_cache(str(cache), st.st_mtime_ns, st.st_size, data.image_size)
    return OmniglotTable(images, domains, md5s, cache)


def alphabets_of(domains: dict[str, str]) -> list[str]:
    return sorted(set(domains.values()))


def alphabet_problems(data: DataConfig, alphabets: Sequence[str]) -> list[str]:
    """Problems with ``data.val_alphabets`` / ``data.test_alphabets`` given the alphabets present."""
    problems: list[str] = []
    known = set(alphabets)
    for field in ("val_alphabets", "test_alphabets"):
        unknown = [a for a in getattr(data, field) if a not in known]
        if unknown:
            problems.append(f"data.{field}: got unknown alphabet(s) {unknown}, expected names from the "
                            f"archives {list(data.archives)}: {', '.join(sorted(known))}")
    held_out = set(data.val_alphabets) | set(data.test_alphabets)
    if known and known <= held_out:
        problems.append(f"data.val_alphabets + data.test_alphabets: got all {len(known)} alphabets, expected "
                        "some left for the train split; move alphabets out of val/test or add archives")
    return problems


def split_alphabets(data: DataConfig, alphabets: Sequence[str]) -> dict[str, list[str]]:
    """``{split: alphabets}`` for train/val/test/all (unknown names in the config are ignored)."""
    val = [a for a in alphabets if a in set(data.val_alphabets)]
    test = [a for a in alphabets if a in set(data.test_alphabets) and a not in set(val)]
    held = set(val) | set(test)
    return {"train": [a for a in alphabets if a not in held], "val": val, "test": test, "all": list(alphabets)}


def make_pools(table: OmniglotTable, data: DataConfig) -> dict[str, ClassPool]:
    """``{split: ClassPool}``; rotations (x4 classes) on train only when ``data.rotations``."""
    by_split = split_alphabets(data, alphabets_of(table.domains))
    pools: dict[str, ClassPool] = {}
    for split, alphas in by_split.items():
        keep = set(alphas)
        names = tuple(lab for lab in table.images if table.domains[lab] in keep)
        rot = ROTATIONS if split == "train" and data.rotations else 1
        pools[split] = ClassPool(names=names, images=tuple(table.images[n] for n in names), rotations=rot)
    return pools


def load_source(cfg: Config) -> LoadedSource:
    """Omniglot's classes per split for ``cfg.data``; unknown alphabet names come back as ``problems`` (listing
    the known ones); missing or corrupt archives raise :class:`DataError`."""
    d = cfg.data
    table = load_omniglot_table(d)
    alphabets = alphabets_of(table.domains)
    by_split = split_alphabets(d, alphabets)
    pools = make_pools(table, d)

    def describe(split: str) -> str:
        alphas = ", ".join(by_split[split]) or "none"
        rot = f", x{pools[split].rotations} rotations" if pools[split].rotations > 1 else ""
        return f"classes in the {split!r} split of omniglot: alphabets {alphas}{rot}"

    def fix(split: str) -> str:
        if split == "train":
            return "lower data.ways or move alphabets out of data.val_alphabets/data.test_alphabets"
        return f"lower data.ways or move alphabets into that split (data.{split}_alphabets)"

    return LoadedSource(pools, dict(table.md5s), "omniglot", describe, fix, alphabet_problems(d, alphabets))


def check_config(data: DataConfig) -> list[str]:
    """The static checks of Omniglot's own fields (archive names, alphabets in two splits)."""
    p = [f"data.archives: got {name!r}, expected one of: {', '.join(ARCHIVE_MD5)}"
         for name in data.archives if name not in ARCHIVE_MD5]
    both = sorted(set(data.val_alphabets) & set(data.test_alphabets))
    if both:
        p.append(f"data.val_alphabets and data.test_alphabets share {both}; an alphabet may be in one split only")
    return p


def clear_cache() -> None:
    """Forget tables read in this process (the on-disk cache stays)."""
    _read_cache.cache_clear()


def count_images(cfg: Config) -> int:
    """Images of ``data.archives`` (rotations are views of them, not copies)."""
    return sum(ARCHIVE_IMAGES.get(a, 0) for a in cfg.data.archives)


SOURCE = SourceSpec(kind="classification", images=True, load=load_source, check=check_config, clear_cache=clear_cache,
                    count_images=count_images,
                    config_keys=IMAGE_KEYS | {"root", "download", "archives", "val_alphabets", "test_alphabets",
                                              "rotations"})
