"""Every config key with its value, default, type and one-line doc: what ``mtl-ray config show`` prints.

The docs are the comments beside each field in :mod:`mtl_ray.config` (on the field's line, or the comment
lines just above it), read from that module's source so they cannot drift from the code; a section's
docstring heads its block. A test checks that every field has one.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import tokenize
import typing
from dataclasses import dataclass
from typing import Any

from mtl_ray import config as C


@dataclass(frozen=True)
class Key:
    """One config key: ``name`` ("optim.outer_lr"), its ``value`` here, ``default``, ``type`` and ``doc``."""

    name: str
    value: Any
    default: Any
    type: str
    doc: str


def _field_docs(cls: type) -> dict[str, str]:
    """Field name -> the comment on its line, else the comment lines right above it (joined)."""
    src = inspect.getsource(cls)
    docs: dict[str, str] = {}
    above: list[str] = []
    line_comment: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            line_comment[tok.start[0]] = tok.string.lstrip("#").strip()
    names = {f.name for f in dataclasses.fields(cls)}
    for i, line in enumerate(src.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(line_comment.get(i, ""))
            continue
        name = stripped.split(":", 1)[0].strip()
        if name in names and ":" in stripped:
            docs[name] = line_comment.get(i) or " ".join(above)
        above = []
    return docs


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) if isinstance(tp, type) else str(tp).replace("typing.", "")  # type: ignore[return-value]


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def keys(cfg: C.Config | None = None) -> list[Key]:
    """Every leaf key of ``cfg`` (default: the defaults), in the order of :class:`mtl_ray.config.Config`."""
    cfg = cfg or C.Config()
    default = C.Config()
    out: list[Key] = []
    top_hints = typing.get_type_hints(C.Config)
    top_docs = _field_docs(C.Config)
    for f in dataclasses.fields(C.Config):
        section = top_hints[f.name]
        if isinstance(section, type) and dataclasses.is_dataclass(section):
            hints, docs = typing.get_type_hints(section), _field_docs(section)
            for sf in dataclasses.fields(section):
                out.append(Key(f"{f.name}.{sf.name}", _plain(getattr(getattr(cfg, f.name), sf.name)),
                               _plain(getattr(getattr(default, f.name), sf.name)), _type_name(hints[sf.name]),
                               docs.get(sf.name, "")))
        else:
            out.append(Key(f.name, getattr(cfg, f.name), getattr(default, f.name), _type_name(section),
                           top_docs.get(f.name, "")))
    return out


def format_keys(items: list[Key]) -> str:
    """One line per key: ``name = value  (type; default D when it differs)  # doc``, a blank line between sections."""
    lines: list[str] = []
    section = None
    for k in items:
        head = k.name.split(".", 1)[0] if "." in k.name else ""
        if head != section and lines:
            lines.append("")
        section = head
        changed = "" if k.value == k.default else f"; default {json.dumps(k.default)}"
        lines.append(f"{k.name} = {json.dumps(k.value)}  ({k.type}{changed})  # {k.doc}")
    return "\n".join(lines)
