"""Fixtures for the data-layer tests: the shared read-only data and one Omniglot cache per session."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mtl_ray.components import from_dict
from mtl_ray.config import Config
from mtl_ray.data import omniglot

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SMALL_ZIPS = ("images_background_small1.zip", "images_background_small2.zip")
LAKE_ZIP = "lake_oneshot_runs_01-10.zip"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The README's commands run first: they start a Ray head on the default ports and end with `ray stop`, which
    stops every Ray on the machine, so nothing else in the session may have Ray up yet (order kept otherwise)."""
    items.sort(key=lambda item: "test_readme_section_runs_as_typed" not in item.nodeid)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``/work/shared/data`` (read-only): the Omniglot minimal splits and Lake's runs."""
    needed = [SHARED_DATA / "omniglot" / n for n in (*SMALL_ZIPS, LAKE_ZIP)]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        pytest.skip(f"shared test data not found: {missing} (expected next to the repository in shared/data)")
    return SHARED_DATA


def link_zips(shared: Path, root: Path, names: tuple[str, ...] = SMALL_ZIPS) -> Path:
    """Symlink shared Omniglot zips into ``root/omniglot/`` so caches are written under ``root``."""
    (root / "omniglot").mkdir(parents=True, exist_ok=True)
    for n in names:
        os.symlink(shared / "omniglot" / n, root / "omniglot" / n)
    return root


@pytest.fixture(scope="session")
def omniglot_root(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A writable data root holding links to the two small zips (28px cache built once), fonts/ and fashion-mnist/."""
    root = link_zips(shared_data, tmp_path_factory.mktemp("omniglot_root"))
    for name in ("fonts", "fashion-mnist"):  # the other domains of the shipped multi-domain config
        os.symlink(shared_data / name, root / name)
    omniglot.load_omniglot_table(from_dict({"data": {"root": str(root)}}).data)
    return root


@pytest.fixture
def linked_root(shared_data: Path, tmp_path: Path) -> Callable[..., Path]:
    """``make(*zip_names)`` -> a fresh data root under tmp_path with those shared zips linked in."""
    return lambda *names: link_zips(shared_data, tmp_path, names or SMALL_ZIPS)


@pytest.fixture
def omniglot_cfg(omniglot_root: Path) -> Callable[..., Config]:
    """``make(**data_fields, seed=..)`` -> a validated Omniglot config on the session data root."""

    def make(seed: int = 0, optim: dict[str, Any] | None = None, **data: Any) -> Config:
        return from_dict({"seed": seed, "data": {"root": str(omniglot_root), **data}, "optim": optim or {}})

    return make


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray instance for the session: a ``ray.cluster_utils.Cluster`` head with 4 logical CPUs.

    Tests that need more nodes add them to it (and remove them); starting Ray costs seconds.
    """
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback only; docs/architecture.md, "Ray's token auth"
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 4, "include_dashboard": False, "object_store_memory": 256 * 2**20})
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture
def pretrained_stub() -> Callable[[Config, Path], str]:
    """``make(cfg, dir)`` -> a pretraining checkpoint in ``dir`` whose shapes fit ``cfg``'s model (fresh weights,
    nothing trained): what configs with ``model.init`` need to validate."""
    from mtl_ray.algorithms import TaskShape
    from mtl_ray.checkpoint import Checkpoint, save_checkpoint
    from mtl_ray.models import build_model, initial_params

    def make(cfg: Config, where: Path) -> str:
        shape = TaskShape("classification", (1, cfg.data.image_size, cfg.data.image_size), 652)
        params = initial_params(build_model(cfg, shape.x_shape, shape.ways), 0)
        return save_checkpoint(where, Checkpoint(step=1, params=params, optimizer={}, config=cfg, shape=shape,
                                                 stage="pretrain"))

    return make


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real ``mlflow server`` (sqlite backend, artifacts destination) on a free port; stopped by PID."""
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], env=env, stdout=(root / "server.log").open("w"), stderr=subprocess.STDOUT,
        start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if urllib.request.urlopen(f"{uri}/health", timeout=2).read().strip() == b"OK":
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    try:
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def sinusoid_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory holding a real, tiny checkpoint (sinusoid MAML, MLP [8], 2 steps): for tests that need any
    checkpoint to point a command at. Read it, never write into it (it is shared by the whole session)."""
    from mtl_ray.distributed.driver import MetaTrainer

    run = tmp_path_factory.mktemp("sinusoid_run") / "run"
    cfg = from_dict({"data": {"source": "sinusoid", "shots": 5, "queries": 5}, "model": {"name": "mlp",
                     "hidden_sizes": [8]}, "optim": {"steps": 2, "meta_batch_size": 2, "val_every": 0},
                     "tracking": {"checkpoint_every": 0, "progress": False, "mlflow": False}})
    trainer = MetaTrainer.create(cfg, run)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return run
