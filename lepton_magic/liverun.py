"""A run in flight, seen from the kernel: placement, dispatch, events into the store, the end.

Every event from the nodes is written to the store as it arrives; the run's in-memory state is
only what is needed to decide when and how it ended, and the outputs to bind.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path
from typing import Callable

import msgpack

from . import compat, private, sharedmem, values, workdir
from .agent.network import is_loopback
from .backends import NodeLink
from .errors import LeptonError, RemoteError
from .inputs import Inputs
from .store import TRACEBACK_STREAM, Store

log = logging.getLogger("lepton_magic.run")

#: After a cancel, ranks that have not confirmed their end by then are given up on.
CANCEL_GRACE_SECONDS = 5.0


def ranks_on(link: NodeLink, gpus: int | None) -> int:
    """Rank processes to start on one node: one per GPU asked for, one on a CPU-only node."""
    have = link.gpu_count
    if have == 0:
        return 1
    if gpus is None:
        return have
    if gpus > have:
        raise LeptonError(f"{link.name} has {have} GPU{'s' if have != 1 else ''}; --gpus {gpus} asks for more")
    return max(gpus, 1)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LiveRun:
    def __init__(self, *, store: Store, pool, seq: int, run_id: str, name: str, code: str, line_offset: int,
                 inputs: "Inputs | None", outputs: list[str], explicit_outputs: bool,
                 nodes: list[NodeLink], gpus: int | None, env: dict[str, str],
                 on_done: list[Callable[["LiveRun"], None]], preload: bool = True, attempt: int = 0,
                 checkpoint: bytes | None = None, will_retry: Callable[["LiveRun"], bool] | None = None,
                 after_end: Callable[["LiveRun"], None] | None = None, trial: int | None = None,
                 params: dict | None = None, plan=None):
        self.store = store
        self.pool = pool
        self.seq = seq
        self.run_id = run_id
        self.attempt = attempt
        # Each attempt has its own name on the wire: late frames of an attempt that was stopped
        # never reach the next one, and each starts its own frame numbering.
        self.id = run_id if attempt == 0 else f"{run_id}.{attempt}"
        self._will_retry = will_retry
        self._after_end = after_end
        #: Why the attempt lost a node or a rank (a retry may help), if it did.
        self.lost: str | None = None
        #: This attempt failed and another one follows.
        self.retrying = False
        self.name = name
        self.code = code
        self.line_offset = line_offset
        self.inputs = inputs
        self.output_names = outputs
        self.explicit_outputs = explicit_outputs
        self.nodes = nodes
        self.gpus = gpus
        self.env = env
        self.on_done = on_done
        self.preload = preload
        self.status = "queued"
        self.done = threading.Event()
        self.outputs: dict = {}
        self.skipped: dict[str, str] = {}
        self.error: LeptonError | None = None
        self.notes: list[str] = []
        self.world_size = 0
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self.checkpoint_blob = checkpoint
        self.trial = trial
        self.params = params
        self.plan = plan  # the folder and packages remote nodes need first (workdir.py)
        self.transfer: dict | None = None
        self._finishing = False
        self.rank_pids: dict[int, int] = {}
        self._rank_node: dict[int, str] = {}
        self._started: set[int] = set()
        self._answered: set[int] = set()  # ranks that sent a result or an error
        self._printing: set[int] = set()  # answered straight; their last lines still on the way
        self._exited: set[int] = set()
        self._result: dict | None = None
        self._cancel_reason: str | None = None
        self._cancel_is_failure = False
        self._lock = threading.RLock()
        self._timers: list[threading.Timer] = []
        self.replies = workdir.Replies()  # the nodes' answers while they are made ready

    @property
    def all_exited(self) -> bool:
        """Every rank's process has ended (or its node was lost)."""
        return len(self._exited) >= self.world_size

    @property
    def rank_nodes(self) -> dict[int, str]:
        """Which node each rank of this attempt runs on."""
        return self._rank_node

    # --- start -----------------------------------------------------------------------------
    def start(self) -> None:
        plan = []
        offset = 0
        for node_rank, link in enumerate(self.nodes):
            local = ranks_on(link, self.gpus)
            if link.gpu_count == 0 and self.gpus:
                self.notes.append(f"{link.name} has no GPU: 1 CPU rank there")
            plan.append((node_rank, link, offset, local))
            offset += local
        self.world_size = offset
        self.notes.extend(compat.missing_notes(self.nodes))  # (psutil, NVML bindings: optional)
        # Ranks sharing a machine share its cores: this run's, and those of runs going there now
        # (a sweep's trials side by side on one host would each take every core otherwise).
        per_host: dict[str, int] = self.pool.ranks_by_host(exclude=self)
        for _node_rank, link, _first, local in plan:
            per_host[link.host] = per_host.get(link.host, 0) + local
        master_addr = self.pool.backend.master_addr(self.nodes[0])
        master_port = self.pool.backend.master_port(self.nodes[0]) or (
            free_port(master_addr) if is_loopback(master_addr) else 29500 + self.seq % 10000)
        writes = []
        for _node_rank, link, first, local in plan:
            ranks = list(range(first, first + local))
            for r in ranks:
                self._rank_node[r] = link.name
            writes.append(self.store.run_node_insert(self.seq, link.name, link.host, ranks,
                                                     min(local, link.gpu_count), link.gpu_name))
        self.started_at = time.time()
        writes.append(self.store.attempt_start(self.seq, self.attempt, [link.name for link in self.nodes],
                                               self.started_at))
        self.pool.attach_run(self)
        # The mirror of the notebook's folder and the run's packages, on every node at once.
        try:
            ready = workdir.prepare(self, {link.name: first for _n, link, first, _l in plan})
        except BaseException:  # (a node that could not be made ready, a cancel): an attempt that
            # ended before it ran is recorded all the same, its nodes and start with it
            self.store.write([*writes, self.store.run_update(self.seq, started=self.started_at)])
            raise
        # Dispatch first, record after: the nodes start while the store is written. Events that
        # arrive meanwhile wait for the lock, so 'running' never lands before 'starting'.
        stager = getattr(self.pool.backend, "stager", None)
        staged_inputs = staged_outputs = None
        if stager is not None:
            if self.inputs and self.inputs.size >= stager.threshold:
                staged_inputs = stager.put_input(self.inputs.joined())
            staged_outputs = stager.output_slot(self.id)
        cwd = self.pool.backend.rank_cwd()
        shm_dir = self.pool.backend.shared_memory_dir()
        messages = []
        for node_rank, link, first, local in plan:
            if staged_inputs or self.inputs is None:
                carried = {"inputs": None, "inputs_s3": staged_inputs}
            else:  # one shared-memory file for the nodes on this machine, the pipe for others
                carried = self.inputs.message(shm_dir, self.run_id)
            messages.append((link, {
                    "t": "run", "run": self.id, "code": self.code, "line_offset": self.line_offset,
                    **carried, "outputs_s3": staged_outputs, "outputs": self.output_names,
                    "explicit_outputs": self.explicit_outputs, "node": link.name, "node_rank": node_rank,
                    "nnodes": len(plan), "rank_offset": first, "local_world_size": local,
                    "world_size": self.world_size, "master_addr": master_addr, "master_port": master_port,
                    "env": self.env, "checkpoint": self.checkpoint_blob, "attempt": self.attempt,
                    "trial": self.trial, "params": self.params,
                    "preload": self.preload,
                    "cwd": ready.get(link.name, {}).get("cwd", cwd),
                    "paths": ready.get(link.name, {}).get("paths"),
                    "shm_dir": shm_dir,
                    # torchrun's rule, made to fit nodes that share a machine: cores / ranks there
                    "threads": max(1, int(link.facts.get("cpus") or 1) // per_host[link.host]),
                }))
        with self._lock:
            said = _dispatch(messages)
            self.status = "starting"
            writes.append(self.store.run_update(self.seq, status="starting", started=self.started_at,
                                                world_size=self.world_size, price_per_hour=self._price()))
            for link, message in said:  # what the agents would have said of ranks given jobs straight
                if message["t"] == "started":
                    writes += self._started_writes(link, message)
            self.store.write(writes)
            for link, message in said:
                if message["t"] != "started":  # (a rank no standby was left for)
                    self.on_message(link, message)
        self.inputs = None  # sent: do not keep a copy of every input of every run

    # --- events ----------------------------------------------------------------------------
    def on_message(self, link: NodeLink, message: dict) -> None:
        kind = message["t"]
        rank = message.get("rank")
        if kind in workdir.REPLIES:
            self.replies.put(link, message)
        elif kind == "metrics":
            self.store.add_metrics(self.seq, rank, message["step"], message["name"], message["value"],
                                   message["time"], self.attempt)
        elif kind == "log":
            self.store.add_logs(self.seq, rank, message["stream"], message["time"], message["lines"],
                                message.get("partial"))
        elif kind == "started":
            with self._lock:
                self.store.write(self._started_writes(link, message))
        elif kind == "result":
            with self._lock:
                self._answer(rank, message)
                if rank == 0:
                    self._result = message
            self._finish_if_answered()
        elif kind == "error":
            error = RemoteError(self.name, rank, link.name, message["type"], message["message"],
                                message["traceback"], message.get("line"))
            with self._lock:
                self._answer(rank, message)
                first = self.error is None
                if first:
                    self.error = error
            # In the rank's log too, as torchrun leaves it on stderr: run.logs() tells the whole story.
            text = message["traceback"] or f"{message['type']}: {message['message']}"
            self.store.add_logs(self.seq, rank, TRACEBACK_STREAM, message.get("time") or time.time(),
                                text.rstrip("\n").splitlines())
            self.store.add_event("rank_error", {k: message[k] for k in ("rank", "type", "message", "line")},
                                 run=self.seq)
            if first:
                # The others may wait forever in a collective for the rank that died.
                self.cancel(reason=f"rank {rank} failed", failure=True)
            self._finish_if_answered()
        elif kind == "checkpoint":
            self.checkpoint_blob = message["blob"]
            self.store.save_checkpoint(self.seq, self.attempt, rank, message["blob"])  # durable: a retry starts here
            self.store.add_event("checkpoint", {"rank": rank, "bytes": len(message["blob"]), "attempt": self.attempt},
                                 run=self.seq)
        elif kind == "exit":
            self._on_exit(link, rank, message.get("killed"))

    def _started_writes(self, link: NodeLink, message: dict) -> list:
        """A rank started: the first one makes the run 'running' (call with the lock held)."""
        first = not self._started
        self._started.add(message["rank"])
        self.rank_pids[message["rank"]] = message["pid"]
        writes = [self.store.run_node_status(self.seq, link.name, "running")]
        if first and self.status == "starting" and not self._finishing:  # (a late word of an ending run)
            self.status = "running"
            writes.append(self.store.run_update(self.seq, status="running"))
        return writes

    def _answer(self, rank: int, message: dict) -> None:
        """A rank's result or error. One sent straight by a rank that printed (``quiet`` False)
        counts once its exit came: the agent reports the exit after the last of its lines."""
        if message.get("quiet") is False:
            self._printing.add(rank)
            self._tell_agents()  # its end, after its last line, comes once its agent knows it
        else:
            self._answered.add(rank)

    def _on_exit(self, link: NodeLink, rank: int, killed: str | None) -> None:
        with self._lock:
            self._exited.add(rank)
            if rank in self._printing:
                self._printing.discard(rank)
                self._answered.add(rank)
            crashed = rank not in self._answered and self._cancel_reason is None and self.error is None
            if crashed:
                how = f"was killed ({killed})" if killed else "ended without a result (it crashed or was killed)"
                self.error = LeptonError(f"rank {rank} on {link.name} {how}; see run.logs(rank={rank})")
                self.lost = f"rank {rank} on {link.name} {how}"
            node_done = all(r in self._exited for r, n in self._rank_node.items() if n == link.name)
            finished = len(self._exited) >= self.world_size or len(self._answered) >= self.world_size
        if node_done and not self.done.is_set():
            self.store.set_run_node_status(self.seq, link.name, "done")
        if finished:
            self._finish()
        elif crashed:  # the others would wait for it in their next collective
            self.cancel(reason=f"rank {rank} ended unexpectedly", failure=True)

    def _finish_if_answered(self) -> None:
        # Every rank has sent its result or error: the run is over. Their processes exit on
        # their own just after; waiting for that would only add the exit to the latency.
        with self._lock:
            answered = len(self._answered) >= self.world_size
        if answered:
            self._finish()

    def on_node_lost(self, link: NodeLink, reason: str) -> None:
        if link not in self.nodes or self.done.is_set():
            return
        with self._lock:
            lost = [r for r, n in self._rank_node.items() if n == link.name and r not in self._exited]
            if not lost:
                return
            self._exited.update(lost)
            if self.error is None:
                self.error = LeptonError(f"node {link.name} was lost ({reason})")
            if self.lost is None:
                self.lost = f"{link.name} lost: {reason}"
            finished = len(self._exited) >= self.world_size
        self.store.set_run_node_status(self.seq, link.name, "lost")
        if finished:
            self._finish()
        else:
            self.cancel(reason=f"node {link.name} was lost", failure=True)

    # --- control ---------------------------------------------------------------------------
    def cancel(self, reason: str = "cancelled", failure: bool = False) -> None:
        with self._lock:
            if self.done.is_set() or self._cancel_reason is not None:
                return
            self._cancel_reason = reason
            self._cancel_is_failure = failure
        self.store.add_event("cancel", {"reason": reason}, run=self.seq)
        self._send_cancel()
        self._timer(CANCEL_GRACE_SECONDS, self._give_up)

    def _tell_agents(self) -> None:
        """Agents that were not told yet whose ranks took this run's jobs straight are told."""
        for link in self.nodes:
            if link.direct is not None:
                link.direct.tell_agent(self.id)

    def _send_cancel(self) -> None:
        self._tell_agents()  # first: the agent stops what it knows is the run's
        for link in self.nodes:
            if link.alive:
                link.send({"t": "cancel", "run": self.id})

    def _give_up(self) -> None:
        with self._lock:
            missing = sorted(set(self._rank_node) - self._exited)
        if missing and not self.done.is_set():
            self.notes.append(f"ranks {missing} did not confirm they stopped")
            self._finish()

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    def stop_preparing(self, reason: str, failure: bool) -> None:
        """A cancel (or timeout) while the nodes are made ready (a folder sync, a long --pip
        install): stop waiting for them and tell them to stop; ``start`` then raises
        ``workdir.Stopped``, and ``abort`` ends the run with the cancel's reason."""
        if self.replies.stop(reason, failure):
            for link in self.nodes:
                if link.alive:
                    link.send({"t": "cancel", "run": self.id})  # the agent kills the run's install

    def abort(self, error: BaseException) -> None:
        """Dispatch itself failed (a bad placement, an interrupt half-way) or a cancel cut the
        nodes' preparation short: end the run now."""
        interrupted = isinstance(error, KeyboardInterrupt)
        with self._lock:
            if isinstance(error, workdir.Stopped):
                self._cancel_reason, self._cancel_is_failure = error.reason, error.failure
                self.store.add_event("cancel", {"reason": error.reason}, run=self.seq)
            else:
                if self.error is None and not interrupted:
                    self.error = error if isinstance(error, LeptonError) else LeptonError(
                        f"could not start {self.name}: {type(error).__name__}: {error}")
                self._cancel_reason = "interrupted while starting" if interrupted else "could not start"
                self._cancel_is_failure = not interrupted
        self.replies.stop(self._cancel_reason, self._cancel_is_failure)  # (helpers still waiting on nodes)
        self._send_cancel()
        self._finish()

    # --- the end ---------------------------------------------------------------------------
    def _finish(self) -> None:
        with self._lock:
            if self._finishing:
                return
            self._finishing = True
            for t in self._timers:
                t.cancel()
            if self.error is None and self._cancel_reason is not None:
                if self._cancel_is_failure:
                    self.error = LeptonError(f"{self.name} {self._cancel_reason}")
                status = "failed" if self._cancel_is_failure else "cancelled"
            else:
                status = "failed" if self.error is not None else "succeeded"
            if status == "succeeded" and self._result is None:
                status = "failed"
                self.error = LeptonError("rank 0 finished without sending its result")
            self.retrying = status == "failed" and self._will_retry is not None and self._will_retry(self)
        if self.retrying:
            self._end_attempt(status)
            return
        result, self._result = self._result, None
        try:
            if status == "succeeded":
                self._load_outputs(result)
                self._record_transfer(result)
            elif result is not None:
                sharedmem.discard(result.get("shm"))
            self.ended_at = time.time()
            node_status = {"succeeded": "done", "failed": "failed", "cancelled": "cancelled"}[status]
            writes = [
                ("UPDATE run_nodes SET status=? WHERE run=? AND status NOT IN ('lost', 'done')",
                 (node_status, self.seq)),
                self.store.run_update(self.seq, status=status, ended=self.ended_at,
                                      outputs=sorted(self.outputs), error=_error_record(self.error),
                                      reason=self._cancel_reason,
                                      cost=_cost(self._price(), self.started_at, self.ended_at)),
            ]
            if self.transfer is not None:
                writes.append(self.store.event_insert("outputs", self.transfer, run=self.seq))
            writes.append(self.store.attempt_end(self.seq, self.attempt, self.ended_at, self.end_reason(status)))
            self.store.write(writes)
        except Exception:
            log.exception("recording the end of %s failed", self.name)
        finally:
            # In this order, so that whoever sees the end sees all of it: the store (other
            # processes, the sidebar), then this process's status and the run-end callbacks
            # (bindings, a sweep taking its trial's end), then done. The outputs are loaded.
            self.status = status
            keep = status == "succeeded" and bool(self.outputs)  # (before a sweep may drop them)
            try:
                for callback in self.on_done:
                    try:
                        callback(self)
                    except Exception:
                        log.exception("a run-end callback failed")
            finally:
                self._ended()
        if keep:  # after the waiter is woken: not on its way
            self._keep_outputs(result)

    def _keep_outputs(self, result: dict) -> None:
        """Save the outputs beside the store on a thread of their own. Not a daemon: an exiting
        interpreter waits for the file to be complete (one exiting already gets it written here)."""
        try:
            threading.Thread(target=self._persist_outputs, args=(result,), name="lepton-outputs").start()
        except RuntimeError:  # "can't create new thread at interpreter shutdown"
            self._persist_outputs(result)

    def _end_attempt(self, status: str) -> None:
        """This attempt failed and the run goes on in another one: record the attempt only."""
        try:
            if self._result is not None:
                sharedmem.discard(self._result.get("shm"))
            self._result = None
            self.ended_at = time.time()
            self.status = status
            self.store.write([
                ("UPDATE run_nodes SET status='failed' WHERE run=? AND status NOT IN ('lost', 'done')", (self.seq,)),
                self.store.attempt_end(self.seq, self.attempt, self.ended_at, self.end_reason(status)),
            ])
        except Exception:
            log.exception("recording the end of attempt %d of %s failed", self.attempt, self.name)
        finally:
            self._ended()

    def _ended(self) -> None:
        """The attempt's nodes go back to the pool; whoever waits (the run's scheduler) hears."""
        self.pool.release(self)
        self.done.set()
        if self._after_end is not None:
            self._after_end(self)
        self._tell_agents()  # after the answer: the agent reports the ranks' ends, frees their output

    def end_reason(self, status: str) -> str:
        """Why this attempt ended, in a few words (run.attempts shows it)."""
        if status == "succeeded":
            return "succeeded"
        if self.lost:
            return self.lost
        if self.error is not None:
            return str(self.error)
        return self._cancel_reason or status

    def retryable(self, on_error: bool) -> bool:
        """Another attempt may succeed: a node or a rank was lost (or the cell raised, when
        retrying on errors was asked for). Cancels and timeouts are never retried."""
        if self.lost:
            return True
        return on_error and isinstance(self.error, RemoteError)

    def _load_outputs(self, result: dict) -> None:
        self.skipped.update(result.get("skipped") or {})
        staged = result.get("staged")
        if staged:  # large outputs came through the bucket
            body = self.pool.backend.stager.get_output(staged["key"], staged["sha256"])
            n = int.from_bytes(body[:8], "big")
            result["outputs"], pos, buffers = body[8:8 + n], 8 + n, []
            for size in staged["lens"]:
                buffers.append(memoryview(body)[pos:pos + size])
                pos += size
            result["_buffers"] = buffers
        if result.get("outputs") is None:
            return
        try:
            if result.get("shm"):
                result["_buffers"] = sharedmem.map_buffers(result.pop("shm"))
            self.outputs.update(values.loads(result["outputs"], result.get("_buffers")))
        except Exception as e:
            for name in result.get("names") or []:
                self.skipped[name] = f"could not be loaded in the kernel ({type(e).__name__}: {e})"

    def _record_transfer(self, result: dict) -> None:
        """How many bytes came back and how long from rank 0 starting to pickle to bound here."""
        size = len(result.get("outputs") or b"") + sum(memoryview(b).nbytes for b in result.get("_buffers") or [])
        seconds = time.time() - result["collect_started"] if result.get("collect_started") else None
        self.transfer = {"bytes": size, "seconds": seconds, "names": sorted(self.outputs)}

    def _persist_outputs(self, result: dict) -> None:
        """Keep the pickled outputs beside the store, so a later process can read run.outputs."""
        try:
            folder = outputs_dir(self.store, self.run_id)
            private.make_dir(folder)
            tmp = folder / "outputs.pkl.tmp"
            buffers = result.get("_buffers") or []
            meta = msgpack.packb({"pickle": result["outputs"], "lens": [b.nbytes for b in buffers]})
            with private.open_file(tmp, "wb") as f:
                f.write(len(meta).to_bytes(8, "big"))
                f.write(meta)
                for buffer in buffers:
                    f.write(buffer)
            tmp.replace(folder / OUTPUTS_FILE)
        except OSError:
            log.exception("could not save the outputs of %s", self.id)

    # --- helpers ---------------------------------------------------------------------------
    def _price(self) -> float | None:
        """$/h of the nodes this run holds (cloud backends; None where nodes are free)."""
        prices = [self.pool.backend.node_price(link.name) for link in self.nodes]
        if all(p is None for p in prices):
            return None
        return sum(p or 0.0 for p in prices)

    def _timer(self, seconds: float, action: Callable[[], None]) -> None:
        timer = threading.Timer(seconds, action)
        timer.daemon = True
        self._timers.append(timer)
        timer.start()


OUTPUTS_FILE = "outputs.bin"

#: Run messages from this many bytes (inputs through the pipe) go to every node at once.
PARALLEL_SEND_BYTES = 1 << 20


def _dispatch(messages: list[tuple[NodeLink, dict]]) -> list[tuple[NodeLink, dict]]:
    """Send each node its run message: straight to standby ranks where the node is on this
    machine (backends/direct), else to its agent. Returns what the run records of the ranks
    given jobs straight (their 'started')."""
    said: list[tuple[NodeLink, dict]] = []
    through_agents = []
    for link, message in messages:
        straight = link.direct.dispatch(message) if link.direct is not None and not _large(message) else None
        if straight is None:
            through_agents.append((link, message))
        else:
            said.extend((link, m) for m in straight)
    _send_to_all(through_agents)
    return said


def _large(message: dict) -> bool:
    return sum(memoryview(b).nbytes for b in message.get("_buffers") or []) >= PARALLEL_SEND_BYTES


def _send_to_all(messages: list[tuple[NodeLink, dict]]) -> None:
    """Send each node its run message; large ones to all nodes at once (a pipe write blocks until
    its agent has read it: one after the other, the last node would wait for all the others)."""
    if len(messages) < 2 or not any(_large(m) for _link, m in messages):
        for link, message in messages:
            link.send(message)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(messages), thread_name_prefix="lepton-send") as pool:
        for future in [pool.submit(link.send, message) for link, message in messages]:
            future.result()


def outputs_dir(store: Store, run_id: str) -> Path:
    return Path(store.home) / "runs" / run_id


def read_outputs(path: Path) -> dict:
    """The outputs a run saved (see ``LiveRun._persist_outputs``)."""
    with open(path, "rb") as f:
        meta = msgpack.unpackb(f.read(int.from_bytes(f.read(8), "big")))
        buffers = [bytearray(f.read(n)) for n in meta["lens"]]
    return values.loads(meta["pickle"], buffers)


def _error_record(error: LeptonError | None) -> dict | None:
    if error is None:
        return None
    if isinstance(error, RemoteError):
        return {"type": error.type_name, "message": error.message, "rank": error.rank, "node": error.node,
                "line": error.line, "traceback": error.remote_traceback}
    return {"type": "LeptonError", "message": str(error)}


def _cost(price: float | None, started: float | None, ended: float | None) -> float | None:
    if price is None or not started or not ended:
        return None
    return round(price * (ended - started) / 3600, 6)

