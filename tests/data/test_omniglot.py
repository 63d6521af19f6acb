"""Omniglot on the real minimal background splits: cache, dedupe, splits, rotations, tasks, errors."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mtl_ray.components import from_dict
from mtl_ray.config import Config
from mtl_ray.data import build_task_source, omniglot
from mtl_ray.data.fetch import DataError
from mtl_ray.data.imagetable import META_MD5

SMALL_ZIPS = ("images_background_small1.zip", "images_background_small2.zip")
SMALL_MD5 = {"images_background_small1.zip": "e704a628b5459e08445c13499850abc4",
             "images_background_small2.zip": "b75a71a51d3b13f821f212756fe481fd"}

MakeCfg = Callable[..., Config]


def test_cache_built_with_source_md5s(omniglot_cfg: MakeCfg) -> None:
    cfg = omniglot_cfg()
    table = omniglot.load_omniglot_table(cfg.data)
    assert table.cache_path == omniglot.cache_path(cfg.data.root, cfg.data.archives, 28)
    assert table.cache_path.parent == Path(cfg.data.root) / "omniglot" / "cache"
    assert table.cache_path.name.startswith("omniglot-28px-")
    meta = pq.read_schema(table.cache_path).metadata
    assert json.loads(meta[META_MD5]) == SMALL_MD5
    assert table.md5s == SMALL_MD5


def test_dedupe_gives_242_characters_of_20_drawers(omniglot_cfg: MakeCfg) -> None:
    table = omniglot.load_omniglot_table(omniglot_cfg().data)
    assert len(table.images) == 136 + 156 - 24 - 26 == 242
    assert all(x.shape == (20, 1, 28, 28) and x.dtype == np.uint8 for x in table.images.values())
    alphabets = omniglot.alphabets_of(table.domains)
    assert alphabets == ["Balinese", "Early_Aramaic", "Greek", "Japanese_(katakana)", "Korean", "Latin",
                         "Sanskrit", "Tagalog"]
    count = {a: sum(1 for d in table.domains.values() if d == a) for a in alphabets}
    assert count["Greek"] == 24 and count["Latin"] == 26 and count["Korean"] == 40
    assert all(lab.split("/")[0] == table.domains[lab] and lab.split("/")[1].startswith("character")
               for lab in table.images)


def test_second_load_reads_the_cache(omniglot_cfg: MakeCfg, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = omniglot_cfg()
    first = omniglot.load_omniglot_table(cfg.data)
    mtime = first.cache_path.stat().st_mtime_ns

    def no_decode(*a: object, **k: object) -> None:
        raise AssertionError("the archives were decoded again although the cache exists")

    monkeypatch.setattr(omniglot, "decode_archives", no_decode)
    omniglot.clear_cache()  # force a read from disk, not from this process's memory
    second = omniglot.load_omniglot_table(cfg.data)
    assert second.cache_path == first.cache_path and first.cache_path.stat().st_mtime_ns == mtime
    assert second.images.keys() == first.images.keys()
    np.testing.assert_array_equal(second.images["Korean/character01"], first.images["Korean/character01"])


def test_other_image_size_gets_its_own_cache(linked_root: Callable[..., Path]) -> None:
    root = linked_root(SMALL_ZIPS[0])
    cfg = from_dict({"data": {"root": str(root), "image_size": 20, "archives": ["images_background_small1"],
                              "val_alphabets": ["Early_Aramaic"], "test_alphabets": ["Korean"]}})
    table = omniglot.load_omniglot_table(cfg.data)
    assert table.cache_path.name.startswith("omniglot-20px-") and len(table.images) == 136
    assert next(iter(table.images.values())).shape == (20, 1, 20, 20)


def test_alphabet_splits_disjoint_and_as_configured(omniglot_cfg: MakeCfg) -> None:
    cfg = omniglot_cfg(val_alphabets=["Early_Aramaic", "Greek"], test_alphabets=["Korean", "Tagalog"])
    loaded = omniglot.load_source(cfg)
    pools, md5s = loaded.splits, loaded.md5s
    assert md5s == SMALL_MD5
    alpha = {s: {n.split("/")[0] for n in p.names} for s, p in pools.items()}
    assert alpha["val"] == {"Early_Aramaic", "Greek"} and alpha["test"] == {"Korean", "Tagalog"}
    assert alpha["train"] == {"Balinese", "Japanese_(katakana)", "Latin", "Sanskrit"}
    names = {s: set(p.names) for s, p in pools.items()}
    assert not (names["train"] & names["val"]) and not (names["train"] & names["test"])
    assert not (names["val"] & names["test"])
    assert names["train"] | names["val"] | names["test"] == names["all"] and len(names["all"]) == 242


def test_rotations_only_on_train(omniglot_cfg: MakeCfg) -> None:
    pools = omniglot.load_source(omniglot_cfg(rotations=True)).splits
    assert pools["train"].rotations == 4 and pools["train"].num_classes == 4 * len(pools["train"].names) == 652
    assert all(pools[s].rotations == 1 for s in ("val", "test", "all"))
    assert pools["val"].num_classes == 22 and pools["test"].num_classes == 40 + 17
    plain = omniglot.load_source(omniglot_cfg(rotations=False)).splits
    assert plain["train"].num_classes == len(plain["train"].names) == 163


def test_unknown_alphabet_lists_known_ones(omniglot_cfg: MakeCfg) -> None:
    with pytest.raises(DataError) as e:  # the loader reports it; building a task source refuses it
        build_task_source(omniglot_cfg(test_alphabets=["Korean", "Klingon"]))
    msg = str(e.value)
    assert "data.test_alphabets" in msg and "'Klingon'" in msg and "Balinese" in msg and "Tagalog" in msg


def test_ink_is_high_on_a_dark_background(omniglot_cfg: MakeCfg) -> None:
    src = build_task_source(omniglot_cfg())
    b = src.sample("test", 0, range(4))
    x = torch.cat([b.support_x, b.query_x], 1)
    assert x.dtype == torch.float32 and float(x.min()) >= 0.0 and float(x.max()) == 1.0
    assert float(x.mean()) < 0.5  # mostly background (0), sparse strokes (1)
    corners = x[..., :2, :2]
    assert float(corners.mean()) < 0.05
    assert float((x > 0.5).float().mean()) > 0.02  # strokes exist and are bright


def test_tasks_are_deterministic_and_chunk_invariant(omniglot_cfg: MakeCfg) -> None:
    src = build_task_source(omniglot_cfg(seed=3, ways=5, shots=1, queries=5))
    a = src.sample("train", 7, range(8))
    again = src.sample("train", 7, range(8))
    parts = [src.sample("train", 7, range(0, 4)), src.sample("train", 7, range(4, 8))]
    for f in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(a, f), getattr(again, f))
        assert torch.equal(getattr(a, f), torch.cat([getattr(p, f) for p in parts]))
    one = src.sample("train", 7, [5])
    assert torch.equal(one.support_x[0], a.support_x[5])
    other_seed = build_task_source(omniglot_cfg(seed=4, ways=5, shots=1, queries=5)).sample("train", 7, range(8))
    assert not torch.equal(other_seed.support_x, a.support_x)
    assert not torch.equal(src.sample("train", 8, range(8)).support_x, a.support_x)


def test_task_labels_and_shapes(omniglot_cfg: MakeCfg) -> None:
    ways, shots, queries = 5, 2, 3
    src = build_task_source(omniglot_cfg(ways=ways, shots=shots, queries=queries))
    assert src.x_shape == (1, 28, 28) and src.ways == ways
    b = src.sample("val", 0, range(6))
    assert b.support_x.shape == (6, ways * shots, 1, 28, 28) and b.query_x.shape == (6, ways * queries, 1, 28, 28)
    for t in range(6):
        assert torch.equal(torch.bincount(b.support_y[t], minlength=ways), torch.full((ways,), shots))
        assert torch.equal(torch.bincount(b.query_y[t], minlength=ways), torch.full((ways,), queries))
        assert int(b.support_y[t].max()) == ways - 1
        # support and query of a class are different drawings of one character
        assert not any(torch.equal(s, q) for s in b.support_x[t] for q in b.query_x[t])


def test_corrupt_zip_gives_md5_error_and_no_cache(shared_data: Path, tmp_path: Path) -> None:
    (tmp_path / "omniglot").mkdir()
    good = shared_data / "omniglot" / SMALL_ZIPS[0]
    bad = tmp_path / "omniglot" / SMALL_ZIPS[0]
    shutil.copyfile(good, bad)
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    cfg = from_dict({"data": {"root": str(tmp_path), "archives": ["images_background_small1"],
                              "test_alphabets": ["Korean"]}})
    with pytest.raises(DataError) as e:
        omniglot.load_omniglot_table(cfg.data)
    msg = str(e.value)
    assert "md5" in msg and SMALL_MD5[SMALL_ZIPS[0]] in msg and str(bad) in msg
    assert sorted(p.name for p in (tmp_path / "omniglot").rglob("*")) == [SMALL_ZIPS[0]]  # no cache, no temp


def test_unreadable_zip_gives_data_error(tmp_path: Path) -> None:
    """Without a known md5 to catch it first, a broken zip is still reported as a DataError."""
    bad = tmp_path / "images_custom.zip"
    bad.write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(DataError, match="not a readable zip archive"):
        omniglot.decode_archives([bad], 28)


def test_missing_zip_without_download(tmp_path: Path) -> None:
    cfg = from_dict({"data": {"root": str(tmp_path), "download": False}})
    with pytest.raises(DataError) as e:
        omniglot.load_omniglot_table(cfg.data)
    msg = str(e.value)
    for name in SMALL_ZIPS:  # both missing archives are reported at once
        assert name in msg
        assert f"https://github.com/brendenlake/omniglot/raw/master/python/{name}" in msg
    assert str(tmp_path / "omniglot") in msg and "data.download=true" in msg
    assert not (tmp_path / "omniglot" / "cache").exists()
