"""imagetable: folder conversion, raw and encoded tables, errors, atomic writes, hash splits."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mtl_ray.atomic import WriteError
from mtl_ray.components import from_dict
from mtl_ray.data import build_task_source, check_data
from mtl_ray.data.fetch import DataError
from mtl_ray.data.imagetable import (
    META_ENCODING,
    META_SHAPE,
    convert_folder,
    hash_split,
    read_image_table,
    write_table,
)


def _drawing(kind: int, size: int = 40) -> np.ndarray:
    """A black-on-white drawing ([size, size] uint8): class 0 a bar, 1 a box, 2 a cross."""
    a = np.full((size, size), 255, np.uint8)
    if kind == 0:
        a[size // 2 - 3:size // 2 + 3, 4:-4] = 0
    elif kind == 1:
        a[6:-6, 6:12] = 0
        a[6:-6, -12:-6] = 0
    else:
        idx = np.arange(4, size - 4)
        a[idx, idx] = 0
        a[idx, size - 1 - idx] = 0
    return a


def _make_folder(root: Path) -> Path:
    """3 classes x 4 images: grayscale PNG, RGB PNG, RGB JPEG, palette PNG (mixed sizes)."""
    src = root / "imgs"
    for k, name in enumerate(("bar", "box", "cross")):
        d = src / name
        d.mkdir(parents=True)
        g = _drawing(k)
        Image.fromarray(g, "L").save(d / "a.png")
        Image.fromarray(np.stack([g] * 3, -1), "RGB").save(d / "b.png")
        Image.fromarray(np.stack([g] * 3, -1), "RGB").resize((60, 50)).save(d / "c.jpg", quality=95)
        Image.fromarray(g, "L").convert("P").save(d / "D.PNG")
        (d / "notes.txt").write_text("ignored")
    return src


def test_convert_folder_then_read_pools(tmp_path: Path) -> None:
    out = convert_folder(_make_folder(tmp_path), tmp_path / "t.parquet", image_size=16, invert=True,
                         domain="shapes")
    meta = pq.read_schema(out).metadata
    assert meta[META_ENCODING] == b"raw-uint8" and meta[META_SHAPE] == b"1,16,16"
    images, domains, md5s = read_image_table(out, 16)
    assert sorted(images) == ["bar", "box", "cross"]
    assert all(x.shape == (4, 1, 16, 16) and x.dtype == np.uint8 for x in images.values())
    assert domains == {"bar": "shapes", "box": "shapes", "cross": "shapes"} and md5s == {}
    # invert=True: the drawing's black ink is high, the white background ~0
    bar = images["bar"][0, 0]
    assert bar[8, 8] > 200 and bar[0, 0] < 30
    # the four encodings of the same drawing decode to nearly the same pixels
    for x in images.values():
        assert np.abs(x.astype(int) - x[0].astype(int)).mean() < 12


def test_convert_folder_rgb_keeps_three_channels(tmp_path: Path) -> None:
    out = convert_folder(_make_folder(tmp_path), tmp_path / "rgb.parquet", image_size=12, channels=3)
    images, _, _ = read_image_table(out, 12)
    assert images["box"].shape == (4, 3, 12, 12)
    gray, _, _ = read_image_table(out, 12, channels=1)  # RGB -> L on read
    assert gray["box"].shape == (4, 1, 12, 12)
    assert np.abs(gray["box"][:, 0].astype(int) - images["box"][:, 0].astype(int)).max() <= 1


def test_raw_roundtrip_is_exact_and_resizes_on_read(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(50, 1, 8, 8), dtype=np.uint8)
    labels = [f"c{i % 5}" for i in range(50)]
    path = write_table(tmp_path / "r.parquet", labels, x, domains=["d"] * 50, source_md5={"src.zip": "ab" * 16})
    images, domains, md5s = read_image_table(path, 8)
    assert md5s == {"src.zip": "ab" * 16} and set(domains.values()) == {"d"}
    for c in range(5):
        np.testing.assert_array_equal(images[f"c{c}"], x[c::5])
    assert not images["c0"].flags.writeable
    big, _, _ = read_image_table(path, 16)
    assert big["c0"].shape == (10, 1, 16, 16)


def test_raw_table_read_from_many_chunks(tmp_path: Path) -> None:
    """Row groups come back as separate Arrow chunks; every chunk's buffers must be sliced right."""
    x = np.arange(300 * 4, dtype=np.uint32).astype(np.uint8).reshape(300, 1, 2, 2)
    labels = [str(i // 100) for i in range(300)]
    path = write_table(tmp_path / "r.parquet", labels, x)
    table = pq.read_table(path)
    pq.write_table(table, tmp_path / "chunked.parquet", row_group_size=7)
    images, _, _ = read_image_table(tmp_path / "chunked.parquet", 2)
    for c in range(3):
        np.testing.assert_array_equal(images[str(c)], x[c * 100:(c + 1) * 100])


def test_encoded_table_is_decoded(tmp_path: Path) -> None:
    cells, labels = [], []
    for k in range(3):
        for fmt in ("PNG", "JPEG"):
            buf = io.BytesIO()
            Image.fromarray(_drawing(k), "L").save(buf, format=fmt)
            cells.append(buf.getvalue())
            labels.append(f"k{k}")
    path = tmp_path / "enc.parquet"
    pq.write_table(pa.table({"label": labels, "image": pa.array(cells, pa.binary())}), path)
    images, domains, md5s = read_image_table(path, 20, invert=True)
    assert sorted(images) == ["k0", "k1", "k2"] and domains["k0"] == "" and md5s == {}
    assert images["k2"].shape == (2, 1, 20, 20)
    assert images["k0"][0, 0, 10, 10] > 200 and images["k0"][0, 0, 0, 0] < 30  # inverted: ink high
    rgb, _, _ = read_image_table(path, 20, channels=3)
    assert rgb["k1"].shape == (2, 3, 20, 20)


def test_parquet_task_source_samples(tmp_path: Path) -> None:
    out = convert_folder(_make_folder(tmp_path), tmp_path / "t.parquet", image_size=16)
    cfg = from_dict({"data": {"source": "parquet", "path": str(out), "ways": 3, "shots": 1, "queries": 3,
                              "image_size": 16}, "model": {"name": "conv4", "blocks": 2},
                     "optim": {"val_every": 0}})
    assert check_data(cfg) == []  # training samples train only (validation off); eval checks test:
    assert check_data(cfg, ["test"]) == ["split 'test': got 0 classes, expected >= data.ways=3 (classes in the 'test' "
                               "split of t.parquet (3 classes, data.test_fraction=0.0)); lower data.ways or "
                               "raise data.test_fraction (or add classes to the table)"]
    src = build_task_source(cfg)
    assert src.x_shape == (1, 16, 16) and src.num_classes("train") == 3 and "t.parquet" in src.md5s
    batch = src.sample("train", 0, [0, 1])
    assert batch.support_x.shape == (2, 3, 1, 16, 16) and batch.query_x.shape == (2, 9, 1, 16, 16)


def test_empty_folder_error(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        convert_folder(tmp_path / "src", tmp_path / "o.parquet")
    assert not (tmp_path / "o.parquet").exists()


def test_class_without_images_error(tmp_path: Path) -> None:
    src = _make_folder(tmp_path)
    (src / "empty_class").mkdir()
    (src / "empty_class" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="class 'empty_class' has no images"):
        convert_folder(src, tmp_path / "o.parquet")
    assert not (tmp_path / "o.parquet").exists()


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    src = _make_folder(tmp_path)
    bad = src / "box" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError) as e:
        convert_folder(src, tmp_path / "o.parquet")
    assert str(bad) in str(e.value) and "not a readable image" in str(e.value)


def test_table_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="image table not found"):
        read_image_table(tmp_path / "absent.parquet", 28)
    pq.write_table(pa.table({"name": ["a"], "image": [b"x"]}), tmp_path / "nolabel.parquet")
    with pytest.raises(DataError, match=r"missing \['label'\]"):
        read_image_table(tmp_path / "nolabel.parquet", 28)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        read_image_table(tmp_path / "junk.parquet", 28)
    t = pa.table({"label": ["a"], "image": pa.array([b"\x00" * 5], pa.binary())})
    pq.write_table(t.replace_schema_metadata({META_ENCODING: b"raw-uint8", META_SHAPE: b"1,2,2"}),
                   tmp_path / "short.parquet")
    with pytest.raises(DataError, match="holds 5 bytes, expected 4"):
        read_image_table(tmp_path / "short.parquet", 2)
    with pytest.raises(DataError, match=r"images: got dtype float64"):
        write_table(tmp_path / "f.parquet", ["a"], np.zeros((1, 1, 2, 2)))


def test_write_table_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails half-way leaves neither the target nor a temp file."""

    def half_write(table: pa.Table, where: str, **kw: object) -> None:
        Path(where).write_bytes(b"PAR1 half")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", half_write)
    with pytest.raises(WriteError, match=r"cannot write .*t\.parquet: disk full"):  # one line, exit 2 in the CLI
        write_table(tmp_path / "t.parquet", ["a"], np.zeros((1, 1, 2, 2), np.uint8), source_md5={"a.zip": "x"})
    assert list(tmp_path.iterdir()) == []


def test_hash_split_is_deterministic_disjoint_and_roughly_proportional() -> None:
    labels = [f"class{i}" for i in range(2000)]
    s = hash_split(labels, 0.2, 0.1)
    assert s == hash_split(reversed(labels), 0.2, 0.1)
    assert sorted(s["train"] + s["val"] + s["test"]) == sorted(labels) == s["all"]
    assert not (set(s["train"]) & set(s["val"])) and not (set(s["val"]) & set(s["test"]))
    assert 320 < len(s["val"]) < 480 and 140 < len(s["test"]) < 260
