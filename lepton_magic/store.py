"""The embedded store: one SQLite database (WAL) under LEPTON_HOME holding pools, nodes, runs,
metrics, logs and events.

Everything a run produces is written here as it arrives, so a kernel killed mid-run keeps every
point received, and a fresh process (or the server extension) reads the same truth. Writers keep
their transactions short; WAL lets readers in other processes read meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from . import columnar, owners, private

SCHEMA = """
CREATE TABLE IF NOT EXISTS pools (
    id TEXT PRIMARY KEY, backend TEXT NOT NULL, status TEXT NOT NULL,
    created REAL NOT NULL, ended REAL, owner_pid INTEGER, owner_host TEXT, settings TEXT
);
CREATE TABLE IF NOT EXISTS nodes (
    pool TEXT NOT NULL, node TEXT NOT NULL, host TEXT, status TEXT NOT NULL DEFAULT 'starting',
    cpus INTEGER, memory INTEGER, gpus INTEGER DEFAULT 0, gpu_name TEXT, gpu_memory INTEGER,
    agent_pid INTEGER, python TEXT, torch TEXT, started REAL, last_seen REAL,
    cpu_percent REAL, mem_used INTEGER, telemetry TEXT,
    PRIMARY KEY (pool, node)
);
CREATE TABLE IF NOT EXISTS runs (
    seq INTEGER PRIMARY KEY, id TEXT UNIQUE NOT NULL, name TEXT NOT NULL, pool TEXT,
    backend TEXT, status TEXT NOT NULL, nodes INTEGER, gpus INTEGER, world_size INTEGER,
    created REAL NOT NULL, started REAL, ended REAL, code TEXT, inputs TEXT, outputs TEXT,
    error TEXT, reason TEXT, owner_pid INTEGER, owner_host TEXT, timeout REAL, env TEXT
);
CREATE INDEX IF NOT EXISTS runs_name ON runs (name);
CREATE TABLE IF NOT EXISTS run_nodes (
    run INTEGER NOT NULL, node TEXT NOT NULL, host TEXT, ranks TEXT, gpus INTEGER,
    gpu_name TEXT, status TEXT, PRIMARY KEY (run, node)
);
CREATE TABLE IF NOT EXISTS metrics (
    run INTEGER NOT NULL, rank INTEGER NOT NULL, step INTEGER, name TEXT NOT NULL,
    value REAL, time REAL
);
CREATE INDEX IF NOT EXISTS metrics_run ON metrics (run);
CREATE TABLE IF NOT EXISTS logs (
    id INTEGER PRIMARY KEY, run INTEGER NOT NULL, rank INTEGER, stream TEXT, time REAL, line TEXT
);
CREATE INDEX IF NOT EXISTS logs_run ON logs (run);
CREATE TABLE IF NOT EXISTS log_partials (
    run INTEGER NOT NULL, rank INTEGER NOT NULL, stream TEXT NOT NULL, time REAL, line TEXT,
    PRIMARY KEY (run, rank, stream)
);
CREATE TABLE IF NOT EXISTS commands (
    id INTEGER PRIMARY KEY, action TEXT NOT NULL, target TEXT NOT NULL, node TEXT,
    owner_pid INTEGER, owner_host TEXT, created REAL NOT NULL, taken REAL, done REAL, result TEXT
);
CREATE INDEX IF NOT EXISTS commands_open ON commands (owner_pid, done);
CREATE TABLE IF NOT EXISTS attempts (
    run INTEGER NOT NULL, attempt INTEGER NOT NULL, nodes TEXT, started REAL, ended REAL, reason TEXT,
    PRIMARY KEY (run, attempt)
);
CREATE TABLE IF NOT EXISTS checkpoints (
    run INTEGER NOT NULL, attempt INTEGER NOT NULL, rank INTEGER NOT NULL, time REAL, state BLOB
);
CREATE INDEX IF NOT EXISTS checkpoints_run ON checkpoints (run);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, run INTEGER, pool TEXT, time REAL NOT NULL, kind TEXT NOT NULL, data TEXT
);
CREATE INDEX IF NOT EXISTS events_pool ON events (pool);
"""

#: Columns added after a table was first created: (table, column, type), applied on open.
MIGRATIONS = [
    ("runs", "price_per_hour", "REAL"),
    ("runs", "cost", "REAL"),
    ("pools", "price_per_hour", "REAL"),
    ("pools", "cost", "REAL"),
    ("runs", "owner_started", "REAL"),
    ("runs", "lease", "REAL"),
    ("pools", "owner_started", "REAL"),
    ("pools", "lease", "REAL"),
    ("metrics", "attempt", "INTEGER NOT NULL DEFAULT 0"),
    ("runs", "retries", "INTEGER"),
    ("runs", "detached", "INTEGER NOT NULL DEFAULT 0"),
    # sweeps: the sweep's own row holds its spec; each trial is a run of its own under it
    ("runs", "sweep", "TEXT"),
    ("runs", "parent", "INTEGER"),
    ("runs", "trial", "INTEGER"),
    ("runs", "params", "TEXT"),
    ("runs", "pruned_step", "INTEGER"),
    # where the backend put a node, in its own terms (a Ray node and the GPUs Ray assigned)
    ("nodes", "place", "TEXT"),
]

#: What a run whose kernel is gone reads as, and why.
OWNER_GONE_REASON = "the kernel running it exited (killed or crashed) while the run was going"

TERMINAL = ("succeeded", "failed", "cancelled")
#: The log stream a failed rank's traceback is written to (views that show the error itself
#: can leave these lines out).
TRACEBACK_STREAM = "traceback"
STATUSES = ("queued", "starting", "running") + TERMINAL


def default_home() -> Path:
    return Path(os.environ.get("LEPTON_HOME") or Path.home() / ".local/share/lepton_magic")


class Store:
    """Thread-safe access to the database; one connection guarded by a lock."""

    def __init__(self, home: str | os.PathLike | None = None):
        self.home = Path(home) if home else default_home()
        private.make_home(self.home)
        self.path = self.home / "store.sqlite"
        private.make_sqlite_files(self.path)
        self._lock = threading.RLock()
        self._listeners: dict[int, list] = {}
        self._log_batches: dict[int, int] = {}  # (see log_batches)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a process crash (not a power cut) and costs no fsync.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=30000")
        with self._lock:
            self._db.executescript(SCHEMA + columnar.TABLE)
            for table, column, kind in MIGRATIONS:
                have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- low level -------------------------------------------------------------------------
    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict]:
        with self._lock:
            cursor = self._db.execute(sql, params)
            columns = [c[0] for c in cursor.description]
            return [dict(zip(columns, row)) for row in cursor.fetchall()]

    @contextlib.contextmanager
    def _transaction(self):
        """One short write transaction, rolled back on any error (the lock held throughout)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def write(self, statements: Iterable[tuple[str, Sequence[Any]]]) -> None:
        """Run several statements in one short transaction."""
        with self._transaction() as db:
            for sql, params in statements:
                db.execute(sql, params)

    def frame(self, sql: str, params: Sequence[Any] = ()):
        import pandas as pd

        with self._lock:
            return pd.read_sql_query(sql, self._db, params=params)

    # --- pools and nodes -------------------------------------------------------------------
    def add_pool(self, pool_id: str, backend: str, settings: dict) -> None:
        owner = owners.this_process()
        self.write([(
            "INSERT INTO pools (id, backend, status, created, settings, owner_pid, owner_host, owner_started, lease)"
            " VALUES (?, ?, 'up', ?, ?, ?, ?, ?, ?)",
            (pool_id, backend, time.time(), json.dumps(settings), *owner.values()),
        )])

    def set_pool_cost(self, pool_id: str, price_per_hour: float | None, cost: float | None) -> None:
        self.write([("UPDATE pools SET price_per_hour=?, cost=? WHERE id=?", (price_per_hour, cost, pool_id))])

    # --- attempts and checkpoints ----------------------------------------------------------------
    @staticmethod
    def attempt_start(seq: int, attempt: int, nodes: list[str], started: float) -> tuple[str, tuple]:
        return ("INSERT OR REPLACE INTO attempts (run, attempt, nodes, started) VALUES (?, ?, ?, ?)",
                (seq, attempt, json.dumps(nodes), started))

    @staticmethod
    def attempt_end(seq: int, attempt: int, ended: float, reason: str) -> tuple[str, tuple]:
        return ("UPDATE attempts SET ended=?, reason=? WHERE run=? AND attempt=?", (ended, reason, seq, attempt))

    def attempts(self, seq: int) -> list[dict]:
        return self.query("SELECT attempt, nodes, started, ended, reason FROM attempts WHERE run=? ORDER BY attempt",
                          (seq,))

    def save_checkpoint(self, seq: int, attempt: int, rank: int, state: bytes) -> None:
        """Keep the newest checkpoint of a run (the one a retry starts from), durably."""
        self.write([
            ("DELETE FROM checkpoints WHERE run=? AND rank=?", (seq, rank)),
            ("INSERT INTO checkpoints VALUES (?, ?, ?, ?, ?)", (seq, attempt, rank, time.time(), state)),
        ])

    def last_checkpoint(self, seq: int, rank: int = 0) -> bytes | None:
        rows = self.execute("SELECT state FROM checkpoints WHERE run=? AND rank=?", (seq, rank))
        return rows[0][0] if rows else None

    def renew_leases(self, pool_ids: list[str], run_ids: list[str]) -> None:
        """The owner is alive: other machines reading this store see its pools and runs as live."""
        until = time.time() + owners.LEASE_SECONDS
        statements = [(f"UPDATE {table} SET lease=? WHERE id IN ({','.join('?' * len(ids))})", (until, *ids))
                      for table, ids in (("pools", pool_ids), ("runs", run_ids)) if ids]
        if statements:
            self.write(statements)

    def reconcile(self) -> int:
        """Close what dead owners left open: their runs fail (ended when last heard from), their
        pools go down, and their nodes and run nodes read lost. Returns how many rows it fixed.
        Each owner reconciles its own rows as it goes; this is for the kernels that could not."""
        now = time.time()
        runs = [r for r in self.query("SELECT * FROM runs WHERE status NOT IN (?, ?, ?)", TERMINAL)
                if owners.owner_gone(r, now)]
        pools = [p for p in self.query("SELECT * FROM pools WHERE status='up'") if owners.owner_gone(p, now)]
        statements = []
        for run in runs:
            ended = self._last_heard(run["seq"]) or run["started"] or run["created"]
            statements += [
                ("UPDATE runs SET status='failed', ended=?, reason=? WHERE seq=? AND status=?",
                 (ended, OWNER_GONE_REASON, run["seq"], run["status"])),
                ("UPDATE run_nodes SET status='lost' WHERE run=? AND status NOT IN ('done', 'failed', 'cancelled')",
                 (run["seq"],)),
            ]
        for pool in pools:
            ended = self.execute("SELECT MAX(last_seen) FROM nodes WHERE pool=?", (pool["id"],))[0][0]
            statements += [
                ("UPDATE pools SET status='down', ended=? WHERE id=? AND status='up'",
                 (ended or pool["created"], pool["id"])),
                ("UPDATE nodes SET status='lost' WHERE pool=? AND status NOT IN ('released', 'lost')", (pool["id"],)),
            ]
        if statements:
            self.write(statements)
        return len(runs) + len(pools)

    def _last_heard(self, seq: int) -> float | None:
        """When a run last sent anything: its newest metric, log line or event."""
        return self.execute(
            "SELECT MAX(t) FROM (SELECT MAX(time) AS t FROM metrics WHERE run=:r UNION ALL "
            "SELECT MAX(time) FROM logs WHERE run=:r UNION ALL SELECT MAX(time) FROM events WHERE run=:r)",
            {"r": seq})[0][0]

    def end_pool(self, pool_id: str) -> None:
        now = time.time()
        self.write([
            ("UPDATE pools SET status='down', ended=? WHERE id=?", (now, pool_id)),
            ("UPDATE nodes SET status='released' WHERE pool=? AND status!='lost'", (pool_id,)),
        ])

    def upsert_node(self, pool_id: str, node: str, **fields: Any) -> None:
        fields = _columns(fields)
        columns = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        updates = ", ".join(f"{k}=excluded.{k}" for k in fields)
        self.write([(
            f"INSERT INTO nodes (pool, node, {columns}) VALUES (?, ?, {marks})"
            f" ON CONFLICT (pool, node) DO UPDATE SET {updates}",
            (pool_id, node, *fields.values()),
        )])

    # --- runs ------------------------------------------------------------------------------
    def add_run(self, run_id: str, name: str | None, **fields: Any) -> tuple[int, str]:
        """Record a queued run; returns its sequence number and name (run-N by default)."""
        fields = {**_columns(fields), **owners.this_process()}
        with self._transaction() as db:
            seq = db.execute(
                f"INSERT INTO runs (id, name, status, created{''.join(', ' + k for k in fields)})"
                f" VALUES (?, ?, 'queued', ?{', ?' * len(fields)})",
                (run_id, name or "", time.time(), *fields.values()),
            ).lastrowid
            if not name:
                name = f"run-{seq}"
                db.execute("UPDATE runs SET name=? WHERE seq=?", (name, seq))
        return seq, name

    def take_run(self, seq: int) -> None:
        """This process owns the run from now on (the keeper of a detached run takes it from the
        kernel that submitted it): the dead-owner checks look at this process."""
        self.update_run(seq, **owners.this_process())

    def update_run(self, seq: int, **fields: Any) -> None:
        self.write([self.run_update(seq, **fields)])

    @staticmethod
    def run_update(seq: int, **fields: Any) -> tuple[str, tuple]:
        """The statement that sets ``fields`` of one run, for ``write`` to batch with others."""
        fields = _columns(fields)
        sets = ", ".join(f"{k}=?" for k in fields)
        return f"UPDATE runs SET {sets} WHERE seq=?", (*fields.values(), seq)

    @staticmethod
    def event_insert(kind: str, data: dict | None, run: int | None = None, pool: str | None = None):
        return ("INSERT INTO events (run, pool, time, kind, data) VALUES (?, ?, ?, ?, ?)",
                (run, pool, time.time(), kind, json.dumps(data) if data is not None else None))

    def run_row(self, key: str | int) -> dict | None:
        if isinstance(key, int):
            rows = self.query("SELECT * FROM runs WHERE seq=?", (key,))
        else:
            rows = self.query("SELECT * FROM runs WHERE id=? ORDER BY seq DESC LIMIT 1", (key,)) or \
                self.query("SELECT * FROM runs WHERE name=? ORDER BY seq DESC LIMIT 1", (key,))
        return rows[0] if rows else None

    @staticmethod
    def run_node_insert(seq: int, node: str, host: str, ranks: list[int], gpus: int, gpu_name: str | None):
        return ("INSERT OR REPLACE INTO run_nodes (run, node, host, ranks, gpus, gpu_name, status)"
                " VALUES (?, ?, ?, ?, ?, ?, 'starting')", (seq, node, host, json.dumps(ranks), gpus, gpu_name))

    @staticmethod
    def run_node_status(seq: int, node: str, status: str):
        return "UPDATE run_nodes SET status=? WHERE run=? AND node=?", (status, seq, node)

    def set_run_node_status(self, seq: int, node: str, status: str) -> None:
        self.write([self.run_node_status(seq, node, status)])

    # --- commands: actions from other processes (the sidebar) for the process that owns a run --
    def add_command(self, action: str, target: str, owner_pid: int, owner_host: str, node: str | None = None) -> int:
        with self._transaction() as db:
            command = db.execute(
                "INSERT INTO commands (action, target, node, owner_pid, owner_host, created)"
                " VALUES (?, ?, ?, ?, ?, ?)", (action, target, node, owner_pid, owner_host, time.time()),
            ).lastrowid
        return command

    def take_commands(self, owner_pid: int, targets: list[str]) -> list[dict]:
        """The open commands for these pools and runs of this process, marked as taken (each is
        handed out once, to the session that owns its target)."""
        if not targets:
            return []
        marks = ",".join("?" for _ in targets)
        with self._lock:
            rows = self.query(
                "SELECT id, action, target, node FROM commands WHERE owner_pid=? AND owner_host=? "
                f"AND taken IS NULL AND target IN ({marks})",
                (owner_pid, owners.host(), *targets),
            )
            if rows:
                now = time.time()
                self.write([("UPDATE commands SET taken=? WHERE id=?", (now, r["id"])) for r in rows])
        return rows

    def finish_command(self, command: int, result: str) -> None:
        self.write([("UPDATE commands SET done=?, result=? WHERE id=?", (time.time(), result, command))])

    # --- streams ---------------------------------------------------------------------------
    def add_metrics(self, seq: int, rank: int, steps: list, names: list, values: list, times: list,
                    attempt: int = 0) -> None:
        n = len(steps)
        rows = zip([seq] * n, [rank] * n, steps, names, values, times, [attempt] * n)
        with self._lock:
            with self._transaction() as db:
                db.executemany("INSERT INTO metrics (run, rank, step, name, value, time, attempt)"
                               " VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                last = db.execute("SELECT last_insert_rowid()").fetchone()[0]
            for listener in self._listeners.get(seq, ()):
                listener(rank, steps, names, values)
        # The columnar copy readers read back at once (columnar.py), once the rows are committed:
        # built outside the lock, appended in a short transaction of its own.
        columnar.append(self._transaction, self.home, seq, rank, steps, names, values, times, attempt, last)

    def metric_table(self, seq: int):
        """Every point of a run as an Arrow table (rowid order; columns rank, step, name,
        value, time, attempt) read from its columnar copy, and the largest rowid it covers; the
        table is None when the copy cannot be used (missing, broken, pyarrow absent): read SQL."""
        return columnar.read(self.execute, self.home, seq)

    def metrics_frame(self, seq: int):
        """Every point of a run as a DataFrame (rank, step, name, value, time in seconds,
        attempt; rowid order), from the columnar copy or else SQL, and the name column as int
        codes (None when read from SQL)."""
        table, _last = self.metric_table(seq)
        if table is not None:
            return columnar.frame(table)
        return self.frame("SELECT rank, step, name, value, time, attempt FROM metrics WHERE run=? ORDER BY rowid",
                          (seq,)), None

    def follow_metrics(self, seq: int, listener, after_rowid: int = 0) -> tuple[list[tuple], int]:
        """The metrics rows of a run after ``after_rowid``, and from then on every batch this
        process writes, handed to ``listener(rank, steps, names, values)`` as it is committed.
        Both under one lock, so no point is missed or seen twice. Returns (rows, last rowid)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT rowid, rank, step, name, value FROM metrics WHERE run=? AND rowid>? ORDER BY rowid",
                (seq, after_rowid),
            ).fetchall()
            self._listeners.setdefault(seq, []).append(listener)
        return rows, (rows[-1][0] if rows else after_rowid)

    def unfollow_metrics(self, seq: int, listener) -> None:
        with self._lock:
            listeners = self._listeners.get(seq, [])
            if listener in listeners:
                listeners.remove(listener)
            if not listeners:
                self._listeners.pop(seq, None)

    def add_logs(self, seq: int, rank: int, stream: str, when: float, lines: list[str],
                 partial: str | None = None) -> None:
        """Finished lines of one rank's stream, and the unfinished line it shows now (a progress
        bar redrawn with carriage returns): kept apart, replaced by each update, gone once the
        line is finished."""
        with self._transaction() as db:
            db.executemany("INSERT INTO logs (run, rank, stream, time, line) VALUES (?, ?, ?, ?, ?)",
                           ((seq, rank, stream, when, line) for line in lines))
            if lines:
                self._log_batches[seq] = self._log_batches.get(seq, 0) + 1
            if partial:
                db.execute("INSERT OR REPLACE INTO log_partials VALUES (?, ?, ?, ?, ?)",
                           (seq, rank, stream, when, partial))
            elif lines:
                db.execute("DELETE FROM log_partials WHERE run=? AND rank=? AND stream=?", (seq, rank, stream))

    def log_batches(self, seq: int) -> int:
        """How many batches of a run's lines this process has stored: a view of a run this
        process runs reads its lines again only when this has changed."""
        return self._log_batches.get(seq, 0)

    def _write_many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with self._transaction() as db:
            db.executemany(sql, rows)

    def pool_events(self, pool_id: str, limit: int) -> list[dict]:
        """A pool's latest events (grown, shrunk and why, nodes lost), oldest first."""
        rows = self.query("SELECT time, kind, data FROM events WHERE pool=? ORDER BY id DESC LIMIT ?", (pool_id, limit))
        return [{"time": r["time"], "kind": r["kind"], "data": json.loads(r["data"] or "{}")} for r in reversed(rows)]

    def set_pool_settings(self, pool_id: str, settings: dict) -> None:
        self.write([("UPDATE pools SET settings=? WHERE id=?", (json.dumps(settings), pool_id))])

    def add_event(self, kind: str, data: dict | None = None, run: int | None = None, pool: str | None = None) -> None:
        self.write([self.event_insert(kind, data, run, pool)])

    def logs_since(self, seq: int, after_id: int = 0, rank: int | None = None) -> list[tuple]:
        sql = "SELECT id, rank, stream, line FROM logs WHERE run=? AND id>?"
        params: list[Any] = [seq, after_id]
        if rank is not None:
            sql += " AND rank=?"
            params.append(rank)
        return self.execute(sql + " ORDER BY id", params)

    def logs_tail(self, seq: int, limit: int, skip_stream: str | None = None) -> tuple[list[tuple], int]:
        """The last ``limit`` log lines of a run (oldest first), and how many it has in all;
        lines of ``skip_stream`` are left out of both."""
        where, params = "run=?", [seq]
        if skip_stream is not None:
            where, params = where + " AND stream IS NOT ?", params + [skip_stream]
        total = self.execute(f"SELECT COUNT(*) FROM logs WHERE {where}", params)[0][0]
        rows = self.execute(f"SELECT id, rank, stream, line FROM logs WHERE {where} ORDER BY id DESC LIMIT ?",
                            params + [limit])
        return rows[::-1], total

    def log_partials(self, seq: int) -> dict[int, str]:
        """Each rank's unfinished line (stdout's if both streams have one)."""
        rows = self.execute("SELECT rank, line FROM log_partials WHERE run=? ORDER BY stream DESC", (seq,))
        return dict(rows)

    def latest_metrics(self, seq: int, rank: int = 0, limit: int = 64) -> dict[str, tuple[int, float]]:
        """The latest (step, value) of each metric of one rank."""
        rows = self.execute(
            "SELECT step, name, value FROM metrics WHERE run=? AND rank=? ORDER BY rowid DESC LIMIT ?",
            (seq, rank, limit),
        )
        latest: dict[str, tuple[int, float]] = {}
        for step, name, value in rows:
            latest.setdefault(name, (step, value))
        return latest


def _columns(fields: dict[str, Any]) -> dict[str, Any]:
    """Column values as SQLite takes them: dicts and lists as JSON text."""
    return {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in fields.items()}

