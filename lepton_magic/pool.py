"""A pool: the warm nodes of one backend, kept between cells until released or idle too long."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Callable

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
#: How long an ended run still takes what its ranks send before their exits.
ENDING_SECONDS = 30.0


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
        #: Runs that ended before every rank's exit came (a rank answers, then exits): what their
        #: ranks still send (the last lines of C code or of a child) goes on to them a while.
        self._ending: dict[str, tuple[float, "LiveRun"]] = {}
        self.closed = False
        self._run_ids: list[str] = []
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # nodes were freed, lost or released
        self._waiting: deque[str] = deque()  # runs queued for nodes, first come first served
        #: When each free node that has come up last became free (time.monotonic()): its idle clock.
        self._idle_since: dict[str, float] = {}
        self._growing = 0  # grow() calls under way
        # Names are never used twice in a pool: the store and the backends (EC2's cost) key by name.
        self._nodes_named = 0
        self._released: set[str] = set()  # nodes stopped on purpose, whose exit is no loss
        self._preempting: set[str] = set()  # nodes with a spot notice: given to no new run
        self._spare_for: set[str] = set()  # runs with retries going: a warm node waits for their retry
        self._log_dir = Path(store.home) / "logs"
        private.make_dir(self._log_dir)
        store.add_pool(self.id, backend, {k: v for k, v in settings.items() if k != "secret"})
        self._watch_thread = threading.Thread(target=self._watch, daemon=True, name="lepton-pool-watch")
        self._watch_thread.start()

    # --- nodes -----------------------------------------------------------------------------
    @property
    def live_nodes(self) -> list[NodeLink]:
        return [n for n in self.nodes if n.alive]

    @property
    def min_nodes(self) -> int:
        """Nodes the idle release leaves (``%lepton up --min N``). 0 for a pool started with
        ``--nodes N`` or by a cell: all its nodes go when idle, and it grows again on demand."""
        return self.settings.get("min_nodes") or 0

    @property
    def max_nodes(self) -> int | None:
        """The most nodes the pool may hold (``--max M``); None: no cap but the max_nodes
        setting, which bounds each run and each ``%lepton up``."""
        return self.settings.get("max_nodes")

    @property
    def limits(self) -> str:
        """``min 1, max 3`` as ``%lepton up`` and ``status`` show it; "" for a pool given neither."""
        if not (self.min_nodes or self.max_nodes):
            return ""
        return f"min {self.min_nodes}" + (f", max {self.max_nodes}" if self.max_nodes else "")

    def grow(self, count: int, reason: str) -> list[NodeLink]:
        """Start ``count`` more nodes and wait until each has reported in; ``reason`` (why the
        pool grows) goes into the pool's events."""
        with self._lock:
            self._check_room(count, reason)
            names = [f"{self.backend_name}-{i}" for i in range(self._nodes_named, self._nodes_named + count)]
            self._nodes_named += count
            self._growing += 1
        try:
            return self._start(names, reason)
        finally:
            with self._lock:
                self._growing -= 1

    def _check_room(self, count: int, reason: str) -> None:
        cap = self.max_nodes
        if cap and len(self.live_nodes) + count > cap:
            message = f"the pool may hold at most {cap} nodes (%lepton up --max {cap}); {reason}"
            self.store.add_event("pool_grow_refused", {"nodes": count, "reason": message}, pool=self.id)
            raise LeptonError(message)

    def _start(self, names: list[str], reason: str) -> list[NodeLink]:
        self.store.add_event("pool_grow", {"nodes": len(names), "reason": reason}, pool=self.id)
        with self._lock:
            started = time.time()
            for name in names:
                self.store.upsert_node(self.id, name, status="starting", started=started)
            try:
                links = self.backend.start_nodes(names, self.secret, self._on_message, self._on_lost,
                                                 str(self._log_dir))
            except LeptonError as e:  # none of them started (the backend stopped those that had)
                for name in names:
                    self.store.upsert_node(self.id, name, status="lost")
                self.store.add_event("pool_grow_refused", {"nodes": len(names), "reason": str(e)}, pool=self.id)
                raise
            self.nodes.extend(links)
        deadline = time.monotonic() + NODE_START_TIMEOUT
        failed = []
        for link in links:
            link.ready.wait(max(0.0, deadline - time.monotonic()))
            if not link.alive or not link.facts:
                # Lost, so that nothing waits on it or keeps it: the others still join the pool.
                link.lose(f"it did not report in within {NODE_START_TIMEOUT:.0f} s")
                self.store.upsert_node(self.id, link.name, status="lost")
                failed.append(link)
                continue
            gpus = link.facts.get("gpus") or []
            # ``started`` becomes when it came up: its idle clock starts there (readers of the
            # store, like the sidebar's countdown, count from it too).
            self.store.upsert_node(
                self.id, link.name, status="ready", host=link.host, cpus=link.facts.get("cpus"),
                memory=link.facts.get("memory"), gpus=len(gpus),
                gpu_name=gpus[0]["name"] if gpus else None,
                gpu_memory=gpus[0]["memory"] if gpus else None,
                agent_pid=link.facts.get("pid"), python=link.facts.get("python"), last_seen=time.time(),
                started=time.time(), place=link.place,
            )
            with self._changed:
                self._idle_since[link.name] = time.monotonic()
                self._changed.notify_all()
        self.record_cost()
        if failed:
            name = failed[0].name
            raise LeptonError(f"node {name} did not start (see {self._log_dir / f'agent-{name}.log'})")
        return links

    def ensure(self, count: int) -> None:
        """At least ``count`` live nodes (``%lepton up``, and before each run). Asking counts as
        using: the idle clocks of the free nodes that make up the count start again, so they are
        not released just as a run or ``up`` is about to take them."""
        with self._lock:
            live = self.live_nodes
            now = time.monotonic()
            for link in self._free(live)[:count]:
                self._idle_since[link.name] = now
        missing = count - len(live)
        if missing > 0:
            self.grow(missing, f"{_nodes(count)} asked for, {len(live)} up")

    def acquire(self, count: int, run_id: str, wanted: Callable[[], bool] | None = None) -> list[NodeLink]:
        """``count`` idle nodes for one run, starting more when too few are free (up to the
        pool's max). The free ones are taken at once: no idle release takes them while the
        others start.

        When the pool is at its max and too few nodes are free, a run that could fit once others
        end either raises PoolBusy (``wanted`` None) or, with ``wanted``, waits its turn in a
        first-come queue, for as long as ``wanted()`` says the run still wants nodes. Nothing is
        held while it waits (two waiting runs never hold half of what each needs)."""
        cap = self.max_nodes
        if cap and count > cap:
            self._check_room(count - len(self._free(self.live_nodes)),
                             f"a run needs {_nodes(count)}, {len(self._free(self.live_nodes))} free")
        with self._changed:
            self._waiting.append(run_id)
        try:
            while True:
                with self._changed:
                    if self.closed:
                        raise LeptonError("the pool was released; run again to start a new one")
                    if self._waiting[0] == run_id:
                        taken = self._take(count, run_id)
                        missing = count - len(taken)
                        if not missing or self._room() >= missing:
                            self._waiting.popleft()
                            break
                        self._give_back(run_id)
                        if wanted is None:
                            raise PoolBusy(f"the pool is at its max of {cap} nodes and {len(taken)} of them "
                                           f"are free; the run needs {_nodes(count)}")
                    elif wanted is None:
                        raise PoolBusy(f"{self._waiting.index(run_id)} run(s) wait for nodes before it")
                    if not wanted():
                        raise LeptonError("no longer wanted")
                    self._changed.wait(0.25)
        finally:
            with self._changed:
                if run_id in self._waiting:
                    self._waiting.remove(run_id)
                self._changed.notify_all()
        if not missing:
            return taken
        try:
            self.grow(missing, f"a run needs {_nodes(count)}, {len(taken)} free")
            with self._lock:
                taken += self._take(missing, run_id)
            if len(taken) < count:
                raise LeptonError(f"the pool has {len(taken)} usable nodes, the run needs {count}")
        except BaseException:
            self.release_run(run_id)
            raise
        return taken

    def _room(self) -> int | float:
        """Nodes the pool may still start."""
        return self.max_nodes - len(self.live_nodes) if self.max_nodes else float("inf")

    @property
    def queued(self) -> int:
        """Runs waiting for nodes."""
        return len(self._waiting)

    def _free(self, links: list[NodeLink]) -> list[NodeLink]:
        """Those of ``links`` that have come up, run nothing and are not about to go (a spot
        notice): a new run or a retry never starts on a node being reclaimed."""
        return [n for n in links if n.name not in self.busy and n.name in self._idle_since
                and n.name not in self._preempting]

    def _take(self, count: int, run_id: str) -> list[NodeLink]:
        taken = self._free(self.live_nodes)[:count]
        for node in taken:
            self.busy[node.name] = run_id
        return taken

    # --- a warm spare for retries ------------------------------------------------------------
    @property
    def keeps_spares(self) -> bool:
        """A spare costs a node's memory here; on a cloud it costs money, so only when asked."""
        choice = self.settings.get("retry_spare") or "auto"
        return choice == "on" or (choice == "auto" and self.backend_name in ("local", "ssh"))

    @property
    def spares_wanted(self) -> int:
        return 1 if self._spare_for and self.keeps_spares else 0

    def hold_spare(self, run_id: str, name: str) -> None:
        """While the run goes, keep one free node warm (its torch imported), so the run's retry
        after a lost node starts at once instead of waiting for a new node to come up."""
        if not self.keeps_spares:
            return
        with self._lock:
            self._spare_for.add(run_id)
            short = not self._free(self.live_nodes) and not self._growing
            room = not self.max_nodes or len(self.live_nodes) < self.max_nodes
        if short and room:
            threading.Thread(target=self._grow_spare, args=(name,), daemon=True, name="lepton-spare").start()

    def _grow_spare(self, name: str) -> None:
        try:
            self.grow(1, f"a warm spare for {name}'s retries")
        except Exception as e:  # no room, or the node did not start: a retry starts one then
            log.info("pool %s: no spare node (%s)", self.id, e)

    def drop_spare(self, run_id: str) -> None:
        with self._lock:
            self._spare_for.discard(run_id)

    def ranks_by_host(self, exclude: "LiveRun | None" = None) -> dict[str, int]:
        """Ranks of the runs going now, per host (how many share each machine's cores)."""
        counts: dict[str, int] = {}
        with self._lock:
            runs = [r for r in self.runs.values() if r is not exclude and not r.done.is_set()]
        for run in runs:
            for link in run.nodes:
                ranks = sum(1 for node in run.rank_nodes.values() if node == link.name)
                counts[link.host] = counts.get(link.host, 0) + ranks
        return counts

    def attach_run(self, run: "LiveRun") -> None:
        with self._lock:
            self.runs[run.id] = run
            self._run_ids.append(run.id)

    def release(self, run: "LiveRun") -> None:
        self.release_run(run.id)

    def release_run(self, run_id: str) -> None:
        with self._changed:
            self._give_back(run_id)
            # Into _ending before out of runs: the agents' reader threads look in both, unlocked,
            # and a late line read in between would find the run in neither.
            run = self.runs.get(run_id)
            if run is not None and not run.all_exited:
                self._ending[run_id] = (time.monotonic() + ENDING_SECONDS, run)
            self.runs.pop(run_id, None)
            self._changed.notify_all()  # a queued run may take them

    def _give_back(self, run_id: str) -> None:
        now = time.monotonic()
        for name, owner in list(self.busy.items()):
            if owner == run_id:
                del self.busy[name]
                self._idle_since[name] = now

    # --- messages from agents ---------------------------------------------------------------
    def _on_message(self, link: NodeLink, message: dict) -> None:
        kind = message.get("t")
        run_id = message.get("run")
        if run_id is not None:
            run = self.runs.get(run_id) or self._ending.get(run_id, (0, None))[1]
            if run is not None:
                run.on_message(link, message)
                if kind == "exit" and run_id in self._ending and run.all_exited:
                    self._ending.pop(run_id, None)
            elif message.get("shm"):  # a result that came after its run ended: free its memory
                sharedmem.discard(message["shm"])
            return
        if kind == "heartbeat":
            self.store.upsert_node(
                self.id, link.name, last_seen=time.time(), cpu_percent=message.get("cpu"),
                mem_used=message.get("mem_used"),
                telemetry={k: message.get(k) for k in ("ranks", "gpus", "time")},
            )
        elif kind == "link":  # a resumable link's connection dropped, or came back
            data = {"node": link.name, "reason": message.get("reason")}
            self.store.add_event(f"node_{message['state']}", data, pool=self.id)
            self.store.upsert_node(self.id, link.name,
                                   status="reconnecting" if message["state"] == "reconnecting" else "ready")
            with self._lock:
                runs = {run.seq for run in self.runs.values() if link in run.nodes}
            for seq in runs:
                self.store.add_event(f"node_{message['state']}", data, run=seq)
        elif kind == "node_update":
            self.store.upsert_node(self.id, link.name, torch=message.get("torch"))
        elif kind == "preempting":  # a spot notice: the node goes in about two minutes
            # The link's name, not the message's: the link is who signed the frame.
            notice = {"node": link.name, "action": message.get("action"), "time": message.get("time")}
            log.warning("node %s: spot interruption notice (%s at %s)", link.name, notice["action"],
                        notice["time"])
            self.store.upsert_node(self.id, link.name, status="preempting")
            self.store.add_event("node_preempting", notice, pool=self.id)
            with self._lock:
                self._preempting.add(link.name)
                runs = {run.seq for run in self.runs.values() if link in run.nodes}
            for seq in runs:
                self.store.add_event("node_preempting", notice, run=seq)

    def _on_lost(self, link: NodeLink, reason: str) -> None:
        if self.closed or link.name in self._released:
            return
        log.warning("node %s lost: %s", link.name, reason)
        # Whatever is left of it goes: a hung or corrupt agent is killed, a dead one reaped.
        threading.Thread(target=self.backend.stop_node, args=(link,), daemon=True).start()
        self.store.upsert_node(self.id, link.name, status="lost", last_seen=time.time())
        self.store.add_event("node_lost", {"node": link.name, "reason": reason}, pool=self.id)
        with self._changed:
            runs = list(self.runs.values())
            self._changed.notify_all()  # the room it leaves may start a queued run's nodes
        for run in runs:
            run.on_node_lost(link, reason)

    # --- life cycle ------------------------------------------------------------------------
    def record_cost(self) -> None:
        """$/h and dollars so far into the store (the sidebar and other processes read them)."""
        price, cost = self.backend.price_per_hour(), self.backend.cost_so_far()
        if price is not None or cost is not None:
            self.store.set_pool_cost(self.id, price, cost)

    def idle_remaining(self) -> float | None:
        """Seconds until the next idle node is released; None when none would be (no idle
        timeout, the pool at its min, or every node above it busy)."""
        timeout = self.settings.get("idle_timeout")
        with self._lock:
            idle = self._longest_idle_first()
            if (not timeout or self.closed or len(idle) <= self.spares_wanted
                    or len(self.live_nodes) <= self.min_nodes):
                return None
            return max(0.0, timeout - (time.monotonic() - self._idle_since[idle[0].name]))

    def _longest_idle_first(self) -> list[NodeLink]:
        """Free nodes in the order the idle release takes them: among nodes freed together (by
        one run's end) the newest first, so the pool keeps its oldest, as runs take them first."""
        newest_first = reversed(self._free(self.live_nodes))
        return sorted(newest_first, key=lambda link: self._idle_since[link.name])

    def _watch(self) -> None:
        """Once a second: nodes that stopped answering, the cost, the idle release."""
        ticks = 0
        while not self.closed:
            time.sleep(1.0)
            ticks += 1
            self._lose_silent_nodes()
            for link in self.live_nodes:
                if link.direct is not None:
                    link.direct.tell_due()
            now = time.monotonic()
            for run_id, (until, _run) in list(self._ending.items()):
                if now > until:
                    self._ending.pop(run_id, None)
            if ticks % 2 == 0:
                self._beat()
            if ticks % 10 == 0:
                self.record_cost()
            self._release_idle_nodes()

    def _release_idle_nodes(self) -> None:
        """Nodes above min that sat idle for the idle timeout go, the longest idle first. Each
        node has its own clock, so a pool kept busy by small runs still sheds what a big run
        needed. Busy nodes never go, and none while nodes start: what they start for is about
        to take free ones."""
        timeout = self.settings.get("idle_timeout")
        if not timeout:
            return
        with self._lock:
            if self.closed or self._growing:
                return
            now = time.monotonic()
            free = self._longest_idle_first()
            due = [n for n in free if now - self._idle_since[n.name] >= timeout]
            going = due[:max(0, min(len(self.live_nodes) - self.min_nodes, len(free) - self.spares_wanted))]
            for link in going:
                self._forget(link)
        if going:
            log.info("pool %s: releasing %d node(s) idle for %s", self.id, len(going), _duration(timeout))
            self._stop(going, f"idle {_duration(timeout)}; min {self.min_nodes}")

    def _lose_silent_nodes(self) -> None:
        """A node silent past the deadline is lost; one of detached runs (a resumable link) is
        first connected to again."""
        deadline = self.settings.get("heartbeat_timeout") or HEARTBEAT_TIMEOUT
        now = time.monotonic()
        for link in self.live_nodes:
            silent = now - link.last_heard
            if link.facts and silent > deadline and not link.reconnecting:  # (a starting node has its own timeout)
                link.drop(f"no heartbeat for {silent:.0f} s")

    def _beat(self) -> None:
        """Agents on other hosts take a kernel that stopped sending for gone (see backends.ssh)."""
        for link in self.live_nodes:
            if link.facts and not link.reconnecting:
                link.beat()

    def release_node(self, name: str) -> str:
        """Stop one idle node; says what happened."""
        with self._lock:
            link = next((n for n in self.nodes if n.name == name and n.alive), None)
            if link is None:
                return f"no live node {name} in pool {self.id}"
            if name in self.busy:
                return f"{name} is busy with run {self.busy[name]}: cancel it first"
            self._forget(link)
        self._stop([link], "released on request")
        return f"released {name}"

    def _forget(self, link: NodeLink) -> None:
        """Out of the pool before it is stopped: no run can take it, and its exit is no loss."""
        self.nodes.remove(link)
        self._idle_since.pop(link.name, None)
        self._released.add(link.name)

    def _stop(self, links: list[NodeLink], reason: str) -> None:
        self.store.add_event("pool_shrink", {"nodes": len(links), "released": [n.name for n in links],
                                             "reason": reason}, pool=self.id)
        for link in links:
            self.backend.stop_node(link)
            self.store.upsert_node(self.id, link.name, status="released")
        self.record_cost()

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
        with self._changed:
            self.closed = True
            nodes = list(self.nodes)
            self._changed.notify_all()
        for link in nodes:
            self.backend.stop_node(link)
        self.backend.close()
        self.record_cost()
        shm = self.backend.shared_memory_dir()
        if shm:  # results no kernel mapped (a rank killed while writing one): free that memory
            sharedmem.sweep(shm, self._run_ids)
        self.store.end_pool(self.id)


class PoolBusy(LeptonError):
    """Every node the pool may hold is busy: the run can start once others end (it is queued)."""


def _nodes(count: int) -> str:
    return f"{count} node" if count == 1 else f"{count} nodes"


def _duration(seconds: float) -> str:
    return f"{seconds:g} s" if seconds < 120 else f"{seconds / 60:g} min"
