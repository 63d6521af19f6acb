"""Lake et al.'s 20-way within-alphabet one-shot classification runs (Omniglot evaluation alphabets).

Each run ``runNN/`` holds ``training/class01..20.png`` (one example of each of 20 characters from one
alphabet), ``test/item01..20.png`` and ``class_labels.txt`` with lines
``runNN/test/itemII.png runNN/training/classCC.png`` giving each test item's true class. The
benchmark score is the error rate over all runs (Lake et al. 2015 report 4.5% for people).

Images get the same preprocessing as Omniglot: 'L', LANCZOS resize, inverted so ink = 1.
"""

from __future__ import annotations

import re
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mtl_ray.data.base import to_float_images
from mtl_ray.data.fetch import DataError, data_root, ensure_file
from mtl_ray.data.imagetable import decode_image

LAKE_ZIP = "lake_oneshot_runs_01-10.zip"
LAKE_MD5 = "77075c782318dc37bab579ad18a78087"
WAYS = 20
_RUN_RE = re.compile(r"^run\d+$")
_LINE_RE = re.compile(r"^(?:\S*/)?test/item(\d+)\.png\s+(?:\S*/)?training/class(\d+)\.png$")


@dataclass(frozen=True)
class LakeRun:
    """One 20-way one-shot run.

    ``support_x [20, 1, S, S]`` float32 in [0, 1] (ink 1), ``support_y [20]`` int64 (0..19 =
    class01..class20), ``query_x [20, 1, S, S]`` (item01..item20), ``query_y [20]`` int64 the true
    class index of each item (from ``class_labels.txt``).
    """

    name: str
    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor


def default_lake_path(cfg_root: str) -> Path:
    """``<data_root>/omniglot/lake_oneshot_runs_01-10.zip``."""
    return data_root(cfg_root) / "omniglot" / LAKE_ZIP


def _reader(path: Path) -> tuple[list[str], Callable[[str], bytes], Callable[[], None]]:
    """``(run names, read(relative path) -> bytes, close)`` for a zip file or a directory."""
    if path.is_dir():
        runs = sorted(p.name for p in path.iterdir() if p.is_dir() and _RUN_RE.match(p.name))

        def read_dir(rel: str) -> bytes:
            f = path / rel
            if not f.is_file():
                raise DataError(f"{f}: missing; expected it in Lake's one-shot run layout "
                                "(runNN/training/classCC.png, runNN/test/itemII.png, runNN/class_labels.txt)")
            return f.read_bytes()

        return runs, read_dir, lambda: None
    if path.name == LAKE_ZIP:
        ensure_file(path, LAKE_MD5, None, download=False)
    elif not path.is_file():
        raise DataError(f"{path}: not found; expected {LAKE_ZIP} or a directory holding run01/..run10/; "
                        f"put it under <data.root>/omniglot/ (data.root=... or $MTL_RAY_DATA_DIR)")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path}: not a readable zip archive ({e}); expected Lake's one-shot runs; "
                        "replace it with a good copy") from e
    names = set(zf.namelist())
    runs = sorted({n.split("/")[0] for n in names if _RUN_RE.match(n.split("/")[0])})

    def read_zip(rel: str) -> bytes:
        if rel not in names:
            raise DataError(f"{path}: member {rel!r} missing; expected Lake's one-shot run layout "
                            "(runNN/training/classCC.png, runNN/test/itemII.png, runNN/class_labels.txt)")
        try:
            return zf.read(rel)
        except (zipfile.BadZipFile, zlib.error, OSError) as e:
            raise DataError(f"{path}: member {rel!r} is corrupt ({e}); replace the archive") from e

    return runs, read_zip, zf.close


def _parse_labels(text: str, where: str) -> np.ndarray:
    """``class_labels.txt`` -> ``[20]`` int64 true class index (0-based) of item01..item20."""
    y = np.full(WAYS, -1, dtype=np.int64)
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        m = _LINE_RE.match(line)
        if not m:
            raise DataError(f"{where}: line {line!r} is not 'runNN/test/itemII.png runNN/training/classCC.png'")
        item, cls = int(m.group(1)), int(m.group(2))
        if not (1 <= item <= WAYS and 1 <= cls <= WAYS):
            raise DataError(f"{where}: line {line!r} refers to item {item} / class {cls}, expected 1..{WAYS}")
        y[item - 1] = cls - 1
    if (y < 0).any():
        missing = [f"item{i + 1:02d}" for i in np.flatnonzero(y < 0)]
        raise DataError(f"{where}: no label for {missing}; expected one line per test item 01..{WAYS}")
    return y


def load_lake_runs(path: str | Path, image_size: int) -> list[LakeRun]:
    """Read every ``runNN`` from ``path`` (the zip file or a directory containing ``runNN/``).

    The known zip (``lake_oneshot_runs_01-10.zip``) is md5-checked first. Raises :class:`DataError`
    for a missing/corrupt file, a layout without runs, or a malformed ``class_labels.txt``.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found; expected {LAKE_ZIP} or a directory holding run01/..run10/ "
                        "(the runs are published in the brendenlake/omniglot repository under "
                        "python/one-shot-classification/); point at it, e.g. <data.root>/omniglot/" + LAKE_ZIP)
    runs, read, close = _reader(path)
    try:
        if not runs:
            raise DataError(f"{path}: no runNN/ folders found; expected run01/..run10/ each with training/, "
                            "test/ and class_labels.txt")
        out = []
        for run in runs:
            def img(rel: str, run: str = run) -> np.ndarray:
                return decode_image(read(f"{run}/{rel}"), image_size=image_size, channels=1, invert=True,
                                    resample=Image.Resampling.LANCZOS, name=f"{path}:{run}/{rel}")

            sx = np.stack([img(f"training/class{c:02d}.png") for c in range(1, WAYS + 1)])
            qx = np.stack([img(f"test/item{i:02d}.png") for i in range(1, WAYS + 1)])
            labels_rel = f"{run}/class_labels.txt"
            qy = _parse_labels(read(labels_rel).decode("utf-8", "replace"), f"{path}:{labels_rel}")
            out.append(LakeRun(run, to_float_images(sx), torch.arange(WAYS, dtype=torch.int64),
                               to_float_images(qx), torch.from_numpy(qy)))
        return out
    finally:
        close()


def lake_error_rate(predictions: Sequence[torch.Tensor], runs: Sequence[LakeRun]) -> float:
    """Percentage of wrong predictions over all runs; ``predictions[i]`` is ``[20]`` class indices for
    ``runs[i]``'s queries."""
    if len(predictions) != len(runs):
        raise ValueError(f"predictions: got {len(predictions)} run(s), expected one per run ({len(runs)})")
    wrong = total = 0
    for pred, run in zip(predictions, runs, strict=True):
        pred = torch.as_tensor(pred).reshape(-1)
        if pred.shape != run.query_y.shape:
            raise ValueError(f"predictions for {run.name}: got shape {tuple(pred.shape)}, expected "
                             f"{tuple(run.query_y.shape)} (one class index per query)")
        wrong += int((pred.to(run.query_y.device).long() != run.query_y).sum())
        total += int(run.query_y.numel())
    if total == 0:
        raise ValueError("lake_error_rate: no runs given, expected at least one")
    return 100.0 * wrong / total
