"""glyphs: printed characters rendered from the shared Noto fonts (and from a user's folder of fonts)."""

from __future__ import annotations

import dataclasses
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mtl_ray.components import from_dict
from mtl_ray.config import Config, ConfigError
from mtl_ray.data import build_task_source, check_data, glyphs
from mtl_ray.data.fetch import DataError, md5sum

GEORGIAN = "NotoSansGeorgian-Regular.ttf"
ARMENIAN = "NotoSansArmenian-Regular.ttf"


def _cfg(fonts: Path, cache: Path, **data: Any) -> Config:
    return from_dict({"data": {"source": "glyphs", "fonts": str(fonts), "cache_dir": str(cache), **data}})


def _face(path: Path) -> glyphs.FontFace:
    (face,) = glyphs.font_faces([glyphs.FontFile(path, path.name, md5sum(path), path.stat().st_size)])
    return face


def test_a_font_draws_the_code_points_of_its_cmap_and_nothing_else(fonts_dir: Path) -> None:
    face = _face(fonts_dir / "noto-core" / GEORGIAN)
    assert 0x10D0 in face.cmap and ord("A") not in face.cmap and ord(" ") in face.cmap
    font = glyphs.open_font(face, 45)
    assert font is not None
    notdef = glyphs.notdef_glyph(font, face)
    assert notdef is not None and notdef.max() == 255  # Noto's .notdef is a visible box: ink alone proves nothing
    an = glyphs.render_glyph(font, 0x10D0)  # GEORGIAN LETTER AN, inside its coverage
    assert glyphs.draws(an, notdef) and an is not None and an.max() == 255
    latin_a = glyphs.render_glyph(font, ord("A"))  # outside its coverage: FreeType draws .notdef
    assert latin_a is not None and not glyphs.draws(latin_a, notdef)
    assert glyphs.render_glyph(font, ord(" ")) is None  # mapped, but an empty glyph
    assert not glyphs.draws(None, notdef)


def test_selection_drops_a_code_point_the_font_maps_but_draws_as_notdef(fonts_dir: Path, tmp_path: Path) -> None:
    face = _face(fonts_dir / "noto-core" / GEORGIAN)
    liar = dataclasses.replace(face, cmap=face.cmap | {ord("A"), ord("B")})  # a cmap that claims Latin letters
    d = _cfg(fonts_dir, tmp_path, scripts=["Latin", "Georgian"], glyph_chars=0).data
    chars = glyphs.select_characters(d, [liar])
    assert {c.script for c in chars} == {"Georgian"}
    assert all(glyphs.script_of(c.cp) == "Georgian" and c.cp in face.cmap for c in chars)
    assert len(chars) == sum(1 for cp in face.cmap if glyphs.script_of(cp) == "Georgian")  # glyph_chars=0: all


def test_scripts_come_from_unicode_blocks_letters_and_numbers_only() -> None:
    assert glyphs.script_of(ord("A")) == "Latin" and glyphs.script_of(0x00E9) == "Latin"  # é, Latin-1 Supplement
    assert glyphs.script_of(0x10D0) == "Georgian" and glyphs.script_of(0x1C90) == "Georgian"  # Georgian Extended
    assert glyphs.script_of(0x0531) == "Armenian" and glyphs.script_of(0x13000) == "Egyptian_Hieroglyphs"
    assert glyphs.script_of(0x4E00) == "Han" and glyphs.script_of(0x0966) == "Devanagari"  # a Devanagari digit
    for cp in (ord("."), ord(" "), 0x0301, 0x0902, 0x2190, 0x1D400, 0xE000, 0x10FFFF):
        assert glyphs.script_of(cp) is None, hex(cp)  # punctuation, marks, arrows, math letters, private use


def test_the_default_table_of_the_noto_fonts(fonts_dir: Path, glyph_cache: Path) -> None:
    d = _cfg(fonts_dir, glyph_cache).data
    table = glyphs.load_glyph_table(d)
    assert table.cache_path.parent == glyph_cache / "glyphs" and table.cache_path.name.startswith("glyphs-28px-")
    scripts = glyphs.scripts_of(table.domains)
    assert len(scripts) > 100 and {"Latin", "Greek", "Georgian", "Runic", "Cherokee", "Tifinagh"} <= set(scripts)
    per_script = {s: sum(1 for v in table.domains.values() if v == s) for s in scripts}
    assert max(per_script.values()) == 40 and per_script["Latin"] == 40  # data.glyph_chars caps every script
    for label, x in table.images.items():
        script, _, code = label.partition("/U+")
        assert table.domains[label] == script == glyphs.script_of(int(code, 16))
        assert x.shape == (20, 1, 28, 28) and x.dtype == np.uint8
    files = {f.name: f for f in glyphs.font_files(d)}
    assert table.md5s and all(md5 == files[name].md5 for name, md5 in table.md5s.items())
    assert not list(fonts_dir.rglob("*.parquet"))  # nothing written beside the fonts
    x = np.stack(list(table.images.values()))
    assert x[..., 0, :].mean() < 1.0 and x[..., :, 0].mean() < 1.0  # ink high on a dark background, in the frame
    peak = x.reshape(len(x), 20, -1).max(-1)
    assert peak.min() > 96 and (peak == 255).mean() > 0.8  # every example holds ink (thin strokes stay grey at 28 px)


def test_script_splits_are_disjoint_named_ones_first(fonts_dir: Path, glyph_cache: Path) -> None:
    pools = glyphs.load_source(_cfg(fonts_dir, glyph_cache)).splits
    by_split = {s: {n.split("/")[0] for n in pools[s].names} for s in ("train", "val", "test")}
    assert all(by_split.values())
    assert not (by_split["train"] & by_split["val"] or by_split["train"] & by_split["test"]
                or by_split["val"] & by_split["test"])
    assert set(pools["all"].names) == set(pools["train"].names) | set(pools["val"].names) | set(pools["test"].names)
    named = glyphs.load_source(_cfg(fonts_dir, glyph_cache, val_scripts=["Georgian"], test_scripts=["Runic", "Latin"],
                                    script_val_fraction=0.0, script_test_fraction=0.0))
    assert not named.problems
    assert {n.split("/")[0] for n in named.splits["val"].names} == {"Georgian"}
    assert {n.split("/")[0] for n in named.splits["test"].names} == {"Latin", "Runic"}
    assert len(named.splits["train"].names) == len(pools["all"].names) - len(named.splits["val"].names) - len(
        named.splits["test"].names)


def test_images_are_the_same_rendered_twice_and_whatever_else_is_loaded(fonts_dir: Path, glyph_cache: Path,
                                                                         tmp_path: Path) -> None:
    alone = _cfg(fonts_dir, tmp_path, scripts=["Georgian"]).data
    files = glyphs.font_files(alone)
    labels, _, x1, _ = glyphs.render_table(alone, files)
    _, _, x2, _ = glyphs.render_table(alone, files)
    assert np.array_equal(x1, x2)
    everything = glyphs.load_glyph_table(_cfg(fonts_dir, glyph_cache).data).images  # 143 scripts, cached
    mine = {lab: x1[i:i + 20] for i, lab in enumerate(labels) if i % 20 == 0}
    assert mine and all(np.array_equal(everything[lab], x) for lab, x in mine.items())
    assert not np.array_equal(x1[0], x1[1])  # the examples differ (jitter, fonts)


def test_a_user_folder_of_two_fonts(fonts_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = tmp_path / "my fonts" / "sub"
    mine.mkdir(parents=True)
    for name in (GEORGIAN, ARMENIAN):
        os.symlink(fonts_dir / "noto-core" / name, mine / name)
    (mine / "README.txt").write_text("not a font")
    cfg = _cfg(tmp_path / "my fonts", tmp_path / "cache")
    loaded = glyphs.load_source(cfg)
    assert sorted({n.split("/")[0] for n in loaded.splits["all"].names}) == ["Armenian", "Georgian"]
    assert loaded.md5s == {f"sub/{n}": md5sum(fonts_dir / "noto-core" / n) for n in (ARMENIAN, GEORGIAN)}
    assert all(x.shape == (20, 1, 28, 28) for x in loaded.splits["all"].images)
    (cache,) = (tmp_path / "cache" / "glyphs").iterdir()
    assert pq.read_metadata(cache).num_rows == 20 * len(loaded.splits["all"].names) == glyphs.count_images(cfg)

    def no_render(*a: object, **k: object) -> None:
        raise AssertionError("rendered again although the cache exists")

    glyphs.clear_cache()
    monkeypatch.setattr(glyphs, "render_table", no_render)
    again = glyphs.load_source(cfg)
    assert all(np.array_equal(a, b) for a, b in zip(again.splits["all"].images, loaded.splits["all"].images,
                                                    strict=True))
    monkeypatch.undo()
    other = glyphs.load_glyph_table(_cfg(tmp_path / "my fonts", tmp_path / "cache", image_size=32).data)
    assert other.cache_path != cache and next(iter(other.images.values())).shape == (20, 1, 32, 32)


def _collection(paths: list[Path]) -> bytes:
    """A .ttc of whole font files: its header, then each file with its table offsets moved by where it starts."""
    header = 12 + 4 * len(paths)
    blobs, offsets, at = [], [], header
    for p in paths:
        data = bytearray(p.read_bytes())
        for i in range(struct.unpack_from(">H", data, 4)[0]):
            pos = 12 + 16 * i + 8
            struct.pack_into(">I", data, pos, struct.unpack_from(">I", data, pos)[0] + at)
        blobs.append(bytes(data))
        offsets.append(at)
        at += len(data)
    return struct.pack(f">4sII{len(paths)}I", b"ttcf", 0x00010000, len(paths), *offsets) + b"".join(blobs)


def test_a_font_collection_gives_each_face(fonts_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ttc"
    folder.mkdir()
    (folder / "two.ttc").write_bytes(_collection([fonts_dir / "noto-core" / n for n in (GEORGIAN, ARMENIAN)]))
    files = glyphs.font_files(_cfg(folder, tmp_path).data)
    faces = glyphs.font_faces(files)
    assert [(f.name, f.index) for f in faces] == [("two.ttc#0", 0), ("two.ttc#1", 1)]
    assert 0x10D0 in faces[0].cmap and 0x0531 in faces[1].cmap and 0x0531 not in faces[0].cmap
    table = glyphs.load_glyph_table(_cfg(folder, tmp_path).data)
    assert set(table.domains.values()) == {"Armenian", "Georgian"} and set(table.md5s) == {"two.ttc#0", "two.ttc#1"}


def test_tasks_of_held_out_scripts(fonts_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(fonts_dir, tmp_path, scripts=["Georgian", "Armenian", "Runic", "Cherokee"], val_scripts=["Runic"],
               test_scripts=["Cherokee"], script_val_fraction=0.0, script_test_fraction=0.0, queries=5)
    assert check_data(cfg, ["train", "val", "test"]) == []
    src = build_task_source(cfg)
    b = src.sample("test", 0, range(3))
    assert b.support_x.shape == (3, 5, 1, 28, 28) and b.query_x.shape == (3, 25, 1, 28, 28)
    assert torch.equal(b.query_x, build_task_source(cfg).sample("test", 0, range(3)).query_x)
    assert src.md5s.keys() >= {"noto-core/NotoSansCherokee-Regular.ttf", "noto-core/NotoSansRunic-Regular.ttf"}


def test_unknown_scripts_list_the_known_ones(fonts_dir: Path, tmp_path: Path) -> None:
    problems = check_data(_cfg(fonts_dir, tmp_path, scripts=["Georgian", "Armenian"], val_scripts=["Runic"],
                               script_val_fraction=0.0, script_test_fraction=0.0), ["train"])
    assert len(problems) == 1 and "data.val_scripts: got unknown script(s) ['Runic']" in problems[0]
    assert "within data.scripts=['Georgian', 'Armenian']: Armenian, Georgian" in problems[0]
    with pytest.raises(ConfigError) as e:
        _cfg(fonts_dir, tmp_path, val_scripts=["Latin", "Klingon"], test_scripts=["Latin"], glyph_examples=0)
    text = str(e.value)
    assert "share ['Latin']" in text and "got ['Klingon']" in text and "data.glyph_examples: got 0" in text


def test_a_missing_or_empty_font_folder_says_what_to_set(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=re.escape("is not a folder; expected a folder of .ttf/.otf fonts")):
        glyphs.load_glyph_table(_cfg(tmp_path / "nowhere", tmp_path).data)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=re.escape("no .ttf/.otf/.ttc/.otc files under")):
        glyphs.load_glyph_table(_cfg(tmp_path / "empty", tmp_path).data)
    assert "is not a folder" in check_data(_cfg(tmp_path / "nowhere", tmp_path))[0]


def test_fonts_default_to_the_data_root(fonts_dir: Path, tmp_path: Path) -> None:
    cfg = from_dict({"data": {"source": "glyphs", "root": str(fonts_dir.parent), "cache_dir": str(tmp_path)}})
    assert glyphs.fonts_dir(cfg.data) == fonts_dir
    assert glyphs.cache_dir(cfg.data) == tmp_path


def test_relative_font_and_cache_folders_travel_as_absolute_paths(fonts_dir: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from mtl_ray.config import with_absolute_paths

    os.symlink(fonts_dir, tmp_path / "fonts")
    monkeypatch.chdir(tmp_path)
    cfg = with_absolute_paths(from_dict({"data": {"source": "glyphs", "fonts": "fonts", "cache_dir": "cache"}}))
    assert cfg.data.fonts == str(tmp_path / "fonts") and cfg.data.cache_dir == str(tmp_path / "cache")
