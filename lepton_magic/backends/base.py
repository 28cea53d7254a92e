"""The two things a backend provides: nodes, and a byte pipe to an agent on each."""

from __future__ import annotations

import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable

from ..protocol import Frame, FrameReader, FrameWriter, ProtocolError, node_key, run_key, write_all

if TYPE_CHECKING:
    from .direct import DirectRanks

log = logging.getLogger("lepton_magic.backends")

OnMessage = Callable[["NodeLink", dict], None]
OnLost = Callable[["NodeLink", str], None]

#: What a rank may say (the agent says the rest: started, log, exit, heartbeats...).
RANK_MESSAGES = frozenset({"metrics", "result", "error", "checkpoint"})


class NodeLink:
    """The kernel's end of one agent: send frames, receive them on a reader thread.

    The link has a key of its own, derived from the pool secret and a fresh salt (an agent
    started later under the same name accepts none of this link's frames); the agent learns it
    as its first read and never sees the pool secret. Frames of the agent's ranks are verified
    with their run's key, and a rank may speak only for its own run and rank, and only of
    RANK_MESSAGES.
    """

    def __init__(self, name: str, write_fd: int, read_fd: int, secret: bytes,
                 on_message: OnMessage, on_lost: OnLost, resumer: "Resumer | None" = None):
        self.name = name
        self.facts: dict = {}
        self.ready = threading.Event()
        self.alive = True
        self._lost_lock = threading.Lock()  # the node is lost once, by whichever thread sees it first
        self.broken = False
        self.refused = 0  # verified frames of a rank that spoke beyond its run and rank
        #: When the last frame from the agent arrived (time.monotonic()): heartbeats come every
        #: 2 s, so a node silent for much longer is hung (SIGSTOPped, a half-open connection).
        self.last_heard = time.monotonic()
        self._key = node_key(secret, name, salt=os.urandom(16))
        self._writer = FrameWriter(write_fd, self._key)
        self._reader = FrameReader(read_fd, self._key_for, source=f"node {name}")
        self._on_message = on_message
        self._on_lost = on_lost
        #: Links to agents of detached runs come back after their connection drops (see Resumer).
        self._resumer = resumer
        self.reconnecting = False
        self.stopped = False  # stopped on purpose: no coming back
        self._outbox: list[dict] = []  # what was sent while the connection was down
        self._outbox_lock = threading.Lock()
        #: Nodes on the kernel's machine: the standbys the agent offered (see backends/direct).
        self.direct: "DirectRanks | None" = None
        write_all(write_fd, self._key)  # the agent's first read: its key
        self._thread = threading.Thread(target=self._read, name=f"lepton-{name}", daemon=True)
        self._thread.start()

    @property
    def rejected(self) -> int:
        """Frames and runs of bytes from the agent that were dropped."""
        return self._reader.rejected + self.refused

    @property
    def host(self) -> str:
        return self.facts.get("host", "?")

    @property
    def place(self) -> str | None:
        """Where the backend put the node, in its own terms, for the panels (None: its host says it)."""
        return None

    @property
    def gpu_count(self) -> int:
        return len(self.facts.get("gpus") or [])

    @property
    def gpu_name(self) -> str | None:
        gpus = self.facts.get("gpus") or []
        return gpus[0]["name"] if gpus else None

    def send(self, message: dict) -> None:
        with self._outbox_lock:
            if self.reconnecting:
                self._outbox.append(message)  # the agent gets it once the link is back
                return
        try:
            self._writer.send(message)
        except OSError as e:
            if self._resumer is not None and self.alive and not self.stopped:
                with self._outbox_lock:
                    self._outbox.append(message)
                self._resumer.disconnect(self)  # the reader sees the end and connects again
                return
            self._lost(f"cannot write to the agent ({e})", inline=False)
        except BaseException:
            # Interrupted half-way through a frame: the agent would read garbage from here on.
            self.broken = True
            self._lost("interrupted while sending to it", inline=False)
            raise

    def _key_for(self, channel: str) -> bytes:
        return self._key if channel == "" else run_key(self._key, channel)

    def run_key(self, run: str) -> bytes:
        """The key a run's ranks on this node sign with (what the agent gives each in its job)."""
        return run_key(self._key, run)

    def deliver_rank_message(self, frame: Frame, message: dict, rank: int) -> None:
        """A message rank ``rank`` sent straight to the kernel (backends/direct), checked as if
        the agent had relayed it: its frames must also be sent as that rank."""
        if self._rank_may_say(frame, message, rank):
            self._hand_on(message)

    def _read(self) -> None:
        while True:
            reason = self._read_stream()
            if self._resumer is None or not self.alive:
                break
            gone = self._resume(reason)
            if gone is not None:
                reason = gone
                break
        self._lost(reason)

    def _read_stream(self) -> str:
        """Take the agent's messages until its stream ends; returns why it ended."""
        reason = "the agent exited"
        try:
            for frame, message in self._reader.envelopes():
                self.last_heard = time.monotonic()
                if frame.channel and not self._rank_may_say(frame, message):
                    continue
                if message.get("t") == "node":
                    self.facts = message
                    self.ready.set()
                    continue
                if message.get("t") == "exit":  # what the rank left unfinished will never end
                    self._reader.splitter.forget(message.get("run"), message.get("rank"))
                    if self.direct is not None:  # what it sent straight comes before its end
                        self.direct.drain(message.get("run"), message.get("rank"))
                self._hand_on(message)
        except ProtocolError as e:  # the stream cannot be read at all (see protocol)
            reason = str(e)
        except OSError as e:
            reason = f"the pipe to the agent broke ({e})"
        except Exception as e:  # never die silently: the runs on this node must learn of it
            log.exception("reading from %s failed", self.name)
            reason = f"reading from the agent failed ({type(e).__name__}: {e})"
        return reason

    def _hand_on(self, message: dict) -> None:
        try:
            self._on_message(self, message)
        except Exception:
            log.exception("handling a %s message from %s failed", message.get("t"), self.name)

    def beat(self) -> None:
        """Say the kernel is still there (agents on other hosts stop when it goes silent). A
        resumable link says what arrived, so the agent's journal can forget it."""
        if self._resumer is not None:
            self.send({"t": "ack", "have": self._reader.splitter.last_seqs()})
        else:
            self.send({"t": "beat"})

    # --- links that come back ----------------------------------------------------------------
    def _resume(self, reason: str) -> str | None:
        """The connection to an agent of detached runs ended: connect again (the agent kept its
        runs going and journalled what they sent) until the resumer's deadline. None: the
        stream goes on, with what was missed sent again, once; else why the node is lost."""
        if self.stopped:
            return reason
        with self._outbox_lock:
            self.reconnecting = True
        log.warning("node %s: connection lost (%s); connecting again", self.name, reason)
        self._hand_on({"t": "link", "state": "reconnecting", "reason": reason})
        deadline = time.monotonic() + self._resumer.timeout
        delay = 0.2
        while self.alive and not self.stopped and time.monotonic() < deadline:
            try:
                write_fd, read_fd = self._resumer.reconnect(self)
            except LinkGone as e:
                with self._outbox_lock:
                    self.reconnecting = False
                return f"{reason}; then {e}"
            except Exception as e:
                log.info("node %s: not back yet (%s)", self.name, e)
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 5.0)
                continue
            self._reader.redirect(read_fd)
            self._writer.redirect(write_fd)
            try:
                with self._outbox_lock:
                    self._writer.send({"t": "resume", "have": self._reader.splitter.last_seqs()})
                    for message in self._outbox:
                        self._writer.send(message)
                    self._outbox = []
                    self.reconnecting = False
            except OSError as e:
                log.info("node %s: the new connection broke at once (%s)", self.name, e)
                continue
            self.last_heard = time.monotonic()
            self._hand_on({"t": "link", "state": "resumed", "reason": reason})
            return None
        with self._outbox_lock:
            self.reconnecting = False
        return f"{reason}; not back within {self._resumer.timeout:g} s"

    def drop(self, reason: str) -> None:
        """The agent went silent. A resumable link connects again (the reader sees the stream
        end); any other is lost."""
        if self._resumer is not None and not self.reconnecting:
            log.warning("node %s: %s; dropping the connection to connect again", self.name, reason)
            self._resumer.disconnect(self)
        elif self._resumer is None:
            self.lose(reason)

    def _rank_may_say(self, frame: Frame, message: dict, rank: int | None = None) -> bool:
        """A rank's frame verified with its run's key: it speaks for that run and rank only."""
        kind = message.get("t")
        if (isinstance(kind, str) and kind in RANK_MESSAGES and message.get("run") == frame.channel
                and message.get("rank") == frame.sender and rank in (None, frame.sender)):
            return True
        self.refused += 1
        log.warning("dropped a %r message for run %r rank %r from rank %s of %s on %s: a rank speaks "
                    "for itself only", message.get("t"), message.get("run"), message.get("rank"),
                    frame.sender, frame.channel, self.name)
        return False

    def lose(self, reason: str) -> None:
        """Give up on the node (it stopped answering): its runs learn of it as of a crash."""
        self._lost(reason)

    def _lost(self, reason: str, inline: bool = True) -> None:
        with self._lost_lock:
            if not self.alive:
                return
            self.alive = False
        self.ready.set()
        if inline:
            self._on_lost(self, reason)
        else:
            # A sender may hold locks that the node's loss takes in turn (its runs', the direct
            # ranks'): the loss is handled on a thread of its own, as the reader's would be.
            threading.Thread(target=self._on_lost, args=(self, reason), daemon=True,
                             name=f"lepton-{self.name}-lost").start()


class LinkGone(Exception):
    """The agent a link would come back to is not there any more (it exited, or was stopped)."""


class Resumer(ABC):
    """What a backend gives the links of agents that outlive their connection (agents of
    detached runs on remote hosts): a way to connect to the same agent again."""

    #: Seconds a link tries to come back before its node is lost.
    timeout: float = 300.0

    @abstractmethod
    def reconnect(self, link: NodeLink) -> tuple[int, int]:
        """A new connection to the agent of ``link``: (fd to write, fd to read)."""

    @abstractmethod
    def disconnect(self, link: NodeLink) -> None:
        """Close the link's current connection (its reader then sees the end and reconnects)."""


class Backend(ABC):
    name: str

    def __init__(self, settings: dict):
        self.settings = settings

    @abstractmethod
    def start_nodes(self, names: list[str], secret: bytes, on_message: OnMessage, on_lost: OnLost,
                    log_dir: str) -> list[NodeLink]:
        """Start an agent on each new node and return the links (not yet ready)."""

    @abstractmethod
    def master_addr(self, link: NodeLink) -> str:
        """The address other nodes use to reach rank 0 on ``link``."""

    def master_port(self, link: NodeLink) -> int | None:
        """A port free for rank 0's rendezvous on ``link``, where the backend can find one on
        the node itself; None (the default): the kernel picks (see liverun)."""
        return None

    def rank_cwd(self) -> str | None:
        """The folder ranks run in, decided when a run is submitted. None (the default): the
        agent's own folder on the node (remote nodes do not share the notebook's files)."""
        return None

    def shared_memory_dir(self) -> str | None:
        """Where ranks may leave large results for the kernel to map, when they share its
        machine; None (the default) sends them through the pipe."""
        return None

    def close(self) -> None:
        """After every node was stopped: wait for whatever the backend must see gone."""

    def cost_so_far(self) -> float | None:
        """Dollars this backend's nodes have cost so far; None where nodes are free."""
        return None

    def price_per_hour(self) -> float | None:
        return None

    def node_price(self, name: str) -> float | None:
        """$/h of one node; None where nodes are free."""
        return None

    @abstractmethod
    def stop_node(self, link: NodeLink, wait: float = 5.0) -> None:
        """Ask the agent to exit; make sure it and its ranks are gone."""
