"""The ``lepton`` object a cell sees on a node (DESIGN.md §2)."""

from __future__ import annotations

import operator
import sys
import threading
import time
from collections import deque
from typing import Any, Callable

from .. import values
from . import network

_now = time.time
_STEP_MIN, _STEP_MAX = -(2**63), 2**63 - 1  # what SQLite's INTEGER holds

#: A batch leaves the rank when it holds this many points, or when it is this old.
BATCH_POINTS = 4096
BATCH_SECONDS = 0.2


class Lepton:
    """Rank facts, metric logging, distributed set-up and checkpoints for the running cell."""

    def __init__(
        self,
        *,
        run: str,
        rank: int,
        local_rank: int,
        world_size: int,
        node: str,
        node_rank: int,
        send: Callable[[dict], None],
        checkpoint_blob: bytes | None = None,
        attempt: int = 0,
        trial: int | None = None,
    ):
        self.run = run
        self.rank = rank
        self.local_rank = local_rank
        self.world_size = world_size
        self.node = node
        self.node_rank = node_rank
        self.attempt = attempt
        #: The trial number in a sweep (``%%lepton --sweep``); None outside one.
        self.trial = trial
        self._send = send
        self._checkpoint_blob = checkpoint_blob
        self._points: deque[tuple[int, float, dict]] = deque()
        self._next_step = 0
        self._flush_lock = threading.Lock()
        self._closed = threading.Event()
        self._flusher: threading.Thread | None = None  # started by the first log call
        self._preempting = False

    def __repr__(self) -> str:
        return (
            f"<lepton rank {self.rank}/{self.world_size} local_rank {self.local_rank} "
            f"on {self.node} device {self.device}>"
        )

    # --- metrics -------------------------------------------------------------------------
    def log(self, step: int | None = None, **metrics: float) -> None:
        """Record metrics at ``step`` (default: one past the previous step)."""
        if step is None:
            step = self._next_step
        elif type(step) is not int or not _STEP_MIN <= step <= _STEP_MAX:
            step = _as_step(step)
        for value in metrics.values():
            if type(value) is not float:
                metrics = _as_floats(metrics)
                break
        self._next_step = step + 1
        points = self._points
        # deque.append is atomic, so the flusher thread can drain concurrently without a lock.
        points.append((step, _now(), metrics))
        if len(points) >= BATCH_POINTS:
            self.flush()
        elif self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_periodically, daemon=True)
            self._flusher.start()

    def flush(self, lock_timeout: float = -1) -> None:
        """Send the points logged so far. A signal handler passes a timeout: the interrupted
        main thread may itself be inside flush, holding the lock."""
        points = self._points
        steps, names, vals, times = [], [], [], []
        if not self._flush_lock.acquire(timeout=lock_timeout):
            return
        try:
            for _ in range(len(points)):
                step, t, point = points.popleft()
                for name, value in point.items():
                    steps.append(step)
                    names.append(name)
                    vals.append(value)
                    times.append(t)
            if steps:
                self._send({"t": "metrics", "run": self.run, "rank": self.rank,
                            "step": steps, "name": names, "value": vals, "time": times})
        finally:
            self._flush_lock.release()

    def _flush_periodically(self) -> None:
        while not self._closed.wait(BATCH_SECONDS):
            if self._points:
                try:
                    self.flush()
                except Exception as e:  # keep flushing later points; say what went wrong
                    print(f"lepton.log: could not send metrics: {type(e).__name__}: {e}", file=sys.stderr)

    def detach(self) -> None:
        """In a process forked by the cell: drop the parent's points and never send."""
        self._points = deque()
        self._send = lambda message: None
        self._closed.set()

    # --- devices and torch.distributed -----------------------------------------------------
    @property
    def device(self) -> Any:
        """``cuda:<local_rank>`` where CUDA exists, else ``cpu`` (a torch.device)."""
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() > self.local_rank:
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def init_distributed(self, backend: str | None = None, timeout_s: float = 600) -> Any:
        """Join this run's process group (nccl on GPUs, gloo on CPU); returns torch.distributed."""
        import datetime

        import torch
        import torch.distributed as dist

        if dist.is_initialized():
            return dist
        use_cuda = self.device.type == "cuda"
        if use_cuda:
            torch.cuda.set_device(self.local_rank)
        backend = backend or ("nccl" if use_cuda and dist.is_nccl_available() else "gloo")
        timeout = datetime.timedelta(seconds=timeout_s)
        store = self._rendezvous(dist, timeout)
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world_size, timeout=timeout)
        return dist

    def _rendezvous(self, dist, timeout):
        """The store the ranks meet at (torchrun's env:// rendezvous, on MASTER_ADDR:MASTER_PORT).
        Rank 0 listens only where the other ranks reach it (loopback for local nodes), not on
        every interface as torch's own listener does."""
        import os

        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        listener = network.listen_on(host, port) if self.rank == 0 else None
        try:
            return dist.TCPStore(host, port, self.world_size, self.rank == 0, timeout=timeout,
                                 master_listen_fd=listener.fileno() if listener else None)
        finally:
            if listener is not None:
                listener.close()  # the store holds its own copy of the descriptor

    def barrier(self) -> None:
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_initialized():
            dist.barrier()

    # --- spot interruptions -----------------------------------------------------------------
    @property
    def preempting(self) -> bool:
        """True once the node got a spot interruption notice (about two minutes before the
        instance goes). A training loop checks it every step and, when it turns True, saves a
        ``checkpoint()``: the retry (``--retries``) resumes from there on another node."""
        return self._preempting

    def _notice_preemption(self) -> None:
        """Called from the SIGUSR1 handler: only set a flag, anything more could deadlock."""
        self._preempting = True

    # --- checkpoints -----------------------------------------------------------------------
    def checkpoint(self, state: Any) -> None:
        """Keep ``state`` (rank 0's) in the kernel; a retry starts from it via ``restore()``."""
        if self.rank != 0:
            return
        self._checkpoint_blob = values.dumps(state)
        self._send({"t": "checkpoint", "run": self.run, "rank": self.rank,
                    "blob": self._checkpoint_blob, "time": time.time()})

    def restore(self) -> Any:
        """The last checkpoint of this run (from an earlier attempt), or None."""
        if self._checkpoint_blob is None:
            return None
        return values.loads(self._checkpoint_blob)

    # --- end of the cell -------------------------------------------------------------------
    def close(self) -> None:
        self._closed.set()
        self.flush()
        dist = sys.modules.get("torch.distributed")
        if dist is not None and dist.is_available() and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def _as_step(step: Any) -> int:
    try:
        value = operator.index(step)  # int, numpy integers, 0-d integer tensors
    except TypeError:
        raise TypeError(f"lepton.log: step must be a whole number, got {type(step).__name__} {step!r}") from None
    if not _STEP_MIN <= value <= _STEP_MAX:
        raise TypeError(f"lepton.log: step {value} does not fit in 64 bits")
    return value


def _as_floats(metrics: dict) -> dict:
    try:
        return {name: float(value) for name, value in metrics.items()}
    except (TypeError, ValueError):
        bad = [k for k, v in metrics.items() if not _is_number(v)]
        raise TypeError(
            f"lepton.log takes numbers; {', '.join(bad)} "
            f"{'is' if len(bad) == 1 else 'are'} not (use .item() on a tensor)"
        ) from None


def _is_number(value: Any) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def environ_for(job: dict, local_rank: int) -> dict[str, str]:
    """The torchrun-style environment of one rank, then the user's --env on top."""
    rank = job["rank_offset"] + local_rank
    env = {
        "RANK": str(rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(job["world_size"]),
        "LOCAL_WORLD_SIZE": str(job["local_world_size"]),
        "GROUP_RANK": str(job["node_rank"]),
        "NODE_RANK": str(job["node_rank"]),
        "GROUP_WORLD_SIZE": str(job["nnodes"]),
        "ROLE_NAME": "default",
        "ROLE_RANK": str(rank),
        "ROLE_WORLD_SIZE": str(job["world_size"]),
        "MASTER_ADDR": job["master_addr"],
        "MASTER_PORT": str(job["master_port"]),
        "TORCHELASTIC_RUN_ID": job["run"],
        "TORCHELASTIC_RESTART_COUNT": str(job.get("attempt", 0)),
        "TORCHELASTIC_MAX_RESTARTS": "0",
        "LEPTON_RUN": job["run"],
        "LEPTON_NODE": job["node"],
    }
    if job.get("threads"):  # as torchrun does: cores shared out among the ranks of a machine
        env["OMP_NUM_THREADS"] = str(job["threads"])
    user = job.get("env") or {}
    env.update(network.socket_env(job["master_addr"], user))
    env.update(user)
    return env
