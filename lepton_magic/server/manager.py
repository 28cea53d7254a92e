"""What the sidebar asks for, answered from the store; actions become commands for the kernel
that owns the pool or run (see ``Session._poll_commands``)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import OrderedDict

import numpy as np

from ..owners import owner_gone
from ..store import TERMINAL, Store
from ..ui.downsample import minmax
from ..ui.model import RunView

SPARK_POINTS = 40
CURVE_BUCKETS = 200  # ≤ 400 points per line
LOG_LINES = 50
#: Latest events listed per pool.
POOL_EVENTS = 5
#: Run views kept between requests (each holds a run's curves in memory).
CACHED_VIEWS = 64
#: Why a run whose kernel died has failed (the words ``Run.status`` records).
OWNER_EXITED = "the kernel running it exited"


class NotFound(Exception):
    pass


class Conflict(Exception):
    pass


class LeptonManager:
    def __init__(self, store: Store):
        self.store = store
        self._views: OrderedDict[int, RunView] = OrderedDict()
        # Requests are answered on several threads; a view is refreshed in place (its cursors
        # and curves), so one request at a time uses the cache and the views in it.
        self._views_lock = threading.RLock()

    # --- reads -----------------------------------------------------------------------------
    def pools(self, include_down: bool = False) -> list[dict]:
        sql = "SELECT * FROM pools" + ("" if include_down else " WHERE status='up'") + " ORDER BY created DESC"
        now = time.time()
        pools = [effective_pool(pool) for pool in self.store.query(sql)]
        return [self._pool_summary(pool, now) for pool in pools if include_down or pool["status"] == "up"]

    def _pool_summary(self, pool: dict, now: float) -> dict:
        stored = self.store.query("SELECT * FROM nodes WHERE pool=? ORDER BY node", (pool["id"],))
        nodes = effective_nodes(pool, stored)
        live = [n for n in nodes if n["status"] not in ("released", "lost")]
        settings = json.loads(pool["settings"] or "{}")
        idle_timeout, min_nodes = settings.get("idle_timeout"), settings.get("min_nodes") or 0
        remaining = None
        if idle_timeout and pool["status"] == "up" and len(live) > min_nodes:
            remaining = self._next_idle_release(pool["id"], live, idle_timeout, now)
        return {
            "id": pool["id"], "backend": pool["backend"], "status": pool["status"],
            "nodes_ready": sum(1 for n in live if n["status"] == "ready"), "nodes_total": len(live),
            "min_nodes": min_nodes, "max_nodes": settings.get("max_nodes"),
            "gpus": sum(n["gpus"] or 0 for n in live), "cost_per_hour": pool.get("price_per_hour"),
            "cost_so_far": pool.get("cost"),
            "idle_timeout": idle_timeout, "idle_remaining": remaining, "owner_pid": pool["owner_pid"],
            "events": self._pool_events(pool["id"]),
            "nodes": [{
                "node": n["node"], "host": n["host"], "place": n.get("place"), "status": n["status"],
                "gpus": n["gpus"] or 0,
                "gpu_name": n["gpu_name"], "cpu_percent": n["cpu_percent"], "mem_used": n["mem_used"],
                "last_seen_ago": (now - n["last_seen"]) if n["last_seen"] else None,
            } for n in nodes],
        }

    def _next_idle_release(self, pool_id: str, live: list[dict], idle_timeout: float,
                           now: float) -> float | None:
        """Seconds until the pool releases its longest-idle node, as ``Pool`` counts: each free
        node from when it came up or its last run ended. None while every node is busy."""
        usage = {node: (ended, active) for node, ended, active in self.store.execute(
            "SELECT rn.node, MAX(r.ended), SUM(r.status IN ('queued','starting','running'))"
            " FROM run_nodes rn JOIN runs r ON r.seq = rn.run WHERE r.pool=? GROUP BY rn.node", (pool_id,))}
        idle_since = []
        for n in live:
            ended, active = usage.get(n["node"], (None, 0))
            times = [t for t in (n["started"], ended) if t is not None]
            if n["status"] == "ready" and not active and times:
                idle_since.append(max(times))
        return max(0.0, idle_timeout - (now - min(idle_since))) if idle_since else None

    def _pool_events(self, pool_id: str) -> list[dict]:
        """The pool's latest events (grown, shrunk and why, nodes lost), oldest first."""
        return self.store.pool_events(pool_id, POOL_EVENTS)

    def runs(self, limit: int = 50) -> list[dict]:
        # A sweep's trials are runs of their own; the list shows the sweep, with its trial counts.
        rows = self.store.query("SELECT * FROM runs WHERE parent IS NULL ORDER BY seq DESC LIMIT ?", (limit,))
        with self._views_lock:
            return [self._summary(row) for row in rows]

    def run(self, key: str) -> dict:
        row = self.store.run_row(key)
        if row is None:
            raise NotFound(f"no run {key!r}")
        with self._views_lock:
            return self._detail(row)

    def _detail(self, row: dict) -> dict:
        out = self._summary(row)
        view = self._view(row["seq"])
        out["nodes"] = [{"node": n.node, "host": n.host, "place": n.place, "ranks": n.ranks, "gpus": n.gpus,
                         "gpu_name": n.gpu_name, "status": n.status} for n in view.nodes]
        out["curves"] = {
            name: {str(rank): _pairs(*minmax(s.x, s.y, CURVE_BUCKETS)) for rank, s in per_rank.items()}
            for name, per_rank in view.series.items()
        }
        # Each rank's unfinished line (a progress bar, as it stands now) comes last.
        out["logs"] = {}
        for rank, lines in view.tails.items():
            shown = list(lines) + ([view.partials[rank]] if rank in view.partials else [])
            out["logs"][str(rank)] = shown[-LOG_LINES:]
        return out

    def _summary(self, row: dict) -> dict:
        row = self._effective_run(row)
        view = self._view(row["seq"])
        metric = "loss" if "loss" in view.series else (view.metric_names[0] if view.metric_names else None)
        spark: list = []
        if metric is not None and 0 in view.series[metric]:
            s = view.series[metric][0]
            spark = _spark(s.y)
        now = time.time()
        error = json.loads(row["error"])["message"] if row["error"] else None
        return {
            "id": row["id"], "name": row["name"], "status": row["status"], "backend": row["backend"],
            "world_size": row["world_size"], "nodes": row["nodes"], "created": row["created"],
            "started": row["started"], "ended": row["ended"],
            "duration": ((row["ended"] or now) - row["started"]) if row["started"] else None,
            "last_step": view.header.step if view.header else None, "sparkline": spark, "metric": metric,
            "owner_pid": row["owner_pid"], "error": error, "cost": row.get("cost"), "reason": row["reason"],
            "sweep": self._sweep(row) if row.get("sweep") else None,
        }

    def _sweep(self, row: dict) -> dict:
        """A sweep's trials by status, its objective and its best trial so far."""
        from ..sweeps.studies import trial_status

        spec = json.loads(row["sweep"])
        counts: dict[str, int] = {}
        for child in self.store.query("SELECT status, reason, pruned_step FROM runs WHERE parent=?", (row["seq"],)):
            status = trial_status(child)
            counts[status] = counts.get(status, 0) + 1
        return {"trials": spec.get("trials"), "counts": counts, "objective": spec.get("objective"),
                "direction": spec.get("direction"), "best": spec.get("best")}

    def _effective_run(self, row: dict) -> dict:
        """The run as the answer shows it: one whose kernel died has failed, and ended when it
        was last heard from. Nothing is written: reconciling the store is for its owners."""
        status = effective_status(row)
        if status == row["status"]:
            return row
        return {**row, "status": status, "reason": row["reason"] or OWNER_EXITED,
                "ended": row["ended"] or self._last_heard(row)}

    def _last_heard(self, row: dict) -> float | None:
        """When the run last wrote a metric or a log line (else when it started)."""
        # The newest row of each by rowid: the run's index finds it at once, however long the run.
        last_metric, last_log = self.store.execute(
            "SELECT (SELECT time FROM metrics WHERE run=?1 ORDER BY rowid DESC LIMIT 1),"
            " (SELECT time FROM logs WHERE run=?1 ORDER BY id DESC LIMIT 1)", (row["seq"],),
        )[0]
        times = [t for t in (row["started"], last_metric, last_log) if t is not None]
        return max(times) if times else None

    def _view(self, seq: int) -> RunView:
        view = self._views.pop(seq, None) or RunView(self.store, seq)
        if not view.finished:
            view.refresh()
        self._views[seq] = view
        while len(self._views) > CACHED_VIEWS:
            self._views.popitem(last=False)
        return view

    # --- actions ---------------------------------------------------------------------------
    def cancel_run(self, key: str) -> int:
        row = self.store.run_row(key)
        if row is None:
            raise NotFound(f"no run {key!r}")
        if effective_status(row) in TERMINAL:
            raise Conflict(f"{row['name']} has already ended")
        return self._command("cancel_run", row["id"], row)

    def release_pool(self, pool_id: str, node: str | None = None) -> int:
        rows = self.store.query("SELECT * FROM pools WHERE id=?", (pool_id,))
        if not rows:
            raise NotFound(f"no pool {pool_id!r}")
        pool = rows[0]
        if effective_pool(pool)["status"] != "up":
            raise Conflict(f"pool {pool_id} is not up")
        if node is not None and not self.store.query("SELECT 1 FROM nodes WHERE pool=? AND node=?", (pool_id, node)):
            raise NotFound(f"no node {node!r} in pool {pool_id}")
        return self._command("release_node" if node else "release_pool", pool_id, pool, node)

    def _command(self, action: str, target: str, owner: dict, node: str | None = None) -> int:
        if owner["owner_host"] != socket.gethostname():
            raise Conflict(f"it belongs to a kernel on {owner['owner_host']}")
        return self.store.add_command(action, target, owner["owner_pid"], owner["owner_host"], node)

    def command(self, command: int) -> dict:
        rows = self.store.query("SELECT * FROM commands WHERE id=?", (command,))
        if not rows:
            raise NotFound(f"no command {command}")
        return rows[0]


# --- what the store's rows mean once their owner is gone: pure, nothing is written back -------
def effective_status(run: dict) -> str:
    """A run's status, counting a run whose kernel died as failed: its nodes died with the
    kernel (the dead-man switch), whatever the row still says."""
    if run["status"] not in TERMINAL and owner_gone(run):
        return "failed"
    return run["status"]


def effective_pool(pool: dict) -> dict:
    """The pool, down if the kernel that owned it died (its nodes went with it)."""
    if pool["status"] == "up" and owner_gone(pool):
        return {**pool, "status": "down"}
    return pool


def effective_nodes(pool: dict, nodes: list[dict]) -> list[dict]:
    """The nodes of a pool as ``Store.end_pool`` leaves them: a down pool's are released
    (lost ones stay lost)."""
    if pool["status"] != "down":
        return nodes
    return [n if n["status"] in ("released", "lost") else {**n, "status": "released"} for n in nodes]


def _spark(y: np.ndarray) -> list:
    if not len(y):
        return []
    if len(y) > SPARK_POINTS:  # the mean of equal slices: the shape of the curve, small
        edges = np.linspace(0, len(y), SPARK_POINTS + 1).astype(int)
        y = np.array([np.nanmean(y[a:b]) if np.isfinite(y[a:b]).any() else np.nan for a, b in zip(edges, edges[1:])])
    return [None if not np.isfinite(v) else round(float(v), 6) for v in y]


def _pairs(x: np.ndarray, y: np.ndarray) -> list:
    return [[int(a) if float(a).is_integer() else float(a), None if not np.isfinite(b) else float(b)]
            for a, b in zip(x, y)]
