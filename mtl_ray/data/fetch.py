"""Locating, verifying and (optionally) downloading the data files the project reads.

Every file the project reads from disk goes through :func:`ensure_file`: a file that is present must
match its md5; a missing file is downloaded only when the config allows it (``data.download=true``)
and a URL is known, into a temporary file in the same directory that is renamed into place only
after its md5 checks out, so a half-written or corrupt file never sits under the real name.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from mtl_ray.atomic import atomic_write
from mtl_ray.config import DATA_DIR_ENV, UserError

_CHUNK = 1 << 20
DOWNLOAD_TIMEOUT_S = 60.0


class DataError(UserError):
    """A data file is missing, corrupt or malformed; the message says what was found and the fix.

    ``problems`` lists the individual problems when several were found at once (else ``[message]``).
    A :class:`mtl_ray.config.UserError` (hence a ``ValueError``): the CLI prints it without a traceback.
    """

    def __init__(self, message: str, problems: Sequence[str] | None = None):
        super().__init__(message)
        self.problems: list[str] = list(problems) if problems else [message]


def data_root(cfg_root: str) -> Path:
    """The data directory: ``cfg_root`` if non-empty, else ``$MTL_RAY_DATA_DIR``, else ``./data``."""
    if cfg_root:
        return Path(cfg_root).expanduser()
    env = os.environ.get(DATA_DIR_ENV, "")
    if env:
        return Path(env).expanduser()
    return Path("data")


def md5sum(path: str | Path) -> str:
    """Hex md5 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _where_hint(path: Path) -> str:
    return (f"put it at {str(path)!r}, or point data.root=... (or ${DATA_DIR_ENV}) at the directory "
            f"that holds {path.parent.name}/{path.name}")


def ensure_file(path: Path, md5: str | None, url: str | None, download: bool) -> Path:
    """Return ``path`` once it exists with the expected md5, downloading it first if allowed.

    ``md5`` None or "" means unknown (no check). Raises :class:`DataError` when the file is corrupt
    (md5 mismatch), missing and not downloadable, or the download fails; a failed download leaves
    nothing behind.
    """
    path = Path(path)
    if path.is_file():
        if md5:
            got = md5sum(path)
            if got != md5:
                fix = f"delete it and re-download it from {url}" if url else "delete it and restore a good copy"
                auto = " (or delete it and set data.download=true)" if url else ""
                raise DataError(f"{path}: md5 got {got}, expected {md5}; the file is corrupt or a different "
                                f"version: {fix}{auto}")
        return path
    if path.exists():
        raise DataError(f"{path}: exists but is not a regular file; expected the data file {path.name}")
    if download and url:
        return _download(url, path, md5)
    if url:
        how = (f"download it from {url} and {_where_hint(path)}; or set data.download=true to fetch it "
               "automatically")
    else:
        how = _where_hint(path) + " (there is no download URL for this file)"
    raise DataError(f"{path.name}: not found in {str(path.parent)!r}; {how}")


def _download(url: str, path: Path, md5: str | None) -> Path:
    """Stream ``url`` to a temp file next to ``path``, check the md5, then rename into place."""

    def fetch(tmp: str) -> None:
        h = hashlib.md5()
        with open(tmp, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
                    while chunk := resp.read(_CHUNK):
                        h.update(chunk)
                        out.write(chunk)
            except (urllib.error.URLError, OSError, ValueError) as e:
                raise DataError(f"{path.name}: download from {url} failed ({e}); check the network, or "
                                f"download it by hand and {_where_hint(path)}") from e
        got = h.hexdigest()
        if md5 and got != md5:
            raise DataError(f"{path.name}: downloaded from {url} but md5 got {got}, expected {md5}; the "
                            "download was corrupt or the upstream file changed; nothing was kept. Retry, "
                            f"or download it by hand and {_where_hint(path)}")

    return atomic_write(path, fetch)

