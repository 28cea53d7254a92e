"""What the panel shows, read from the store (never from the widgets): header facts, the node
table with telemetry, the curves and the log tail. Reads are incremental, so a refresh costs
the same early and late in a long run."""

from __future__ import annotations

import json
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

import numpy as np

from ..columnar import column, name_codes
from ..store import TERMINAL, TRACEBACK_STREAM, Store
from .downsample import Series

#: Lines of log kept per rank for the tail.
TAIL_LINES = 200
#: Lines of log a finished run leaves in the saved notebook (the rest: %lepton logs RUN).
SAVED_LOG_LINES = 200
#: A node whose heartbeat is older than this shows as late.
HEARTBEAT_LATE_SECONDS = 10.0


@dataclass
class NodeRow:
    node: str
    host: str
    ranks: list[int]
    gpus: int
    gpu_name: str | None
    status: str
    cpu_percent: float | None = None
    rss: int | None = None
    gpu_util: float | None = None
    gpu_mem_used: int | None = None
    gpu_memory: int | None = None
    heartbeat_age: float | None = None
    place: str | None = None  # where the backend put it (a Ray node, its GPUs)


@dataclass
class Header:
    name: str
    run_id: str
    status: str
    backend: str
    world_size: int | None
    elapsed: float | None
    step: int | None = None
    steps_per_second: float | None = None
    error: str | None = None
    cost: float | None = None
    #: "attempt 2 of 3 on local-0, local-2 — local-1 lost: no heartbeat for 10 s" once a run
    #: has been retried.
    attempt: str | None = None


@dataclass(eq=False)
class RunView:
    """The panel's model of one run. ``refresh()`` pulls what is new from the store."""

    store: Store
    seq: int
    #: Take new points from this process's writes as they are committed instead of reading
    #: them back from the database: for the kernel that runs the run.
    follow: bool = False
    header: Header | None = None
    nodes: list[NodeRow] = field(default_factory=list)
    series: dict[str, dict[int, Series]] = field(default_factory=lambda: defaultdict(dict))
    tails: dict[int, deque] = field(default_factory=dict)
    #: Each rank's unfinished line as it stands now (a progress bar): shown after its tail.
    partials: dict[int, str] = field(default_factory=dict)
    new_points: int = 0
    new_lines: int = 0
    _metric_cursor: int = 0
    _log_cursor: int = 0
    _rate: deque = field(default_factory=lambda: deque(maxlen=20))
    _batches: deque = field(default_factory=deque)
    _following: bool = False

    @property
    def metric_names(self) -> list[str]:
        names = sorted(self.series)
        return sorted(names, key=lambda n: (n != "loss", n))  # loss first: the default curve

    @property
    def finished(self) -> bool:
        return self.header is not None and self.header.status in TERMINAL

    def refresh(self) -> "RunView":
        self._refresh_metrics()
        self._refresh_logs()
        self._refresh_run()
        self._refresh_nodes()
        if self.finished:
            self.close()
        return self

    # --- pieces ----------------------------------------------------------------------------
    def _refresh_metrics(self) -> None:
        loaded = self._load_columnar() if not self._metric_cursor and not self._following else 0
        if self.follow and not self._following:
            rows, self._metric_cursor = self.store.follow_metrics(self.seq, self._on_batch, self._metric_cursor)
            self._following = True
        elif self._following:
            self.new_points = 0
            while self._batches:
                rank, steps, names, values = self._batches.popleft()
                self._add_batch(rank, steps, names, values)
                self.new_points += len(steps)
            return
        else:
            rows = self.store.execute(
                "SELECT rowid, rank, step, name, value FROM metrics WHERE run=? AND rowid>? ORDER BY rowid",
                (self.seq, self._metric_cursor),
            )
            if rows:
                self._metric_cursor = rows[-1][0]
        self.new_points = loaded + len(rows)
        grouped: dict[tuple[str, int], tuple[list, list]] = {}
        for _rowid, rank, step, name, value in rows:
            xs, ys = grouped.setdefault((name, rank), ([], []))
            xs.append(step)
            ys.append(np.nan if value is None else value)
        for (name, rank), (xs, ys) in grouped.items():
            self._extend(name, rank, xs, ys)

    def _load_columnar(self) -> int:
        """The first read: every point so far from the run's columnar copy (no Python object per
        point), batch by batch as a live view takes them, so a retry's re-logged steps replace
        the earlier attempt's. Returns how many points; 0 leaves the first read to SQL."""
        table, last = self.store.metric_table(self.seq)
        if table is None or not table.num_rows:
            return 0
        codes, names = name_codes(table)
        ranks, steps, values = column(table, "rank"), column(table, "step"), column(table, "value")
        # Consecutive batches of a curve are joined and extended at once; a batch that goes back
        # in steps (a retry) first lets the curve take what came before, then replaces from there.
        pending: dict[tuple[str, int], list] = {}

        def take(name: str, rank: int, xs, ys) -> None:
            parts = pending.setdefault((name, rank), [])
            if parts and len(xs) and xs[0] <= parts[-1][0][-1]:
                flush(name, rank)
                self._extend(name, rank, xs, ys)
            else:
                parts.append((xs, ys))

        def flush(name: str, rank: int) -> None:
            parts = pending.pop((name, rank), [])
            if parts:
                self._extend(name, rank, np.concatenate([p[0] for p in parts]),
                             np.concatenate([p[1] for p in parts]))

        start = 0
        for chunk in table.column("rank").chunks:
            end = start + len(chunk)
            if end == start:
                continue
            r, c = ranks[start:end], codes[start:end]
            if r[0] == r[-1] and c[0] == c[-1] and (r == r[0]).all() and (c == c[0]).all():
                take(names[c[0]], int(r[0]), steps[start:end], values[start:end])
            else:
                for rank in dict.fromkeys(r.tolist()):
                    for code in dict.fromkeys(c[r == rank].tolist()):
                        mask = (r == rank) & (c == code)
                        take(names[code], rank, steps[start:end][mask], values[start:end][mask])
            start = end
        for name, rank in list(pending):
            flush(name, rank)
        self._metric_cursor = last
        return table.num_rows

    def _on_batch(self, rank, steps, names, values) -> None:
        self._batches.append((rank, steps, names, values))  # on the receiving thread: O(1) only

    def _add_batch(self, rank: int, steps: list, names: list, values: list) -> None:
        # Values come as the rank sent them (NaN stays NaN; only SQLite turns it into NULL).
        if names and names[0] == names[-1] and all(n == names[0] for n in names):
            self._extend(names[0], rank, steps, values)
            return
        names_a = np.asarray(names)
        steps_a = np.asarray(steps)
        values_a = np.asarray(values, dtype=float)
        for name in dict.fromkeys(names):
            mask = names_a == name
            self._extend(name, rank, steps_a[mask], values_a[mask])

    def _extend(self, name: str, rank: int, steps, values) -> None:
        series = self.series[name].setdefault(rank, Series())
        if len(steps) and series.n and steps[0] <= series.x[-1]:
            series.drop_from(steps[0])  # a retry resumed from a checkpoint: one continuous curve
        series.extend(steps, values)

    def close(self) -> None:
        """Stop taking batches from the store (the run ended, or the panel is gone)."""
        if self._following:
            self.store.unfollow_metrics(self.seq, self._on_batch)
            self._following = False
            self.follow = False

    def _refresh_logs(self) -> None:
        rows = self.store.logs_since(self.seq, self._log_cursor)
        self.new_lines = len(rows)
        for log_id, rank, _stream, line in rows:
            self.tails.setdefault(rank, deque(maxlen=TAIL_LINES)).append(line)
            self._log_cursor = log_id
        if not self.finished:
            self.partials = self.store.log_partials(self.seq)
            for rank in self.partials:
                self.tails.setdefault(rank, deque(maxlen=TAIL_LINES))

    def _refresh_run(self) -> None:
        row = self.store.run_row(self.seq)
        if row is None:
            return
        now = time.time()
        elapsed = ((row["ended"] or now) - row["started"]) if row["started"] else None
        step = None
        rank0 = [s for per_rank in self.series.values() for r, s in per_rank.items() if r == 0 and s.n]
        if rank0:
            step = int(max(s.x[-1] for s in rank0))
            self._rate.append((now, step))
        rate = None
        if len(self._rate) >= 2 and self._rate[-1][0] > self._rate[0][0]:
            (t0, s0), (t1, s1) = self._rate[0], self._rate[-1]
            rate = (s1 - s0) / (t1 - t0)
        error = json.loads(row["error"])["message"] if row["error"] else None
        cost = row.get("cost")
        if cost is None and row.get("price_per_hour") and elapsed is not None:
            cost = row["price_per_hour"] * elapsed / 3600  # so far, while it runs
        self.header = Header(row["name"], row["id"], row["status"], row["backend"] or "?",
                             row["world_size"], elapsed, step, rate, error, cost, self._attempt_text(row))

    def _attempt_text(self, row: dict) -> str | None:
        attempts = self.store.attempts(self.seq)
        if len(attempts) < 2:
            return None
        last, before = attempts[-1], attempts[-2]
        nodes = ", ".join(json.loads(last["nodes"] or "[]"))
        return (f"attempt {last['attempt'] + 1} of {(row.get('retries') or 0) + 1} on {nodes}"
                f" — {before['reason']}")

    def _refresh_nodes(self) -> None:
        rows = self.store.query(
            "SELECT rn.node, rn.host, rn.ranks, rn.gpus, rn.gpu_name, rn.status, n.cpu_percent, "
            "n.telemetry, n.last_seen, n.gpu_memory, n.place FROM run_nodes rn JOIN runs r ON r.seq = rn.run "
            "LEFT JOIN nodes n ON n.pool = r.pool AND n.node = rn.node WHERE rn.run=? ORDER BY rn.node",
            (self.seq,),
        )
        now = time.time()
        self.nodes = []
        for row in rows:
            ranks = json.loads(row["ranks"])
            telemetry = json.loads(row["telemetry"]) if row["telemetry"] else {}
            per_rank = telemetry.get("ranks") or {}
            rss = sum(per_rank[str(r)]["rss"] for r in ranks if str(r) in per_rank) or None
            cpu = sum(per_rank[str(r)]["cpu"] for r in ranks if str(r) in per_rank) if per_rank else None
            gpus = telemetry.get("gpus") or []
            self.nodes.append(NodeRow(
                node=row["node"], host=row["host"] or "?", ranks=ranks, gpus=row["gpus"] or 0,
                gpu_name=row["gpu_name"], status=row["status"] or "?",
                cpu_percent=cpu if cpu is not None else row["cpu_percent"], rss=rss,
                gpu_util=float(np.mean([g["util"] for g in gpus])) if gpus else None,
                gpu_mem_used=sum(g["mem_used"] for g in gpus) if gpus else None,
                gpu_memory=row["gpu_memory"], place=row["place"],
                heartbeat_age=(now - row["last_seen"]) if row["last_seen"] else None,
            ))

    # --- summaries -------------------------------------------------------------------------
    def saved_log(self, limit: int = SAVED_LOG_LINES) -> tuple[list[str], int]:
        """The last ``limit`` lines the ranks printed, prefixed by rank when there are several,
        and how many earlier lines were left out. Tracebacks are left out: the cell's error
        shows them."""
        rows, total = self.store.logs_tail(self.seq, limit, skip_stream=TRACEBACK_STREAM)
        multi = self.header is not None and (self.header.world_size or 1) > 1
        lines = [f"[rank {rank}] {line}" if multi else line for _id, rank, _stream, line in rows]
        return lines, total - len(rows)

    def final_metrics(self) -> dict[int, dict[str, float]]:
        """The last value of every metric, per rank."""
        out: dict[int, dict[str, float]] = defaultdict(dict)
        for name, per_rank in self.series.items():
            for rank, s in per_rank.items():
                if s.n:
                    out[rank][name] = float(s.y[-1])
        return dict(out)
