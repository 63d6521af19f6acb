"""Lake's 20-way one-shot runs: layout, labels and a pixel-space nearest-neighbour baseline."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

from mtl_ray.data.fetch import DataError
from mtl_ray.data.lake import LakeRun, lake_error_rate, load_lake_runs

LAKE_ZIP = "lake_oneshot_runs_01-10.zip"


@pytest.fixture(scope="module")
def runs(shared_data: Path) -> list[LakeRun]:
    return load_lake_runs(shared_data / "omniglot" / LAKE_ZIP, 28)


def _labels_from_zip(path: Path, run: str) -> torch.Tensor:
    """Parse class_labels.txt independently of the loader: item index -> class index (0-based)."""
    with zipfile.ZipFile(path) as zf:
        lines = zf.read(f"{run}/class_labels.txt").decode().split()
    y = torch.full((20,), -1)
    for item, cls in zip(lines[::2], lines[1::2], strict=True):
        y[int(item[-6:-4]) - 1] = int(cls[-6:-4]) - 1
    return y


def test_ten_runs_of_twenty(runs: list[LakeRun], shared_data: Path) -> None:
    assert [r.name for r in runs] == [f"run{i:02d}" for i in range(1, 11)]
    for r in runs:
        assert r.support_x.shape == r.query_x.shape == (20, 1, 28, 28)
        assert r.support_x.dtype == torch.float32
        assert torch.equal(r.support_y, torch.arange(20))
        assert torch.equal(r.query_y, _labels_from_zip(shared_data / "omniglot" / LAKE_ZIP, r.name))
        assert sorted(r.query_y.tolist()) == list(range(20))  # one test item per class
        assert float(r.query_x.mean()) < 0.3 and float(r.query_x.max()) == 1.0  # ink high, like Omniglot


def test_nearest_neighbour_baseline_beats_chance(runs: list[LakeRun]) -> None:
    preds = []
    for r in runs:
        d = torch.cdist(r.query_x.flatten(1), r.support_x.flatten(1))  # [20 queries, 20 classes]
        preds.append(d.argmin(1))
    err = lake_error_rate(preds, runs)
    assert 0.0 < err < 95.0  # chance is 95%; Lake et al. report ~80% error for pixel NN at 105px
    assert lake_error_rate([r.query_y for r in runs], runs) == 0.0
    assert lake_error_rate([(r.query_y + 1) % 20 for r in runs], runs) == 100.0


def test_directory_layout_matches_zip(runs: list[LakeRun], shared_data: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(shared_data / "omniglot" / LAKE_ZIP) as zf:
        zf.extractall(tmp_path)
    from_dir = load_lake_runs(tmp_path, 28)
    assert [r.name for r in from_dir] == [r.name for r in runs]
    for a, b in zip(from_dir, runs, strict=True):
        assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_y, b.query_y)


def test_errors(tmp_path: Path, runs: list[LakeRun]) -> None:
    with pytest.raises(DataError, match="not found"):
        load_lake_runs(tmp_path / LAKE_ZIP, 28)
    (tmp_path / LAKE_ZIP).write_bytes(b"PK not the zip")
    with pytest.raises(DataError, match="md5 got"):
        load_lake_runs(tmp_path / LAKE_ZIP, 28)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no runNN/ folders"):
        load_lake_runs(tmp_path / "empty", 28)
    with pytest.raises(ValueError, match="expected one per run"):
        lake_error_rate([runs[0].query_y], runs)
