"""One real local Ray cluster per test session: a head and a second raylet, both on 127.0.0.2.

127.0.0.2 is loopback, and Ray keeps it (127.0.0.1 and localhost it rewrites to the machine's
interface address). The cluster runs with its own --temp-dir and ports, usage stats and token
auth off, and a temporary HOME holding an empty ray_bootstrap_config.yaml (without it the head
asks the cloud metadata addresses which cloud it is on). It is stopped by PID: `ray stop` would
stop every Ray process of the machine, other people's too.

    from raycluster import ray_cluster  # noqa: F401  (the session-scoped fixture)

Also usable from benchmarks: ``RayCluster.start(folder)`` ... ``cluster.stop()``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import psutil
import pytest

NODE_IP = "127.0.0.2"
NO_RAY = 'Ray is not installed (bash scripts/ci_ray_deps.sh, or pip install "lepton-magic[ray]")'
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((NODE_IP, 0))
        return s.getsockname()[1]


def _worker_ports(count: int = 100) -> tuple[int, int]:
    """A run of ports between Ray's default worker range (10002-19999) and the ephemeral ports
    (32768-), free now: two raylets on one machine need a range each."""
    for _ in range(200):
        low = 20000 + 100 * (int.from_bytes(os.urandom(2), "big") % 120)
        try:
            for port in (low, low + count // 2, low + count - 1):
                with socket.socket() as s:
                    s.bind((NODE_IP, port))
            return low, low + count - 1
        except OSError:
            continue
    raise RuntimeError("no free run of worker ports")


def _raylet_ports() -> list[str]:
    low, high = _worker_ports()
    return ["--node-manager-port", str(_free_port()), "--object-manager-port", str(_free_port()),
            "--min-worker-port", str(low), "--max-worker-port", str(high),
            "--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
            "--runtime-env-agent-port", str(_free_port()), "--metrics-export-port", str(_free_port())]


@dataclass
class RayCluster:
    folder: str
    port: int
    client_port: int
    env: dict = field(default_factory=dict)

    @property
    def address(self) -> str:
        """What a driver connects to."""
        return f"{NODE_IP}:{self.port}"

    @property
    def client_address(self) -> str:
        """Ray Client."""
        return f"ray://{NODE_IP}:{self.client_port}"

    @property
    def temp_dir(self) -> str:
        return os.path.join(self.folder, "t")

    @classmethod
    def start(cls, folder: str | None = None, cpus_per_raylet: int = 2) -> "RayCluster":
        folder = folder or tempfile.mkdtemp(prefix="lepton-raytest-")
        home = os.path.join(folder, "home")
        os.makedirs(home, exist_ok=True)
        open(os.path.join(home, "ray_bootstrap_config.yaml"), "w").close()
        # A loaded 2-core machine registers raylets slowly, and starts a Ray Client connection's
        # server slowly (Ray gives it 30 s; the suite once saw that run out).
        env = dict(os.environ, HOME=home, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled",
                   RAY_raylet_start_wait_time_s="180", RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S="120")
        cluster = cls(folder, _free_port(), _free_port(), env)
        try:
            cluster._ray_start(
                "--head", "--port", str(cluster.port), "--ray-client-server-port", str(cluster.client_port),
                "--include-dashboard=false", "--disable-usage-stats", "--temp-dir", cluster.temp_dir,
                "--num-cpus", str(cpus_per_raylet), "--resources", json.dumps({"head": 1}))
            cluster._ray_start(
                "--address", cluster.address, "--num-cpus", str(cpus_per_raylet),
                "--resources", json.dumps({"second": 1}))
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _ray_start(self, *args: str) -> None:
        done = subprocess.run([*RAY, "start", "--node-ip-address", NODE_IP, *_raylet_ports(), *args],
                              env=self.env, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{done.stdout}\n{done.stderr}")

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster: those naming its temp dir (GCS, raylets, monitors) or
        its address (Ray Client's servers), and their descendants (workers rename themselves
        ray::..., agents and ranks)."""
        roots = []
        marks = (self.folder, f"--address={self.address}")
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(mark in part for part in proc.info["cmdline"] or [] for mark in marks):
                    roots.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        seen = {p.pid: p for p in roots}
        for root in roots:
            try:
                for child in root.children(recursive=True):
                    seen.setdefault(child.pid, child)
            except psutil.NoSuchProcess:
                continue
        return list(seen.values())

    def stop(self) -> None:
        procs = self.processes()
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _gone, alive = psutil.wait_procs(procs, timeout=2)  # a throwaway cluster: no need to wait long
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        shutil.rmtree(self.folder, ignore_errors=True)


def non_loopback_peers(processes: list[psutil.Process]) -> list[str]:
    """TCP connections of these processes to anything but loopback (should be none)."""
    found = []
    for proc in processes:
        try:
            connections = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for c in connections:
            if not c.raddr:
                continue
            ip = ipaddress.ip_address(c.raddr.ip)
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
                ip = ip.ipv4_mapped
            if not ip.is_loopback:
                found.append(f"pid {proc.pid} ({_name(proc)}) -> {c.raddr.ip}:{c.raddr.port}")
    return found


def _name(proc: psutil.Process) -> str:
    try:
        return proc.name()
    except psutil.NoSuchProcess:
        return "gone"


@pytest.fixture(scope="session")
def ray_cluster():
    pytest.importorskip("ray", reason=NO_RAY)
    # The test process is a driver of this cluster: no token auth, like the cluster.
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    cluster = RayCluster.start(tempfile.mkdtemp(prefix="lepton-ray-"))
    yield cluster
    cluster.stop()
