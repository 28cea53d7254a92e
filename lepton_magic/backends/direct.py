"""Ranks on the kernel's machine, reached straight: the job goes from the kernel to a standby
rank, and the rank's frames come back, without passing through its agent.

Through the agent a short cell crosses five process wake-ups (kernel → agent → rank → agent →
kernel); straight, three. The agent still does everything else: it forks the standbys, reads
their output, watches their end, kills them on cancel and when the kernel goes. It offers each
standby once it said hello (agent/node.py ``offer``): the standby's pid, its control key and
one end of a socket pair whose other end the standby holds, passed over a private Unix socket.

Guarantees kept: the job is signed with the standby's control key, the rank's frames with its
run's key and checked like any (a rank speaks for its run and rank only); the agent learns whose
rank each standby became (``assigned``) before any cancel of that run can reach it; and a rank's
end, which the agent reports, is never taken in before the frames the rank sent straight
(``drain``).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgpack

from ..protocol import FrameSplitter, FrameWriter, ProtocolError

if TYPE_CHECKING:
    from .base import NodeLink

log = logging.getLogger("lepton_magic.backends")

#: A run still going this long after its jobs were sent straight: its agent is told whose ranks
#: they are (a short cell has ended by then, and its end tells the agent).
LATER_SECONDS = 0.05
#: How long telling the agent waits for another thread still sending the run's jobs.
DISPATCH_WAIT_SECONDS = 5.0


@dataclass(eq=False)
class Standby:
    """An offered standby: idle until given a job, then one rank of one run."""

    sid: int
    pid: int
    key: bytes
    preloaded: bool
    sock: socket.socket
    run: str | None = None
    rank: int | None = None
    splitter: FrameSplitter | None = None
    gone: bool = False  # its socket is closed
    lock: threading.Lock = field(default_factory=threading.Lock)  # reading and handing on, one at a time


@dataclass(eq=False)
class _Untold:
    """A run whose agent has not been told yet whose ranks its standbys became."""

    ranks: list[list[int]] = field(default_factory=list)  # [standby id, rank], as jobs go
    since: float = float("inf")  # when its jobs were all sent (not yet: they are being sent)

    @property
    def sending(self) -> bool:
        return self.since == float("inf")


class DirectRanks:
    """The kernel's side of one local agent's offered standbys: hands out jobs, reads answers."""

    def __init__(self, link: "NodeLink", offers: socket.socket):
        self.link = link
        self._offers = offers
        self._idle: dict[bool, list[Standby]] = {False: [], True: []}  # by preloaded
        self._by_fd: dict[int, Standby] = {}
        self._running: dict[tuple[str, int], Standby] = {}
        self._untold: dict[str, _Untold] = {}  # runs the agent has not been told of
        self._lock = threading.Lock()
        self._dispatched = threading.Condition(self._lock)  # a run's jobs all sent (see tell_agent)
        self._poll = select.epoll()  # registering from another thread is safe with epoll
        self._wake_r, self._wake_w = os.pipe()
        self._poll.register(self._wake_r, select.EPOLLIN)
        # Offers are taken when a run needs standbys, not as they come: a thread woken for each
        # would compete for the GIL with the cell being dispatched.
        offers.setblocking(False)
        self._offers_lock = threading.Lock()
        self._closed = False
        self.jobs_sent = 0  # (tests and benchmarks: how many jobs went straight)
        self._thread = threading.Thread(target=self._serve, name=f"lepton-{link.name}-direct", daemon=True)
        self._thread.start()

    # --- dispatch (the kernel's main thread) -------------------------------------------------
    def dispatch(self, message: dict) -> list[dict] | None:
        """Send one node's share of a run (the agent's run message) straight to standbys, and
        tell the agent whose ranks they are. Returns what the run records next ('started', as
        the agent would say it), or None when there are not enough standbys of the kind: the
        agent's way then."""
        run = message["run"]
        preloaded = bool(message.get("preload", True))
        key = self.link.run_key(run)
        ranks = [message["rank_offset"] + local_rank for local_rank in range(message["local_world_size"])]
        self._take_offers()
        with self._lock:
            idle = self._idle[preloaded]
            if len(idle) < len(ranks):
                return None  # not one for every rank of the node: the agent starts them all
            taken = [idle.pop(0) for _ in ranks]  # the oldest: they finished starting long ago
            # Whose rank each standby becomes is recorded before its job goes, so the agent is
            # told of every job sent (tell_agent), even of a dispatch interrupted half-way.
            untold = self._untold[run] = _Untold()
        events: list[dict] | None = []
        try:
            for local_rank, rank in enumerate(ranks):
                job = dict(message, t="job", local_rank=local_rank, key=key, preempting=False, direct=True)
                standby = self._send_job(taken.pop(0), preloaded, job, key, untold)
                if standby is None:
                    if not untold.ranks:
                        events = None  # nothing was sent (the standbys had died): the agent's way
                        break
                    events += _not_started(run, rank, self.link.name)
                    continue
                events.append({"t": "started", "run": run, "rank": rank, "pid": standby.pid,
                               "time": time.time()})
        finally:
            with self._lock:
                self._idle[preloaded][:0] = taken  # (interrupted: those not given a job yet)
                untold.since = time.monotonic()
                if events is None:
                    del self._untold[run]
                self._dispatched.notify_all()
        # The agent is told later (see tell_agent): waking it now would slow the cell.
        return events

    def tell_agent(self, run: str) -> None:
        """Tell the agent whose ranks the standbys of ``run`` became, if not told yet. Not on the
        way of a short cell (its ranks' end waits for it at the agent, see agent/node.py
        'unclaimed'); before anything the agent must act on: a cancel (on the same pipe, after
        this), a rank's lines the run waits for, the run's end, or LATER_SECONDS into it."""
        with self._lock:  # sent under the lock: whoever sends a cancel after this call sends it after
            deadline = time.monotonic() + DISPATCH_WAIT_SECONDS
            while run in self._untold and self._untold[run].sending and time.monotonic() < deadline:
                self._dispatched.wait(0.05)  # another thread is sending its jobs: all of them first
            untold = self._untold.pop(run, None)
            if untold is not None:
                self.link.send({"t": "assigned", "run": run, "ranks": list(untold.ranks)})

    def _send_job(self, standby: Standby, preloaded: bool, job: dict, key: bytes,
                  untold: "_Untold") -> Standby | None:
        """Give ``standby`` (or, if it died since its offer, another idle one) the job; None
        when none is left."""
        run, rank = job["run"], job["rank_offset"] + job["local_rank"]
        while True:
            with self._lock:
                if standby is None:
                    idle = self._idle[preloaded]
                    if not idle:
                        return None
                    standby = idle.pop(0)
                standby.run, standby.rank = run, rank
                standby.splitter = FrameSplitter(lambda channel: key if channel == run else None,
                                                 f"rank {rank} of {run} on {self.link.name}")
                self._running[(run, rank)] = standby
                untold.ranks.append([standby.sid, rank])
            try:
                with standby.lock:  # not closed (and its descriptor number reused) meanwhile
                    if standby.gone:
                        raise BrokenPipeError("its socket is closed")
                    FrameWriter(standby.sock.fileno(), standby.key).send(job)
                self.jobs_sent += 1
                return standby
            except OSError as e:  # it died since its offer: the next one
                log.info("standby %s on %s is gone (%s); trying another", standby.pid, self.link.name, e)
                with self._lock:
                    self._running.pop((run, rank), None)
                    untold.ranks.remove([standby.sid, rank])
                self._forget(standby)
                standby = None

    # --- the end of a rank (the agent's reader thread) ----------------------------------------
    def drain(self, run: str, rank: int) -> None:
        """The agent says the rank ended: take in whatever it sent straight first. Its process
        is gone, so everything it wrote is in the socket (or was read) by now."""
        with self._lock:
            standby = self._running.pop((run, rank), None)
        if standby is not None:
            self._read(standby)
            self._forget(standby)

    # --- the reader thread -------------------------------------------------------------------
    def _serve(self) -> None:
        try:
            while True:
                self.tell_due()
                timeout = LATER_SECONDS if self._untold else -1
                for fd, _events in self._poll.poll(timeout):
                    if fd == self._wake_r:
                        os.read(self._wake_r, 4096)
                        if self._closed:
                            return
                        continue
                    standby = self._by_fd.get(fd)
                    if standby is not None:
                        self._read(standby)
        except Exception:
            log.exception("reading the direct ranks of %s failed", self.link.name)
        finally:
            self._close_all()

    def tell_due(self) -> None:
        """Tell the agent of the runs going for LATER_SECONDS already (this thread, when it wakes,
        and the pool's watch once a second)."""
        now = time.monotonic()
        with self._lock:
            due = [run for run, untold in self._untold.items() if now - untold.since >= LATER_SECONDS]
        for run in due:
            self.tell_agent(run)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"w")
        except OSError:
            pass

    def standbys(self, preloaded: bool) -> int:
        """How many standbys of the kind are offered and idle now."""
        self._take_offers()
        with self._lock:
            return len(self._idle[preloaded])

    def _take_offers(self) -> None:
        with self._offers_lock:
            while not self._closed and self._take_offer():
                pass

    def _take_offer(self) -> bool:
        """One offer from the agent; False when none waits (or the agent is gone)."""
        try:
            about, fds, _flags, _addr = socket.recv_fds(self._offers, 1024, 1)
        except OSError:
            return False
        if not about:
            for fd in fds:
                os.close(fd)
            return False
        try:
            os.set_inheritable(fds[0], False)  # not into the cell's subprocesses (os.system, Popen)
            info = msgpack.unpackb(about)
            standby = Standby(int(info["standby"]), int(info["pid"]), bytes(info["key"]), bool(info["preloaded"]),
                              socket.socket(fileno=fds[0]))
        except Exception as e:
            for fd in fds:
                os.close(fd)
            log.warning("dropped a standby offer from %s that does not read (%s: %s)", self.link.name,
                        type(e).__name__, e)
            return True
        with self._lock:  # registered under it: a node stopped meanwhile has not closed the epoll yet
            if self._closed:
                standby.sock.close()
                return False
            self._by_fd[standby.sock.fileno()] = standby
            self._idle[standby.preloaded].append(standby)
            self._poll.register(standby.sock.fileno(), select.EPOLLIN)  # its frames, or its end
        return True

    def _read(self, standby: Standby) -> None:
        """Take and hand on what the standby sent; at its end (EOF), stop watching it."""
        with standby.lock:  # one reader at a time, so frames are handed on in order
            while not standby.gone:
                try:
                    data = standby.sock.recv(1 << 20, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    return
                except OSError:
                    data = b""
                if not data:
                    break
                if standby.splitter is None:
                    continue  # an idle standby has nothing to say
                try:
                    standby.splitter.feed(data)
                except ProtocolError as e:  # not frames at all: nothing more of it can be read
                    log.warning("rank %s of %s on %s: %s", standby.rank, standby.run, self.link.name, e)
                    break
                for frame, message in list(standby.splitter.envelopes()):
                    self.link.deliver_rank_message(frame, message, standby.rank)
        self._forget(standby)

    def _forget(self, standby: Standby) -> None:
        """Stop watching a standby that ended, was retired, or whose rank the agent saw end. A
        rank's entry in _running stays until the agent's word on its end (see drain)."""
        with self._lock:
            if standby.gone:
                return
            standby.gone = True
            self._by_fd.pop(standby.sock.fileno(), None)
            for idle in self._idle.values():
                if standby in idle:
                    idle.remove(standby)
        with standby.lock:  # not while a job is being written to it (see _send_job)
            try:
                self._poll.unregister(standby.sock.fileno())
            except (OSError, ValueError):
                pass
            standby.sock.close()

    # --- the end -----------------------------------------------------------------------------
    def close(self) -> None:
        """The node is stopped: retire the standbys (their sockets close) and stop reading."""
        with self._lock:
            self._closed = True
        self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def _close_all(self) -> None:
        with self._lock:
            self._closed = True
            standbys = list(self._by_fd.values())
        for standby in standbys:
            self._forget(standby)
        with self._lock:
            self._running.clear()
        self._offers.close()
        self._poll.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass


def _not_started(run: str, rank: int, node: str) -> list[dict]:
    """A rank no standby was left for, after others of the node got their jobs: the run learns
    it as of a rank that could not start (it fails; a retry may help)."""
    return [{"t": "error", "run": run, "rank": rank, "type": "LeptonError",
             "message": f"could not start rank {rank} on {node}: no standby was left",
             "traceback": "", "line": None},
            {"t": "exit", "run": run, "rank": rank, "pid": None, "killed": None, "time": time.time()}]
