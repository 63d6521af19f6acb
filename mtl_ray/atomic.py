"""The one way the package writes a local file: a temporary file beside it, renamed into place.

Readers see the old file or the new one, never half of one, and a failed write (disk full, read-only
directory) leaves the old file as it was and no temporary file behind. The temporary file is created
like ``open(path, "w")`` creates one: mode ``0o666`` less the process umask (``0644`` under the usual
``022``), not ``tempfile.mkstemp``'s ``0600``. Its content is flushed to disk before the rename.

Every write error is a :class:`WriteError` (a :class:`~mtl_ray.config.UserError`: the CLI prints one
line and exits 2) naming the file, the operating system's reason and the fix. Used for config.yaml,
metrics.jsonl, local checkpoints, the Omniglot cache, ``mtl-ray data convert`` output and downloads.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mtl_ray.config import UserError

Content = str | bytes | Callable[[str], None]  # a callable writes the file at the temporary path it is given
PROBE_BYTES = 4096  # what check_writable writes: a full disk refuses it


class WriteError(UserError):
    """A file could not be written; the previous file under that name (if any) is unchanged."""

    def __init__(self, path: str | Path, error: OSError, fix: str = ""):
        self.path = str(path)
        self.error = error
        reason = error.strerror or str(error)
        code = errno.errorcode.get(error.errno, "") if error.errno else ""
        fix = fix or ("expected a writable directory with free space: free some space, make it writable, "
                      "or choose another location")
        self.fix = fix
        super().__init__(f"cannot write {self.path}: {reason}{f' ({code})' if code else ''}; {fix}")

    def __reduce__(self) -> tuple[Any, ...]:  # raised in Ray workers and actors: it must come back to the driver intact
        return (type(self), (self.path, self.error, self.fix))


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def _create(path: Path) -> tuple[int, Path]:
    """An exclusive new temp file beside ``path``, mode 0o666 & ~umask (the kernel applies the umask)."""
    while True:
        tmp = _temp_name(path)
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), tmp
        except FileExistsError:
            continue


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, content: Content, *, fix: str = "") -> Path:
    """Write ``content`` (text, bytes, or ``writer(temp_path)``) to ``path`` atomically; return ``path``.

    The parent directories are created as needed. ``fix`` replaces the generic advice of the
    :class:`WriteError` raised when the file cannot be written.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create(path)
    except OSError as e:
        raise WriteError(path, e, fix) from e
    try:
        if callable(content):
            os.close(fd)
            content(str(tmp))
            _fsync(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(content.encode() if isinstance(content, str) else content)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteError(path, e, fix) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def check_writable(directory: str | Path, fix: str = "") -> None:
    """Raise :class:`WriteError` unless a file can be written in ``directory`` (created when missing).

    It really writes (and removes) a small file, so a read-only or immutable directory, a read-only
    mount or a full disk are found whoever runs it (root ignores permission bits, not those). The
    directories it had to create are removed again, so a check leaves nothing behind (the first real
    write creates them).
    """
    d = Path(directory).absolute()
    missing = []
    p = d
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    probe = d / f".write-check.{uuid.uuid4().hex[:12]}"
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"\0" * PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as e:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
        _remove(missing)
        raise WriteError(d, e, fix) from e
    _remove(missing)


def _remove(created: list[Path]) -> None:
    for m in created:  # deepest first
        with contextlib.suppress(OSError):
            m.rmdir()
