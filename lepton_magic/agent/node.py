"""The node agent: one per node, started by a backend as ``python -m lepton_magic.agent``.

It speaks the protocol with the kernel over stdin/stdout and runs a single-threaded selector
loop. It keeps standby rank processes ready, hands each job to them, relays their signed frames
to the kernel untouched, turns their stdout and stderr into log lines, samples telemetry, and
kills their process groups on cancel. When the kernel goes away (its end of stdin closes, even
after ``kill -9``) it kills everything and exits. Where asked (spot instances), one thread polls
the instance metadata for an interruption notice and hands it to the loop through a pipe
(agent/spot.py); the agent then warns the kernel and its ranks (``lepton.preempting``).

On the kernel's machine (``--direct-fd``) the agent offers each greeted standby to the kernel:
the kernel sends it its job and reads its frames itself (backends/direct.py), and tells the
agent afterwards whose rank it became (``assigned``); the agent does all the rest as ever.

Keys: the kernel's first bytes are this node's key. The agent forks its zygotes before it reads
them and never forks after, so no rank holds the node key: a rank gets the key of its control
socket (to say hello and take its job) and the key of its run, derived from the node's. The
agent relays a rank's frame only if it verifies with that run's key and names that rank; the
kernel verifies it again with the same key.

Bad input never stops the agent: protocol.FrameSplitter drops what does not verify or decode,
and a message the agent cannot act on is dropped with one log line. Only a kernel stream that
does not start with a frame of this protocol version ends it, as the kernel's going away does.
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import socket
import sys
import time

import msgpack

from .. import __version__
from ..protocol import (
    KEY_SIZE,
    VERSION,
    Frame,
    FrameSplitter,
    FrameWriter,
    ProtocolError,
    decode_body,
    new_secret,
    read_exact,
    run_key,
)
from . import facts, spot, zygote
from .prepare import KINDS as PREPARE_KINDS, Preparer
from .uplink import Journal, Resume, Uplink
from . import rank as _rank  # noqa: F401  imported once here, inherited by the zygotes' children
from .forking import CTRL_FD

HEARTBEAT_SECONDS = 2.0
#: An unfinished line (a progress bar redrawn with carriage returns) is sent at most this often.
PARTIAL_LINE_SECONDS = 0.25
#: Of an unfinished line, at most this many bytes (its end: what a terminal would show) are sent.
PARTIAL_LINE_BYTES = 4096
#: After SIGTERM a rank has this long to exit before SIGKILL.
KILL_GRACE_SECONDS = 2.0
#: A run that comes before any zygote is ready waits this long for the light one (a bare fork,
#: ready in milliseconds).
ZYGOTE_WAIT_SECONDS = 10.0
#: An offered standby that ended is kept this long for the kernel's word on whose rank it was.
UNCLAIMED_SECONDS = 60.0


class RankProcess:
    """A standby rank, or a rank running a job: its descriptors and what we know of it."""

    def __init__(self, ctrl: socket.socket, out_fd: int, err_fd: int):
        self.ctrl = ctrl
        self.out_fd = out_fd
        self.err_fd = err_fd
        self.pid: int | None = None
        self.greeted = False
        self.preloaded = False
        self.run: str | None = None
        self.rank: int | None = None
        self.run_key: bytes | None = None
        self.control_key = new_secret()
        ctrl.sendall(self.control_key)  # the standby's first read (see rank.serve)
        self.control = FrameWriter(ctrl.fileno(), self.control_key)
        self.splitter = FrameSplitter(self.key_for, "a standby rank")
        self.partial = {1: b"", 2: b""}
        self.open = 3
        self.killed: str | None = None
        self.kill_at: float | None = None
        self.kill_pending: int | None = None  # a signal to send as soon as the pid is known
        self.pidfd: int | None = None  # readable once the process has exited (Linux 5.3+)
        self.ended = False
        self.preempt_pending = False  # a spot notice came before its pid (see on_hello)
        #: On the kernel's machine: the kernel's end of the standby's direct socket, until it is
        #: offered to the kernel (see Agent.offer); then the kernel alone may give it a job.
        self.direct_end: socket.socket | None = None
        self.offered = False
        self.sid = 0  # the standby's number in this agent's offers
        self.early = {1: b"", 2: b""}  # output of an offered standby before the kernel said whose

    def key_for(self, channel: str) -> bytes | None:
        """The control socket's key for hello; its run's key, once it has one, for the rest."""
        if channel == "":
            return self.control_key
        return self.run_key if channel == self.run else None

    def assign(self, run: str, rank: int, key: bytes) -> None:
        self.run, self.rank, self.run_key = run, rank, key
        self.splitter.source = f"rank {rank} of {run}"

    def tell_preempting(self) -> None:
        """SIGUSR1 to the rank alone, not its process group: a program the cell started (a shell,
        a compiler) has no handler for it and would die of it. Through the pidfd where there is
        one: the pid of a rank that just ended may already name another process."""
        if self.pid is None:
            self.preempt_pending = True
            return
        self.preempt_pending = False
        try:
            if self.pidfd is not None and hasattr(signal, "pidfd_send_signal"):
                signal.pidfd_send_signal(self.pidfd, signal.SIGUSR1)
            else:
                os.kill(self.pid, signal.SIGUSR1)
        except (ProcessLookupError, PermissionError):
            pass  # it has ended: nothing left to warn

    def signal(self, sig: int) -> None:
        if self.pid is None:
            self.kill_pending = sig
            return
        for target in (lambda: os.killpg(self.pid, sig), lambda: os.kill(self.pid, sig)):
            try:
                target()
                return
            except (ProcessLookupError, PermissionError):
                continue


class Agent:
    def __init__(self, node: str, key: bytes, kernel_in: int, kernel_out: int,
                 zygotes: dict[bool, socket.socket], parent_pid: int | None = None,
                 spot_watcher: spot.SpotWatcher | None = None, resume: "Resume | None" = None,
                 kernel_timeout: float | None = None, direct: socket.socket | None = None):
        self.node = node
        self.key = key
        self.kernel_in: int | None = kernel_in
        self.kernel_out: int | None = kernel_out
        # Agents of detached runs keep a journal and wait for the kernel to come back (see uplink).
        self.resume = resume
        self.out = Uplink(kernel_out, key, Journal(resume.journal) if resume else None)
        self.inbox = FrameSplitter(key, "kernel")
        #: The kernel sends a frame every few seconds; silent this long, it is taken for gone.
        self.kernel_timeout = kernel_timeout
        self.last_kernel = time.monotonic()
        self.disconnected_at: float | None = None  # the kernel's connection dropped (resumable)
        self.candidates: dict[int, tuple[socket.socket, FrameSplitter]] = {}  # connections not yet resumed
        self.writing = False  # the kernel's fd is registered for writing too
        self.sel = selectors.DefaultSelector()
        self.ranks: list[RankProcess] = []
        self.want = {False: 1, True: 2}  # standbys to keep, light and preloaded
        # Two zygotes fork the standbys, so forking never holds up this loop: a light one (a bare
        # interpreter) and a preloaded one (torch and friends imported). Keyed by "preloaded".
        self.zygotes = zygotes
        self.zygote_ready = {False: False, True: False}
        self.logs: dict[tuple[str, int, str], list[str]] = {}
        self.partials: dict[tuple[str, int, str], str] = {}  # unfinished lines not sent yet
        self.next_partials = 0.0
        self.next_heartbeat = 0.0
        self.running = True
        self.parent_pid = parent_pid
        self.spot_watcher = spot_watcher
        self.preempting: dict | None = None  # the spot notice this node got, if any
        self.last_run_end = 0.0
        #: Nodes on the kernel's machine: the socket standbys are offered to the kernel on.
        self.direct = direct
        self.standbys_made = 0
        #: Offered standbys that ended before the kernel said whose they were: a short cell's
        #: rank is done before the kernel's 'assigned' arrives. Kept (output and all) a while.
        self.unclaimed: dict[int, tuple[float, RankProcess]] = {}
        # The mirror of the notebook's folder and the run's packages (agent/prepare.py).
        self.preparer = Preparer(node, self.out.send,
                                 lambda fd, install: self.sel.register(fd, selectors.EVENT_READ, ("install", install)),
                                 self.sel.unregister)

    # --- life cycle ------------------------------------------------------------------------
    def serve(self) -> None:
        info = facts.node_facts(self.node)
        info.update({"t": "node", "protocol": VERSION, "agent_version": __version__})
        self.out.send(info)
        self.sel.register(self.kernel_in, selectors.EVENT_READ, ("kernel", None))
        if self.resume is not None:
            self.sel.register(self.resume.listener, selectors.EVENT_READ, ("listen", None))
        if self.parent_pid:
            # The kernel's death must stop us even when a process it forked still holds our stdin.
            parent = _pidfd(self.parent_pid)
            if parent is None:
                return
            self.sel.register(parent, selectors.EVENT_READ, ("parent", None))
        for preloaded, sock in self.zygotes.items():
            self.sel.register(sock, selectors.EVENT_READ, ("zygote", preloaded))
        if self.spot_watcher is not None:
            # The agent's only thread, started once the zygotes are forked: it never forks again.
            self.sel.register(self.spot_watcher.fileno(), selectors.EVENT_READ, ("spot", None))
            self.spot_watcher.start()
        try:
            while self.running:
                self.step()
        finally:
            self.shutdown()

    def step(self) -> None:
        now = time.monotonic()
        deadlines = [self.next_heartbeat] + [r.kill_at for r in self.ranks if r.kill_at]
        if self.partials:
            deadlines.append(self.next_partials)
        timeout = max(0.0, min(deadlines) - now)
        self.want_write(self.out.wants_write)
        for key, mask in self.sel.select(timeout):
            kind, rank = key.data
            try:
                if kind == "kernel":
                    if mask & selectors.EVENT_WRITE:
                        self.out.flush()
                    if mask & selectors.EVENT_READ:
                        self.on_kernel()
                elif kind == "kernel_out":
                    self.out.flush()
                elif kind == "listen":
                    self.on_connect()
                elif kind == "candidate":
                    self.on_candidate(rank)
                elif kind == "parent":
                    self.running = False  # the kernel process is gone
                elif kind == "zygote":
                    self.on_zygote(rank)
                elif kind == "spot":
                    self.on_spot_notice()
                elif kind == "pidfd":
                    self.end_rank(rank)
                elif kind == "install":
                    self.preparer.on_output(rank)
                elif kind == "ctrl":
                    if rank.ctrl is not None:
                        self.on_ctrl(rank)
                elif key.fd in (rank.out_fd, rank.err_fd):  # not closed earlier in this round
                    self.on_output(rank, 1 if kind == "out" else 2, key.fd)
            except BlockingIOError:
                pass
            except ProtocolError as e:
                self.reject_rank(rank, e)
            except OSError as e:
                print(f"lepton agent {self.node}: {kind}: {e}", file=sys.stderr, flush=True)
            if not self.running:
                return
        try:
            self.flush_logs()
            self.reap()
        except OSError as e:
            print(f"lepton agent {self.node}: {e}", file=sys.stderr, flush=True)
        now = time.monotonic()
        for r in self.ranks:
            if r.kill_at and now >= r.kill_at:
                r.signal(signal.SIGKILL)
                r.killed = "SIGKILL"
                r.kill_at = None
        if now >= self.next_heartbeat:
            self.next_heartbeat = now + HEARTBEAT_SECONDS
            pids = {r.rank: r.pid for r in self.ranks if r.run and r.pid}
            self.out.send({"t": "heartbeat", "node": self.node, **facts.telemetry(pids)})
            self.check_kernel(now)
        if not self.out.connected and self.kernel_in is not None:
            self.kernel_gone("it stopped taking what the agent sends")

    def shutdown(self) -> None:
        for r in self.ranks:
            r.signal(signal.SIGKILL)
        for sock in self.zygotes.values():
            sock.close()
        if self.resume is not None:
            self.resume.close()
            self.out.journal.close()

    # --- the kernel's connection -------------------------------------------------------------
    def check_kernel(self, now: float) -> None:
        """A kernel that stopped sending (its host asleep, a half-open link) is gone; an agent
        without runs that waited ``linger`` for a kernel to come back exits."""
        if self.kernel_in is not None and self.kernel_timeout and now - self.last_kernel > self.kernel_timeout:
            self.kernel_gone(f"nothing from the kernel for {now - self.last_kernel:.0f} s")
        if self.disconnected_at is not None and not any(r.run for r in self.ranks if not r.ended):
            idle_since = max(self.disconnected_at, self.last_run_end)
            if now - idle_since > self.resume.linger:
                print(f"lepton agent {self.node}: no kernel came back within {self.resume.linger:g} s "
                      "and no run is left; exiting", file=sys.stderr, flush=True)
                self.running = False

    def kernel_gone(self, reason: str) -> None:
        """The kernel's connection ended. A plain agent stops everything (the dead-man switch);
        one of detached runs keeps its runs going and waits for the kernel to connect again."""
        if self.resume is None:
            print(f"lepton agent {self.node}: the kernel is gone ({reason}); exiting", file=sys.stderr, flush=True)
            self.running = False
            return
        print(f"lepton agent {self.node}: the kernel's connection dropped ({reason}); runs go on, "
              f"the journal keeps what they send", file=sys.stderr, flush=True)
        self.drop_connection()
        self.disconnected_at = time.monotonic()

    def drop_connection(self) -> None:
        self.want_write(False)
        for fd in {self.kernel_in, self.out.disconnect(), self.kernel_out} - {None}:
            try:
                self.sel.unregister(fd)
            except (KeyError, ValueError):
                pass
            try:
                os.close(fd)
            except OSError:
                pass
        self.kernel_in = self.kernel_out = None

    def want_write(self, wanted: bool) -> None:
        """Wake for the kernel's connection taking more, only while frames wait for it."""
        if wanted == self.writing or self.kernel_out is None:
            return
        self.writing = wanted
        if self.kernel_out == self.kernel_in:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if wanted else 0)
            self.sel.modify(self.kernel_out, events, ("kernel", None))
        elif wanted:
            self.sel.register(self.kernel_out, selectors.EVENT_WRITE, ("kernel_out", None))
        else:
            self.sel.unregister(self.kernel_out)

    def on_connect(self) -> None:
        """A new connection on the resume socket (a kernel coming back, through agent.bridge).
        It becomes the kernel's only after its first frame, a resume signed with this node's
        key, verifies."""
        conn, _addr = self.resume.listener.accept()
        conn.setblocking(False)
        self.candidates[conn.fileno()] = (conn, self.inbox.fork("a resuming kernel"))
        self.sel.register(conn, selectors.EVENT_READ, ("candidate", conn.fileno()))

    def on_candidate(self, fd: int) -> None:
        conn, splitter = self.candidates[fd]
        try:
            data = conn.recv(1 << 16)
            if data:
                splitter.feed(data)
        except BlockingIOError:
            return
        except (OSError, ProtocolError):
            data = b""
        if not data:
            self.sel.unregister(conn)
            del self.candidates[fd]
            conn.close()
            return
        for message in list(splitter.messages()):
            if message.get("t") != "resume":
                continue
            self.sel.unregister(conn)
            del self.candidates[fd]
            self.adopt(conn, splitter, message)
            return

    def adopt(self, conn: socket.socket, splitter: FrameSplitter, message: dict) -> None:
        """The kernel is back: the new connection replaces the old, and gets what it missed."""
        if self.kernel_in is not None:
            self.drop_connection()  # half-open, or replaced: the kernel says it is gone
        fd = conn.detach()
        self.kernel_in = self.kernel_out = fd
        self.inbox = splitter
        self.last_kernel = time.monotonic()
        self.disconnected_at = None
        self.sel.register(fd, selectors.EVENT_READ, ("kernel", None))
        missed = self.out.resume(fd, _streams(message.get("have")))
        print(f"lepton agent {self.node}: the kernel is back; {missed} frame(s) sent again from the journal",
              file=sys.stderr, flush=True)

    # --- the kernel ------------------------------------------------------------------------
    def on_kernel(self) -> None:
        try:
            data = os.read(self.kernel_in, 1 << 20)
        except BlockingIOError:
            return
        except OSError as e:
            data, reason = b"", f"reading failed ({e})"
        else:
            reason = "its connection closed"
        if not data:
            self.kernel_gone(reason)  # the dead-man switch, unless runs are detached
            return
        self.last_kernel = time.monotonic()
        try:
            self.inbox.feed(data)
        except ProtocolError as e:  # not a stream of our frames: nothing in it can be read
            print(f"lepton agent {self.node}: {e}; exiting", file=sys.stderr, flush=True)
            self.running = False
            return
        for message in list(self.inbox.messages()):
            try:
                self.on_kernel_message(message)
            except Exception as e:  # signed by the kernel, yet not a message we can act on
                print(f"lepton agent {self.node}: dropped a {message.get('t')!r} message from the kernel "
                      f"({type(e).__name__}: {e})", file=sys.stderr, flush=True)

    def on_kernel_message(self, message: dict) -> None:
        kind = message.get("t")
        if kind == "run":
            self.start_run(message)
        elif kind == "assigned":
            self.on_assigned(message)
        elif kind == "cancel":
            self.cancel(message["run"])
        elif kind == "shutdown":
            self.running = False
        elif kind == "ping":
            self.out.send({"t": "pong", "time": time.time(), "sent": message.get("time")})
        elif kind == "ack":  # what the kernel has taken: the journal forgets it
            self.out.acknowledge(_streams(message.get("have")))
        elif kind in PREPARE_KINDS:  # the run's folder and packages
            self.preparer.on_message(message)

    def start_run(self, job: dict) -> None:
        local = job["local_world_size"]
        preloaded = bool(job.get("preload", True))
        key = run_key(self.key, job["run"])
        # Two per rank slot and kind: the next run then takes a standby that finished starting
        # long ago, not the one being forked right now.
        self.want[preloaded] = max(self.want[preloaded], 2 * local)
        if self.direct is not None:
            # The kernel found no offered standby (cells back to back outrun their replacement):
            # keep one more, up to four per rank slot.
            self.want[preloaded] = min(self.want[preloaded] + 1, 4 * local)
        for local_rank in range(local):
            rank = job["rank_offset"] + local_rank
            for attempt in range(2):  # a standby that died meanwhile is replaced once
                proc = None
                try:
                    proc = self.take_standby(preloaded)
                    proc.control.send(dict(job, t="job", local_rank=local_rank, key=key,
                                           preempting=self.preempting is not None))
                except OSError as e:
                    if proc is not None:
                        self.discard(proc)
                    if attempt:
                        self.out.send({"t": "error", "run": job["run"], "rank": rank, "type": "LeptonError",
                                       "message": f"could not start rank {rank} on {self.node}: {e}",
                                       "traceback": "", "line": None})
                        self.out.send({"t": "exit", "run": job["run"], "rank": rank, "pid": None,
                                       "killed": None, "time": time.time()})
                    continue
                proc.assign(job["run"], rank, key)
                if proc.greeted:
                    self.announce(proc)
                # else: announced when its hello arrives (see on_hello)
                break
        # New standbys are forked once these ranks end (see reap): forking now would compete
        # with the run for the CPU.

    def announce(self, proc: RankProcess) -> None:
        """Tell the kernel a rank started. The agent says it, not the rank: one wake-up fewer on
        the way of a short cell, and the rank is not preempted right after it got its job."""
        self.out.send({"t": "started", "run": proc.run, "rank": proc.rank, "pid": proc.pid, "time": time.time()})

    def offer(self, proc: RankProcess) -> None:
        """Give the kernel a greeted standby's direct socket: the kernel sends it a job and reads
        its frames straight. The socket is the proof of origin, and frames are signed as ever:
        the job with the standby's control key, its answers with its run's key."""
        about = msgpack.packb({"standby": proc.sid, "pid": proc.pid, "key": proc.control_key,
                               "preloaded": proc.preloaded})
        try:
            socket.send_fds(self.direct, [about], [proc.direct_end.fileno()])
            proc.offered = True
        except OSError as e:  # the kernel is not taking offers: the standby stays this agent's
            if not isinstance(e, BlockingIOError):
                print(f"lepton agent {self.node}: could not offer a standby to the kernel ({e})",
                      file=sys.stderr, flush=True)
            return
        proc.direct_end.close()
        proc.direct_end = None

    def on_assigned(self, message: dict) -> None:
        """The kernel gave offered standbys a job of its run: they are that run's ranks now (their
        output, their end, a cancel). A standby that died meanwhile is reported as not started."""
        run = message["run"]
        key = run_key(self.key, run)
        by_sid = {r.sid: r for r in self.ranks if r.offered and r.run is None}
        for sid, rank in message["ranks"]:
            reaped = None if sid in by_sid else self.unclaimed.pop(sid, (0, None))[1]
            proc = by_sid.get(sid) or reaped
            if proc is None:
                self.out.send({"t": "error", "run": run, "rank": rank, "type": "LeptonError",
                               "message": f"could not start rank {rank} on {self.node}: its process ended "
                                          "before the job reached it", "traceback": "", "line": None})
                self.out.send({"t": "exit", "run": run, "rank": rank, "pid": None, "killed": None,
                               "time": time.time()})
                continue
            # As for runs of its own (see start_run): two standbys per rank slot of the kind.
            self.want[proc.preloaded] = max(self.want[proc.preloaded], 2 * len(message["ranks"]))
            proc.assign(run, rank, key)
            self.take_early_output(proc)
            if proc.ended:  # it ran its job and is gone already: its last output is all in
                self.drain_output(proc, final=True)
            if reaped is not None:
                self.report_exit(proc)  # (reap reports the others' ends)
            elif self.preempting is not None and not proc.ended:
                proc.tell_preempting()

    def take_early_output(self, proc: RankProcess) -> None:
        """What an offered standby printed before the kernel's word came: its run's now."""
        for stream in (1, 2):
            early, proc.early[stream] = proc.early[stream], b""
            if early:
                self.take_output(proc, stream, early)

    def cancel(self, run: str) -> None:
        for r in self.ranks:
            if r.run == run and r.killed is None:
                r.signal(signal.SIGTERM)
                r.killed = "SIGTERM"
                r.kill_at = time.monotonic() + KILL_GRACE_SECONDS
        self.preparer.cancel(run)  # (a cancel while the node was made ready for the run)

    def on_spot_notice(self) -> None:
        """The instance is to be reclaimed: tell the kernel, and every running rank (its
        ``lepton.preempting`` turns True; ranks started later learn it from their job)."""
        for notice in self.spot_watcher.take():
            self.preempting = notice
            print(f"lepton agent {self.node}: spot interruption notice: {notice['action']} "
                  f"at {notice['time']}", file=sys.stderr, flush=True)
            self.out.send({"t": "preempting", "node": self.node, "action": notice["action"],
                           "time": notice["time"], "noticed": time.time()})
            for r in self.ranks:
                if r.run is not None and not r.ended:
                    r.tell_preempting()

    # --- standbys --------------------------------------------------------------------------
    def idle(self, preloaded: bool | None = None, offered: bool = True) -> list[RankProcess]:
        """Standbys without a job (with ``offered=False``, only those the kernel was not given)."""
        return [r for r in self.ranks if r.run is None and r.open == 3 and not r.ended
                and (preloaded is None or r.preloaded == preloaded) and (offered or not r.offered)]

    def take_standby(self, preloaded: bool) -> RankProcess:
        """An idle standby of the kind asked for: ``preloaded`` ones were forked from the
        preloaded zygote (torch and friends imported), light ones from the light zygote (for
        cells that need neither)."""
        if not any(self.zygote_ready.values()):
            self.await_light_zygote()
        idle = self.idle(preloaded, offered=False)
        if not idle and preloaded and not self.zygote_ready[True]:
            idle = self.idle(False, offered=False)  # the zygote is still importing: a light one will import itself
        idle.sort(key=lambda r: not r.greeted)
        return idle[0] if idle else self.new_standby(preloaded)

    def await_light_zygote(self) -> None:
        """A run came before any zygote was ready (the agent has just started). Wait for the
        light one rather than fork here: a child of this process would hold the node key."""
        sock = self.zygotes.get(False)
        if sock is not None and _readable(sock, ZYGOTE_WAIT_SECONDS):
            self.on_zygote(False)

    def replenish(self) -> None:
        for preloaded in (False, True):
            if not self.zygote_ready[preloaded]:
                continue
            while len(self.idle(preloaded)) < self.want[preloaded]:
                self.new_standby(preloaded)

    def new_standby(self, preloaded: bool) -> RankProcess:
        """A standby forked by the zygote of the kind asked for, else by the other one."""
        ready = [k for k in (preloaded, not preloaded) if self.zygote_ready[k]]
        if not ready:
            raise OSError("no zygote is left to fork rank processes from")
        ctrl, child_ctrl = socket.socketpair()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        os.set_blocking(out_r, False)
        os.set_blocking(err_r, False)
        proc = RankProcess(ctrl, out_r, err_r)
        fds = [child_ctrl.fileno(), out_w, err_w]
        child_direct = None
        if self.direct is not None:
            proc.direct_end, child_direct = socket.socketpair()
            fds.append(child_direct.fileno())
        socket.send_fds(self.zygotes[ready[0]], [zygote.FORK], fds)
        proc.preloaded = ready[0]
        self.standbys_made += 1
        proc.sid = self.standbys_made
        child_ctrl.close()
        if child_direct is not None:
            child_direct.close()
        os.close(out_w)
        os.close(err_w)
        self.sel.register(ctrl, selectors.EVENT_READ, ("ctrl", proc))
        self.sel.register(out_r, selectors.EVENT_READ, ("out", proc))
        self.sel.register(err_r, selectors.EVENT_READ, ("err", proc))
        self.ranks.append(proc)
        return proc

    def on_zygote(self, preloaded: bool) -> None:
        sock = self.zygotes[preloaded]
        try:
            message = sock.recv(1 << 16)
        except BlockingIOError:
            return  # taken already (see await_light_zygote)
        except OSError:
            message = b""
        if not message:
            self.sel.unregister(sock)
            sock.close()
            del self.zygotes[preloaded]
            self.zygote_ready[preloaded] = False
            return
        if message[:1] == zygote.READY:
            self.zygote_ready[preloaded] = True
            if preloaded:
                info = msgpack.unpackb(message[1:])
                self.out.send({"t": "node_update", "node": self.node, **info})
            self.replenish()

    # --- rank output -----------------------------------------------------------------------
    def on_ctrl(self, proc: RankProcess) -> None:
        target = proc.splitter.want()
        try:
            if target is not None:  # the rest of a large frame: straight into its buffer
                n = proc.ctrl.recv_into(target)
                data = None
            else:
                data = proc.ctrl.recv(1 << 20)
                n = len(data)
        except BlockingIOError:
            return
        except OSError:
            n = 0
        if not n:
            self.close_fd(proc, "ctrl")
            return
        if data is None:
            proc.splitter.filled(n)
        else:
            proc.splitter.feed(data)
        frames = list(proc.splitter.frames())  # each verified with the key of its channel
        if frames and proc.run is not None:
            # Whatever the rank printed before this frame is already in its pipes: send it first,
            # so the kernel has every line once it sees the result.
            self.drain_output(proc, final=any(f.final for f in frames))
        for frame in frames:
            if frame.channel == "":
                self.on_hello(proc, frame)
            elif frame.sender == proc.rank:  # its run's key, so its run: relay it untouched
                self.out.send_frame(frame.header, frame.body)
            else:
                print(f"lepton agent {self.node}: dropped a frame rank {proc.rank} of {proc.run} sent "
                      f"as rank {frame.sender}", file=sys.stderr, flush=True)

    def on_hello(self, proc: RankProcess, frame: Frame) -> None:
        try:
            message = decode_body(frame.body)
            pid = message["pid"] if message.get("t") == "hello" and not proc.greeted else None
        except Exception:
            pid = None
        if type(pid) is not int:
            print(f"lepton agent {self.node}: dropped a control frame that is not a standby's first hello",
                  file=sys.stderr, flush=True)
            return
        proc.greeted = True
        proc.pid = pid
        self.watch(proc)
        if proc.run is not None:
            self.announce(proc)
        if proc.direct_end is not None and proc.run is None and not proc.ended:
            self.offer(proc)
        # (One given a job by this agent before its hello is never offered; its direct socket
        # stays open until it ends, so the standby never mistakes its end for being retired.)
        if proc.kill_pending:
            proc.signal(proc.kill_pending)
        elif proc.preempt_pending:
            proc.tell_preempting()

    def drain_output(self, proc: RankProcess, final: bool = False) -> None:
        """Read what the rank's pipes hold now; with ``final``, an unfinished last line too."""
        for stream in (1, 2):
            while (fd := proc.out_fd if stream == 1 else proc.err_fd) is not None:
                try:
                    self.on_output(proc, stream, fd)
                except BlockingIOError:
                    break
            if final and proc.partial[stream]:
                self.add_lines(proc, stream, [proc.partial[stream]])
                proc.partial[stream] = b""
        self.flush_logs()

    def on_output(self, proc: RankProcess, stream: int, fd: int) -> None:
        data = os.read(fd, 1 << 16)
        if not data:
            if proc.partial[stream]:
                self.add_lines(proc, stream, [proc.partial[stream]])
            proc.partial[stream] = b""
            self.close_fd(proc, "out" if stream == 1 else "err")
            return
        if proc.run is None:
            if proc.offered:  # the kernel may have given it a job already: keep it until it says
                proc.early[stream] += data
            else:
                print(data.decode(errors="replace"), end="", file=sys.stderr)  # standby noise
            return
        self.take_output(proc, stream, data)

    def take_output(self, proc: RankProcess, stream: int, data: bytes) -> None:
        *lines, proc.partial[stream] = (proc.partial[stream] + data).split(b"\n")
        self.add_lines(proc, stream, lines)
        if proc.partial[stream] and proc.rank is not None:
            key = (proc.run, proc.rank, _STREAMS[stream])
            self.partials[key] = _shown(proc.partial[stream][-PARTIAL_LINE_BYTES:])

    def add_lines(self, proc: RankProcess, stream: int, lines: list[bytes]) -> None:
        if proc.run is None or proc.rank is None or not lines:
            return
        key = (proc.run, proc.rank, _STREAMS[stream])
        self.logs.setdefault(key, []).extend(_shown(line) for line in lines)
        self.partials.pop(key, None)  # older than these lines

    def flush_logs(self) -> None:
        """Send the finished lines, and each stream's unfinished line with them; unfinished lines
        alone (a progress bar that only redraws) at most every PARTIAL_LINE_SECONDS."""
        now = time.time()
        keys = list(self.logs)
        if self.partials and time.monotonic() >= self.next_partials:
            keys += [k for k in self.partials if k not in self.logs]
            self.next_partials = time.monotonic() + PARTIAL_LINE_SECONDS
        for key in keys:
            run, rank, stream = key
            self.out.send({"t": "log", "run": run, "rank": rank, "stream": stream, "lines": self.logs.get(key, []),
                           "partial": self.partials.pop(key, None), "time": now})
        self.logs.clear()

    # --- the end of a rank -----------------------------------------------------------------
    def watch(self, proc: RankProcess) -> None:
        """Learn of the process's end from a pidfd, not from its pipes closing: a child it left
        behind may hold those open for ever."""
        if proc.pidfd is None and proc.pid:
            proc.pidfd = _pidfd(proc.pid)
            if proc.pidfd is not None:
                self.sel.register(proc.pidfd, selectors.EVENT_READ, ("pidfd", proc))
            elif _pidfd_supported:
                proc.ended = True  # already gone

    def end_rank(self, proc: RankProcess) -> None:
        """The rank process exited: take in all it sent, kill what it left in its process group,
        report its end."""
        proc.ended = True
        while proc.ctrl is not None and _readable(proc.ctrl):  # EOF counts as readable
            self.on_ctrl(proc)
        if proc.run is not None or proc.offered:
            self.drain_output(proc, final=True)
        if proc.pid:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.discard(proc)

    def reject_rank(self, proc: RankProcess, error: Exception) -> None:
        """The rank's control socket did not start with a lepton frame: nothing on it can be read."""
        if proc.run is not None:
            self.out.send({"t": "error", "run": proc.run, "rank": proc.rank, "type": "ProtocolError",
                           "message": f"the rank wrote bytes that are not lepton frames to file descriptor "
                                      f"{CTRL_FD} ({error}); it was stopped",
                           "traceback": "", "line": None})
        proc.signal(signal.SIGKILL)
        proc.killed = "SIGKILL"
        self.discard(proc)

    def discard(self, proc: RankProcess) -> None:
        for which in ("ctrl", "out", "err"):
            self.close_fd(proc, which)
        if proc.direct_end is not None:
            proc.direct_end.close()
            proc.direct_end = None
        if proc.pidfd is not None:
            try:
                self.sel.unregister(proc.pidfd)
            except (KeyError, ValueError):
                pass
            os.close(proc.pidfd)
            proc.pidfd = None
        proc.ended = True

    def close_fd(self, proc: RankProcess, which: str) -> None:
        target = {"ctrl": proc.ctrl, "out": proc.out_fd, "err": proc.err_fd}[which]
        if target is None:
            return
        try:
            self.sel.unregister(target)
        except (KeyError, ValueError):
            pass
        if which == "ctrl":
            proc.ctrl.close()
            proc.ctrl = None
        else:
            os.close(target)
            setattr(proc, "out_fd" if which == "out" else "err_fd", None)
        proc.open -= 1

    def reap(self) -> None:
        """Report the ranks that ended (their pidfd fired, or without pidfds every descriptor
        closed), then fork standbys to replace them."""
        now = time.monotonic()
        for proc in [r for r in self.ranks if r.open == 0 and r.pidfd is None]:
            self.ranks.remove(proc)
            if proc.run:
                self.report_exit(proc)
            elif proc.offered:
                self.unclaimed[proc.sid] = (now, proc)
        for sid, (since, _proc) in list(self.unclaimed.items()):
            if now - since > UNCLAIMED_SECONDS:
                del self.unclaimed[sid]
        if self.running:
            self.replenish()

    def report_exit(self, proc: RankProcess) -> None:
        self.last_run_end = time.monotonic()
        self.flush_logs()
        self.out.send({"t": "exit", "run": proc.run, "rank": proc.rank, "pid": proc.pid,
                       "killed": proc.killed, "time": time.time()})


_STREAMS = {1: "stdout", 2: "stderr"}


def _streams(have) -> dict[tuple[str, int], int]:
    """[[channel, sender, last number], ...] from the kernel as a lookup."""
    return {(str(channel), int(sender)): int(seq) for channel, sender, seq in have or []}


def _shown(line: bytes) -> str:
    """A carriage return redraws the line (progress bars): keep what a terminal would show."""
    return line.rstrip(b"\r").rsplit(b"\r", 1)[-1].decode(errors="replace")


_pidfd_supported = hasattr(os, "pidfd_open")


def _pidfd(pid: int) -> int | None:
    if not _pidfd_supported:
        return None
    try:
        return os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return None


def _readable(sock: socket.socket, timeout: float = 0) -> bool:
    import select

    return bool(select.select([sock], [], [], timeout)[0])


def _spot_watcher(args: argparse.Namespace) -> spot.SpotWatcher | None:
    """A bad endpoint costs the node its spot notices, not its life."""
    if not args.spot_metadata:
        return None
    try:
        return spot.SpotWatcher(args.spot_metadata, args.spot_poll_seconds, f"lepton agent {args.node}")
    except ValueError as e:
        print(f"lepton agent {args.node}: {e}; not watching for spot notices", file=sys.stderr, flush=True)
        return None


def _log_beside(path: str) -> None:
    """An agent that outlives its connection writes its log on the node: stderr over SSH breaks
    with the connection, and a write to it would then fail."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    print(f"lepton agent: logging to {path} on this node", file=sys.stderr, flush=True)
    os.dup2(fd, 2)
    os.close(fd)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lepton_magic.agent")
    parser.add_argument("--node", default=socket.gethostname())
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="exit when this process (the kernel) exits")
    parser.add_argument("--preload", default=os.environ.get("LEPTON_PRELOAD", "torch,torch._dynamo,numpy,pandas"),
                        help="comma-separated modules the zygote imports ahead of jobs ('' for none)")
    parser.add_argument("--spot-metadata", default=None, metavar="URL",
                        help="poll this instance metadata endpoint for spot interruption notices")
    parser.add_argument("--spot-poll-seconds", type=float,
                        default=float(os.environ.get("LEPTON_SPOT_POLL_SECONDS") or spot.POLL_SECONDS))
    parser.add_argument("--resume-socket", default=None, metavar="PATH",
                        help="detached runs: outlive the kernel's connection, journal what is sent, and take "
                             "a returning kernel on this Unix socket")
    parser.add_argument("--linger", type=float, default=600.0,
                        help="with --resume-socket: seconds to wait for a kernel once no run is left")
    parser.add_argument("--kernel-timeout", type=float, default=None,
                        help="the kernel is gone when it has sent nothing for this many seconds")
    parser.add_argument("--direct-fd", type=int, default=None,
                        help="a Unix socket to the kernel on this machine: standbys are offered on it")
    args = parser.parse_args(argv)
    if args.resume_socket:
        try:
            os.setsid()  # the SSH session's end must not take the agent with it
        except OSError:
            pass  # a group leader already
        _log_beside(os.path.expanduser(args.resume_socket) + ".log")
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # standbys are reaped by the kernel
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the kernel's cancel stops a run
    kernel_in = 0
    kernel_out = os.dup(1)
    os.dup2(2, 1)  # a stray print must never corrupt the frame stream
    sys.stdout = sys.stderr
    preload = [m.strip() for m in args.preload.split(",") if m.strip()]
    # Forked before the key is read: neither they nor the ranks they fork ever hold it.
    zygotes = {preloaded: zygote.start(modules)[1]
               for preloaded, modules in ((False, []), (True, preload)) if modules or not preloaded}
    for sock in zygotes.values():
        sock.setblocking(False)
    direct = None
    if args.direct_fd is not None:
        direct = socket.socket(fileno=args.direct_fd)
        direct.setblocking(False)  # a kernel that takes no offers must never hold up this loop
    key = read_exact(kernel_in, KEY_SIZE)
    resume = Resume(os.path.expanduser(args.resume_socket), args.linger) if args.resume_socket else None
    Agent(args.node, key, kernel_in, kernel_out, zygotes, args.parent_pid, _spot_watcher(args), resume,
          args.kernel_timeout, direct).serve()
    os._exit(0)
