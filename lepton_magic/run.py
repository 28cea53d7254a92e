"""``Run``: one run as the Python API shows it (DESIGN.md §3). It reads the store, so the same
object works in the kernel that started the run and in any later process."""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Any

from .errors import LeptonError, RemoteError
from . import owners
from .owners import owner_gone
from .store import TERMINAL, Store

if TYPE_CHECKING:
    import pandas as pd

    from .scheduler import ScheduledRun


class Run:
    """A run: its status, metrics, nodes, logs and outputs."""

    def __init__(self, store: Store, seq: int, live: "ScheduledRun | None" = None, session=None):
        self._store = store
        self.seq = seq
        self._live = live
        self._session = session
        if live is not None:  # (what a live run knows saves a read of the store on every cell)
            self.id, self.name = live.run_id, live.name
        else:
            row = self._row()
            self.id: str = row["id"]
            self.name: str = row["name"]

    def __repr__(self) -> str:
        return f"<Run {self.name} ({self.id}) {self.status}>"

    def _repr_html_(self) -> str:
        return (f"<b>{self.name}</b> <code>{self.id}</code> · {self.status} · "
                f"{self.world_size or '?'} ranks · {_duration(self.duration)}")

    def _ipython_display_(self) -> None:
        """In a notebook: the run's panel (live while it runs). Elsewhere: its text."""
        from IPython import get_ipython
        from IPython.display import display

        from .ui import live

        shell = get_ipython()
        if shell is not None and live.widgets_available(shell):
            live.show(self, shell)
        else:
            display({"text/plain": repr(self), "text/html": self._repr_html_()}, raw=True)

    @property
    def store(self) -> Store:
        """The store the run lives in (views read its metrics and logs from there)."""
        return self._store

    def _row(self) -> dict:
        row = self._store.run_row(self.seq)
        if row is None:
            raise LeptonError(f"run {self.seq} is not in the store at {self._store.path}")
        return row

    # --- status ----------------------------------------------------------------------------
    @property
    def status(self) -> str:
        """queued, starting, running, succeeded, failed or cancelled."""
        if self._live is not None:
            return self._live.status
        row = self._row()
        if row["status"] not in TERMINAL and owner_gone(row):
            # The kernel that ran it died, and its nodes died with it (the dead-man switch).
            self._store.reconcile()
            return "failed"
        return row["status"]

    @property
    def is_live(self) -> bool:
        """This process runs it: its events arrive here, not only through the store."""
        return self._live is not None

    @property
    def done(self) -> bool:
        """It has ended (succeeded, failed or cancelled)."""
        if self._live is not None:
            return self._live.done.is_set()
        return self.status in TERMINAL

    def wait_done(self, timeout: float | None = None) -> bool:
        """Wait for the end without raising the run's error; True if it has ended."""
        if self._live is not None:
            return self._live.wait(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.2)
        return True

    @property
    def world_size(self) -> int | None:
        if self._live is not None and self._live.world_size:
            return self._live.world_size
        return self._row()["world_size"]

    @property
    def node_count(self) -> int:
        """How many nodes the run got."""
        if self._live is not None:
            return len(self._live.nodes)
        return self._store.execute("SELECT COUNT(*) FROM run_nodes WHERE run=?", (self.seq,))[0][0]

    @property
    def duration(self) -> float | None:
        live = self._live
        if live is not None and live.done.is_set():  # in memory already: no store round trip
            return (live.ended_at or time.time()) - live.started_at if live.started_at else None
        row = self._row()
        if not row["started"]:
            return None
        return (row["ended"] or time.time()) - row["started"]

    @property
    def notes(self) -> list[str]:
        """What the run's placement or end had to say (a node without GPU, ranks that did not
        confirm they stopped)."""
        return list(self._live.notes) if self._live is not None else []

    @property
    def error(self) -> LeptonError | None:
        """What went wrong, for a failed run (a RemoteError when the cell raised)."""
        if self._live is not None:
            return self._live.error
        record = self._row()["error"]
        if not record:
            return None
        data = json.loads(record)
        if data.get("traceback"):
            return RemoteError(self.name, data["rank"], data["node"], data["type"], data["message"],
                               data["traceback"], data.get("line"))
        return LeptonError(data["message"])

    # --- data ------------------------------------------------------------------------------
    @property
    def metrics(self) -> "pd.DataFrame":
        """Every logged point of every rank: columns rank, step, name, value, time, attempt. A
        run that was retried forms one curve: for a (rank, step, name) logged by several attempts
        the latest attempt's point is kept."""
        import pandas as pd

        # from the run's columnar copy (store.metrics_frame falls back to SQL); names as codes too
        df, codes = self._store.metrics_frame(self.seq)
        if len(df) and df["attempt"].iat[-1] > 0:
            keys = df[["rank", "step"]].assign(name=df["name"] if codes is None else codes)
            df = df[~keys.duplicated(keep="last").to_numpy()].reset_index(drop=True)
        df["time"] = pd.to_datetime(df["time"], unit="s", utc=True)
        return df

    @property
    def attempts(self) -> "pd.DataFrame":
        """One row per attempt: attempt (1 for the first), nodes, started, ended, reason it ended."""
        import pandas as pd

        rows = self._store.attempts(self.seq)
        df = pd.DataFrame(rows, columns=["attempt", "nodes", "started", "ended", "reason"])
        df["attempt"] += 1
        df["nodes"] = df["nodes"].map(json.loads)
        for column in ("started", "ended"):
            df[column] = pd.to_datetime(df[column], unit="s", utc=True)
        return df

    @property
    def history(self) -> "pd.DataFrame":
        """Rank 0's metrics, wide: index step, one column per metric."""
        table, _last = self._store.metric_table(self.seq)
        if table is None:
            df = self._store.frame(
                "SELECT step, name, value FROM metrics WHERE run=? AND rank=0 ORDER BY rowid", (self.seq,)
            )
        else:  # the columnar copy: rank 0's rows, names as codes until the columns are named
            from .columnar import column, name_codes
            import pandas as pd

            codes, names = name_codes(table)
            mine = column(table, "rank") == 0
            df = pd.DataFrame({"step": column(table, "step")[mine], "name": codes[mine],
                               "value": column(table, "value")[mine].astype(float)})
        # The last value logged at each step wins; a NaN (a diverging loss) stays visible.
        last = df.drop_duplicates(["step", "name"], keep="last")
        wide = last.pivot(index="step", columns="name", values="value").sort_index()
        if table is not None:
            wide.columns = [names[c] for c in wide.columns]
            wide = wide[sorted(wide.columns)]
        wide.columns.name = None
        return wide

    @property
    def nodes(self) -> "pd.DataFrame":
        """The nodes the run got: node, host, ranks, gpus, gpu_name, status."""
        df = self._store.frame(
            "SELECT node, host, ranks, gpus, gpu_name, status FROM run_nodes WHERE run=? ORDER BY node",
            (self.seq,),
        )
        df["ranks"] = df["ranks"].map(json.loads)
        return df

    @property
    def outputs(self) -> dict[str, Any]:
        """The variables the cell assigned, from rank 0 (of a sweep: of its best trial)."""
        if self._live is not None:
            if self._live.status in TERMINAL:  # its end is being taken (the run-end callbacks)
                self._live.wait(5)
            if self._live.done.is_set():
                return dict(self._live.outputs)
        from .liverun import OUTPUTS_FILE, outputs_dir, read_outputs

        row = self._row()
        if row["status"] != "succeeded" or not json.loads(row["outputs"] or "[]"):
            return {}
        if row.get("sweep"):  # a sweep's outputs are its best trial's
            best = json.loads(row["sweep"]).get("best")
            return self.trial(best["trial"]).outputs if best else {}
        path = outputs_dir(self._store, self.id) / OUTPUTS_FILE
        deadline = time.monotonic() + 30
        while not path.exists():  # written just after the run ended, by the kernel that ran it
            if time.monotonic() > deadline or owner_gone(row):
                return {}
            time.sleep(0.05)
        return read_outputs(path)

    @property
    def skipped(self) -> dict[str, str]:
        """Outputs that could not come back, and why."""
        return dict(self._live.skipped) if self._live is not None else {}

    # --- sweeps ----------------------------------------------------------------------------
    @property
    def is_sweep(self) -> bool:
        """A ``%%lepton --sweep`` run: its trials are runs of their own under it."""
        if self._live is not None:
            return self._live.is_sweep
        return bool(self._row().get("sweep"))

    @property
    def trials(self) -> "pd.DataFrame":
        """One row per trial: its parameters, status (succeeded, failed, pruned, cancelled),
        nodes, start, duration, objective, pruned_at_step, last_ and best_ of each metric."""
        from .sweeps.studies import trials_frame

        return trials_frame(self._store, self.seq)

    @property
    def best(self) -> dict | None:
        """The best trial: {"trial", "params", "objective", "run"}; None until one succeeded."""
        if self._live is not None and getattr(self._live, "best", None) is not None:
            return dict(self._live.best)
        return json.loads(self._row()["sweep"] or "{}").get("best")

    def trial(self, number: int) -> "Run":
        """Trial ``number`` of this sweep as a Run of its own (metrics, logs, outputs)."""
        rows = self._store.execute("SELECT seq FROM runs WHERE parent=? AND trial=?", (self.seq, number))
        if not rows:
            raise LeptonError(f"{self.name} has no trial {number}")
        live = self._session._live_run(self._store.run_row(rows[0][0])["id"]) if self._session else None
        return Run(self._store, rows[0][0], live, self._session)

    @property
    def study(self):
        """The optuna.Study of this sweep (``optuna.visualization.matplotlib`` plots work on it)."""
        if self._live is not None and getattr(self._live, "study", None) is not None:
            return self._live.study
        from .sweeps.studies import study_of

        return study_of(self._store, self.seq)

    def logs(self, rank: int | None = None) -> str:
        """Everything the ranks printed; prefixed by rank unless one rank is asked for."""
        rows = self._store.logs_since(self.seq, 0, rank)
        if rank is not None:
            return "\n".join(line for _id, _rank, _stream, line in rows)
        return "\n".join(f"[rank {r}] {line}" for _id, r, _stream, line in rows)

    # --- control ---------------------------------------------------------------------------
    def pull(self, path: str = ".", into: str | None = None) -> dict:
        """Bring back what rank 0 wrote under ``path`` of its node's mirror of the notebook's
        folder (checkpoints, figures), into the folder that was mirrored (or ``into``). Only
        files whose hash differs from the local copy travel; returns files, bytes, unchanged."""
        from . import workdir
        from .session import default_session

        return workdir.pull(self._session or default_session(), self, path, into)

    def wait(self, timeout: float | None = None) -> "Run":
        """Block until the run ends; raises its error if it failed, TimeoutError if still running."""
        if not self.wait_done(timeout):
            raise TimeoutError(f"{self.name} is still {self.status} after {timeout:g} s")
        if self._session is not None:
            self._session.bind_pending(self.seq)
        if self.status == "failed" and self.error is not None:
            raise self.error
        return self

    def cancel(self, reason: str = "cancelled by the user") -> None:
        """Stop every rank (within 5 s); the run ends as cancelled. A run of another process
        on this machine (a detached run's keeper, another notebook) is asked through the
        store's command table, which its owner reads within a second."""
        if self._live is not None:
            self._live.cancel(reason=reason)
            return
        row = self._row()
        if row["status"] in TERMINAL:
            return
        if owner_gone(row):
            self._store.reconcile()
            return
        if row["owner_host"] != owners.host():
            raise LeptonError(f"{self.name} belongs to a process on {row['owner_host']}; cancel it there")
        self._store.add_command("cancel_run", self.id, row["owner_pid"], row["owner_host"],
                                node=f"another process (pid {os.getpid()})")

    @property
    def detached(self) -> bool:
        """Kept by a process of its own (``%%lepton --detach``): it outlives the kernel, and
        stopping to follow it does not cancel it."""
        return self._live is None and bool(self._row().get("detached"))


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "not started"
    return f"{seconds:.3g} s" if seconds < 60 else f"{seconds / 60:.1f} min"
