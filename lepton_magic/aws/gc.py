"""Cleaning up after kernels that died: what ``gc`` does to each instance this tool launched, and why.

Another kernel's pool is never touched: the kernel that owns a pool refreshes its instances'
heartbeat tag every HEARTBEAT_SECONDS (backends/ec2.py), so a fresh heartbeat means a live pool
somewhere (another notebook, another machine); an instance of another owner (user@host) is left to
its owner, whatever its heartbeat. Only this owner's instances with a stale heartbeat, whose pool
is not up here, are terminated, and only when asked (``--yes``).
"""

from __future__ import annotations

import time
from datetime import datetime

from ..errors import LeptonError
from .identity import TAG_HEARTBEAT, TAG_OWNER, TAG_POOL, owner

HEARTBEAT_SECONDS = 60.0
#: A heartbeat older than this: the kernel that owned the pool is gone (missed five beats,
#: with room for clocks that differ between machines).
STALE_SECONDS = 300.0

KEEP, TERMINATE = "keep", "terminate"


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def decide(instance: dict, live_here: set[str], me: str, now: float) -> dict:
    """One instance (as describe_instances gives it) → what gc does to it and why."""
    tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
    pool, who = tags.get(TAG_POOL), tags.get(TAG_OWNER)
    launched: datetime = instance["LaunchTime"]
    try:
        beat = float(tags[TAG_HEARTBEAT])
        heard = f"last heartbeat {_ago(now - beat)}"
    except (KeyError, ValueError):  # launched by a version without heartbeats: its launch is all we know
        beat = launched.timestamp()
        heard = f"no heartbeat tag, launched {_ago(now - beat)}"
    row = {"id": instance["InstanceId"], "type": instance["InstanceType"], "state": instance["State"]["Name"],
           "pool": pool, "owner": who, "launched": launched.isoformat(), "heartbeat_age": round(now - beat)}
    if pool in live_here:
        return {**row, "action": KEEP, "why": f"pool {pool} is up in this process"}
    if now - beat < STALE_SECONDS:
        return {**row, "action": KEEP, "why": f"its pool is alive elsewhere ({heard})"}
    if who != me:
        return {**row, "action": KEEP,
                "why": f"owned by {who or 'nobody known'}, not {me}: left to its owner ({heard})"}
    return {**row, "action": TERMINATE, "why": f"yours, pool {pool} is not up anywhere ({heard})"}


def survey(ec2, live_here: set[str], me: str | None = None, now: float | None = None) -> list[dict]:
    """Every instance this tool launched that is not gone yet, each with its decision."""
    me, now = me or owner(), now or time.time()
    pages = ec2.get_paginator("describe_instances").paginate(
        Filters=[{"Name": "tag-key", "Values": [TAG_POOL]},
                 {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]}])
    try:
        instances = [i for page in pages for reservation in page["Reservations"] for i in reservation["Instances"]]
    except Exception as e:
        raise LeptonError(f"cannot list EC2 instances in {ec2.meta.region_name}: {e}") from None
    return [decide(instance, live_here, me, now) for instance in instances]


def collect(ec2, live_here: set[str], terminate: bool = False, me: str | None = None) -> list[dict]:
    """survey(), then with ``terminate`` terminate those marked so (their rows say "terminated")."""
    rows = survey(ec2, live_here, me)
    doomed = [r["id"] for r in rows if r["action"] == TERMINATE]
    if terminate and doomed:
        ec2.terminate_instances(InstanceIds=doomed)
        for r in rows:
            if r["action"] == TERMINATE:
                r["action"] = "terminated"
    return rows


def summary(rows: list[dict], acted: bool, how_to_act: str) -> str:
    """The line under the table: what was (or would be) done."""
    if not rows:
        return "no instance of this tool is running"
    doomed = sum(r["action"] in (TERMINATE, "terminated") for r in rows)
    kept = len(rows) - doomed
    if not doomed:
        return f"nothing to do: {kept} instance(s) kept (see why)"
    if acted:
        return f"terminated {doomed} instance(s), kept {kept}"
    return f"{doomed} instance(s) would be terminated, {kept} kept; {how_to_act} to terminate them"


def lines(rows: list[dict]) -> list[str]:
    """One line per instance, for a terminal."""
    return [f"{r['action']:<10} {r['id']}  {r['type']:<13} pool {r['pool']}  owner {r['owner']}  · {r['why']}"
            for r in rows]
