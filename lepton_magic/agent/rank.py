"""One rank: wait for a job, run the cell, send back metrics, result or error, exit.

A fresh process runs every job (clean semantics: nothing leaks from one run into the next);
it was forked before the job arrived, so the fork is not on the critical path.
"""

from __future__ import annotations

import array
import builtins
import fcntl
import linecache
import os
import select
import signal
import sys
import termios
import time
import traceback
import types

from .. import sharedmem, staging, values
from ..cellcode import CELL_FILENAME, padded_source
from ..protocol import KEY_SIZE, FrameReader, FrameWriter, encode, read_exact
from . import network
from .forking import CTRL_FD, DIRECT_FD, CountedFile
from .runtime import Lepton, environ_for


#: A spot notice that reached this process before its ``lepton`` existed (see _on_preempting).
_preempting_noticed = False


def serve(preloaded: bool) -> int:
    # Before the hello: the agent signals a rank only once it knows the pid, and SIGUSR1's
    # default action would kill the rank.
    _on_preempting(_note_preempting)
    try:
        control_key = read_exact(CTRL_FD, KEY_SIZE)  # the agent's first bytes on the socket
    except EOFError:
        return 0  # the agent retired this standby before it started
    FrameWriter(CTRL_FD, control_key).send({"t": "hello", "pid": os.getpid(), "preloaded": preloaded})
    if not _job_waiting():  # (a standby made for a job that is here already goes straight to it)
        _rehearse(control_key)
    # The job comes from the agent, or, where the agent offered this standby to the kernel (on
    # the kernel's machine), from the kernel on the direct socket, signed with the same key.
    _wake_politely(True)
    fd = _job_source()
    job = FrameReader(fd, control_key, source="kernel" if fd == DIRECT_FD else "agent").read()
    _wake_politely(False)
    if job is None or job.get("t") != "job":
        return 0  # the agent or the kernel retired this standby
    if fd != DIRECT_FD and _has_fd(DIRECT_FD):
        os.close(DIRECT_FD)
    # From here on this rank speaks with its run's key (no other key but its control socket's
    # was ever in this process): whoever sent the job takes its frames for this run and this
    # rank only (the agent relays them to the kernel; the kernel reads them straight).
    rank = job["rank_offset"] + job["local_rank"]
    return run_job(job, FrameWriter(fd, job.pop("key"), channel=job["run"], sender=rank))


def _rehearse(key: bytes) -> None:
    """Go through a job's steps once on a dummy job, off the critical path. A standby is a fresh
    fork: the first time it runs any code it copies the pages it writes to and fills cold
    caches (about 1 ms for ``x = 1``, more than the job itself); a job should find that done.
    Only steps without lasting effects are rehearsed (no signal handlers, no fork hooks)."""
    dummy = {"run": "r-rehearsal", "rank_offset": 0, "local_rank": 0, "world_size": 1, "local_world_size": 1,
             "node_rank": 0, "nnodes": 1, "master_addr": "127.0.0.1", "master_port": 29500, "node": "rehearsal",
             "threads": 1}
    environ = environ_for(dummy, 0)
    before = {name: os.environ.get(name) for name in environ}
    os.environ.update(environ)
    for name, value in before.items():
        if value is None:
            del os.environ[name]
        else:
            os.environ[name] = value
    lepton = Lepton(run="r-rehearsal", rank=0, local_rank=0, world_size=1, node="rehearsal", node_rank=0,
                    send=lambda message: None)
    namespace = {"__builtins__": builtins, "lepton": lepton}
    exec(compile(padded_source("x = 1", 1), CELL_FILENAME, "exec"), namespace)
    collect_outputs(namespace, ["x"], False)
    lepton.close()
    encode(key, {"t": "result", "run": "r-rehearsal", "rank": 0, "outputs": b"", "names": ["x"], "time": time.time()},
           channel="r-rehearsal")
    quiet_since(CountedFile.written)


def _wake_politely(waiting: bool, idle: bool = False) -> None:
    """While it waits, a standby is SCHED_BATCH: the job's arrival then does not preempt the
    process that sent it (the kernel, still sending the other ranks their jobs) on its CPU;
    once the job is read it is an ordinary process again (``idle``: SCHED_IDLE, for its exit)."""
    if not hasattr(os, "sched_setscheduler"):
        return
    policy = os.SCHED_IDLE if idle else os.SCHED_BATCH if waiting else os.SCHED_OTHER
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))
    except OSError:
        pass


def _job_fds() -> list[int]:
    """Where a job may come from: the agent's control socket, and the kernel's direct one."""
    return [CTRL_FD, DIRECT_FD] if _has_fd(DIRECT_FD) else [CTRL_FD]


def _job_waiting() -> bool:
    return bool(select.select(_job_fds(), [], [], 0)[0])


def _job_source() -> int:
    """The descriptor the job arrives on: the direct socket when the kernel wrote to it (or
    closed it: retired), else the control socket (a job from the agent, or its end)."""
    readable, _, _ = select.select(_job_fds(), [], [])
    return DIRECT_FD if DIRECT_FD in readable else CTRL_FD


def _has_fd(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def _pending(fd: int) -> int:
    """Bytes waiting to be read on ``fd`` (a socket or a pipe)."""
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(fd, termios.FIONREAD, buf)
    except OSError:
        return 0
    return buf[0]


def quiet_since(written_before: int) -> bool:
    """Nothing the rank printed can still be on its way: Python wrote nothing to stdout or
    stderr since ``written_before``, and nothing waits in either pipe for the agent to read.
    (What C code wrote and the agent has already read may reach the kernel after the answer;
    the kernel still stores it: a run takes lines until its ranks' exits.)"""
    return CountedFile.written == written_before and not _pending(1) and not _pending(2)


def run_job(job: dict, writer: FrameWriter) -> int:
    printed_before = CountedFile.written
    local_rank = job["local_rank"]
    rank = job["rank_offset"] + local_rank
    run = job["run"]
    os.environ.update(environ_for(job, local_rank))
    lepton = Lepton(
        run=run,
        rank=rank,
        local_rank=local_rank,
        world_size=job["world_size"],
        node=job["node"],
        node_rank=job["node_rank"],
        send=writer.send,
        checkpoint_blob=job.get("checkpoint"),
        attempt=job.get("attempt", 0),
        trial=job.get("trial"),
    )
    signal.signal(signal.SIGTERM, lambda *_: _terminate(lepton))
    _on_preempting(lambda: lepton._notice_preemption())
    if job.get("preempting") or _preempting_noticed:  # the notice came before this run did
        lepton._notice_preemption()
    # A process the cell forks (DataLoader workers, multiprocessing) must not speak for this rank.
    os.register_at_fork(after_in_child=lambda: _silence_child(lepton))
    _apply_thread_count()
    _paths_first(job.get("paths") or [])  # the run's packages, modules shipped from the kernel
    if job.get("cwd"):
        _enter(job["cwd"])
    namespace = _main_module(lepton).__dict__
    if job["inputs"] or job.get("inputs_s3"):
        try:  # one pickle: objects that share state in the notebook share it here too
            namespace.update(_load_inputs(job))
        except Exception as e:
            return _fail(writer, lepton, job, e, f"could not load the inputs on {job['node']}: ", printed_before)
    # A sweep's trial: its parameters are plain variables of the cell, as if the notebook had them.
    namespace.update(job.get("params") or {})

    source = padded_source(job["code"], job["line_offset"])
    linecache.cache[CELL_FILENAME] = (len(source), None, source.splitlines(True), CELL_FILENAME)
    try:
        exec(compile(source, CELL_FILENAME, "exec"), namespace)
    except BaseException as e:  # KeyboardInterrupt and SystemExit are failures of the cell too
        return _fail(writer, lepton, job, e, printed_before=printed_before)

    result: dict = {"t": "result", "run": run, "rank": rank}
    if rank == 0:
        result["collect_started"] = time.time()
        blob, buffers, names, skipped = collect_outputs(namespace, job["outputs"], job["explicit_outputs"])
        result.update(outputs=blob, names=names, skipped=skipped)
        result["_buffers"] = buffers
        slot = job.get("outputs_s3")
        size = len(blob) + sum(b.nbytes for b in buffers)
        if slot and size >= slot["threshold"]:
            body = b"".join([len(blob).to_bytes(8, "big"), blob, *[bytes(b) for b in buffers]])
            result["staged"] = {"key": slot["key"], "sha256": staging.upload(slot, body),
                                "lens": [b.nbytes for b in buffers]}
            result["outputs"] = None
            del result["_buffers"]
        elif job.get("shm_dir") and sum(b.nbytes for b in buffers) >= sharedmem.SHM_MIN_BYTES:
            try:
                result["shm"] = sharedmem.write_buffers(job["shm_dir"], run, buffers)
                del result["_buffers"]
            except OSError as e:  # /dev/shm too small (64 MB in a default container): use the pipe
                print(f"lepton: shared memory unavailable ({e}); sending the outputs through the pipe",
                      file=sys.stderr)
    lepton.close()
    _flush_std()
    result["time"] = time.time()
    if job.get("direct"):
        result["quiet"] = quiet_since(printed_before)
    writer.send(result, final=True)
    if result.get("quiet") and "torch" not in sys.modules:
        # A light rank answered, and nothing of it is on the way through the agent: its exit
        # waits for CPUs the kernel is not using to take the answer in. (Not a rank with torch:
        # tearing that down takes long enough to hold up its replacement, and a GPU's memory.)
        _wake_politely(True, idle=True)
    return 0


def _main_module(lepton: Lepton) -> types.ModuleType:
    """The cell runs in a module installed as ``__main__``, as IPython runs a notebook's cells:
    what it defines pickles by reference (``__main__.square``), so multiprocessing pools,
    ProcessPoolExecutor and DataLoader workers forked from the rank find it."""
    module = types.ModuleType("__main__", "the %%lepton cell")
    module.__dict__.update({"__builtins__": builtins, "lepton": lepton})
    sys.modules["__main__"] = module
    return module


def _enter(folder: str) -> None:
    """Run in the notebook's folder, importing its sibling modules, as the notebook does."""
    try:
        os.chdir(folder)
    except OSError as e:
        print(f"lepton: cannot run in {folder} ({e}); running in {os.getcwd()}", file=sys.stderr)
        return
    sys.path.insert(0, folder)


def _paths_first(folders: list[str]) -> None:
    """Put folders first on sys.path, their .pth files read (editable installs, namespace
    packages), as the site module does for site-packages."""
    import site

    for folder in reversed(folders):
        before = list(sys.path)
        site.addsitedir(folder)
        added = [p for p in sys.path if p not in before]
        sys.path[:] = added + [p for p in before if p not in added]


def _apply_thread_count() -> None:
    """OpenMP read OMP_NUM_THREADS when the zygote imported torch, before this job set it:
    tell torch now, or every rank on a shared machine would use every core."""
    torch = sys.modules.get("torch")
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if torch is not None and threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))


def _silence_child(lepton: Lepton) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    lepton.detach()


def _load_inputs(job: dict) -> dict:
    """The notebook's variables: a pickle whose large buffers came out of band — mapped from the
    run's shared-memory file (nodes on the kernel's machine), with the message (the pipe), or in
    one object from a bucket."""
    if job.get("inputs_s3"):
        blob, buffers = values.split_oob(staging.fetch(job["inputs_s3"]))
    elif job.get("inputs_shm"):
        blob, buffers = job["inputs"], sharedmem.map_buffers(job["inputs_shm"], keep=True)
    else:
        blob, buffers = job["inputs"], job.get("_buffers")
    return values.loads(blob, buffers)


def collect_outputs(namespace: dict, names: list[str], explicit: bool):
    """Pickle the named variables together (so shared references stay shared, as if the cell
    ran in the notebook), tensors moved to the CPU; say why any could not come back."""
    chosen: dict = {}
    skipped: dict[str, str] = {}
    for name in names:
        if name not in namespace:
            if explicit:
                skipped[name] = "was never assigned by the cell"
            continue
        value = namespace[name]
        if not values.is_shippable(value):
            if explicit:
                skipped[name] = "is a module (import it in the notebook instead)"
            continue
        chosen[name] = value
    try:
        blob, buffers = values.dumps_oob(chosen)
    except Exception:
        # Find the culprits one by one, then send the rest together.
        for name in list(chosen):
            try:
                values.dumps(chosen[name])
            except Exception as e:
                skipped[name] = f"a {values.describe(chosen.pop(name))} cannot be pickled ({type(e).__name__}: {e})"
        blob, buffers = values.dumps_oob(chosen)
    return blob, buffers, list(chosen), skipped


def _fail(writer: FrameWriter, lepton: Lepton, job: dict, error: BaseException, prefix: str = "",
          printed_before: int = 0) -> int:
    tb = error.__traceback__
    # Drop the frames of this module: the user's traceback starts in their cell.
    while tb is not None and tb.tb_frame.f_code.co_filename != CELL_FILENAME:
        tb = tb.tb_next
    if tb is None:
        tb = error.__traceback__.tb_next if error.__traceback__ else None
    lines = traceback.format_exception(type(error), error, tb)
    cell_line = None
    frame = tb
    while frame is not None:
        if frame.tb_frame.f_code.co_filename == CELL_FILENAME:
            cell_line = frame.tb_lineno
        frame = frame.tb_next
    if isinstance(error, SyntaxError) and error.filename == CELL_FILENAME:
        cell_line = error.lineno
    try:
        lepton.close()
    except BaseException:
        pass
    _flush_std()
    message = {
        "t": "error",
        "run": job["run"],
        "rank": lepton.rank,
        "type": type(error).__name__,
        "message": prefix + str(error),
        "traceback": "".join(lines),
        "line": cell_line,
        "time": time.time(),
    }
    if job.get("direct"):
        message["quiet"] = quiet_since(printed_before)
    writer.send(message, final=True)
    return 1


def _on_preempting(action) -> None:
    """SIGUSR1 is the agent's spot notice. Restartable: a system call the cell is in (a read, a
    collective's socket) goes on rather than fail with EINTR."""
    signal.signal(signal.SIGUSR1, lambda *_: action())
    signal.siginterrupt(signal.SIGUSR1, False)


def _note_preempting() -> None:
    global _preempting_noticed
    _preempting_noticed = True


def _terminate(lepton: Lepton) -> None:
    """On cancel: hand over the points logged so far, then go (SIGKILL follows if we hang)."""
    try:
        lepton.flush(lock_timeout=0.5)
        _flush_std()
    finally:
        os._exit(128 + signal.SIGTERM)


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
