"""Printed glyphs: a folder of fonts rendered as an Omniglot-like source of alphabets and characters.

Each *script* (writing system) is an alphabet, each code point that a font really draws a character, and the
fonts (weights, styles) that draw it plus small geometric jitter are its examples. Printed characters vary far
less within a class than Omniglot's 20 drawers: a different domain (printed vs handwritten), a large
pretraining source or a cross-domain target; say so wherever results on it are reported.

Fonts: every ``.ttf``/``.otf`` (and ``.ttc``/``.otc`` collection) under ``data.fonts``, searched recursively;
``""`` means ``<data root>/fonts`` (the Noto fonts in the test data, ``noto-core/``), and any folder works, e.g.
``data.fonts=/usr/share/fonts``. Identical files (same md5) count once; a file Pillow cannot open is skipped.

Which code points a font draws: its ``cmap`` table (parsed here, formats 4 and 12) maps the code point to a
glyph other than 0 (``.notdef``), and that glyph, rendered with Pillow (FreeType, basic layout: one code point,
one glyph), has ink and differs from the font's ``.notdef`` rendering (fonts map code points to empty or
box-like placeholder glyphs).

Scripts come from the Unicode block of the code point (:data:`SCRIPT_BLOCKS`, from Unicode 14.0's Blocks.txt,
blocks of one script merged; symbol, punctuation, number-system, compatibility and presentation-form blocks
belong to no script), not from font names: one font often covers several scripts (NotoSans: Latin, Greek,
Cyrillic; DejaVuSans: dozens), and a user's folder has arbitrary names. Only letters and numbers (Unicode
general category ``L*``, ``N*``) are characters: combining marks render as detached dots and strokes, and
punctuation is shared by every script. Block is an approximation of the Unicode Script property (a few
blocks mix scripts, e.g. Phonetic Extensions holds some Greek and Cyrillic letters, counted as Latin).

Size: at most ``data.glyph_chars`` characters per script (0: all), chosen by a hash of the code point, so a
script's characters do not depend on which other scripts or fonts are present; ``data.glyph_examples``
examples per character: example ``e`` is drawn with the ``e mod k``-th of the ``k`` fonts that draw it (sorted
by file name), jittered by a rotation of up to ±:data:`ROTATION_DEG` degrees, a scale in :data:`SCALE_RANGE`
and a shift of up to :data:`SHIFT_FRACTION` of the image, drawn from a generator seeded by (the font file's md5,
its face index, the code point) at row ``e div k``: fixed data, not task randomness. Each glyph is rendered at
:data:`EM_FRACTION` of a canvas ``f`` times ``data.image_size`` (``f`` = :func:`supersample`), centred on its
ink, shrunk to fit :data:`FIT_FRACTION` of the canvas when larger, then box-averaged down to the image size:
ink 255 on 0, 1 channel, like Omniglot. A class is ``Script/U+XXXX``, its domain the script.

Cache: rendering thousands of glyphs is slow, so the images are written once to
``<cache>/glyphs/glyphs-<size>px-<key>.parquet`` (an image table, :mod:`mtl_ray.data.imagetable`, written
atomically; ``<cache>`` is ``data.cache_dir``, else ``$XDG_CACHE_HOME/mtl-ray``, else ``~/.cache/mtl-ray``, never
the font folder, which may be read-only system fonts). ``<key>`` hashes every font file's name, md5 and size and
the rendering parameters; the used fonts' md5s travel as the run's data md5s.

Splits are by script, like Omniglot's by alphabet: ``data.val_scripts`` / ``data.test_scripts`` name scripts
for val / test; every other script goes to val when a hash of its name (:func:`stable_fraction`) is below
``data.script_val_fraction``, to test when it is below that plus ``data.script_test_fraction``, else to train
(set both fractions to 0 for named splits only). ``data.scripts`` restricts the source to some scripts.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import struct
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mtl_ray.config import Config, DataConfig
from mtl_ray.data.base import IMAGE_KEYS, ClassPool, LoadedSource, SourceSpec, stable_fraction
from mtl_ray.data.fetch import DataError, data_root
from mtl_ray.data.imagetable import read_image_table, write_table

FONT_SUFFIXES = (".ttf", ".otf", ".ttc", ".otc")
RENDER_VERSION = 1  # bump when the rendering below changes: old caches are then never read
ROTATION_DEG = 10.0
SCALE_RANGE = (0.85, 1.0)  # shrink only: a glyph already fitted to the canvas is never clipped by scaling
SHIFT_FRACTION = 0.08  # of the canvas, at most the free margin (a glyph is never shifted out of the image)
EM_FRACTION = 0.8  # the font size as a share of the canvas: capitals fill about half of it, like Omniglot's strokes
FIT_FRACTION = 0.92  # the largest side of a glyph, at most (tall stacks, wide ligatures are shrunk to it)
NOTDEF_PROBES = (0x10FFFF, 0x10FFFE, 0xFFFF)  # noncharacters: no font maps them, so they render .notdef

# Unicode 14.0 blocks (Blocks.txt) -> script, blocks of one script merged: "first-last:Script" in hex.
SCRIPT_BLOCKS_TEXT = """
0-2AF:Latin 370-3FF:Greek 400-52F:Cyrillic 530-58F:Armenian 590-5FF:Hebrew 600-6FF:Arabic 700-74F:Syriac
750-77F:Arabic 780-7BF:Thaana 7C0-7FF:Nko 800-83F:Samaritan 840-85F:Mandaic 860-86F:Syriac 870-8FF:Arabic
900-97F:Devanagari 980-9FF:Bengali A00-A7F:Gurmukhi A80-AFF:Gujarati B00-B7F:Oriya B80-BFF:Tamil C00-C7F:Telugu
C80-CFF:Kannada D00-D7F:Malayalam D80-DFF:Sinhala E00-E7F:Thai E80-EFF:Lao F00-FFF:Tibetan 1000-109F:Myanmar
10A0-10FF:Georgian 1100-11FF:Hangul 1200-139F:Ethiopic 13A0-13FF:Cherokee 1400-167F:Canadian_Aboriginal
1680-169F:Ogham 16A0-16FF:Runic 1700-171F:Tagalog 1720-173F:Hanunoo 1740-175F:Buhid 1760-177F:Tagbanwa
1780-17FF:Khmer 1800-18AF:Mongolian 18B0-18FF:Canadian_Aboriginal 1900-194F:Limbu 1950-197F:Tai_Le
1980-19DF:New_Tai_Lue 1A00-1A1F:Buginese 1A20-1AAF:Tai_Tham 1B00-1B7F:Balinese 1B80-1BBF:Sundanese
1BC0-1BFF:Batak 1C00-1C4F:Lepcha 1C50-1C7F:Ol_Chiki 1C80-1C8F:Cyrillic 1C90-1CBF:Georgian 1CC0-1CCF:Sundanese
1D00-1DBF:Latin 1E00-1EFF:Latin 1F00-1FFF:Greek 2C00-2C5F:Glagolitic 2C60-2C7F:Latin 2C80-2CFF:Coptic
2D00-2D2F:Georgian 2D30-2D7F:Tifinagh 2D80-2DDF:Ethiopic 2DE0-2DFF:Cyrillic 3040-309F:Hiragana
30A0-30FF:Katakana 3100-312F:Bopomofo 31A0-31BF:Bopomofo 31F0-31FF:Katakana 3400-4DBF:Han 4E00-9FFF:Han
A000-A48F:Yi A4D0-A4FF:Lisu A500-A63F:Vai A640-A69F:Cyrillic A6A0-A6FF:Bamum A720-A7FF:Latin
A800-A82F:Syloti_Nagri A840-A87F:Phags_Pa A880-A8DF:Saurashtra A8E0-A8FF:Devanagari A900-A92F:Kayah_Li
A930-A95F:Rejang A960-A97F:Hangul A980-A9DF:Javanese A9E0-A9FF:Myanmar AA00-AA5F:Cham AA60-AA7F:Myanmar
AA80-AADF:Tai_Viet AAE0-AAFF:Meetei_Mayek AB00-AB2F:Ethiopic AB30-AB6F:Latin AB70-ABBF:Cherokee
ABC0-ABFF:Meetei_Mayek AC00-D7FF:Hangul 10000-100FF:Linear_B 10280-1029F:Lycian 102A0-102DF:Carian
10300-1032F:Old_Italic 10330-1034F:Gothic 10350-1037F:Old_Permic 10380-1039F:Ugaritic 103A0-103DF:Old_Persian
10400-1044F:Deseret 10450-1047F:Shavian 10480-104AF:Osmanya 104B0-104FF:Osage 10500-1052F:Elbasan
10530-1056F:Caucasian_Albanian 10570-105BF:Vithkuqi 10600-1077F:Linear_A 10780-107BF:Latin 10800-1083F:Cypriot
10840-1085F:Imperial_Aramaic 10860-1087F:Palmyrene 10880-108AF:Nabataean 108E0-108FF:Hatran
10900-1091F:Phoenician 10920-1093F:Lydian 10980-1099F:Meroitic_Hieroglyphs 109A0-109FF:Meroitic_Cursive
10A00-10A5F:Kharoshthi 10A60-10A7F:Old_South_Arabian 10A80-10A9F:Old_North_Arabian 10AC0-10AFF:Manichaean
10B00-10B3F:Avestan 10B40-10B5F:Inscriptional_Parthian 10B60-10B7F:Inscriptional_Pahlavi
10B80-10BAF:Psalter_Pahlavi 10C00-10C4F:Old_Turkic 10C80-10CFF:Old_Hungarian 10D00-10D3F:Hanifi_Rohingya
10E80-10EBF:Yezidi 10F00-10F2F:Old_Sogdian 10F30-10F6F:Sogdian 10F70-10FAF:Old_Uyghur 10FB0-10FDF:Chorasmian
10FE0-10FFF:Elymaic 11000-1107F:Brahmi 11080-110CF:Kaithi 110D0-110FF:Sora_Sompeng 11100-1114F:Chakma
11150-1117F:Mahajani 11180-111DF:Sharada 11200-1124F:Khojki 11280-112AF:Multani 112B0-112FF:Khudawadi
11300-1137F:Grantha 11400-1147F:Newa 11480-114DF:Tirhuta 11580-115FF:Siddham 11600-1165F:Modi
11660-1167F:Mongolian 11680-116CF:Takri 11700-1174F:Ahom 11800-1184F:Dogra 118A0-118FF:Warang_Citi
11900-1195F:Dives_Akuru 119A0-119FF:Nandinagari 11A00-11A4F:Zanabazar_Square 11A50-11AAF:Soyombo
11AB0-11ABF:Canadian_Aboriginal 11AC0-11AFF:Pau_Cin_Hau 11C00-11C6F:Bhaiksuki 11C70-11CBF:Marchen
11D00-11D5F:Masaram_Gondi 11D60-11DAF:Gunjala_Gondi 11EE0-11EFF:Makasar 11FB0-11FBF:Lisu 11FC0-11FFF:Tamil
12000-123FF:Cuneiform 12480-1254F:Cuneiform 12F90-12FFF:Cypro_Minoan 13000-1342F:Egyptian_Hieroglyphs
14400-1467F:Anatolian_Hieroglyphs 16800-16A3F:Bamum 16A40-16A6F:Mro 16A70-16ACF:Tangsa 16AD0-16AFF:Bassa_Vah
16B00-16B8F:Pahawh_Hmong 16E40-16E9F:Medefaidrin 16F00-16F9F:Miao 17000-187FF:Tangut
18B00-18CFF:Khitan_Small_Script 18D00-18D7F:Tangut 1AFF0-1B16F:Kana 1B170-1B2FF:Nushu 1BC00-1BC9F:Duployan
1D800-1DAAF:SignWriting 1DF00-1DFFF:Latin 1E000-1E02F:Glagolitic 1E100-1E14F:Nyiakeng_Puachue_Hmong
1E290-1E2BF:Toto 1E2C0-1E2FF:Wancho 1E7E0-1E7FF:Ethiopic 1E800-1E8DF:Mende_Kikakui 1E900-1E95F:Adlam
20000-2EBEF:Han 30000-3134F:Han
"""


def _parse_blocks(text: str) -> tuple[list[int], list[int], list[str]]:
    starts, ends, names = [], [], []
    for item in text.split():
        span, name = item.split(":")
        a, b = (int(v, 16) for v in span.split("-"))
        starts.append(a)
        ends.append(b)
        names.append(name)
    return starts, ends, names


_STARTS, _ENDS, _SCRIPTS = _parse_blocks(SCRIPT_BLOCKS_TEXT)
SCRIPT_NAMES: frozenset[str] = frozenset(_SCRIPTS)


def script_of(cp: int) -> str | None:
    """The script of a code point that is a letter or number of a script block; None for anything else."""
    i = bisect.bisect_right(_STARTS, cp) - 1
    if i < 0 or cp > _ENDS[i]:
        return None
    if unicodedata.category(chr(cp))[0] not in "LN":
        return None
    return _SCRIPTS[i]


# --------------------------------------------------------------------------- reading font files


def _cmap_format4(c: bytes, so: int, out: dict[int, int]) -> None:
    seg = struct.unpack_from(">H", c, so + 6)[0] // 2
    ends = struct.unpack_from(f">{seg}H", c, so + 14)
    starts = struct.unpack_from(f">{seg}H", c, so + 16 + 2 * seg)
    deltas = struct.unpack_from(f">{seg}h", c, so + 16 + 4 * seg)
    roff_pos = so + 16 + 6 * seg
    roffs = struct.unpack_from(f">{seg}H", c, roff_pos)
    for k in range(seg):
        s, e, d, r = starts[k], ends[k], deltas[k], roffs[k]
        if s == 0xFFFF:
            continue
        for cp in range(s, e + 1):
            if r == 0:
                g = (cp + d) & 0xFFFF
            else:  # idRangeOffset: an index into glyphIdArray relative to this very field
                g = struct.unpack_from(">H", c, roff_pos + 2 * k + r + 2 * (cp - s))[0]
                g = (g + d) & 0xFFFF if g else 0
            if g:
                out[cp] = g


def _cmap_format12(c: bytes, so: int, out: dict[int, int]) -> None:
    groups = struct.unpack_from(">I", c, so + 12)[0]
    for k in range(groups):
        s, e, g0 = struct.unpack_from(">III", c, so + 16 + 12 * k)
        for cp in range(s, min(e, 0x10FFFF) + 1):
            if g0 + cp - s:
                out[cp] = g0 + cp - s


def parse_cmap(data: bytes, offset: int = 0) -> dict[int, int]:
    """``{code point: glyph id}`` of the sfnt font whose table directory starts at ``offset`` (glyph 0, .notdef,
    left out). Reads the Unicode subtables (platform 0, or 3 with encoding 1 or 10) of formats 4 and 12, the
    ones every Unicode font has. Raises ``ValueError`` (or ``struct.error``) for a malformed font."""
    num = struct.unpack_from(">H", data, offset + 4)[0]
    tables = {}
    for i in range(num):
        tag, _sum, off, length = struct.unpack_from(">4sIII", data, offset + 12 + 16 * i)
        tables[tag] = (off, length)
    if b"cmap" not in tables:
        raise ValueError("no cmap table")
    off, length = tables[b"cmap"]
    c = data[off:off + length]
    out: dict[int, int] = {}
    for i in range(struct.unpack_from(">H", c, 2)[0]):
        pid, eid, so = struct.unpack_from(">HHI", c, 4 + 8 * i)
        if not (pid == 0 or (pid == 3 and eid in (1, 10))):
            continue
        fmt = struct.unpack_from(">H", c, so)[0]
        if fmt == 4:
            _cmap_format4(c, so, out)
        elif fmt == 12:
            _cmap_format12(c, so, out)
    return out


def face_offsets(data: bytes) -> list[int]:
    """Table-directory offsets of the faces in a font file: one for .ttf/.otf, each face of a .ttc/.otc."""
    if data[:4] == b"ttcf":
        n = struct.unpack_from(">I", data, 8)[0]
        return list(struct.unpack_from(f">{n}I", data, 12))
    return [0]


@dataclass(frozen=True)
class FontFace:
    """One face of a font file: ``name`` is its path under the font folder (``#i`` for face ``i`` of a
    collection), ``md5``/``size`` of the file, ``cmap`` the code points it maps (to a glyph other than 0)."""

    path: str
    index: int
    name: str
    md5: str
    size: int
    cmap: frozenset[int]


@lru_cache(maxsize=4096)
def _file_md5(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@lru_cache(maxsize=4096)
def _file_cmaps(path: str, size: int, mtime_ns: int) -> tuple[frozenset[int], ...] | None:
    """The cmap of each face of a font file; None when it is no font this parser reads."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        return tuple(frozenset(parse_cmap(data, off)) for off in face_offsets(data))
    except (OSError, ValueError, struct.error, IndexError):
        return None


class FontFile(NamedTuple):
    path: Path
    name: str  # path relative to the font folder
    md5: str
    size: int


def fonts_dir(data: DataConfig) -> Path:
    """``data.fonts`` (relative paths: as given when that exists, else under the data root), or
    ``<data root>/fonts``."""
    if not data.fonts:
        return data_root(data.root) / "fonts"
    p = Path(data.fonts).expanduser()
    if p.is_absolute() or p.exists():
        return p
    under = data_root(data.root) / p
    return under if under.exists() else p


def cache_dir(data: DataConfig) -> Path:
    """Where rendered and decoded tables are cached: ``data.cache_dir``, else ``$XDG_CACHE_HOME/mtl-ray``, else
    ``~/.cache/mtl-ray``."""
    if data.cache_dir:
        return Path(data.cache_dir).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mtl-ray"


def font_files(data: DataConfig) -> list[FontFile]:
    """The font files under the font folder, sorted by relative path, one per md5 (the first)."""
    folder = fonts_dir(data)
    if not folder.is_dir():
        raise DataError(f"data.fonts: {str(folder)!r} is not a folder; expected a folder of .ttf/.otf fonts "
                        "(searched recursively), e.g. the Noto fonts at <data.root>/fonts, or set "
                        "data.fonts=/usr/share/fonts")
    found: list[FontFile] = []
    seen: set[str] = set()
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in FONT_SUFFIXES and p.is_file())
    for p in paths:
        st = p.stat()
        md5 = _file_md5(str(p), st.st_size, st.st_mtime_ns)
        if md5 in seen:
            continue
        seen.add(md5)
        found.append(FontFile(p, p.relative_to(folder).as_posix(), md5, st.st_size))
    if not found:
        raise DataError(f"data.fonts: no {'/'.join(FONT_SUFFIXES)} files under {str(folder)!r}; expected a folder "
                        "of fonts, e.g. data.fonts=/usr/share/fonts")
    return found


def font_faces(files: Sequence[FontFile]) -> list[FontFace]:
    """Every face of ``files`` whose cmap this module reads (others are skipped)."""
    faces: list[FontFace] = []
    for f in files:
        st = f.path.stat()
        cmaps = _file_cmaps(str(f.path), st.st_size, st.st_mtime_ns)
        for i, cmap in enumerate(cmaps or ()):
            name = f.name if len(cmaps or ()) == 1 else f"{f.name}#{i}"
            faces.append(FontFace(str(f.path), i, name, f.md5, f.size, cmap))
    return faces


def candidates(faces: Sequence[FontFace], scripts: Sequence[str] = ()) -> dict[str, dict[int, list[FontFace]]]:
    """``{script: {code point: faces mapping it}}`` for letters and numbers of script blocks (``scripts``: only
    those; empty: all). Faces of a code point are sorted by file name (not path), then face index and md5."""
    keep = set(scripts)
    out: dict[str, dict[int, list[FontFace]]] = {}
    script_cache: dict[int, str | None] = {}
    for face in faces:
        for cp in face.cmap:
            if cp not in script_cache:
                script_cache[cp] = script_of(cp)
            s = script_cache[cp]
            if s is None or (keep and s not in keep):
                continue
            out.setdefault(s, {}).setdefault(cp, []).append(face)
    for chars in out.values():
        for fs in chars.values():
            fs.sort(key=lambda f: (Path(f.name).name, f.index, f.md5))
    return out


# --------------------------------------------------------------------------- rendering


def supersample(image_size: int) -> int:
    """The canvas is this many times ``image_size`` (box-averaged down after rendering), about 56 px: FreeType's
    anti-aliasing at twice the 28 px size, for 110 µs per example against 179 µs at 112 px (docs/benchmarks.md)."""
    return max(1, round(56 / image_size))


def render_glyph(font: ImageFont.FreeTypeFont, cp: int) -> np.ndarray | None:
    """The ink of one code point, cropped to it: ``[h, w]`` uint8 (ink 255); None when it draws nothing."""
    ch = chr(cp)
    box = font.getbbox(ch)
    left, top, right, bottom = math.floor(box[0]), math.floor(box[1]), math.ceil(box[2]), math.ceil(box[3])
    if right <= left or bottom <= top:
        return None
    pad = 2  # anti-aliased edges may reach a pixel past the box
    im = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    ImageDraw.Draw(im).text((pad - left, pad - top), ch, font=font, fill=255)
    a = np.asarray(im)
    rows, cols = np.flatnonzero(a.any(axis=1)), np.flatnonzero(a.any(axis=0))
    if rows.size == 0:
        return None
    return np.ascontiguousarray(a[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])


def open_font(face: FontFace, px: int) -> ImageFont.FreeTypeFont | None:
    """The face at ``px`` pixels per em with basic layout (no shaping: one code point, one glyph); None when
    FreeType cannot open it."""
    try:
        return ImageFont.truetype(face.path, size=px, index=face.index, layout_engine=ImageFont.Layout.BASIC)
    except OSError:
        return None


def notdef_glyph(font: ImageFont.FreeTypeFont, face: FontFace) -> np.ndarray | None:
    """What the face draws for a code point it does not map (its .notdef glyph), or None when that is empty."""
    probe = next((cp for cp in NOTDEF_PROBES if cp not in face.cmap), None)
    return None if probe is None else render_glyph(font, probe)


def draws(glyph: np.ndarray | None, notdef: np.ndarray | None) -> bool:
    """Whether a rendered glyph is a real character: it has ink and is not the .notdef placeholder."""
    if glyph is None:
        return False
    return notdef is None or glyph.shape != notdef.shape or not np.array_equal(glyph, notdef)


def jitter_rows(face: FontFace, cp: int, rows: int) -> np.ndarray:
    """``[rows, 4]`` uniforms in [0, 1) (rotation, scale, shift x, shift y) for the examples of ``cp`` drawn with
    ``face``: a pure function of the font file's md5, the face and the code point."""
    seed = np.random.SeedSequence([int(face.md5[:16], 16), face.index, cp])
    return np.random.default_rng(seed).random((rows, 4))


def place(glyph: Image.Image, canvas: int, factor: int, jitter: np.ndarray) -> Image.Image:
    """Centre ``glyph`` (an 'L' image of its ink) on a ``canvas``-px square, rotated, scaled and shifted by
    ``jitter`` (4 uniforms), then box-average it down by ``factor``: a ``canvas // factor`` px 'L' image."""
    w, h = glyph.size
    u_rot, u_scale, u_x, u_y = (float(v) for v in jitter)
    fit = min(1.0, FIT_FRACTION * canvas / max(h, w))
    scale = fit * (SCALE_RANGE[0] + u_scale * (SCALE_RANGE[1] - SCALE_RANGE[0]))
    margin = max(0.0, (FIT_FRACTION * canvas - scale * max(h, w)) / 2)
    limit = min(SHIFT_FRACTION * canvas, margin)
    cx, cy = canvas / 2 + (2 * u_x - 1) * limit, canvas / 2 + (2 * u_y - 1) * limit
    ang = math.radians((2 * u_rot - 1) * ROTATION_DEG)
    cos, sin = math.cos(ang) / scale, math.sin(ang) / scale
    # PIL's affine maps each output pixel (x, y) to the input (a x + b y + c, d x + e y + f): the inverse of
    # "scale, rotate about the glyph's centre, move it to (cx, cy)"
    coeffs = (cos, sin, w / 2 - cos * cx - sin * cy, -sin, cos, h / 2 + sin * cx - cos * cy)
    out = glyph.transform((canvas, canvas), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR,
                          fillcolor=0)
    return out.reduce(factor) if factor > 1 else out


class Character(NamedTuple):
    script: str
    cp: int
    faces: list[FontFace]
    glyphs: list[np.ndarray]  # the ink of cp in each face, in the order of ``faces``


def rank(cp: int) -> float:
    """Which characters of a script are kept when it has more than ``data.glyph_chars``: lowest rank first."""
    return stable_fraction(f"U+{cp:04X}")


def select_characters(data: DataConfig, faces: Sequence[FontFace]) -> list[Character]:
    """The characters to render: per script, code points in :func:`rank` order whose faces draw them (faces that
    draw nothing or .notdef are dropped), up to ``data.glyph_chars`` per script."""
    cand = candidates(faces, data.scripts)
    px = round(EM_FRACTION * supersample(data.image_size) * data.image_size)
    fonts: dict[FontFace, tuple[ImageFont.FreeTypeFont, np.ndarray | None] | None] = {}

    def font_of(face: FontFace) -> tuple[ImageFont.FreeTypeFont, np.ndarray | None] | None:
        if face not in fonts:
            font = open_font(face, px)
            fonts[face] = None if font is None else (font, notdef_glyph(font, face))
        return fonts[face]

    chosen: list[Character] = []
    for script in sorted(cand):
        kept = 0
        for cp in sorted(cand[script], key=lambda c: (rank(c), c)):
            if data.glyph_chars and kept >= data.glyph_chars:
                break
            good: list[FontFace] = []
            glyphs: list[np.ndarray] = []
            for face in cand[script][cp]:
                opened = font_of(face)
                if opened is None:
                    continue
                g = render_glyph(opened[0], cp)
                if g is not None and draws(g, opened[1]):
                    good.append(face)
                    glyphs.append(g)
            if good:
                chosen.append(Character(script, cp, good, glyphs))
                kept += 1
    return chosen


def render_examples(ch: Character, image_size: int, examples: int) -> np.ndarray:
    """``[examples, 1, S, S]`` uint8: example ``e`` in face ``e mod k``, jitter row ``e div k``."""
    factor = supersample(image_size)
    k = len(ch.faces)
    rows = math.ceil(examples / k)
    jit = [jitter_rows(f, ch.cp, rows) for f in ch.faces]
    ink = [Image.fromarray(g) for g in ch.glyphs]
    # one strip of all examples, converted to numpy once: a conversion per 28 px image costs more than rendering it
    strip = Image.new("L", (image_size, image_size * examples), 0)
    for e in range(examples):
        i, r = e % k, e // k
        strip.paste(place(ink[i], factor * image_size, factor, jit[i][r]), (0, e * image_size))
    return np.asarray(strip).reshape(examples, 1, image_size, image_size)


def label_of(script: str, cp: int) -> str:
    return f"{script}/U+{cp:04X}"


# --------------------------------------------------------------------------- the cached table


class GlyphTable(NamedTuple):
    """Rendered glyphs: ``images[label] -> [glyph_examples, 1, S, S]`` uint8 (ink 255), ``domains[label]`` the
    script, ``md5s`` ``{font file: md5}`` of the fonts that drew something, ``cache_path`` the table read."""

    images: dict[str, np.ndarray]
    domains: dict[str, str]
    md5s: dict[str, str]
    cache_path: Path


def cache_key(data: DataConfig, files: Sequence[FontFile]) -> str:
    """A hash of the fonts (names, md5s, sizes) and every parameter the rendering reads."""
    spec = {"version": RENDER_VERSION, "image_size": data.image_size, "chars": data.glyph_chars,
            "examples": data.glyph_examples, "scripts": sorted(set(data.scripts)),
            "fonts": [[f.name, f.md5, f.size] for f in files]}
    return hashlib.md5(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(data: DataConfig, files: Sequence[FontFile]) -> Path:
    return cache_dir(data) / "glyphs" / f"glyphs-{data.image_size}px-{cache_key(data, files)}.parquet"


@lru_cache(maxsize=8)
def _read_cache(path: str, mtime_ns: int, size: int, image_size: int) -> tuple[
        dict[str, np.ndarray], dict[str, str], dict[str, str]]:
    table = read_image_table(path, image_size)
    return table.images, table.domains, table.source_md5


def render_table(data: DataConfig, files: Sequence[FontFile]) -> tuple[list[str], list[str], np.ndarray,
                                                                        dict[str, str]]:
    """``(labels, scripts, images [N, 1, S, S], {font file: md5})`` for every example, by label."""
    chars = select_characters(data, font_faces(files))
    if not chars:
        among = f" of data.scripts {list(data.scripts)}" if data.scripts else ""
        raise DataError(f"data.fonts: no font under {str(fonts_dir(data))!r} draws a letter or number{among}; "
                        "expected fonts that cover a writing system (e.g. the Noto fonts, or /usr/share/fonts)")
    chars.sort(key=lambda c: label_of(c.script, c.cp))
    labels: list[str] = []
    scripts: list[str] = []
    blocks: list[np.ndarray] = []
    used: dict[str, str] = {}
    for ch in chars:
        blocks.append(render_examples(ch, data.image_size, data.glyph_examples))
        labels += [label_of(ch.script, ch.cp)] * data.glyph_examples
        scripts += [ch.script] * data.glyph_examples
        used.update({f.name: f.md5 for f in ch.faces[:data.glyph_examples]})  # a face beyond the examples draws none
    return labels, scripts, np.concatenate(blocks), dict(sorted(used.items()))


def load_glyph_table(data: DataConfig) -> GlyphTable:
    """The rendered glyphs for ``data`` (rendered and cached on first use; later loads read the cache and only
    md5 the font files)."""
    files = font_files(data)
    cache = cache_path(data, files)
    if cache.is_file():
        st = cache.stat()
        try:
            images, domains, md5s = _read_cache(str(cache), st.st_mtime_ns, st.st_size, data.image_size)
            return GlyphTable(images, domains, md5s, cache)
        except DataError:
            pass  # damaged: render again, written atomically over it
    labels, scripts, x, used = render_table(data, files)
    write_table(cache, labels, x, domains=scripts, source_md5=used)
    st = cache.stat()
    images, domains, md5s = _read_cache(str(cache), st.st_mtime_ns, st.st_size, data.image_size)
    return GlyphTable(images, domains, md5s, cache)


# --------------------------------------------------------------------------- splits and the source


def scripts_of(domains: dict[str, str]) -> list[str]:
    return sorted(set(domains.values()))


def split_scripts(data: DataConfig, scripts: Sequence[str]) -> dict[str, list[str]]:
    """``{split: scripts}`` for train/val/test/all: named scripts first, the others by a hash of their name."""
    named_val, named_test = set(data.val_scripts), set(data.test_scripts)
    out: dict[str, list[str]] = {"train": [], "val": [], "test": [], "all": list(scripts)}
    for s in scripts:
        f = stable_fraction(f"script:{s}")
        if s in named_val:
            out["val"].append(s)
        elif s in named_test:
            out["test"].append(s)
        elif f < data.script_val_fraction:
            out["val"].append(s)
        elif f < data.script_val_fraction + data.script_test_fraction:
            out["test"].append(s)
        else:
            out["train"].append(s)
    return out


def script_problems(data: DataConfig, present: Sequence[str]) -> list[str]:
    """Names in ``data.scripts`` / ``data.val_scripts`` / ``data.test_scripts`` that the fonts do not draw."""
    problems: list[str] = []
    known = set(present)
    for field in ("scripts", "val_scripts", "test_scripts"):
        unknown = [s for s in getattr(data, field) if s not in known]
        if unknown:
            where = f"the fonts under {str(fonts_dir(data))!r}"
            if field != "scripts" and data.scripts:
                where += f" within data.scripts={list(data.scripts)}"
            problems.append(f"data.{field}: got unknown script(s) {unknown}, expected scripts drawn by {where}: "
                            f"{', '.join(sorted(known)) or 'none'}")
    return problems


def load_source(cfg: Config) -> LoadedSource:
    """The glyphs' classes per split; script names the fonts do not draw come back as ``problems``."""
    d = cfg.data
    table = load_glyph_table(d)
    present = scripts_of(table.domains)
    by_split = split_scripts(d, present)
    pools: dict[str, ClassPool] = {}
    for split, scripts in by_split.items():
        keep = set(scripts)
        names = tuple(lab for lab in table.images if table.domains[lab] in keep)
        pools[split] = ClassPool(names=names, images=tuple(table.images[n] for n in names))

    def describe(split: str) -> str:
        return (f"characters in the {split!r} split of glyphs: {len(by_split[split])} scripts "
                f"({', '.join(by_split[split][:8]) or 'none'}{', ...' if len(by_split[split]) > 8 else ''})")

    def fix(split: str) -> str:
        if split == "train":
            return ("lower data.ways, or move scripts out of val/test (data.val_scripts, data.test_scripts, "
                    "data.script_val_fraction, data.script_test_fraction)")
        return (f"lower data.ways, or put scripts into that split (data.{split}_scripts, "
                f"data.script_{split}_fraction) or point data.fonts at more fonts")

    return LoadedSource(pools, dict(table.md5s), "glyphs", describe, fix, script_problems(d, present))


def check_config(data: DataConfig) -> list[str]:
    """The static checks of the glyph fields."""
    p: list[str] = []
    if data.glyph_examples < 1:
        p.append(f"data.glyph_examples: got {data.glyph_examples}, expected >= 1 (examples rendered per character)")
    if data.glyph_chars < 0:
        p.append(f"data.glyph_chars: got {data.glyph_chars}, expected >= 0 (characters per script; 0: all)")
    for name in ("script_val_fraction", "script_test_fraction"):
        v = getattr(data, name)
        if not 0.0 <= v < 1.0:
            p.append(f"data.{name}: got {v}, expected a fraction in [0, 1)")
    if data.script_val_fraction + data.script_test_fraction >= 1.0:
        p.append(f"data.script_val_fraction + data.script_test_fraction: got "
                 f"{data.script_val_fraction + data.script_test_fraction}, expected < 1 so some scripts train")
    both = sorted(set(data.val_scripts) & set(data.test_scripts))
    if both:
        p.append(f"data.val_scripts and data.test_scripts share {both}; a script may be in one split only")
    unknown = sorted(s for s in {*data.scripts, *data.val_scripts, *data.test_scripts} if s not in SCRIPT_NAMES)
    if unknown:
        p.append(f"data.scripts/val_scripts/test_scripts: got {unknown}, expected names of Unicode scripts as this "
                 f"source spells them (e.g. Latin, Georgian, Old_Italic): {', '.join(sorted(SCRIPT_NAMES))}")
    return p


def clear_cache() -> None:
    """Forget tables read in this process (the on-disk cache stays)."""
    _read_cache.cache_clear()


def count_images(cfg: Config) -> int:
    """Images of the cached table for ``cfg`` when it exists (its Parquet footer); else an upper bound when
    ``data.scripts`` and ``data.glyph_chars`` bound it; else 0 (unknown)."""
    import pyarrow.parquet as pq

    d = cfg.data
    try:
        path = cache_path(d, font_files(d))
        if path.is_file():
            return int(pq.read_metadata(path).num_rows)
    except (DataError, OSError, ValueError):
        return 0
    if d.scripts and d.glyph_chars:
        return len(set(d.scripts)) * d.glyph_chars * d.glyph_examples
    return 0


SOURCE = SourceSpec(kind="classification", images=True, load=load_source, check=check_config, clear_cache=clear_cache,
                    count_images=count_images,
                    config_keys=IMAGE_KEYS | {"root", "fonts", "cache_dir", "scripts", "val_scripts", "test_scripts",
                                              "script_val_fraction", "script_test_fraction", "glyph_chars",
                                              "glyph_examples"})
