"""Learning checks through the real CLI (subprocess) for glyphs, Fashion-MNIST and multidomain, on small budgets:
held-out scripts, a held-out dataset and held-out domains far above chance (20% for 5-way)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROTONET = str(REPO / "jobs" / "configs" / "omniglot_protonet.yaml")
# a small protonet: 32 filters, strided convs, 40 steps of 4 tasks (about 20 s on 2 busy cores)
FAST = ["data.queries=5", "model.channels=32", "model.downsample=stride", "optim.val_every=0",
        "tracking.checkpoint_every=0", "tracking.mlflow=false", "optim.steps=40", "optim.meta_batch_size=4"]


def cli(*args: str, root: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # not the test session's Ray
    env.update({"PYTHONUNBUFFERED": "1", "MTL_RAY_DATA_DIR": str(root)})
    proc = subprocess.run([sys.executable, "-m", "mtl_ray.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def acc(text: str, key: str = "meta_test/acc") -> float:
    m = re.search(rf"{re.escape(key)}: ([0-9.]+)%", text)
    assert m, text
    return float(m.group(1))


@pytest.fixture(scope="module")
def glyph_run(domains_root: Path, glyph_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """protonet trained on the train scripts of the default glyph source (every script of the Noto fonts)."""
    run = tmp_path_factory.mktemp("glyph_run") / "run"
    out = cli("train", PROTONET, "data.source=glyphs", f"data.cache_dir={glyph_cache}", *FAST, "--run-dir", str(run),
              root=domains_root)
    assert "protonet on glyphs" in out and "checkpoint:" in out, out
    return run


@pytest.mark.slow
def test_glyphs_held_out_scripts_far_above_chance(glyph_run: Path, domains_root: Path) -> None:
    text = cli("eval", str(glyph_run), "--episodes", "100", root=domains_root)
    assert "meta-test on glyphs/test" in text
    assert acc(text) > 40.0, text  # measured 66% (chance 20%): scripts never seen in training


@pytest.mark.slow
def test_fashion_mnist_as_a_cross_domain_target(glyph_run: Path, domains_root: Path) -> None:
    text = cli("eval", str(glyph_run), "--episodes", "100", "data.source=fashion_mnist", root=domains_root)
    assert "meta-test on fashion_mnist/test" in text
    assert acc(text) > 30.0, text  # clothes after printed characters only (chance 20%)


@pytest.mark.slow
def test_multidomain_training_scored_per_held_out_domain(domains_root: Path, glyph_cache: Path,
                                                         tmp_path: Path) -> None:
    run = tmp_path / "run"
    out = cli("train", PROTONET, "data.source=multidomain", "data.domains=[omniglot,glyphs,fashion_mnist]",
              "data.test_domains=[fashion_mnist]", f"data.cache_dir={glyph_cache}", *FAST, "--run-dir", str(run),
              root=domains_root)
    assert "protonet on multidomain" in out, out
    held_out = cli("eval", str(run), "--episodes", "100", root=domains_root)  # the test split: fashion_mnist only
    assert re.search(r"meta_test/acc/fashion_mnist: [0-9.]+% .*100 episodes", held_out), held_out
    assert acc(held_out, "meta_test/acc/fashion_mnist") == acc(held_out) > 30.0, held_out
    every = cli("eval", str(run), "--episodes", "200", "data.test_domains=[]", root=domains_root)
    # held-out alphabets, held-out scripts, and the dataset training never sampled
    assert acc(every, "meta_test/acc/omniglot") > 40.0, every
    assert acc(every, "meta_test/acc/glyphs") > 40.0, every
    assert acc(every, "meta_test/acc/fashion_mnist") > 30.0, every
