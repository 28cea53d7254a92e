"""The keeper of a detached run (``%%lepton --detach``): a process of its own that owns the run
from submission to end, so the run outlives the kernel that submitted it.

The kernel records the run, writes what every attempt starts from into a private file, and
starts ``python -m lepton_magic.keeper FILE`` in a session of its own (no terminal, not in the
kernel's process group). The keeper takes the run's row (the dead-owner checks now look at it),
starts a pool of its own on the run's backend with the kernel's settings, and drives the run
through the scheduler exactly as a kernel would: retries, timeout, checkpoints, every event into
the store. Any process follows it through the store (``%lepton attach``), and cancels it through
the store's command table, which the keeper polls. When the run ends the keeper releases its
nodes and exits.

Why a process and not agents that write the store: the node side stays free of the kernel side
(no store, no SQLite on nodes), remote nodes keep needing only the byte pipe, and one code path
(session → scheduler → liverun) runs attached and detached runs alike.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import msgpack

from . import private
from .errors import LeptonError
from .inputs import Inputs
from .scheduler import RunSpec
from .store import Store

if TYPE_CHECKING:
    from .sweeps.space import SweepSpec

log = logging.getLogger("lepton_magic.keeper")

#: How long the submitting kernel waits for the keeper to take the run.
TAKE_TIMEOUT = 30.0


def spec_dir(store: Store) -> Path:
    return Path(store.home) / "detached"


def log_path(store: Store, run_id: str) -> Path:
    return Path(store.home) / "logs" / f"keeper-{run_id}.log"


def launch(store: Store, *, seq: int, run_id: str, name: str, backend: str, spec: RunSpec,
           config: dict, settings: dict, sweep: "SweepSpec | None" = None, nodes_given: int | None = None) -> int:
    """Start the keeper of run ``seq`` (a sweep's, with ``sweep``: it drives every trial) and
    wait until it has taken the run; returns its pid. A keeper that cannot start fails the run
    with the end of its log."""
    folder = spec_dir(store)
    private.make_dir(folder)
    private.make_dir(Path(store.home) / "logs")
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name != "on_done"}
    fields["inputs"] = spec.inputs.joined() if spec.inputs is not None else None
    fields["plan"] = pickle.dumps(spec.plan) if spec.plan is not None else None  # (paths, hashes)
    body = msgpack.packb({"seq": seq, "run_id": run_id, "name": name, "backend": backend, "spec": fields,
                          "config": config, "settings": settings, "nodes_given": nodes_given,
                          "sweep": pickle.dumps(sweep) if sweep is not None else None})
    path = folder / f"{run_id}.spec"
    with private.open_file(path, "wb") as f:
        f.write(body)
    with private.open_file(log_path(store, run_id), "ab") as keeper_log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lepton_magic.keeper", str(path)],
            stdin=subprocess.DEVNULL, stdout=keeper_log, stderr=keeper_log,
            # Its own session: no terminal's signals and no kernel's process group reach it, and the
            # kernel's death (even kill -9) leaves it running.
            start_new_session=True, cwd=os.getcwd(), env=dict(os.environ, LEPTON_HOME=str(store.home)),
        )
    deadline = time.monotonic() + TAKE_TIMEOUT
    while time.monotonic() < deadline:
        row = store.run_row(seq)
        if row["owner_pid"] == proc.pid:
            _reap_later(proc)
            return proc.pid
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    else:
        proc.kill()
    proc.wait()
    tail = _tail(log_path(store, run_id))
    path.unlink(missing_ok=True)
    message = f"the keeper of {name} did not start" + (f": {tail}" if tail else "")
    store.update_run(seq, status="failed", ended=time.time(), error={"type": "LeptonError", "message": message})
    raise LeptonError(message)


def _reap_later(proc: subprocess.Popen) -> None:
    """The keeper is the kernel's child until it exits: reap it then, so no zombie is left."""
    import threading

    threading.Thread(target=proc.wait, daemon=True, name="lepton-keeper-reaper").start()


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0])
    data = msgpack.unpackb(path.read_bytes())
    path.unlink(missing_ok=True)  # inputs and settings: read once, never left lying around
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    from .config import Config
    from .session import Session

    store = Store()
    seq = data["seq"]
    store.take_run(seq)
    config = Config.defaults()
    config.values.update(data["config"])
    session = Session(config, store)
    spec = RunSpec(**data["spec"])
    spec.inputs = Inputs.from_joined(spec.inputs) if spec.inputs is not None else None
    spec.plan = pickle.loads(spec.plan) if spec.plan is not None else None
    # Agents on other hosts outlive a dropped connection and are connected to again (backends.ssh).
    settings = {**data["settings"], "resumable": data["backend"] != "local"}
    log.info("keeping %s (%s) on %s", data["name"], data["run_id"], data["backend"])
    try:
        if data.get("sweep") is not None:
            run = session.start_prepared_sweep(seq, data["run_id"], data["name"], data["backend"], spec,
                                               pickle.loads(data["sweep"]), data.get("nodes_given"), settings)
        else:
            run = session.start_prepared(seq, data["run_id"], data["name"], data["backend"], spec, settings)
    except BaseException as e:  # recorded on the run by start_prepared; say it here too
        log.error("%s could not start: %s", data["name"], e)
        session.close("the detached run could not start")
        return 1

    def stop(signum, _frame):  # a shutdown of this machine: end the run cleanly, saying why
        run.cancel(reason=f"its keeper (pid {os.getpid()}) was stopped by signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not run.wait_done(1.0):
        pass
    log.info("%s ended: %s", data["name"], run.status)
    session.close("the detached run ended")
    return 0


if __name__ == "__main__":
    sys.exit(main())
