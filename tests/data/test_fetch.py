"""fetch: data root resolution, md5 checks and atomic downloads from a real local HTTP server."""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mtl_ray.config import DATA_DIR_ENV
from mtl_ray.data.fetch import DataError, data_root, ensure_file, md5sum

PAYLOAD = b"omniglot-ish bytes " * 5000


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def http_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """(served directory, base URL) of an HTTP server on 127.0.0.1 at a free port."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()  # returns within one poll interval
        server.server_close()
        thread.join(timeout=5)


def test_data_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "env"))
    assert data_root(str(tmp_path / "cfg")) == tmp_path / "cfg"
    assert data_root("") == tmp_path / "env"
    monkeypatch.delenv(DATA_DIR_ENV)
    assert data_root("") == Path("data")


def test_md5sum_matches_hashlib(tmp_path: Path) -> None:
    f = tmp_path / "x.bin"
    f.write_bytes(PAYLOAD * 30)  # > 1 chunk
    assert md5sum(f) == hashlib.md5(PAYLOAD * 30).hexdigest()


def test_present_file_with_right_md5_is_returned(tmp_path: Path) -> None:
    f = tmp_path / "x.zip"
    f.write_bytes(PAYLOAD)
    assert ensure_file(f, hashlib.md5(PAYLOAD).hexdigest(), None, download=False) == f


def test_md5_mismatch_names_file_both_md5s_and_fix(tmp_path: Path) -> None:
    f = tmp_path / "x.zip"
    f.write_bytes(PAYLOAD)
    want = "0" * 32
    with pytest.raises(DataError) as e:
        ensure_file(f, want, "https://example.invalid/x.zip", download=True)
    msg = str(e.value)
    assert str(f) in msg and hashlib.md5(PAYLOAD).hexdigest() in msg and want in msg
    assert "delete" in msg and "data.download=true" in msg
    assert f.read_bytes() == PAYLOAD  # a mismatching file is reported, never silently replaced


def test_missing_without_download_names_file_dir_url_and_how_to_point(tmp_path: Path) -> None:
    f = tmp_path / "omniglot" / "images_background.zip"
    url = "https://github.com/brendenlake/omniglot/raw/master/python/images_background.zip"
    with pytest.raises(DataError) as e:
        ensure_file(f, "68d2efa1b9178cc56df9314c21c6e718", url, download=False)
    msg = str(e.value)
    for part in ("images_background.zip", str(f.parent), url, "data.root=", DATA_DIR_ENV, "data.download=true"):
        assert part in msg
    assert not f.parent.exists()


def test_download_verifies_md5_and_renames_into_place(http_dir: tuple[Path, str], tmp_path: Path) -> None:
    served, base = http_dir
    (served / "blob.zip").write_bytes(PAYLOAD)
    dest = tmp_path / "root" / "omniglot" / "blob.zip"
    got = ensure_file(dest, hashlib.md5(PAYLOAD).hexdigest(), f"{base}/blob.zip", download=True)
    assert got == dest and dest.read_bytes() == PAYLOAD
    assert sorted(p.name for p in dest.parent.iterdir()) == ["blob.zip"]  # no temp file left


def test_download_with_wrong_md5_leaves_nothing(http_dir: tuple[Path, str], tmp_path: Path) -> None:
    served, base = http_dir
    (served / "blob.zip").write_bytes(PAYLOAD)
    dest_dir = tmp_path / "dl"
    dest_dir.mkdir()
    with pytest.raises(DataError) as e:
        ensure_file(dest_dir / "blob.zip", "f" * 32, f"{base}/blob.zip", download=True)
    assert "md5" in str(e.value) and hashlib.md5(PAYLOAD).hexdigest() in str(e.value)
    assert list(dest_dir.iterdir()) == []


def test_failed_download_leaves_nothing(http_dir: tuple[Path, str], tmp_path: Path) -> None:
    _, base = http_dir
    dest_dir = tmp_path / "dl"
    dest_dir.mkdir()
    with pytest.raises(DataError) as e:
        ensure_file(dest_dir / "absent.zip", "f" * 32, f"{base}/absent.zip", download=True)
    assert "absent.zip" in str(e.value) and "404" in str(e.value)
    assert list(dest_dir.iterdir()) == []


def test_data_error_is_a_user_error() -> None:
    from mtl_ray.config import UserError

    err = DataError("a; b", ["a", "b"])
    assert isinstance(err, UserError) and isinstance(err, ValueError) and err.problems == ["a", "b"]
    assert DataError("only").problems == ["only"]
