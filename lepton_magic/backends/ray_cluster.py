"""Reaching a Ray cluster, and reserving nodes on it (placement groups). Kernel side.

One connection per kernel process (Ray's own rule: ``ray.init`` once), shared by the pools that
use it and closed with the last. ``local`` starts a throwaway cluster owned by the kernel: on
127.0.0.2 (loopback, which Ray does not rewrite to the machine's interface address as it does
127.0.0.1), with usage stats off, and with a private HOME holding an empty
``ray_bootstrap_config.yaml``, without which Ray's head asks the cloud metadata addresses which
cloud it runs on. Ray also writes its auth token under that HOME.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import LeptonError

log = logging.getLogger("lepton_magic.backends")

ACCEPTED_ADDRESSES = "auto, local, HOST:PORT (a driver, e.g. HOST:6379) or ray://HOST:PORT (Ray Client)"
INSTALL_HINT = 'the ray backend needs Ray: pip install "lepton-magic[ray]"'
#: A loopback address Ray keeps as it is (see the module's docstring).
LOCAL_NODE_IP = "127.0.0.2"
#: Connections asked of a Ray Client server (ray://) whose server side failed to start.
CLIENT_INIT_ATTEMPTS = 2
#: Resources worth naming when a request does not fit (not node:..., memory, object store).
SHOWN_RESOURCES = re.compile(r"^(?!node:|memory$|object_store_memory$|accelerator_type:)")


def require_ray():
    try:
        import ray
        import ray.util.placement_group  # noqa: F401
    except ImportError:
        raise LeptonError(INSTALL_HINT) from None
    return ray


def parse_address(text) -> str:
    """auto, local, HOST:PORT or ray://HOST:PORT (the ray_address setting, --address)."""
    value = str(text).strip()
    if value.lower() in ("auto", "local"):
        return value.lower()
    if re.fullmatch(r"(ray://)?[A-Za-z0-9_.\-\[\]:]+:\d+", value):
        return value
    raise ValueError(f"expected a Ray address: {ACCEPTED_ADDRESSES}; got {text!r}")


class _Connection:
    """The process's one Ray connection, counted by its users."""

    lock = threading.Lock()
    users = 0
    address: str | None = None
    owned = False  # we called ray.init (and so ray.shutdown); not when the user had connected
    local_dir: str | None = None


def connect(address: str) -> None:
    ray = require_ray()
    with _Connection.lock:
        if _Connection.users and _Connection.address != address:
            raise LeptonError(f"this kernel is connected to Ray at {_Connection.address}; "
                              f"release that pool first (%lepton down) to use {address}")
        if not _Connection.users:
            if ray.is_initialized():  # the user's own ray.init: use it, leave it open
                _Connection.owned = False
            else:
                _init(ray, address)
                _Connection.owned = True
            _Connection.address = address
        _Connection.users += 1


def disconnect() -> None:
    ray = require_ray()
    with _Connection.lock:
        _Connection.users -= 1
        if _Connection.users > 0:
            return
        if _Connection.owned:
            ray.shutdown()  # for `local`, this stops the cluster too
        if _Connection.local_dir:
            shutil.rmtree(_Connection.local_dir, ignore_errors=True)
        _Connection.users, _Connection.address, _Connection.owned, _Connection.local_dir = 0, None, False, None


def _init(ray, address: str) -> None:
    # Logs come through lepton's own pipe: Ray's copy of every worker's output would flood the
    # notebook (ray #16431), and its INFO lines are noise there.
    options = dict(log_to_driver=False, logging_level=logging.ERROR, namespace="lepton_magic")
    try:
        if address == "local":
            _Connection.local_dir = tempfile.mkdtemp(prefix="lepton-ray-")
            with _quiet_home(Path(_Connection.local_dir) / "home"):
                ray.init(_node_ip_address=LOCAL_NODE_IP, include_dashboard=False,
                         _temp_dir=os.path.join(_Connection.local_dir, "t"), **options)
        else:
            _init_address(ray, address, options)
    except Exception as e:
        if _Connection.local_dir:
            shutil.rmtree(_Connection.local_dir, ignore_errors=True)
            _Connection.local_dir = None
        hint = "; start one, or use --address local for a throwaway cluster" if address == "auto" else ""
        raise LeptonError(f"cannot connect to Ray at {address}: {_why(e)}{hint}") from None


def _init_address(ray, address: str, options: dict) -> None:
    """A cluster's address; through the Ray Client (ray://), a server that failed to start for
    this connection (on a busy head it may not be ready within Ray's 30 s) is asked for again."""
    for attempt in range(CLIENT_INIT_ATTEMPTS):
        try:
            ray.init(address=address, **options)
            return
        except ConnectionAbortedError as e:  # the server's side of the connection failed to start
            if not address.startswith("ray://") or attempt == CLIENT_INIT_ATTEMPTS - 1:
                raise
            log.warning("the Ray Client server at %s did not start for this connection (%s); trying again",
                        address, _why(e))


def _why(error: Exception) -> str:
    """One line: a Ray Client server's failure comes as its whole traceback, whose last line says it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Initialization failure from server"):
        return f"{type(error).__name__}: {lines[0].rstrip(':')}: {lines[-1]}"[:300]
    return first_line(error)


@contextmanager
def _quiet_home(home: Path):
    """The environment the local cluster's processes inherit (they read it as they start)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "ray_bootstrap_config.yaml").touch()
    saved = {k: os.environ.get(k) for k in ("HOME", "RAY_USAGE_STATS_ENABLED")}
    os.environ.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0].rstrip('.') if lines else ''}"[:300]


# --- placement --------------------------------------------------------------------------------
def strategy_for(ray, setting: str, count: int) -> str:
    """``spread``: one node per machine (STRICT_SPREAD) when the cluster has that many alive
    machines, else as spread as Ray can (SPREAD, so an autoscaler may still add machines);
    ``pack``: as few machines as possible."""
    if setting == "pack":
        return "PACK"
    alive = sum(1 for n in ray.nodes() if n.get("Alive"))
    return "STRICT_SPREAD" if count > 1 and alive >= count else "SPREAD"


def reserve(ray, count: int, bundle: dict, strategy: str, timeout: float, name: str,
            say=print):
    """A placement group of ``count`` bundles, placed; or a LeptonError naming what was asked
    and what the cluster has. A group Ray can never place raises nothing there (it stays
    PENDING, INFEASIBLE): it fails here at once. Whatever fails (Ctrl-C too), the group is
    removed, so nothing stays reserved."""
    from ray.util import placement_group, placement_group_table, remove_placement_group

    group = placement_group([dict(bundle) for _ in range(count)], strategy=strategy, name=name)
    try:
        started = time.monotonic()
        next_word = started + 2.0
        while True:
            table = placement_group_table(group)
            state = table.get("state")
            if state == "CREATED":
                return group
            if (table.get("stats") or {}).get("scheduling_state") == "INFEASIBLE":
                raise LeptonError(_unplaceable(ray, count, bundle, strategy, "no node of this cluster can ever hold one"))
            waited = time.monotonic() - started
            if waited >= timeout:
                raise LeptonError(_unplaceable(ray, count, bundle, strategy,
                                               f"not placed within {timeout:g} s (ray_placement_timeout)"))
            if time.monotonic() >= next_word:  # an autoscaler may be bringing machines up
                placed = sum(1 for node in (table.get("bundles_to_node_id") or {}).values() if node)
                say(f"waiting for Ray: {placed} of {count} bundles of {format_resources(bundle)} placed "
                    f"({waited:.0f} s of {timeout:g} s)")
                next_word = time.monotonic() + 10.0
            time.sleep(0.05 if waited < 1 else 0.25)
    except BaseException:
        remove_placement_group(group)
        raise


def _unplaceable(ray, count: int, bundle: dict, strategy: str, why: str) -> str:
    return (f"Ray cannot place {count} node(s) of {format_resources(bundle)} ({strategy}): {why}; "
            f"the cluster has {format_resources(ray.cluster_resources())} in all, "
            f"{format_resources(ray.available_resources())} free")


def format_resources(resources: dict) -> str:
    shown = {k: v for k, v in sorted(resources.items()) if SHOWN_RESOURCES.match(k)}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in shown.items()) + "}"


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
