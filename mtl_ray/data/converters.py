"""``mtl-ray data convert --format FORMAT SRC OUT.parquet``: the few-shot benchmarks, from the files their authors
publish, into the project's image table (:mod:`mtl_ray.data.imagetable`).

Each converter reads one published layout, checks it (a missing list or image, a class in two splits, an unknown
class name, ... is one :class:`DataError` naming the file and the fix, before anything is written), resizes every
image once to the target size (LANCZOS, aspect ratio not kept, as Ravi & Larochelle's and Ren et al.'s scripts do),
and writes one raw uint8 RGB table with each class's published split in its ``split`` column and the train split's
per-channel mean and std in its metadata. The layouts (docs/datasets.md says where to get each):

``folder`` (default)
    ``SRC/<class>/*.png|jpg`` (:func:`mtl_ray.data.imagetable.convert_folder`; no splits: ``data.val_fraction`` /
    ``data.test_fraction`` hash the labels when the table is read).
``mini-imagenet``
    Ravi & Larochelle (2017)'s split: ``SRC/{train,val,test}.csv`` (header ``filename,label``, rows such as
    ``n0153282900000005.jpg,n01532829``; or in ``--split-from DIR``) and ``SRC/images/<filename>``. 64/16/20 classes.
``tiered-imagenet``
    Ren et al. (2018)'s class split, in any of the three forms it circulates in: (a) their release,
    ``SRC/{train,val,test}_images_png.pkl`` + ``SRC/{train,val,test}_labels.pkl``; (b) an image folder per split,
    ``SRC/{train,val,test}/<synset>/*.jpg`` (what yaoyao-liu/tiered-imagenet-tools writes); (c) their class lists
    ``{train,val,test}.csv`` (rows ``synset,category``, no header; fewshot/data/tiered_imagenet_split/ in
    renmengye/few-shot-ssl-public) in ``--split-from DIR`` (or SRC) over an ImageNet train folder
    ``SRC/<synset>/*.JPEG`` (or ``SRC/train/<synset>/``). 351/97/160 classes; the category is the ``domain``.
``cifar-fs``
    CIFAR-100's python pickles (``SRC/cifar-100-python/{train,test,meta}``, or those three files in SRC) and
    Bertinetto et al. (2019)'s class lists ``splits/bertinetto/{train,val,test}.txt`` (one CIFAR-100 class name a
    line; looked for in ``--split-from DIR``, ``SRC/splits/bertinetto/``, ``SRC/cifar100/splits/bertinetto/``).
    64/16/20 classes, 600 images each (CIFAR-100's train and test images together).
``fc100``
    The same pickles, split by superclass as Oreshkin et al. (2018) (TADAM) publish it: 12/4/4 superclasses,
    60/20/20 classes (:data:`FC100_SUPERCLASSES`, no file needed); the superclass is the ``domain``.
``cub``
    CUB-200-2011 (``SRC/images.txt``, ``SRC/image_class_labels.txt``, ``SRC/classes.txt``, ``SRC/images/``; SRC may
    also be the folder holding ``CUB_200_2011/``) with the 100/50/50 class split of Chen et al. (2019, "A closer look
    at few-shot classification", filelists/CUB/write_CUB_filelist.py): class ``i`` (0-based, classes sorted by name)
    is train when ``i % 2 == 0``, val when ``i % 4 == 1``, test when ``i % 4 == 3``.

Pickles (CIFAR-100, tiered-ImageNet's release) are read with an unpickler that only rebuilds numpy arrays and plain
containers, so a file that is not what it claims to be cannot run code.
"""

from __future__ import annotations

import csv
import difflib
import io
import os
import pickle
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from mtl_ray.data.fetch import DataError, md5sum
from mtl_ray.data.imagetable import (
    IMAGE_SUFFIXES,
    TABLE_SPLITS,
    class_splits,
    convert_folder,
    decode_image,
    table_stats,
    write_table,
)

FORMATS = ("folder", "mini-imagenet", "tiered-imagenet", "cifar-fs", "fc100", "cub")
# --image-size when not given: the papers' sizes (84 for ImageNet-derived and CUB, CIFAR's own 32)
DEFAULT_IMAGE_SIZE = {"folder": 28, "mini-imagenet": 84, "tiered-imagenet": 84, "cifar-fs": 32, "fc100": 32,
                      "cub": 84}

# FC100 (Oreshkin et al. 2018, TADAM, supplementary): CIFAR-100 superclass indices (meta's coarse_label_names order)
# per split. Train: fish, flowers, food_containers, fruit_and_vegetables, household_electrical_devices,
# household_furniture, large_man-made_outdoor_things, large_natural_outdoor_scenes, reptiles, trees, vehicles_1,
# vehicles_2. Val: large_carnivores, large_omnivores_and_herbivores, non-insect_invertebrates, small_mammals.
# Test: aquatic_mammals, insects, medium_mammals, people.
FC100_SUPERCLASSES: dict[str, tuple[int, ...]] = {
    "train": (1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19),
    "val": (8, 11, 13, 16),
    "test": (0, 7, 12, 14),
}
CIFAR_PICKLES = ("train", "test", "meta")
CIFAR_FS_SPLIT_DIRS = ("splits/bertinetto", "cifar100/splits/bertinetto")


@dataclass(frozen=True)
class Converted:
    """What a conversion wrote: the table, and per split its classes and images (for the summary line)."""

    path: Path
    classes: dict[str, int]
    images: dict[str, int]
    image_shape: tuple[int, int, int]
    channel_mean: tuple[float, ...]
    channel_std: tuple[float, ...]

    def summary(self) -> str:
        c, s, _ = self.image_shape
        parts = ", ".join(f"{self.classes[k]} {k} classes ({self.images[k]} images)" for k in self.classes)
        kind = "RGB" if c == 3 else f"{c}-channel"
        mean = ", ".join(f"{v:.4f}" for v in self.channel_mean)
        std = ", ".join(f"{v:.4f}" for v in self.channel_std)
        return f"wrote {self.path}: {parts}, {s}x{s} {kind}; channel mean [{mean}], std [{std}]"


@dataclass
class _Rows:
    """What a converter collected: one label, split and domain per image, and how to get each image."""

    labels: list[str]
    splits: list[str]
    domains: list[str] | None
    load: Callable[[int], np.ndarray]  # row -> [3, S, S] uint8
    md5s: dict[str, str]


# --------------------------------------------------------------------------- entry point


def convert(fmt: str, src: str | Path, out: str | Path, *, image_size: int | None = None,
            split_from: str | Path | None = None, channels: int | None = None, invert: bool = False,
            domain: str | None = None, workers: int | None = None) -> Converted:
    """Convert ``src`` in layout ``fmt`` (one of :data:`FORMATS`) into the table ``out``; see the module docstring.

    ``image_size`` defaults per format (:data:`DEFAULT_IMAGE_SIZE`). ``channels``, ``invert`` and ``domain`` are the
    ``folder`` format's (the benchmarks are RGB photos with their own domains); ``split_from`` names the folder of
    class-list files for the formats that read them. ``workers``: decoding threads (default: the CPU count).
    Raises :class:`DataError` (nothing written) when ``src`` is not in that layout.
    """
    if fmt not in FORMATS:
        close = difflib.get_close_matches(fmt, FORMATS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(f"--format: got {fmt!r}, expected one of {', '.join(FORMATS)}{hint}")
    size = DEFAULT_IMAGE_SIZE[fmt] if image_size is None else image_size
    if size <= 0:
        raise DataError(f"--image-size: got {size}, expected a positive number of pixels")
    src_path, out_path = Path(src).expanduser(), Path(out).expanduser()
    if out_path.is_dir():
        raise DataError(f"{out_path}: got an existing directory as the output, expected the path of the Parquet file "
                        f"to write; pass a file name, e.g. {out_path / (src_path.name + '.parquet')}")
    if fmt == "folder":
        if split_from is not None:
            raise DataError("--split-from: got a folder with --format folder, expected none (a folder of classes has "
                            "no split lists; its classes are split by data.val_fraction/data.test_fraction)")
        path = convert_folder(src_path, out_path, image_size=size, channels=channels or 1, invert=invert,
                              domain=domain)
        return _describe_folder_table(path)
    refused = [name for name, value in (("--channels", channels not in (None, 3)), ("--invert", invert),
                                        ("--domain", domain is not None)) if value]
    if refused:
        raise DataError(f"{', '.join(refused)}: got with --format {fmt}, expected none: the {fmt} table is RGB photos "
                        "as published, with its own domains; these options are for --format folder")
    if not src_path.is_dir():
        raise DataError(f"{src_path}: not a directory; expected the {fmt} dataset's folder ({_LAYOUT[fmt]})")
    split_dir = Path(split_from).expanduser() if split_from is not None else None
    if split_dir is not None and not split_dir.is_dir():
        raise DataError(f"--split-from: got {str(split_dir)!r}, which is not a directory; expected the folder "
                        f"holding the split lists ({_LAYOUT[fmt]})")
    reader = _READERS[fmt]
    rows = reader(src_path, split_dir, size)
    images = _load_all(rows, size, workers)
    stats = table_stats(images, rows.splits)
    path = write_table(out_path, rows.labels, images, domains=rows.domains, source_md5=rows.md5s,
                       splits=rows.splits, stats=stats)
    return _described(path, rows.labels, rows.splits, (3, size, size), stats)


def _described(path: Path, labels: Sequence[str], splits: Sequence[str], shape: tuple[int, int, int],
               stats: tuple[tuple[float, ...], tuple[float, ...]]) -> Converted:
    classes: dict[str, set[str]] = {}
    images: dict[str, int] = {}
    for lab, s in zip(labels, splits, strict=True):
        classes.setdefault(s, set()).add(lab)
        images[s] = images.get(s, 0) + 1
    order = [s for s in (*TABLE_SPLITS, "all") if s in classes]
    return Converted(path, {s: len(classes[s]) for s in order}, {s: images[s] for s in order}, shape, *stats)


def _describe_folder_table(path: Path) -> Converted:
    """The summary of a table :func:`convert_folder` wrote, from its label column and footer."""
    import pyarrow.parquet as pq

    from mtl_ray.data.imagetable import META_MEAN, META_SHAPE, META_STD, metadata_floats

    meta = pq.read_metadata(path).metadata or {}
    c, h, w = (int(v) for v in meta[META_SHAPE].decode().split(","))
    labels = [str(v) for v in pq.read_table(path, columns=["label"]).column("label").to_pylist()]
    stats = (metadata_floats(meta, META_MEAN, str(path)), metadata_floats(meta, META_STD, str(path)))
    return _described(path, labels, ["all"] * len(labels), (c, h, w), stats)


def _load_all(rows: _Rows, size: int, workers: int | None) -> np.ndarray:
    """Every row's image as one ``[N, 3, size, size]`` uint8 array, decoded on a thread pool (Pillow releases the
    GIL while it decodes and resizes), filled in place so the table is held once."""
    n = len(rows.labels)
    if n == 0:
        raise DataError("no images found; expected the dataset's images next to its split lists")
    out = np.empty((n, 3, size, size), np.uint8)

    def fill(i: int) -> None:
        out[i] = rows.load(i)

    threads = max(1, workers if workers is not None else min(32, os.cpu_count() or 1))
    if threads == 1:
        for i in range(n):
            fill(i)
    else:
        with ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(fill, range(n), chunksize=64):  # re-raises the first DataError, in row order
                pass
    return out


# --------------------------------------------------------------------------- shared helpers


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: {what} missing; expected it in the layout docs/datasets.md describes") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read {what} ({e.strerror or e}); fix its permissions or replace it") from e


def _image_file_loader(files: Sequence[Path], size: int) -> Callable[[int], np.ndarray]:
    def load(i: int) -> np.ndarray:
        f = files[i]
        return decode_image(_read_bytes(f, "image"), image_size=size, channels=3, name=str(f))

    return load


def _check_files_exist(files: Sequence[Path], what: str, fix: str) -> None:
    missing = [f for f in files if not f.is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DataError(f"{missing[0]}{more}: {what} missing ({len(missing)} of {len(files)}); {fix}")


def _split_files(dirs: Sequence[Path], names: Sequence[str], fmt: str) -> tuple[Path, dict[str, Path]]:
    """The first of ``dirs`` holding every file of ``names`` (one per split); DataError naming what is missing."""
    for d in dirs:
        found = {s: d / n for s, n in zip(TABLE_SPLITS, names, strict=True)}
        if all(p.is_file() for p in found.values()):
            return d, found
    looked = "; ".join(f"{d}: missing {', '.join(n for n in names if not (d / n).is_file())}" for d in dirs)
    raise DataError(f"{fmt}: split lists not found ({looked}); expected {', '.join(names)} in one folder "
                    f"({_LAYOUT[fmt]}); pass that folder with --split-from")


def _check_disjoint(class_split: Mapping[str, Sequence[str]], where: str) -> dict[str, str]:
    """``{class: split}`` from ``{split: classes}``; DataError for a class listed in two splits or twice in one."""
    labels, splits = [], []
    for s, classes in class_split.items():
        dup = sorted({c for c in classes if list(classes).count(c) > 1})
        if dup:
            raise DataError(f"{where}: class {dup[0]!r} is listed twice in the {s} list, expected once")
        labels += list(classes)
        splits += [s] * len(classes)
    return class_splits(labels, splits, where)


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays, numpy scalars and plain Python containers, and nothing else (no code runs)."""

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                *((m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
                  for n in ("_reconstruct", "scalar")),
                *((m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric"))}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it holds a {module}.{name} object, not only numpy arrays and plain data")


def _load_pickle(path: Path, what: str) -> Any:
    data = _read_bytes(path, what)
    try:
        return _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise DataError(f"{path}: not a readable {what} ({e.__class__.__name__}: {e}); expected the published "
                        "file; download it again") from e


def _key(d: Mapping[Any, Any], name: str, path: Path, what: str) -> Any:
    """``d[name]`` whether the pickle was written by Python 2 (bytes keys) or 3 (str keys)."""
    for k in (name.encode(), name):
        if k in d:
            return d[k]
    raise DataError(f"{path}: {what} has no {name!r} entry (keys: {sorted(map(str, d))[:6]}); expected the "
                    "published file; download it again")


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _read_lines(path: Path, what: str) -> list[str]:
    text = _read_bytes(path, what).decode("utf-8", "replace")
    return [line.strip() for line in text.splitlines() if line.strip()]


# --------------------------------------------------------------------------- mini-ImageNet


def _mini_imagenet(src: Path, split_dir: Path | None, size: int) -> _Rows:
    names = tuple(f"{s}.csv" for s in TABLE_SPLITS)
    _, lists = _split_files([split_dir] if split_dir else [src], names, "mini-imagenet")
    image_dir = src / "images"
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: not found; expected mini-ImageNet's images folder ({_LAYOUT['mini-imagenet']})")
    per_split: dict[str, list[tuple[str, str]]] = {}
    for s, path in lists.items():
        text = _read_bytes(path, "split list").decode("utf-8", "replace")
        reader = csv.reader(io.StringIO(text))
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != ["filename", "label"]:
            raise DataError(f"{path}: first line {header!r}, expected the header 'filename,label' of Ravi & "
                            "Larochelle's split files")
        rows = []
        for line_no, row in enumerate(reader, start=2):
            if not row or not "".join(row).strip():
                continue
            if len(row) != 2 or not row[0].strip() or not row[1].strip():
                raise DataError(f"{path}:{line_no}: got {row!r}, expected 'filename,label' "
                                "(e.g. n0153282900000005.jpg,n01532829)")
            rows.append((row[0].strip(), row[1].strip()))
        if not rows:
            raise DataError(f"{path}: no images listed, expected one 'filename,label' row per image")
        per_split[s] = rows
    _check_disjoint({s: sorted({lab for _, lab in rows}) for s, rows in per_split.items()}, "mini-imagenet split lists")
    seen: dict[str, str] = {}
    for s, rows in per_split.items():
        for fname, _ in rows:
            if fname in seen:
                raise DataError(f"{lists[s]}: image {fname!r} is also listed in {lists[seen[fname]].name}, expected "
                                "each image once")
            seen[fname] = s
    files = [image_dir / fname for rows in per_split.values() for fname, _ in rows]
    _check_files_exist(files, "image listed in the split files",
                       f"put every listed image in {image_dir} (the mini-ImageNet release's images/ folder)")
    return _Rows(labels=[lab for rows in per_split.values() for _, lab in rows],
                 splits=[s for s, rows in per_split.items() for _ in rows], domains=None,
                 load=_image_file_loader(files, size), md5s={p.name: md5sum(p) for p in lists.values()})


# --------------------------------------------------------------------------- tiered-ImageNet


def _tiered_imagenet(src: Path, split_dir: Path | None, size: int) -> _Rows:
    csvs = tuple(f"{s}.csv" for s in TABLE_SPLITS)
    if split_dir is not None or all((src / n).is_file() for n in csvs):
        return _tiered_from_class_lists(src, split_dir or src, size)
    if all((src / f"{s}_images_png.pkl").is_file() for s in TABLE_SPLITS):
        return _tiered_from_pickles(src, size)
    if all((src / s).is_dir() for s in TABLE_SPLITS):
        return _tiered_from_folders(src, size)
    raise DataError(f"{src}: not a tiered-ImageNet layout; expected one of {_LAYOUT['tiered-imagenet']}")


def _class_folder_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_SUFFIXES)


def _tiered_from_folders(src: Path, size: int) -> _Rows:
    labels, splits, files = [], [], []
    per_split: dict[str, list[str]] = {}
    for s in TABLE_SPLITS:
        classes = sorted(p for p in (src / s).iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise DataError(f"{src / s}: no class folders; expected {src / s}/<synset>/*.jpg")
        per_split[s] = [c.name for c in classes]
        for c in classes:
            found = _class_folder_files(c)
            if not found:
                raise DataError(f"{c}: class {c.name!r} has no images; expected .jpg/.png files in it")
            files += found
            labels += [c.name] * len(found)
            splits += [s] * len(found)
    _check_disjoint(per_split, f"{src} (train/, val/ and test/)")
    return _Rows(labels, splits, None, _image_file_loader(files, size), {})


def _tiered_from_class_lists(src: Path, split_dir: Path, size: int) -> _Rows:
    _, lists = _split_files([split_dir], tuple(f"{s}.csv" for s in TABLE_SPLITS), "tiered-imagenet")
    per_split: dict[str, list[str]] = {}
    category: dict[str, str] = {}
    for s, path in lists.items():
        synsets = []
        for line_no, line in enumerate(_read_lines(path, "class list"), start=1):
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != 2 or not all(parts):
                raise DataError(f"{path}:{line_no}: got {line!r}, expected 'synset,category' (e.g. "
                                "n01530575,n01503061), as in Ren et al.'s tiered_imagenet_split/*.csv")
            if parts[0] == "synset":  # a header some copies carry
                continue
            synsets.append(parts[0])
            category[parts[0]] = parts[1]
        per_split[s] = synsets
    _check_disjoint(per_split, "tiered-imagenet class lists")
    root = src / "train" if (src / "train").is_dir() and not (src / per_split["train"][0]).is_dir() else src
    labels, splits, domains, files = [], [], [], []
    missing = [syn for syns in per_split.values() for syn in syns if not (root / syn).is_dir()]
    if missing:
        raise DataError(f"{root / missing[0]}: class folder missing ({len(missing)} of "
                        f"{sum(map(len, per_split.values()))} listed synsets have none); expected the ImageNet train "
                        f"folder with one <synset>/ folder of JPEGs per listed class")
    for s, syns in per_split.items():
        for syn in syns:
            found = _class_folder_files(root / syn)
            if not found:
                raise DataError(f"{root / syn}: class {syn!r} has no images; expected its ImageNet JPEGs")
            files += found
            labels += [syn] * len(found)
            splits += [s] * len(found)
            domains += [category[syn]] * len(found)
    return _Rows(labels, splits, domains, _image_file_loader(files, size), {p.name: md5sum(p) for p in lists.values()})


def _tiered_from_pickles(src: Path, size: int) -> _Rows:
    labels: list[str] = []
    splits: list[str] = []
    domains: list[str] = []
    encoded: list[Any] = []
    md5s = {}
    for s in TABLE_SPLITS:
        img_path, lab_path = src / f"{s}_images_png.pkl", src / f"{s}_labels.pkl"
        images = _load_pickle(img_path, "tiered-ImageNet image pickle")
        meta = _load_pickle(lab_path, "tiered-ImageNet label pickle")
        if not isinstance(meta, Mapping):
            raise DataError(f"{lab_path}: holds a {type(meta).__name__}, expected the dict of label_specific, "
                            "label_specific_str, label_general, label_general_str")
        specific = np.asarray(_key(meta, "label_specific", lab_path, "the label pickle")).reshape(-1)
        names = [_text(v) for v in _key(meta, "label_specific_str", lab_path, "the label pickle")]
        general = np.asarray(_key(meta, "label_general", lab_path, "the label pickle")).reshape(-1)
        general_names = [_text(v) for v in _key(meta, "label_general_str", lab_path, "the label pickle")]
        if not isinstance(images, list | tuple | np.ndarray) or len(images) != len(specific) or len(general) != len(
                specific):
            n = len(images) if hasattr(images, "__len__") else "no"
            raise DataError(f"{img_path}: {n} images for {len(specific)} labels in {lab_path.name} (and "
                            f"{len(general)} categories), expected one label and category per image")
        if len(specific) and (specific.min() < 0 or specific.max() >= len(names) or general.min() < 0
                              or general.max() >= len(general_names)):
            raise DataError(f"{lab_path}: label indices outside label_specific_str/label_general_str, expected "
                            "indices into those lists; download the file again")
        labels += [names[int(i)] for i in specific]
        domains += [general_names[int(i)] for i in general]
        splits += [s] * len(specific)
        encoded += list(images)
        md5s[lab_path.name] = md5sum(lab_path)
    _check_disjoint({s: sorted({lab for lab, sp in zip(labels, splits, strict=True) if sp == s})
                     for s in TABLE_SPLITS}, f"{src} (label pickles)")

    def load(i: int) -> np.ndarray:
        cell = encoded[i]
        data = cell.tobytes() if isinstance(cell, np.ndarray) else bytes(cell)
        return decode_image(data, image_size=size, channels=3, name=f"{src / (splits[i] + '_images_png.pkl')} "
                                                                       f"image {i}")

    return _Rows(labels, splits, domains, load, md5s)


# --------------------------------------------------------------------------- CIFAR-100: CIFAR-FS and FC100


@dataclass(frozen=True)
class _Cifar:
    images: np.ndarray  # [N, 3, 32, 32] uint8
    fine: np.ndarray  # [N] int
    coarse: np.ndarray  # [N] int
    fine_names: list[str]
    coarse_names: list[str]
    md5s: dict[str, str]


def _read_cifar100(src: Path) -> _Cifar:
    root = src / "cifar-100-python" if (src / "cifar-100-python").is_dir() else src
    missing = [n for n in CIFAR_PICKLES if not (root / n).is_file()]
    if missing:
        raise DataError(f"{root}: CIFAR-100 pickle(s) {', '.join(missing)} missing; expected cifar-100-python/"
                        "{train,test,meta} as extracted from cifar-100-python.tar.gz (www.cs.toronto.edu/~kriz/"
                        "cifar.html)")
    meta = _load_pickle(root / "meta", "CIFAR-100 meta pickle")
    if not isinstance(meta, Mapping):
        raise DataError(f"{root / 'meta'}: holds a {type(meta).__name__}, expected CIFAR-100's meta dict")
    fine_names = [_text(v) for v in _key(meta, "fine_label_names", root / "meta", "the meta pickle")]
    coarse_names = [_text(v) for v in _key(meta, "coarse_label_names", root / "meta", "the meta pickle")]
    if len(fine_names) != 100 or len(coarse_names) != 20:
        raise DataError(f"{root / 'meta'}: {len(fine_names)} fine and {len(coarse_names)} coarse label names, "
                        "expected CIFAR-100's 100 and 20")
    xs, fines, coarses = [], [], []
    for part in ("train", "test"):
        path = root / part
        d = _load_pickle(path, "CIFAR-100 data pickle")
        if not isinstance(d, Mapping):
            raise DataError(f"{path}: holds a {type(d).__name__}, expected CIFAR-100's dict of data and labels")
        x = np.asarray(_key(d, "data", path, "the data pickle"))
        fine = np.asarray(_key(d, "fine_labels", path, "the data pickle")).reshape(-1)
        coarse = np.asarray(_key(d, "coarse_labels", path, "the data pickle")).reshape(-1)
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(fine) != len(x) or len(
                coarse) != len(x):
            raise DataError(f"{path}: data {x.dtype} {tuple(x.shape)} with {len(fine)} fine and {len(coarse)} coarse "
                            "labels, expected uint8 [N, 3072] (32x32 RGB, channel-major) with one label of each per "
                            "row")
        if len(x) and (fine.min() < 0 or fine.max() >= 100 or coarse.min() < 0 or coarse.max() >= 20):
            raise DataError(f"{path}: labels outside 0..99 (fine) or 0..19 (coarse), expected CIFAR-100's")
        xs.append(x.reshape(-1, 3, 32, 32))  # each row: 1024 red, 1024 green, 1024 blue values, row-major
        fines.append(fine.astype(np.int64))
        coarses.append(coarse.astype(np.int64))
    fine_all, coarse_all = np.concatenate(fines), np.concatenate(coarses)
    for c in range(100):  # every fine class lies in one superclass (what FC100's split rests on)
        sup = np.unique(coarse_all[fine_all == c])
        if len(sup) > 1:
            raise DataError(f"{root}: fine class {fine_names[c]!r} has images in superclasses "
                            f"{[coarse_names[i] for i in sup]}, expected one; the pickles are not CIFAR-100's")
    return _Cifar(np.concatenate(xs), fine_all, coarse_all, fine_names, coarse_names,
                  {f"cifar-100-python/{n}": md5sum(root / n) for n in CIFAR_PICKLES})


def _cifar_rows(cifar: _Cifar, class_split: dict[str, str], size: int, domains: bool) -> _Rows:
    keep = np.flatnonzero([cifar.fine_names[int(f)] in class_split for f in cifar.fine])
    order = keep[np.argsort([TABLE_SPLITS.index(class_split[cifar.fine_names[int(cifar.fine[i])]]) for i in keep],
                            kind="stable")]
    labels = [cifar.fine_names[int(cifar.fine[i])] for i in order]
    splits = [class_split[lab] for lab in labels]

    def load(i: int) -> np.ndarray:
        im = cifar.images[order[i]]
        if size == 32:
            return im
        hwc = Image.fromarray(np.ascontiguousarray(im.transpose(1, 2, 0)), "RGB")
        return np.asarray(hwc.resize((size, size), Image.Resampling.LANCZOS)).transpose(2, 0, 1)

    doms = [cifar.coarse_names[int(cifar.coarse[i])] for i in order] if domains else None
    return _Rows(labels, splits, doms, load, dict(cifar.md5s))


def _cifar_fs(src: Path, split_dir: Path | None, size: int) -> _Rows:
    names = tuple(f"{s}.txt" for s in TABLE_SPLITS)
    dirs = [split_dir] if split_dir else [src / d for d in CIFAR_FS_SPLIT_DIRS]
    _, lists = _split_files(dirs, names, "cifar-fs")
    cifar = _read_cifar100(src)
    known = set(cifar.fine_names)
    per_split = {}
    for s, path in lists.items():
        classes = _read_lines(path, "class list")
        unknown = [c for c in classes if c not in known]
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(f"{path}: class {unknown[0]!r} is not a CIFAR-100 class name{hint}; expected one fine "
                            "label name of cifar-100-python/meta per line")
        if not classes:
            raise DataError(f"{path}: no classes listed, expected one CIFAR-100 class name per line")
        per_split[s] = classes
    class_split = _check_disjoint(per_split, "cifar-fs class lists")
    present = {cifar.fine_names[int(c)] for c in np.unique(cifar.fine)}
    empty = [(s, c) for s, classes in per_split.items() for c in classes if c not in present]
    if empty:
        s, c = empty[0]
        raise DataError(f"{lists[s]}: class {c!r} (and {len(empty) - 1} more) has no images in the CIFAR-100 "
                        "pickles, expected 600 per class; use the complete cifar-100-python files")
    rows = _cifar_rows(cifar, class_split, size, domains=False)
    rows.md5s.update({f"splits/bertinetto/{p.name}": md5sum(p) for p in lists.values()})
    return rows


def _fc100(src: Path, split_dir: Path | None, size: int) -> _Rows:
    if split_dir is not None:
        raise DataError("--split-from: got a folder with --format fc100, expected none: FC100's split is Oreshkin et "
                        "al.'s superclass split, built in (mtl_ray.data.converters.FC100_SUPERCLASSES)")
    cifar = _read_cifar100(src)
    class_split = {}
    for s, supers in FC100_SUPERCLASSES.items():
        for c in range(100):
            sup = int(cifar.coarse[np.argmax(cifar.fine == c)])
            if sup in supers:
                class_split[cifar.fine_names[c]] = s
    return _cifar_rows(cifar, class_split, size, domains=True)


# --------------------------------------------------------------------------- CUB-200-2011


CUB_FILES = ("images.txt", "image_class_labels.txt", "classes.txt")


def cub_split(index: int) -> str | None:
    """Chen et al. (2019)'s split of CUB class ``index`` (0-based, in name order): train/val/test (None: unused,
    which no index is: i % 4 in {0, 2} is train, 1 val, 3 test)."""
    return "train" if index % 2 == 0 else "val" if index % 4 == 1 else "test" if index % 4 == 3 else None


def _pairs(path: Path, what: str) -> list[tuple[str, str]]:
    out = []
    for line_no, line in enumerate(_read_lines(path, what), start=1):
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise DataError(f"{path}:{line_no}: got {line!r}, expected '<id> <value>' as in CUB-200-2011's {path.name}")
        out.append((parts[0], parts[1].strip()))
    return out


def _cub(src: Path, split_dir: Path | None, size: int) -> _Rows:
    if split_dir is not None:
        raise DataError("--split-from: got a folder with --format cub, expected none: CUB's split is Chen et al.'s "
                        "class-index split, built in (mtl_ray.data.converters.cub_split)")
    root = src / "CUB_200_2011" if not (src / "images.txt").is_file() and (src / "CUB_200_2011").is_dir() else src
    missing = [n for n in CUB_FILES if not (root / n).is_file()]
    if missing or not (root / "images").is_dir():
        gone = [*missing, *([] if (root / "images").is_dir() else ["images/"])]
        raise DataError(f"{root}: {', '.join(gone)} missing; expected CUB_200_2011/ as extracted from "
                        f"CUB_200_2011.tgz ({_LAYOUT['cub']})")
    classes = dict(_pairs(root / "classes.txt", "class list"))
    image_paths = _pairs(root / "images.txt", "image list")
    image_class = dict(_pairs(root / "image_class_labels.txt", "image labels"))
    ids = [i for i, _ in image_paths]
    if len(set(ids)) != len(ids):
        raise DataError(f"{root / 'images.txt'}: an image id is listed twice, expected each once")
    unlabelled = [i for i in ids if i not in image_class]
    if unlabelled:
        raise DataError(f"{root / 'image_class_labels.txt'}: image {unlabelled[0]} ({len(unlabelled)} in all) has "
                        "no class, expected a line '<image id> <class id>' for every image of images.txt")
    unknown = sorted({image_class[i] for i in ids} - classes.keys())
    if unknown:
        raise DataError(f"{root / 'image_class_labels.txt'}: class id {unknown[0]} is not in classes.txt, expected "
                        "one of its ids")
    names = sorted(classes.values())
    split_of = {name: cub_split(i) for i, name in enumerate(names)}
    rows = sorted(((split_of[classes[image_class[i]]] or "", classes[image_class[i]], p) for i, p in image_paths),
                  key=lambda r: (TABLE_SPLITS.index(r[0]), r[1], r[2]))
    files = [root / "images" / p for _, _, p in rows]
    _check_files_exist(files, "image listed in images.txt", f"extract CUB_200_2011.tgz completely into {root}")
    return _Rows([r[1] for r in rows], [r[0] for r in rows], None, _image_file_loader(files, size),
                 {n: md5sum(root / n) for n in CUB_FILES})


_READERS: dict[str, Callable[[Path, Path | None, int], _Rows]] = {
    "mini-imagenet": _mini_imagenet, "tiered-imagenet": _tiered_imagenet, "cifar-fs": _cifar_fs, "fc100": _fc100,
    "cub": _cub,
}
_LAYOUT = {
    "mini-imagenet": "SRC/train.csv, SRC/val.csv, SRC/test.csv ('filename,label' rows) and SRC/images/",
    "tiered-imagenet": ("SRC/{train,val,test}_images_png.pkl + SRC/{train,val,test}_labels.pkl (Ren et al.'s "
                        "release); SRC/{train,val,test}/<synset>/*.jpg; or {train,val,test}.csv class lists "
                        "('synset,category') in --split-from DIR over an ImageNet train folder SRC/<synset>/"),
    "cifar-fs": ("SRC/cifar-100-python/{train,test,meta} and splits/bertinetto/{train,val,test}.txt (in --split-from "
                 "DIR or SRC/splits/bertinetto/)"),
    "fc100": "SRC/cifar-100-python/{train,test,meta}",
    "cub": "SRC/images.txt, SRC/image_class_labels.txt, SRC/classes.txt and SRC/images/ (CUB_200_2011/)",
}


def formats_help() -> Iterable[str]:
    """One line per format for ``mtl-ray data convert --help``."""
    yield "folder: SRC/<class>/*.png|jpg (no splits)"
    yield from (f"{k}: {v}" for k, v in _LAYOUT.items())
