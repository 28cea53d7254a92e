"""Cleaning up after kernels that died: what ``gc`` does to each instance and security group this
tool made, and why.

Another kernel's pool is never touched: the kernel that owns a pool refreshes its instances'
heartbeat tag every HEARTBEAT_SECONDS (backends/ec2.py), so a fresh heartbeat means a live pool
somewhere (another notebook, another machine); an instance of another owner (user@host) is left to
its owner, whatever its heartbeat. Only this owner's instances with a stale heartbeat, whose pool
is not up here, are terminated, and only when asked (``--yes``). A pool's security group (its
heartbeat is refreshed with its instances') goes by the same rule, once no instance kept uses it;
AWS frees it only some time after its instances terminated, so gc waits a little, and what is
still held is left for the next gc.
"""

from __future__ import annotations

import time
from datetime import datetime

from ..errors import LeptonError
from .identity import TAG_HEARTBEAT, TAG_OWNER, TAG_POOL, owner
from .launch import group_deletion_error

HEARTBEAT_SECONDS = 60.0
#: A heartbeat older than this: the kernel that owned the pool is gone (missed five beats,
#: with room for clocks that differ between machines).
STALE_SECONDS = 300.0

KEEP, TERMINATE, DELETE = "keep", "terminate", "delete"
GROUP = "security-group"  # a row's type for a pool's security group


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def decide(instance: dict, live_here: set[str], me: str, now: float) -> dict:
    """One instance (as describe_instances gives it) → what gc does to it and why."""
    tags = _tags(instance)
    launched: datetime = instance["LaunchTime"]
    try:
        beat = float(tags[TAG_HEARTBEAT])
        heard = f"last heartbeat {_ago(now - beat)}"
    except (KeyError, ValueError):  # launched by a version without heartbeats: its launch is all we know
        beat = launched.timestamp()
        heard = f"no heartbeat tag, launched {_ago(now - beat)}"
    row = {"id": instance["InstanceId"], "type": instance["InstanceType"], "state": instance["State"]["Name"],
           "pool": tags.get(TAG_POOL), "owner": tags.get(TAG_OWNER), "launched": launched.isoformat(),
           "heartbeat_age": round(now - beat)}
    return _decided(row, beat, heard, TERMINATE, live_here, me, now)


def decide_group(group: dict, used_by: list[str], live_here: set[str], me: str, now: float) -> dict:
    """One pool's security group (as describe_security_groups gives it), ``used_by`` the
    instances gc keeps that are in it → what gc does to it and why."""
    tags = _tags(group)
    try:
        beat = float(tags[TAG_HEARTBEAT])
    except (KeyError, ValueError):  # a group without one is not this tool's to judge
        beat = now
    row = {"id": group["GroupId"], "type": GROUP, "state": "in use" if used_by else "unused",
           "pool": tags.get(TAG_POOL), "owner": tags.get(TAG_OWNER), "launched": None,
           "heartbeat_age": round(now - beat)}
    row = _decided(row, beat, f"last heartbeat {_ago(now - beat)}", DELETE, live_here, me, now)
    if row["action"] == DELETE and used_by:
        return {**row, "action": KEEP, "why": f"instance(s) kept are in it: {', '.join(used_by)}"}
    return row


def _decided(row: dict, beat: float, heard: str, act: str, live_here: set[str], me: str, now: float) -> dict:
    pool, who = row["pool"], row["owner"]
    if pool in live_here:
        return {**row, "action": KEEP, "why": f"pool {pool} is up in this process"}
    if now - beat < STALE_SECONDS:
        return {**row, "action": KEEP, "why": f"its pool is alive elsewhere ({heard})"}
    if who != me:
        return {**row, "action": KEEP,
                "why": f"owned by {who or 'nobody known'}, not {me}: left to its owner ({heard})"}
    return {**row, "action": act, "why": f"yours, pool {pool} is not up anywhere ({heard})"}


def _tags(resource: dict) -> dict:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def survey(ec2, live_here: set[str], me: str | None = None, now: float | None = None) -> list[dict]:
    """Every instance this tool launched that is not gone yet, then every pool's security group,
    each with its decision."""
    me, now = me or owner(), now or time.time()
    pages = ec2.get_paginator("describe_instances").paginate(
        Filters=[{"Name": "tag-key", "Values": [TAG_POOL]},
                 {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]}])
    try:
        instances = [i for page in pages for reservation in page["Reservations"]
                     for i in reservation["Instances"]]
        groups = [g for page in ec2.get_paginator("describe_security_groups").paginate(
            Filters=[{"Name": "tag-key", "Values": [TAG_POOL]}]) for g in page["SecurityGroups"]]
    except Exception as e:
        raise LeptonError(f"cannot list EC2 instances and security groups in {ec2.meta.region_name}: "
                          f"{e}") from None
    rows = [decide(instance, live_here, me, now) for instance in instances]
    kept: dict[str, list[str]] = {}
    for instance, row in zip(instances, rows):
        if row["action"] == KEEP:
            for group in instance.get("SecurityGroups", []):
                kept.setdefault(group["GroupId"], []).append(instance["InstanceId"])
    return rows + [decide_group(g, kept.get(g["GroupId"], []), live_here, me, now) for g in groups]


def collect(ec2, live_here: set[str], terminate: bool = False, me: str | None = None,
            delay: float = 3.0) -> list[dict]:
    """survey(), then with ``terminate`` terminate the instances marked so and delete the groups
    (their rows say "terminated", "deleted", or why a group is left for the next gc)."""
    rows = survey(ec2, live_here, me)
    if not terminate:
        return rows
    doomed = [r["id"] for r in rows if r["action"] == TERMINATE]
    if doomed:
        ec2.terminate_instances(InstanceIds=doomed)
        for r in rows:
            if r["action"] == TERMINATE:
                r["action"] = "terminated"
    for r in rows:
        if r["action"] == DELETE:
            # Held a while by the network interfaces of instances that just terminated.
            error = group_deletion_error(ec2, r["id"], attempts=10 if doomed else 1, delay=delay)
            if error is None:
                r["action"] = "deleted"
            elif error.startswith("DependencyViolation"):
                r.update(action=KEEP, why="AWS still holds it for instances shutting down: run gc again later")
            else:
                r.update(action=KEEP, why=f"could not delete it ({error})")
    return rows


def summary(rows: list[dict], acted: bool, how_to_act: str) -> str:
    """The line under the table: what was (or would be) done."""
    if not rows:
        return "no instance or security group of this tool is left"
    kept = sum(r["action"] == KEEP for r in rows)
    instances = sum(r["action"] in (TERMINATE, "terminated") for r in rows)
    groups = sum(r["action"] in (DELETE, "deleted") for r in rows)
    if not instances and not groups:
        return f"nothing to do: {kept} kept (see why)"
    work = " and ".join(part for part in (
        f"{instances} instance(s)" if instances else "", f"{groups} security group(s)" if groups else "") if part)
    if acted:
        done = " and ".join(part for part in (
            f"terminated {instances} instance(s)" if instances else "",
            f"deleted {groups} security group(s)" if groups else "") if part)
        return f"{done}, kept {kept}"
    return f"{work} would be removed, {kept} kept; {how_to_act} to remove them"


def lines(rows: list[dict]) -> list[str]:
    """One line per instance or security group, for a terminal."""
    return [f"{r['action']:<10} {r['id']}  {r['type']:<14} pool {r['pool']}  owner {r['owner']}  · {r['why']}"
            for r in rows]
