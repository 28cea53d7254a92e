"""A pool: the warm nodes of one backend, kept between cells until released or idle too long."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import backends, private, sharedmem
from .backends import NodeLink
from .errors import LeptonError
from .protocol import new_secret
from .store import Store

if TYPE_CHECKING:
    from .liverun import LiveRun

log = logging.getLogger("lepton_magic.pool")

NODE_START_TIMEOUT = 60.0
#: A node silent this long (agents beat every 2 s) is hung: lost, unless the pool's settings
#: say otherwise (heartbeat_timeout).
HEARTBEAT_TIMEOUT = 10.0


class Pool:
    def __init__(self, store: Store, backend: str, settings: dict):
        self.id = f"p-{secrets.token_hex(4)}"
        self.store = store
        self.backend_name = backend
        self.backend = backends.create(backend, {**settings, "pool_id": self.id, "home": str(store.home)})
        self.settings = settings
        self.secret = new_secret()
        self.nodes: list[NodeLink] = []
        self.busy: dict[str, str] = {}  # node name -> run id
        self.runs: dict[str, "LiveRun"] = {}
        self.closed = False
        self._run_ids: list[str] = []
        self._lock = threading.RLock()
        self._last_active = time.monotonic()
        self._log_dir = Path(store.home) / "logs"
        private.make_dir(self._log_dir)
        store.add_pool(self.id, backend, {k: v for k, v in settings.items() if k != "secret"})
        self._watch_thread = threading.Thread(target=self._watch, daemon=True, name="lepton-pool-watch")
        self._watch_thread.start()

    # --- nodes -----------------------------------------------------------------------------
    @property
    def live_nodes(self) -> list[NodeLink]:
        return [n for n in self.nodes if n.alive]

    def grow(self, count: int) -> list[NodeLink]:
        """Start ``count`` more nodes and wait until each has reported in."""
        cap = self.settings.get("max_nodes")
        if cap and len(self.live_nodes) + count > cap:
            raise LeptonError(
                f"the pool may hold at most {cap} nodes (%lepton up --max {cap}); "
                f"{len(self.live_nodes) + count} would be needed"
            )
        with self._lock:
            taken = {n.name for n in self.nodes}
            names, i = [], 0
            while len(names) < count:
                name = f"{self.backend_name}-{i}"
                if name not in taken:
                    names.append(name)
                i += 1
            started = time.time()
            for name in names:
                self.store.upsert_node(self.id, name, status="starting", started=started)
            links = self.backend.start_nodes(names, self.secret, self._on_message, self._on_lost,
                                             str(self._log_dir))
            self.nodes.extend(links)
        deadline = time.monotonic() + NODE_START_TIMEOUT
        for link in links:
            link.ready.wait(max(0.0, deadline - time.monotonic()))
            if not link.alive or not link.facts:
                self.store.upsert_node(self.id, link.name, status="lost")
                raise LeptonError(
                    f"node {link.name} did not start (see {self._log_dir / f'agent-{link.name}.log'})"
                )
            gpus = link.facts.get("gpus") or []
            self.store.upsert_node(
                self.id, link.name, status="ready", host=link.host, cpus=link.facts.get("cpus"),
                memory=link.facts.get("memory"), gpus=len(gpus),
                gpu_name=gpus[0]["name"] if gpus else None,
                gpu_memory=gpus[0]["memory"] if gpus else None,
                agent_pid=link.facts.get("pid"), python=link.facts.get("python"), last_seen=time.time(),
            )
        self.record_cost()
        return links

    def ensure(self, count: int) -> None:
        missing = count - len(self.live_nodes)
        if missing > 0:
            self.grow(missing)

    def acquire(self, count: int, run_id: str) -> list[NodeLink]:
        """``count`` idle nodes for one run, starting more when the pool is short."""
        with self._lock:
            if self.closed:
                raise LeptonError("the pool was released; run again to start a new one")
            idle = [n for n in self.live_nodes if n.name not in self.busy]
        if len(idle) < count:
            self.grow(count - len(idle))
        with self._lock:
            idle = [n for n in self.live_nodes if n.name not in self.busy][:count]
            if len(idle) < count:
                raise LeptonError(f"the pool has {len(idle)} usable nodes, the run needs {count}")
            for node in idle:
                self.busy[node.name] = run_id
            self._last_active = time.monotonic()
            return idle

    def attach_run(self, run: "LiveRun") -> None:
        with self._lock:
            self.runs[run.id] = run
            self._run_ids.append(run.id)

    def release(self, run: "LiveRun") -> None:
        self.release_run(run.id)

    def release_run(self, run_id: str) -> None:
        with self._lock:
            for name, owner in list(self.busy.items()):
                if owner == run_id:
                    del self.busy[name]
            self.runs.pop(run_id, None)
            self._last_active = time.monotonic()

    # --- messages from agents ---------------------------------------------------------------
    def _on_message(self, link: NodeLink, message: dict) -> None:
        kind = message.get("t")
        run_id = message.get("run")
        if run_id is not None:
            run = self.runs.get(run_id)
            if run is not None:
                run.on_message(link, message)
            elif message.get("shm"):  # a result that came after its run ended: free its memory
                sharedmem.discard(message["shm"])
            return
        if kind == "heartbeat":
            self.store.upsert_node(
                self.id, link.name, last_seen=time.time(), cpu_percent=message.get("cpu"),
                mem_used=message.get("mem_used"),
                telemetry={k: message.get(k) for k in ("ranks", "gpus", "time")},
            )
        elif kind == "node_update":
            self.store.upsert_node(self.id, link.name, torch=message.get("torch"))

    def _on_lost(self, link: NodeLink, reason: str) -> None:
        if self.closed:
            return
        log.warning("node %s lost: %s", link.name, reason)
        # Whatever is left of it goes: a hung or corrupt agent is killed, a dead one reaped.
        threading.Thread(target=self.backend.stop_node, args=(link,), daemon=True).start()
        self.store.upsert_node(self.id, link.name, status="lost", last_seen=time.time())
        self.store.add_event("node_lost", {"node": link.name, "reason": reason}, pool=self.id)
        with self._lock:
            runs = list(self.runs.values())
        for run in runs:
            run.on_node_lost(link, reason)

    # --- life cycle ------------------------------------------------------------------------
    def record_cost(self) -> None:
        """$/h and dollars so far into the store (the sidebar and other processes read them)."""
        price, cost = self.backend.price_per_hour(), self.backend.cost_so_far()
        if price is not None or cost is not None:
            self.store.set_pool_cost(self.id, price, cost)

    def idle_remaining(self) -> float | None:
        """Seconds until the idle release, None while a run is on or with no idle timeout."""
        timeout = self.settings.get("idle_timeout")
        with self._lock:
            if not timeout or self.runs or self.closed:
                return None
            return max(0.0, timeout - (time.monotonic() - self._last_active))

    def _watch(self) -> None:
        """Once a second: nodes that stopped answering, the cost, the idle release."""
        ticks = 0
        while not self.closed:
            time.sleep(1.0)
            ticks += 1
            self._lose_silent_nodes()
            if ticks % 10 == 0:
                self.record_cost()
            timeout = self.settings.get("idle_timeout")
            with self._lock:
                active = bool(self.runs)
                idle_for = time.monotonic() - self._last_active
            if timeout and not active and idle_for > timeout and not self.closed:
                log.info("releasing pool %s after %.0f s idle", self.id, idle_for)
                self.store.add_event("idle_release", {"idle_seconds": idle_for}, pool=self.id)
                self.down()

    def _lose_silent_nodes(self) -> None:
        deadline = self.settings.get("heartbeat_timeout") or HEARTBEAT_TIMEOUT
        now = time.monotonic()
        for link in self.live_nodes:
            silent = now - link.last_heard
            if link.facts and silent > deadline:  # (a node still starting has its own timeout)
                link.lose(f"no heartbeat for {silent:.0f} s")

    def release_node(self, name: str) -> str:
        """Stop one idle node; says what happened."""
        with self._lock:
            link = next((n for n in self.nodes if n.name == name and n.alive), None)
            if link is None:
                return f"no live node {name} in pool {self.id}"
            if name in self.busy:
                return f"{name} is busy with run {self.busy[name]}: cancel it first"
            self.nodes.remove(link)
        self.backend.stop_node(link)
        self.store.upsert_node(self.id, name, status="released")
        return f"released {name}"

    def down(self, reason: str = "the pool was released") -> None:
        """Cancel whatever still runs (saying ``reason``), stop every agent, and mark the pool
        released."""
        with self._lock:
            if self.closed:
                return
            runs = list(self.runs.values())
        for run in runs:
            run.cancel(reason=reason)
        for run in runs:
            run.done.wait(6.0)
        with self._lock:
            self.closed = True
            nodes = list(self.nodes)
        for link in nodes:
            self.backend.stop_node(link)
        self.backend.close()
        self.record_cost()
        shm = self.backend.shared_memory_dir()
        if shm:  # results no kernel mapped (a rank killed while writing one): free that memory
            sharedmem.sweep(shm, self._run_ids)
        self.store.end_pool(self.id)
