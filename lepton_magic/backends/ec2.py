"""AWS EC2 GPU instances as nodes: validate the type, show the plan, launch (aws/launch.py),
reach them over SSH like any SSH host, keep their heartbeat tag fresh while the pool lives
(aws/gc.py spares them), terminate them.

A start either gives every node it was asked for or leaves nothing: when any instance of the
request fails to run or to answer SSH, every instance of the request is terminated (and waited
for) and every connection closed, and the error names the node and the cause.
"""

from __future__ import annotations

import asyncio
import difflib
import threading
import time
from pathlib import Path

from ..agent import spot
from ..aws import gc, identity, launch
from ..aws.launch import watchdog_script  # noqa: F401  (tutorial 04 prints it from here)
from ..aws.pricing import US_EAST_1, Prices
from ..errors import LeptonError
from .base import NodeLink, OnLost, OnMessage
from .ssh import Host, SSHBackend, Unreachable, start_failed

SSH_READY_SECONDS = 300
#: The settings a pool's instances are made with: another value needs another pool.
MACHINE_SETTINGS = {"ec2_instance_type": "--instance-type", "ec2_spot": "--spot", "ec2_region": "--region"}


def refuse_other_machines(pool_id: str, current: dict, given: dict) -> None:
    """``%lepton up --instance-type/--spot/--region`` for a pool that runs other machines: one
    clear line, rather than silently keeping the old ones."""
    changed = [k for k in MACHINE_SETTINGS if given.get(k) is not None and given[k] != current.get(k)]
    if changed:
        asked = ", ".join(f"{MACHINE_SETTINGS[k]} {given[k]}" for k in changed)
        has = ", ".join(f"{k.removeprefix('ec2_').replace('_', ' ')} {current.get(k)}" for k in changed)
        raise LeptonError(f"pool {pool_id} runs {has}, not {asked}: release it first "
                          "(%lepton down --backend ec2), then start the new one")


class Ec2Backend(SSHBackend):
    name = "ec2"

    def __init__(self, settings: dict):
        import boto3
        from botocore.config import Config as BotoConfig

        from .. import private
        from ..staging import DEFAULT_THRESHOLD, Stager
        from ..store import default_home

        # The SSH side is set up as for any SSH pool (hosts come from the launch, below).
        super().__init__({**settings, "ssh_hosts": "instances@launched-later"})
        self.settings = settings
        self.home = Path(settings.get("home") or default_home()) / "ec2"
        private.make_dir(self.home)  # the key pair and the instances' host keys live here
        self.region = settings.get("ec2_region") or "us-east-1"
        self.instance_type = settings.get("ec2_instance_type") or "g5.xlarge"
        self.fallback_types = [t.strip() for t in str(settings.get("ec2_fallback_types") or "").split(",") if t.strip()]
        self.spot = bool(settings.get("ec2_spot"))
        self.spot_metadata = spot.metadata_url(settings, on_spot=self.spot)  # read by SSHBackend._start
        self.idle_timeout = float(settings.get("idle_timeout") or 600)
        self.ssh_ready_seconds = float(settings.get("ec2_ssh_wait") or SSH_READY_SECONDS)
        self.endpoint = settings.get("ec2_endpoint_url") or None
        self.poll = 1 if self.endpoint else 10  # a test endpoint answers at once
        aws = boto3.session.Session(region_name=self.region)
        self.ec2 = aws.client("ec2", endpoint_url=self.endpoint)
        self.ssm = aws.client("ssm", endpoint_url=self.endpoint)
        self.prices = Prices(aws, self.region, self.endpoint, self.spot, self.ec2)
        account = identity.account_id(aws.client("sts", endpoint_url=self.endpoint))  # before anything is spent
        s3 = aws.client("s3", endpoint_url=self.endpoint, config=BotoConfig(signature_version="s3v4"))
        bucket = settings.get("ec2_s3_bucket") or f"lepton-magic-{account}-{self.region}"
        self.stager = Stager(s3, bucket, self.region, int(settings.get("ec2_s3_threshold") or DEFAULT_THRESHOLD),
                             owner=account)
        self.report = settings.get("report") or print
        self.pool_id = settings.get("pool_id", "?")
        # SSH to the instances: this machine's key pair, our known_hosts (fresh instances: trust on first use)
        self.key = str(self.home / f"{identity.key_pair_name(self.region, self.home)}.pem")
        self.known_hosts = str(self.home / "known_hosts")
        self.policy = "accept-new"
        self.python = settings.get("ssh_python") or "python3"
        self.ssh_user = settings.get("ec2_ssh_user") or "ubuntu"
        self.hosts: list[Host] = []
        #: node name -> {"id", "type", "price", "launched", "private_ip", "terminated"?}; kept after
        #: termination, so the cost counts every instance that ever ran
        self.instances: dict[str, dict] = {}
        self.group: str | None = None
        self._beating = threading.Event()
        self._closed = threading.Event()

    # --- the plan ---------------------------------------------------------------------------
    def describe(self, instance_type: str) -> dict:
        """GPU model, count and memory of a type; a made-up type is refused with close names."""
        try:
            info = self.ec2.describe_instance_types(InstanceTypes=[instance_type])["InstanceTypes"][0]
        except Exception as e:
            code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
            if code in ("InvalidInstanceType", "InvalidParameterValue"):
                close = difflib.get_close_matches(instance_type, list(US_EAST_1), n=3, cutoff=0.5)
                hint = f"; did you mean {', '.join(close)}?" if close else f"; GPU types include {', '.join(list(US_EAST_1)[:6])}"
                raise LeptonError(f"unknown EC2 instance type {instance_type!r}{hint}") from None
            raise LeptonError(f"cannot describe {instance_type} in {self.region}: {e}") from None
        gpus = (info.get("GpuInfo") or {}).get("Gpus") or []
        price = self.prices.of(instance_type)
        return {
            "type": instance_type,
            "gpu": gpus[0]["Name"] if gpus else None,
            "gpus": sum(g["Count"] for g in gpus),
            "gpu_memory_gib": round((info.get("GpuInfo") or {}).get("TotalGpuMemoryInMiB", 0) / 1024, 1),
            "price": price.dollars_per_hour,
            "price_note": price.note,
        }

    def price(self, instance_type: str) -> float | None:
        return self.prices.of(instance_type).dollars_per_hour

    def price_note(self) -> str:
        """"" when the $/h shown are AWS's own for this region and market; else why they may be
        off ("estimate: us-east-1 list price, ...")."""
        types = {i["type"] for i in self.instances.values() if not i.get("terminated")} or {self.instance_type}
        return next((n for n in (self.prices.of(t).note for t in sorted(types)) if n), "")

    def plan(self, count: int) -> str:
        d = self.describe(self.instance_type)
        note = f" ({d['price_note']})" if d["price_note"] and d["price"] else ""
        price = (f"${d['price']:.3f}/h each{note}, ${d['price'] * count:.2f}/h in all" if d["price"]
                 else "price unknown")
        gpu = f"{d['gpus']} × {d['gpu']} ({d['gpu_memory_gib']} GiB)" if d["gpus"] else "no GPU"
        return (f"plan: {count} × {self.instance_type}{' spot' if self.spot else ''} in {self.region} · {gpu} "
                f"· {price} · each powers off after {self.idle_timeout / 60:g} min idle")

    # --- launching --------------------------------------------------------------------------
    def start_nodes(self, names: list[str], secret: bytes, on_message: OnMessage, on_lost: OnLost,
                    log_dir: str) -> list[NodeLink]:
        self.report(self.plan(len(names)))
        image = launch.image(self.settings, self.ssm)
        key_name, self.key = launch.ensure_key_pair(self.ec2, self.region, self.home, self.report)
        self.group = launch.ensure_pool_group(self.ec2, self.pool_id,
                                              self.settings.get("ec2_ssh_cidr") or launch.caller_cidr())
        launched = launch.run_instances(
            self.ec2, count=len(names), image_id=image, instance_types=[self.instance_type] + self.fallback_types,
            key_name=key_name, group=self.group, pool_id=self.pool_id, idle_seconds=self.idle_timeout,
            spot=self.spot, report=self.report, check_type=self.describe)
        ids = [i["InstanceId"] for i in launched]
        for name, instance in zip(names, launched):  # known at once: a failure below terminates them
            self.instances[name] = {"id": instance["InstanceId"], "type": instance["InstanceType"],
                                    "price": self.price(instance["InstanceType"]), "launched": time.time()}
        self._start_heartbeat()
        self.report(f"pending: {', '.join(ids)}")
        links: list[NodeLink] = []
        try:
            described = launch.wait_running(self.ec2, ids, self.poll)
            for name, instance_id in zip(names, ids):
                self.instances[name]["private_ip"] = described[instance_id].get("PrivateIpAddress")
            self.report(f"running: {', '.join(ids)}; waiting for SSH")
            hosts = [self._ssh_target(described[i], position) for position, i in enumerate(ids)]
            async def every_node():  # at once: n instances wait for SSH no longer than one
                return await asyncio.gather(*(self._start_when_ready(name, host, secret, on_message, on_lost, log_dir)
                                              for name, host in zip(names, hosts)), return_exceptions=True)

            results = self._loop.run(every_node(), self.ssh_ready_seconds + 120)
            links = [r for r in results if isinstance(r, NodeLink)]
            failed = next(((n, h, r) for n, h, r in zip(names, hosts, results) if not isinstance(r, NodeLink)), None)
            if failed:
                name, host, error = failed
                raise start_failed(name, names.index(name) + 1, len(names), f"{self.instances[name]['id']}, {host}",
                                   error, 0)
        except BaseException as e:
            self._abandon(names, links)
            if isinstance(e, launch.NotRunning):
                name = next(n for n in names if self.instances[n]["id"] == e.instance_id)
                e = start_failed(name, names.index(name) + 1, len(names), e.instance_id, e, 0)
            raise self._undone(e, len(ids)) from None
        self.report(f"SSH ready on {len(links)} instance(s)")
        return links

    def _abandon(self, names: list[str], links: list[NodeLink]) -> None:
        """A request that will not give every node: its connections closed, every instance of it
        terminated and gone before the error reaches the user."""
        self.stop_started(links)  # (stop_node terminates those instances too)
        pending = [self.instances[n]["id"] for n in names if not self.instances[n].get("terminated")]
        if pending:
            self.ec2.terminate_instances(InstanceIds=pending)
        now = time.time()
        for name in names:
            self.instances[name].setdefault("terminated", now)
        self.ec2.get_waiter("instance_terminated").wait(
            InstanceIds=[self.instances[n]["id"] for n in names],
            WaiterConfig={"Delay": self.poll, "MaxAttempts": int(launch.WAIT_TERMINATED_SECONDS / self.poll)})
        for name in names:
            self.instances[name]["gone"] = True

    @staticmethod
    def _undone(error: BaseException, count: int) -> BaseException:
        if not isinstance(error, Exception):
            return error  # Ctrl-C stays Ctrl-C (the instances are gone all the same)
        return LeptonError(f"{error}; terminated the {count} instance(s) of this request")

    async def _start_when_ready(self, name, host, secret, on_message, on_lost, log_dir):
        deadline = time.monotonic() + self.ssh_ready_seconds
        while True:
            try:
                return await self._start(name, host, secret, on_message, on_lost, log_dir)
            except Unreachable as e:
                if time.monotonic() > deadline:
                    raise Unreachable(f"SSH did not answer within {self.ssh_ready_seconds:g} s ({e})") from None
                await asyncio.sleep(min(3.0, self.ssh_ready_seconds / 4))

    def _ssh_target(self, instance: dict, position: int) -> Host:
        override = self.settings.get("ec2_ssh_target")  # tests: host:port for every instance, or one each
        if override:
            targets = [t.strip() for t in str(override).split(",") if t.strip()]
            target = targets[position % len(targets)]
            return Host.parse(f"{self.ssh_user}@{target}" if "@" not in target else target)
        address = instance.get("PublicIpAddress") or instance.get("PrivateIpAddress")
        if not address:
            raise LeptonError(f"{instance['InstanceId']} has no address to reach over SSH")
        return Host(self.ssh_user, address, int(self.settings.get("ec2_ssh_port") or 22))

    def master_addr(self, link: NodeLink) -> str:
        """Rank 0's private address: the other instances of the VPC reach it there."""
        if self.settings.get("ec2_ssh_target"):
            return super().master_addr(link)
        return self.instances[link.name].get("private_ip") or super().master_addr(link)

    # --- the heartbeat gc reads ---------------------------------------------------------------
    def _start_heartbeat(self) -> None:
        if not self._beating.is_set():
            self._beating.set()
            threading.Thread(target=self._beat, daemon=True, name=f"lepton-ec2-heartbeat-{self.pool_id}").start()

    def _beat(self) -> None:
        """While the pool lives, its instances say so (gc elsewhere spares them); a kernel that
        dies stops beating, and its instances become gc's after gc.STALE_SECONDS."""
        while not self._closed.wait(gc.HEARTBEAT_SECONDS):
            self.beat()

    def beat(self) -> None:
        ids = [i["id"] for i in self.instances.values() if not i.get("terminated")]
        try:
            if ids:
                self.ec2.create_tags(Resources=ids + ([self.group] if self.group else []), Tags=[
                    {"Key": identity.TAG_HEARTBEAT, "Value": str(int(time.time()))}])
        except Exception as e:  # a network hiccup: the next beat comes within a minute
            self.report(f"could not refresh the heartbeat tag of pool {self.pool_id}: {e}")

    # --- releasing ---------------------------------------------------------------------------
    def stop_node(self, link: NodeLink, wait: float = 5.0) -> None:
        try:
            super().stop_node(link, wait)
        finally:
            instance = self.instances.get(link.name)
            if instance is not None and not instance.get("terminated"):
                self.ec2.terminate_instances(InstanceIds=[instance["id"]])
                instance["terminated"] = time.time()

    def close(self) -> None:
        """The pool is going: whatever of it still runs is terminated, then waited for (only
        instances whose termination was asked for, so this never waits on its own), and its
        security group deleted."""
        self._closed.set()
        running = [i for i in self.instances.values() if not i.get("terminated")]
        if running:
            self.ec2.terminate_instances(InstanceIds=[i["id"] for i in running])
            for instance in running:
                instance["terminated"] = time.time()
        waiting = [i["id"] for i in self.instances.values() if not i.get("gone")]
        if waiting:
            self.ec2.get_waiter("instance_terminated").wait(InstanceIds=waiting, WaiterConfig={
                "Delay": self.poll, "MaxAttempts": int(launch.WAIT_TERMINATED_SECONDS / self.poll)})
            for instance in self.instances.values():
                instance["gone"] = True
        if self.group and not launch.delete_group(self.ec2, self.group, delay=self.poll):
            self.report(f"could not delete security group {self.group} of pool {self.pool_id} yet; "
                        f"delete it later with aws ec2 delete-security-group --group-id {self.group}")

    def cost_so_far(self) -> float:
        """Dollars spent by this pool's instances, launch to termination (or now)."""
        now = time.time()
        return sum(((i.get("terminated") or now) - i["launched"]) / 3600 * i["price"]
                   for i in self.instances.values() if i["price"])

    def node_price(self, name: str) -> float | None:
        instance = self.instances.get(name)
        return instance["price"] if instance else None

    def price_per_hour(self) -> float:
        return sum(i["price"] or 0 for i in self.instances.values() if not i.get("terminated"))

