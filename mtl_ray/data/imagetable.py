"""The project's one on-disk image format: a Parquet table of labelled images.

Columns:
  ``label``  string, the class of the image (required)
  ``domain`` string, where the image comes from, e.g. the Omniglot alphabet (optional)
  ``split``  string, the class's split: ``train``, ``val`` or ``test``, the same on every row of a class
             (optional; written by the converters of published benchmarks, :mod:`mtl_ray.data.converters`, so
             their published class splits are used as published; without it ``data.source=parquet`` splits
             classes by a hash of the label)
  ``image``  binary, one image per row (required)

Schema metadata (byte-string keys and values):
  ``mtl_ray.encoding``    ``raw-uint8``: every ``image`` cell is ``C*H*W`` uint8 bytes (C-order) of
                          the shape in ``mtl_ray.image_shape`` (``"C,H,W"``), already in the project's
                          pixel convention; absent or ``encoded``: every cell is a PNG/JPEG (anything
                          Pillow reads), decoded and resized on read.
  ``mtl_ray.image_shape`` ``"C,H,W"`` for ``raw-uint8`` tables.
  ``mtl_ray.source_md5``  JSON object ``{source file: md5}`` of the files the table was built from.
  ``mtl_ray.channel_mean``, ``mtl_ray.channel_std``  JSON lists, one float per channel: the per-channel mean and
                          standard deviation of the pixels (as values in [0, 1]) of the table's train split (of
                          every image when it has no ``split`` column); the task source normalises inputs with
                          them (:mod:`mtl_ray.data.normalise`). Optional.

Pixel convention: uint8 with *ink high* — strokes/foreground 255, background 0 — the way the models
see Omniglot. Black-on-white drawings (Omniglot, scanned handwriting) need inverting when decoded:
:func:`convert_folder` and :func:`read_image_table` take ``invert=True`` for that; photos are used as-is.

Raw tables read at memory speed: the ``image`` column's Arrow buffers are viewed with
``np.frombuffer`` (no per-row Python loop).
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from mtl_ray.atomic import atomic_write
from mtl_ray.data.base import stable_fraction
from mtl_ray.data.fetch import DataError
from mtl_ray.data.normalise import channel_stats

META_ENCODING = b"mtl_ray.encoding"
META_SHAPE = b"mtl_ray.image_shape"
META_MD5 = b"mtl_ray.source_md5"
META_MEAN = b"mtl_ray.channel_mean"
META_STD = b"mtl_ray.channel_std"
TABLE_SPLITS = ("train", "val", "test")  # the values of a table's ``split`` column
RAW = b"raw-uint8"
ENCODED = b"encoded"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_RGB_LIKE = {"RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV"}
_MAX_CHUNK_BYTES = 2**31 - 1  # int32 offsets of an Arrow binary array


@dataclass(frozen=True)
class ImageTable:
    """What :func:`read_image_table` returns (unpacks as ``images, domains, source_md5``, as it always has).

    ``images[label]`` is ``[n, C, H, W]`` uint8 (read-only), labels in sorted order;
    ``domains[label]`` the label's domain ("" when the table has none);
    ``source_md5`` the ``mtl_ray.source_md5`` metadata ({} when absent);
    ``splits[label]`` the label's ``split`` column value, train/val/test ({} when the table has no such column);
    ``channel_mean`` / ``channel_std`` the recorded per-channel statistics (() when absent).
    """

    images: dict[str, np.ndarray]
    domains: dict[str, str]
    source_md5: dict[str, str]
    splits: dict[str, str] = field(default_factory=dict)
    channel_mean: tuple[float, ...] = ()
    channel_std: tuple[float, ...] = ()

    def __iter__(self) -> Iterator[Any]:
        """``images, domains, source_md5 = read_image_table(...)``: the three fields callers unpacked before the
        splits and statistics existed."""
        return iter((self.images, self.domains, self.source_md5))


# --------------------------------------------------------------------------- decoding


def decode_image(data: bytes, *, image_size: int, channels: int | None = 1, invert: bool = False,
                 resample: Image.Resampling = Image.Resampling.LANCZOS, name: str = "image") -> np.ndarray:
    """Decode one PNG/JPEG into ``[C, image_size, image_size]`` uint8.

    The image becomes grayscale ('L', ``C = 1``) unless it is RGB-like and ``channels == 3``; a
    grayscale image asked for with ``channels == 3`` is repeated over 3 channels. Transparent pixels
    are composited onto white. The aspect ratio is not kept (the image is resized to a square).
    ``invert`` maps ``v -> 255 - v`` after resizing (black-on-white drawings -> ink high).
    Raises :class:`DataError` naming ``name`` when the bytes are not a readable image.
    """
    if channels not in (None, 1, 3):
        raise DataError(f"channels: got {channels!r}, expected 1 (grayscale) or 3 (RGB)")
    try:
        with warnings.catch_warnings():  # Pillow only warns between MAX_IMAGE_PIXELS and twice that: refuse those too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data))  # an ImageFile until converted below
        if img.format == "JPEG":  # decode at a reduced scale straight away when the target is small
            img.draft("RGB" if channels == 3 else "L", (image_size, image_size))
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{name}: got an image too large to decode safely ({e}), expected one of at most "
                        f"{Image.MAX_IMAGE_PIXELS} pixels (it becomes {image_size}x{image_size}); downscale it or "
                        "remove it (a small file that decodes to that many pixels is a decompression bomb)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{name}: not a readable image ({e.__class__.__name__}: {e}); expected a PNG or "
                        "JPEG file; delete or replace it") from e
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba).convert("RGB" if img.mode.startswith(("RGB", "P")) else "L")
    want_rgb = channels == 3 and img.mode in _RGB_LIKE
    img = img.convert("RGB") if want_rgb else img.convert("L")
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), resample)
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr.transpose(2, 0, 1) if arr.ndim == 3 else arr[None]
    if channels == 3 and arr.shape[0] == 1:
        arr = np.repeat(arr, 3, axis=0)
    if invert:
        arr = 255 - arr
    return np.ascontiguousarray(arr)


def _resize_chw(x: np.ndarray, size: int) -> np.ndarray:
    """``[C, H, W]`` uint8 -> ``[C, size, size]`` (Pillow LANCZOS per channel)."""
    out = [np.asarray(Image.fromarray(c, mode="L").resize((size, size), Image.Resampling.LANCZOS))
           for c in x]
    return np.stack(out)


def _to_channels(x: np.ndarray, channels: int | None, where: str) -> np.ndarray:
    """``[N, C, H, W]`` -> ``[N, channels, H, W]`` (RGB->L with Pillow's luma weights, or L->RGB)."""
    c = x.shape[1]
    if channels is None or channels == c:
        return x
    if c == 3 and channels == 1:
        w = np.array([299, 587, 114], dtype=np.uint32).reshape(1, 3, 1, 1)
        return ((x.astype(np.uint32) * w).sum(axis=1, keepdims=True) // 1000).astype(np.uint8)
    if c == 1 and channels == 3:
        return np.repeat(x, 3, axis=1)
    raise DataError(f"{where}: images have {c} channels, expected {channels}; only 1<->3 channel conversion "
                    "is supported; rebuild the table with the channels you need")


# --------------------------------------------------------------------------- writing


def _binary_column(flat: np.ndarray) -> pa.ChunkedArray:
    """``[N, D]`` uint8 -> a binary column of N cells of D bytes, built from buffers (no copies per row)."""
    n, d = flat.shape
    rows_per_chunk = max(1, _MAX_CHUNK_BYTES // max(d, 1))
    chunks = []
    for start in range(0, max(n, 1), rows_per_chunk):
        part = np.ascontiguousarray(flat[start:start + rows_per_chunk])
        m = part.shape[0]
        offsets = np.arange(m + 1, dtype=np.int32) * np.int32(d)
        chunks.append(pa.Array.from_buffers(pa.binary(), m, [None, pa.py_buffer(offsets), pa.py_buffer(part)]))
    return pa.chunked_array(chunks, type=pa.binary())


def class_splits(labels: Sequence[str], splits: Sequence[str], where: str = "splits") -> dict[str, str]:
    """``{label: split}`` from one split per row; :class:`DataError` for a value outside train/val/test or a class
    whose rows name two splits (a class belongs to one split: its images must not be seen in another)."""
    out: dict[str, str] = {}
    for lab, sp in zip(labels, splits, strict=True):
        if sp not in TABLE_SPLITS:
            raise DataError(f"{where}: class {lab!r} has split {sp!r}, expected one of {', '.join(TABLE_SPLITS)}")
        seen = out.setdefault(lab, sp)
        if seen != sp:
            raise DataError(f"{where}: class {lab!r} is in two splits ({seen!r} and {sp!r}), expected one split per "
                            "class; fix the split lists so that each class appears in exactly one")
    return out


def write_table(path: str | Path, labels: Sequence[str], images_uint8: np.ndarray,
                domains: Sequence[str] | None = None, source_md5: Mapping[str, str] | None = None,
                splits: Sequence[str] | None = None, stats: tuple[Sequence[float], Sequence[float]] | None = None,
                ) -> Path:
    """Write ``images_uint8 [N, C, H, W]`` (uint8, ink high) with their labels as a raw-uint8 table.

    ``splits``: one of train/val/test per row (the ``split`` column; a class in one split only). ``stats``:
    ``(channel_mean [C], channel_std [C])`` to record (see :func:`table_stats`). The file appears atomically: it is
    written to a temp file in the same directory and renamed.
    """
    path = Path(path)
    x = np.asarray(images_uint8)
    if x.dtype != np.uint8 or x.ndim != 4:
        raise DataError(f"images: got dtype {x.dtype} with shape {tuple(x.shape)}, expected uint8 [N, C, H, W]")
    n = x.shape[0]
    if len(labels) != n:
        raise DataError(f"labels: got {len(labels)}, expected one per image ({n})")
    if domains is not None and len(domains) != n:
        raise DataError(f"domains: got {len(domains)}, expected one per image ({n})")
    if splits is not None:
        if len(splits) != n:
            raise DataError(f"splits: got {len(splits)}, expected one per image ({n})")
        class_splits([str(v) for v in labels], [str(v) for v in splits])
    cols: dict[str, pa.Array | pa.ChunkedArray] = {"label": pa.array([str(v) for v in labels], pa.string())}
    if domains is not None:
        cols["domain"] = pa.array([str(v) for v in domains], pa.string())
    if splits is not None:
        cols["split"] = pa.array([str(v) for v in splits], pa.string())
    cols["image"] = _binary_column(x.reshape(n, -1))
    meta = {META_ENCODING: RAW, META_SHAPE: ",".join(str(s) for s in x.shape[1:]).encode()}
    if source_md5:
        meta[META_MD5] = json.dumps(dict(source_md5), sort_keys=True).encode()
    if stats is not None:
        mean, std = (tuple(float(v) for v in part) for part in stats)
        if len(mean) != x.shape[1] or len(std) != x.shape[1] or min(std, default=1.0) <= 0:
            raise DataError(f"stats: got mean {mean} and std {std}, expected {x.shape[1]} of each (std > 0)")
        meta[META_MEAN] = json.dumps(list(mean)).encode()
        meta[META_STD] = json.dumps(list(std)).encode()
    table = pa.table(cols).replace_schema_metadata(meta)
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def table_stats(images_uint8: np.ndarray, splits: Sequence[str] | None = None) -> tuple[tuple[float, ...],
                                                                                        tuple[float, ...]]:
    """The statistics a table records: per-channel mean and std of the train split's images (``splits`` one per
    row), or of every image when there are no splits. Only the train split, so nothing about the held-out classes
    leaks into what every model sees."""
    x = np.asarray(images_uint8)
    if splits is not None:
        keep = np.asarray([s == "train" for s in splits], bool)
        if keep.any():
            x = x[keep]
    return channel_stats(x)


def metadata_floats(meta: Mapping[bytes, bytes], key: bytes, where: str) -> tuple[float, ...]:
    if key not in meta:
        return ()
    try:
        values = json.loads(meta[key])
        if not isinstance(values, list) or not values or not all(isinstance(v, int | float) for v in values):
            raise ValueError(values)
        return tuple(float(v) for v in values)
    except ValueError as e:
        raise DataError(f"{where}: metadata {key.decode()} got {meta[key][:80]!r}, expected a JSON list of one number "
                        "per channel; rebuild the table with `mtl-ray data convert`") from e


# --------------------------------------------------------------------------- reading


def _raw_images(col: pa.ChunkedArray, shape: tuple[int, int, int], where: str) -> np.ndarray:
    """The ``image`` column of a raw-uint8 table as ``[N, C, H, W]`` uint8, viewed from Arrow buffers."""
    size = int(np.prod(shape))
    parts = []
    for chunk in col.chunks:
        if len(chunk) == 0:
            continue
        if chunk.null_count:
            raise DataError(f"{where}: {chunk.null_count} null image cell(s); expected every row to hold an image")
        if pa.types.is_fixed_size_binary(chunk.type):
            if chunk.type.byte_width != size:
                raise DataError(f"{where}: image cells hold {chunk.type.byte_width} bytes, expected {size} "
                                f"(mtl_ray.image_shape {shape})")
            data = np.frombuffer(chunk.buffers()[1], np.uint8)
            parts.append(data[chunk.offset * size:(chunk.offset + len(chunk)) * size].reshape(-1, *shape))
            continue
        if not (pa.types.is_binary(chunk.type) or pa.types.is_large_binary(chunk.type)):
            raise DataError(f"{where}: column 'image' has type {chunk.type}, expected binary")
        _, off_buf, data_buf = chunk.buffers()
        odt = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        offsets = np.frombuffer(off_buf, odt)[chunk.offset:chunk.offset + len(chunk) + 1]
        lengths = np.diff(offsets)
        if np.any(lengths != size):
            row = int(np.argmax(lengths != size))
            raise DataError(f"{where}: an image cell holds {int(lengths[row])} bytes, expected {size} "
                            f"(mtl_ray.image_shape {shape}); the table is corrupt, rebuild it")
        data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.empty(0, np.uint8)
        parts.append(data[int(offsets[0]):int(offsets[-1])].reshape(-1, *shape))
    if not parts:
        return np.empty((0, *shape), np.uint8)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def read_image_table(path: str | Path, image_size: int, channels: int | None = None,
                     invert: bool = False) -> ImageTable:
    """Read an image table, grouped by label: ``images[label] -> [n, C, image_size, image_size]`` uint8.

    Raw tables are already in the project's convention; images whose stored size differs from
    ``image_size`` are resized (LANCZOS). ``channels``: None keeps a raw table's channels (encoded
    cells become grayscale); 1 or 3 converts. ``invert`` applies to *encoded* cells only (use it for
    black-on-white drawings). Raises :class:`DataError` for a missing/unreadable/malformed file.
    """
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise DataError(f"{where}: image table not found; expected a Parquet file with columns label, image "
                        "(make one with `mtl-ray data convert IMAGE_DIR OUT.parquet`) and point data.path at it")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{where}: not a readable Parquet file ({e}); expected an image table made by "
                        "`mtl-ray data convert`; rebuild it") from e
    names = table.column_names
    missing = [c for c in ("label", "image") if c not in names]
    if missing:
        raise DataError(f"{where}: columns {names}, expected 'label' and 'image' (and optionally 'domain', "
                        f"'split'); missing {missing}")
    meta = table.schema.metadata or {}
    encoding = meta.get(META_ENCODING, ENCODED)
    md5s: dict[str, str] = {}
    if META_MD5 in meta:
        try:
            md5s = {str(k): str(v) for k, v in json.loads(meta[META_MD5]).items()}
        except (ValueError, AttributeError) as e:
            raise DataError(f"{where}: metadata mtl_ray.source_md5 is not a JSON object ({e})") from e
    label_col = table.column("label")
    if label_col.null_count:
        raise DataError(f"{where}: {label_col.null_count} row(s) with a null label; expected every row labelled")
    labels = np.asarray([str(v) for v in label_col.to_pylist()])
    domain_list = None
    if "domain" in names:
        domain_list = [("" if v is None else str(v)) for v in table.column("domain").to_pylist()]
    label_split: dict[str, str] = {}
    if "split" in names:
        split_col = table.column("split")
        if split_col.null_count:
            raise DataError(f"{where}: {split_col.null_count} row(s) with a null split; expected every row's class "
                            f"in one of {', '.join(TABLE_SPLITS)} (or no 'split' column at all); rebuild the table")
        label_split = class_splits(labels.tolist(), [str(v) for v in split_col.to_pylist()], f"{where}: column split")
    mean, std = metadata_floats(meta, META_MEAN, where), metadata_floats(meta, META_STD, where)

    if encoding == RAW:
        try:
            shape = tuple(int(s) for s in meta[META_SHAPE].decode().split(","))
            if len(shape) != 3 or min(shape) <= 0:
                raise ValueError(shape)
        except (KeyError, ValueError) as e:
            raise DataError(f"{where}: metadata mtl_ray.image_shape got {meta.get(META_SHAPE)!r}, expected "
                            "b'C,H,W' for a raw-uint8 table; rebuild the table") from e
        x = _raw_images(table.column("image"), shape, where)  # the len(shape) check makes it tuple[int, int, int]
        if shape[1:] != (image_size, image_size):
            x = np.stack([_resize_chw(im, image_size) for im in x]) if len(x) else x
        if (mean or std) and (len(mean) != shape[0] or len(std) != shape[0]):
            raise DataError(f"{where}: metadata mtl_ray.channel_mean/channel_std hold {len(mean)}/{len(std)} "
                            f"values, expected {shape[0]} each (one per channel); rebuild the table")
        if channels is not None and channels != shape[0]:
            mean, std = (), ()  # statistics of the stored channels do not describe converted ones
        x = _to_channels(x, channels, where)
    elif encoding == ENCODED:
        image_type = table.schema.field("image").type
        if not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)
                or pa.types.is_fixed_size_binary(image_type)):
            raise DataError(f"{where}: column 'image' has type {image_type}, expected binary (PNG/JPEG bytes per row, "
                            "or the raw uint8 pixels `mtl-ray data convert` writes); rebuild the table with "
                            "`mtl-ray data convert IMAGE_DIR OUT.parquet`")
        cells = table.column("image").to_pylist()
        out = []
        for i, (cell, lab) in enumerate(zip(cells, labels, strict=True)):
            if cell is None:
                raise DataError(f"{where}: row {i} (label {str(lab)!r}) has a null image; expected image bytes")
            out.append(decode_image(cell, image_size=image_size, channels=channels, invert=invert,
                                    name=f"{where} row {i} (label {str(lab)!r})"))
        x = np.stack(out) if out else np.empty((0, channels or 1, image_size, image_size), np.uint8)
        if mean and (len(mean) != x.shape[1] or len(std) != x.shape[1]):
            mean, std = (), ()  # recorded for other channels than these cells decode to
    else:
        raise DataError(f"{where}: metadata mtl_ray.encoding got {encoding!r}, expected b'raw-uint8' or "
                        "b'encoded'; rebuild the table")

    if len(labels) == 0:
        raise DataError(f"{where}: the table has no rows; expected labelled images")
    uniq, inverse = np.unique(labels, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=len(uniq)))[:-1]
    images: dict[str, np.ndarray] = {}
    domains: dict[str, str] = {}
    for lab, idx in zip(uniq.tolist(), np.split(order, bounds), strict=True):
        arr = x[idx]
        arr.flags.writeable = False
        images[lab] = arr
        domains[lab] = domain_list[int(idx[0])] if domain_list is not None else ""
    return ImageTable(images, domains, md5s, label_split, mean, std)


# --------------------------------------------------------------------------- folders -> tables


def convert_folder(src_dir: str | Path, out_path: str | Path, image_size: int = 28, channels: int = 1,
                   invert: bool = False, domain: str | None = None) -> Path:
    """Convert ``src_dir/<class_name>/*.png|jpg|jpeg`` into a raw-uint8 image table at ``out_path``.

    Every image becomes ``[channels, image_size, image_size]`` uint8 (LANCZOS resize, aspect ratio
    not kept). The table records the channel statistics of all its images (a folder has no splits: they are a
    hash of the label when the table is read). Set ``invert=True`` for dark drawings on a light background (e.g.
    scanned handwriting) so ink ends up high, as the project expects; leave it False for photos and light-on-dark
    images.
    ``domain`` (optional) is stored for every row. Hidden entries (names starting with '.') and
    non-image files are skipped. Raises :class:`DataError` for an empty folder, a class folder with
    no images, or an unreadable image (naming the file).
    """
    src = Path(src_dir)
    if not src.is_dir():
        raise DataError(f"{src}: not a directory; expected a folder with one sub-folder of images per class")
    if channels not in (1, 3):
        raise DataError(f"channels: got {channels!r}, expected 1 (grayscale) or 3 (RGB)")
    if image_size <= 0:
        raise DataError(f"image_size: got {image_size}, expected a positive number of pixels")
    if Path(out_path).is_dir():
        raise DataError(f"{out_path}: got an existing directory as the output, expected the path of the Parquet file "
                        f"to write; pass a file name, e.g. {Path(out_path) / (src.name + '.parquet')}")
    class_dirs = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        loose = [p.name for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES][:3]
        extra = f" (found loose images such as {loose}; move them into class folders)" if loose else ""
        raise DataError(f"{src}: no class folders found; expected {src}/<class_name>/*.png|jpg|jpeg{extra}")
    labels: list[str] = []
    images: list[np.ndarray] = []
    for d in class_dirs:
        files = sorted(p for p in d.iterdir()
                       if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"{d}: class {d.name!r} has no images; expected at least one "
                            f"{'/'.join(IMAGE_SUFFIXES)} file; add images or remove the folder")
        for f in files:
            try:
                data = f.read_bytes()
            except OSError as e:
                raise DataError(f"{f}: cannot read ({e}); fix its permissions or remove it") from e
            images.append(decode_image(data, image_size=image_size, channels=channels, invert=invert, name=str(f)))
            labels.append(d.name)
    domains = [domain] * len(labels) if domain is not None else None
    x = np.stack(images)
    return write_table(out_path, labels, x, domains=domains, stats=table_stats(x))


# --------------------------------------------------------------------------- class splits


def hash_split(labels: Iterable[str], val_fraction: float, test_fraction: float) -> dict[str, list[str]]:
    """Split class labels by :func:`stable_fraction`: val ``< val_fraction``, test the next
    ``test_fraction``, train the rest; ``all`` holds every label. Each list is sorted."""
    out: dict[str, list[str]] = {"train": [], "val": [], "test": [], "all": []}
    for lab in sorted(labels):
        f = stable_fraction(lab)
        split = "val" if f < val_fraction else "test" if f < val_fraction + test_fraction else "train"
        out[split].append(lab)
        out["all"].append(lab)
    return out
