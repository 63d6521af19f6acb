"""The Ray session every Ray-using command starts from: join a cluster, or start a local Ray.

Meta-training's worker actors (:mod:`mtl_ray.distributed.ray_executor`), pretraining on Ray Train
(:mod:`mtl_ray.distributed.pretrain`) and Ray Tune sweeps (:mod:`mtl_ray.tune.sweep`) all call :func:`connect`;
the run-directory checks call :func:`check_address` before anything is written, because Ray itself retries
an address where nothing listens forever.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
from collections.abc import Iterator

import ray
import ray.util

from mtl_ray.config import Config, UserError
from mtl_ray.runtime import DropMessages

PROBE_TIMEOUT_S = 5.0
_ADDRESS_FIX = ("expected the host:port of a running Ray cluster's head (what `ray start --head` prints), or auto "
                "for the one `ray start` runs on this machine: start Ray there, fix the address, or set "
                "scaling.address='' (and unset $RAY_ADDRESS) to start a local Ray")


def _address(cfg: Config) -> tuple[str, str]:
    """(where it came from, the address) Ray would join."""
    if cfg.scaling.address:
        return "scaling.address", cfg.scaling.address
    return "$RAY_ADDRESS", os.environ.get("RAY_ADDRESS", "")


def check_address(cfg: Config, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Raise :class:`UserError` when the Ray address to join (``scaling.address``, else ``$RAY_ADDRESS``) is a
    ``host:port`` where nothing accepts a connection. Ray itself would retry such an address forever.

    Only a TCP connection is tried (``auto``, ``local`` and an already connected process are left to Ray).
    """
    where, value = _address(cfg)
    if ray.is_initialized() or not value or value in ("auto", "local"):
        return
    hostport = value.split("://", 1)[-1].split("/", 1)[0]
    host, sep, port_text = hostport.rpartition(":")
    if not sep:
        host, port_text = hostport, "6379"  # Ray's default GCS port
    host = host.strip("[]")
    if not port_text.isdigit():
        raise UserError(f"{where}: got {value!r}, expected host:port with a numeric port; {_ADDRESS_FIX}")
    try:
        with socket.create_connection((host, int(port_text)), timeout=timeout_s):
            pass
    except OSError as e:
        why = f"no answer within {timeout_s:g}s" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise UserError(f"{where}: got {value!r}, but nothing accepts connections there ({why}); {_ADDRESS_FIX}") from e


def connect(cfg: Config, min_cpus: float | None = None, *, dashboard: bool = False) -> bool:
    """Join ``scaling.address`` (or $RAY_ADDRESS, e.g. inside ``ray job submit``), else start a local Ray.

    A local Ray gets at least ``min_cpus`` logical CPUs (default: what the workers ask for), so
    ``num_workers`` larger than the core count still runs on a laptop (oversubscribed) instead of
    waiting for resources that never come. ``dashboard`` starts its state API too (Ray Train's
    placement-group cleaner polls it). Returns True when this call started (and so owns) Ray.
    """
    if ray.is_initialized():
        return False
    s = cfg.scaling
    if s.address or os.environ.get("RAY_ADDRESS"):
        check_address(cfg)
        try:
            ray.init(address=s.address or None, log_to_driver=True)
        except ConnectionError as e:  # e.g. address=auto with no cluster on this machine
            where, value = _address(cfg)
            raise UserError(f"{where}: got {value!r}, but Ray cannot join it ({' '.join(str(e).split())[:300]}); "
                            f"{_ADDRESS_FIX}") from e
    else:
        need = s.num_workers * s.cpus_per_worker if min_cpus is None else min_cpus
        cpus = max(os.cpu_count() or 1, math.ceil(need))
        # Ray's advice that token auth is on (its default for a new local cluster), printed at every start; the
        # warning that auth is *off* still shows.
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_TOKEN_AUTH_ON)
        # "local": a new instance even if `ray start` left a cluster on this machine (use address=auto for that).
        # Its processes are told its address: Ray's own code in them that looks for "the" local Ray (Ray Train's
        # placement-group cleaner, the state API) would otherwise fail with "Found multiple active Ray instances"
        # whenever another Ray runs on this machine (a second training run, a sweep).
        port = os.environ.get(GCS_PORT) or str(_free_port())
        address = f"{ray.util.get_node_ip_address()}:{port}"
        with _env(GCS_PORT, port):
            ray.init(address="local", num_cpus=cpus, include_dashboard=dashboard, log_to_driver=True,
                     runtime_env={"env_vars": {"RAY_ADDRESS": address}})
    return True


GCS_PORT = "RAY_GCS_SERVER_PORT"  # the port a new local Ray's GCS listens on (read by Ray when it starts one)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """``os.environ[name] = value`` for the block, then as it was."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


_TOKEN_AUTH_ON = DropMessages("Token authentication is enabled for this Ray cluster")
