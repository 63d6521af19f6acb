"""check_data: data-dependent config problems, each with the value got, the value expected and the fix."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mtl_ray.components import from_dict
from mtl_ray.config import Config
from mtl_ray.data import check_data

MakeCfg = Callable[..., Config]

WAYS_VAL = ("data.ways: got 30, expected <= 22 (classes in the 'val' split of omniglot: alphabets "
            "Early_Aramaic); lower data.ways or move alphabets into that split (data.val_alphabets)")
SHOTS = ("data.shots + data.queries: got 25 (5 + 20), expected <= 20 (examples per class in omniglot); "
         "lower data.shots or data.queries")


def test_defaults_are_fine(omniglot_cfg: MakeCfg) -> None:
    assert check_data(omniglot_cfg()) == []
    assert check_data(from_dict({"data": {"source": "sinusoid"}, "model": {"name": "mlp"}})) == []


def test_ways_too_large_for_val(omniglot_cfg: MakeCfg) -> None:
    assert check_data(omniglot_cfg(ways=30)) == [WAYS_VAL]


def test_val_not_checked_when_validation_is_off(omniglot_cfg: MakeCfg) -> None:
    assert check_data(omniglot_cfg(ways=30, optim={"val_every": 0})) == []


def test_test_split_checked_when_evaluated(omniglot_cfg: MakeCfg) -> None:
    """Training does not sample the test split (it may be empty, e.g. for Lake's runs); eval checks it."""
    cfg = omniglot_cfg(ways=20, test_alphabets=["Tagalog"])
    assert check_data(cfg) == []
    assert check_data(omniglot_cfg(ways=20, test_alphabets=[])) == []
    problems = check_data(cfg, ["test"])
    assert problems == ["data.ways: got 20, expected <= 17 (classes in the 'test' split of omniglot: alphabets "
                        "Tagalog); lower data.ways or move alphabets into that split (data.test_alphabets)"]


def test_train_split_mentions_rotations(omniglot_cfg: MakeCfg) -> None:
    everything_held_out = ["Balinese", "Early_Aramaic", "Greek", "Japanese_(katakana)", "Latin", "Sanskrit"]
    problems = check_data(omniglot_cfg(ways=5, val_alphabets=everything_held_out, test_alphabets=["Tagalog"],
                                       optim={"val_every": 0}))
    # train = Korean only: 40 characters x4 rotations
    assert problems == []
    problems = check_data(omniglot_cfg(ways=161, val_alphabets=everything_held_out, test_alphabets=["Tagalog"],
                                       optim={"val_every": 0}))
    assert any(p.startswith("data.ways: got 161, expected <= 160 (classes in the 'train' split of omniglot: "
                            "alphabets Korean, x4 rotations)") for p in problems)


def test_too_many_shots_and_queries(omniglot_cfg: MakeCfg) -> None:
    assert check_data(omniglot_cfg(shots=5, queries=20)) == [SHOTS]


def test_unknown_alphabet(omniglot_cfg: MakeCfg) -> None:
    problems = check_data(omniglot_cfg(val_alphabets=["Early_Aramaic", "Klingon"]))
    assert len(problems) == 1
    assert problems[0].startswith("data.val_alphabets: got unknown alphabet(s) ['Klingon'], expected names")
    assert "Balinese, Early_Aramaic, Greek, Japanese_(katakana), Korean, Latin, Sanskrit, Tagalog" in problems[0]


def test_all_problems_together(omniglot_cfg: MakeCfg) -> None:
    problems = check_data(omniglot_cfg(ways=30, shots=5, queries=20, val_alphabets=["Early_Aramaic", "Klingon"]))
    assert len(problems) == 3
    assert problems[0].startswith("data.val_alphabets: got unknown alphabet(s) ['Klingon']")
    assert WAYS_VAL in problems and SHOTS in problems


def test_missing_archives_become_messages(tmp_path: Path) -> None:
    problems = check_data(from_dict({"data": {"root": str(tmp_path)}}))
    assert len(problems) == 2
    assert all("not found in" in p and "data.download=true" in p for p in problems)


def test_missing_parquet_table(tmp_path: Path) -> None:
    cfg = from_dict({"data": {"source": "parquet", "path": str(tmp_path / "none.parquet")}})
    (problem,) = check_data(cfg)
    assert problem.startswith(f"data.path: got {str(tmp_path / 'none.parquet')!r}, expected an existing Parquet")
    assert "mtl-ray data convert" in problem
