"""The kernel's end of an agent actor's byte pipe, made to look like a process's stdin/stdout.

NodeLink reads and writes file descriptors; here they are socket pairs, and two threads move
their bytes through actor calls (as the ssh backend bridges its channels): one sends what the
link wrote, in batches of what collected while the last call travelled; one keeps two ``drain``
long polls in flight and writes their answers into the link's socket. Calls, not streaming
generators, so that it works through Ray Client too.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections import deque
from typing import Callable

log = logging.getLogger("lepton_magic.backends.ray")

#: Largest answer of one drain: big enough for 10^4 metric points, small enough to stream.
DRAIN_BYTES = 1 << 20
#: How long a drain waits for the agent's first byte (agents beat every 2 s anyway).
DRAIN_WAIT = 5.0
#: Drains in flight: while one answer travels, the agent's next bytes collect for the other.
IN_FLIGHT = 2


class ActorPipe:
    """``to_agent``/``from_agent``: the descriptors a NodeLink takes. ``start(lose)`` once the
    link exists: ``lose(reason)`` is how a dead actor becomes a lost node, with the reason."""

    def __init__(self, ray, actor, name: str):
        self._ray = ray
        self._actor = actor
        self._name = name
        self._to_agent, self._theirs_in = socket.socketpair()
        self._from_agent, self._theirs_out = socket.socketpair()
        self._closing = False
        self._sent_all = threading.Event()
        self._lose: Callable[[str], None] = lambda reason: None

    @property
    def to_agent(self) -> int:
        return self._to_agent.fileno()

    @property
    def from_agent(self) -> int:
        return self._from_agent.fileno()

    def start(self, lose: Callable[[str], None]) -> None:
        self._lose = lose
        threading.Thread(target=self._send_loop, daemon=True, name=f"lepton-{self._name}-send").start()
        threading.Thread(target=self._drain_loop, daemon=True, name=f"lepton-{self._name}-drain").start()

    # --- kernel -> agent -------------------------------------------------------------------
    def _send_loop(self) -> None:
        try:
            while True:
                data = self._theirs_in.recv(DRAIN_BYTES)
                if not data:
                    break  # finish(): every byte the link wrote is sent
                # One call at a time, waited for: keeps the bytes in order, and whatever the link
                # writes meanwhile goes in the next call as one batch.
                if not self._ray.get(self._actor.write.remote(data)):
                    break  # the agent is gone; the drain loop reports it
        except OSError:
            pass
        except Exception as e:
            if not self._closing:
                self._fail(e)
        finally:
            # Nothing takes the link's bytes any more: its next write fails at once (the node is
            # lost) rather than filling the socket and blocking.
            self._theirs_in.close()
            self._sent_all.set()

    # --- agent -> kernel -------------------------------------------------------------------
    def _drain_loop(self) -> None:
        ray = self._ray
        seq = 0
        calls = deque()
        reason = None
        try:
            while True:
                while len(calls) < IN_FLIGHT:
                    calls.append(self._actor.drain.remote(seq, DRAIN_BYTES, DRAIN_WAIT))
                    seq += 1
                data = ray.get(calls.popleft())
                if data is None:
                    reason = "the agent exited"
                    break
                if data:
                    self._theirs_out.sendall(data)
        except OSError:
            pass  # the link closed its end: the node was stopped
        except Exception as e:
            if not self._closing:
                self._fail(e)
        finally:
            if reason and not self._closing:
                self._lose(f"{reason} ({self._how_it_ended()})")
            self._theirs_out.close()  # EOF: the link's reader ends (as the node's loss if not yet said)

    def _fail(self, error: Exception) -> None:
        self._lose(describe(error))

    def _how_it_ended(self) -> str:
        try:
            return self._ray.get(self._actor.how_it_ended.remote(), timeout=5)
        except Exception as e:
            return describe(e)

    # --- the end ---------------------------------------------------------------------------
    def finish(self, wait: float) -> None:
        """Send what the link wrote (its shutdown), then close the agent's stdin and wait up to
        ``wait`` s for it to exit (the actor kills it after that)."""
        self._closing = True
        try:
            self._to_agent.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._sent_all.wait(wait)
        try:
            self._ray.get(self._actor.close.remote(wait), timeout=wait + 5)
        except Exception:
            pass  # dead or unreachable: killing the actor is all there is left

    def close(self) -> None:
        self._closing = True
        for sock in (self._to_agent, self._from_agent, self._theirs_in):
            try:
                sock.close()
            except OSError:
                pass


def describe(error: Exception) -> str:
    """Why an actor call failed, in one line a person reads as a lost node."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    kind = type(error).__name__
    if isinstance(error, ActorDiedError):
        return "its Ray actor died (ActorDiedError: its process was killed, or its node went away)"
    if isinstance(error, ActorUnavailableError):
        return "its Ray actor is unreachable (ActorUnavailableError: its node is gone or cut off)"
    first = (str(error).strip().splitlines() or [""])[0]
    return f"its Ray actor failed ({kind}: {first[:200]})"
