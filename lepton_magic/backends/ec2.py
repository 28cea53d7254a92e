"""AWS EC2 GPU instances as nodes: validate the type, show the plan, launch (tagged, with an
idle watchdog on the instance), reach them over SSH like any SSH host, terminate them.

Launches fall back across availability zones, then across the user's fallback instance types,
when AWS has no capacity, and say so. Every instance terminates itself when idle (the watchdog
powers it off; InstanceInitiatedShutdownBehavior=terminate), so a dead laptop cannot leave a
GPU running for days.
"""

from __future__ import annotations

import difflib
import getpass
import os
import socket
import stat
import time
from pathlib import Path

from ..agent import spot
from ..errors import LeptonError
from .base import NodeLink, OnLost, OnMessage
from .ssh import Host, SSHBackend, Unreachable

#: On-demand Linux prices, us-east-1, $/h (spot prices come from describe_spot_price_history).
PRICES = {
    "g4dn.xlarge": 0.526, "g4dn.2xlarge": 0.752, "g4dn.4xlarge": 1.204, "g4dn.12xlarge": 3.912,
    "g5.xlarge": 1.006, "g5.2xlarge": 1.212, "g5.4xlarge": 1.624, "g5.12xlarge": 5.672,
    "g5.48xlarge": 16.288, "g6.xlarge": 0.805, "g6.2xlarge": 0.978, "g6.12xlarge": 4.602,
    "g6e.xlarge": 1.861, "g6e.12xlarge": 10.493, "p3.2xlarge": 3.06, "p4d.24xlarge": 32.773,
    "p5.48xlarge": 98.32,
}
DLAMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
TAG_POOL = "lepton:pool"
TAG_OWNER = "lepton:owner"
WAIT_RUNNING_SECONDS = 600
SSH_READY_SECONDS = 300

WATCHDOG = r"""#!/bin/bash
# lepton_magic idle watchdog: power off once no lepton agent has run for IDLE seconds, even if
# the notebook and the laptop are gone (the instance terminates on shutdown).
IDLE="${IDLE:-__IDLE__}"; CHECK="${CHECK:-30}"; SHUTDOWN_CMD="${SHUTDOWN_CMD:-shutdown -h now}"
PATTERN="${PATTERN:-lepton_magic[.]agent}"
last=$(date +%s.%N)
while true; do
    now=$(date +%s.%N)
    if pgrep -f "$PATTERN" >/dev/null 2>&1; then
        last=$now
    elif awk -v n="$now" -v l="$last" -v i="$IDLE" 'BEGIN { exit !(n - l >= i) }'; then
        logger -t lepton-watchdog "idle for ${IDLE}s: powering off" 2>/dev/null || true
        $SHUTDOWN_CMD
        exit 0
    fi
    sleep "$CHECK"
done
"""


def watchdog_script(idle_seconds: float) -> str:
    return WATCHDOG.replace("__IDLE__", str(int(idle_seconds)))


def user_data(idle_seconds: float) -> str:
    """Cloud-init user data: install the watchdog and start it (nohup, no systemd needed)."""
    return ("#!/bin/bash\ncat > /usr/local/bin/lepton-watchdog <<'LEPTON_EOF'\n"
            + watchdog_script(idle_seconds)
            + "LEPTON_EOF\nchmod +x /usr/local/bin/lepton-watchdog\n"
              "nohup /usr/local/bin/lepton-watchdog >/var/log/lepton-watchdog.log 2>&1 &\n")


def owner() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


class Ec2Backend(SSHBackend):
    name = "ec2"

    def __init__(self, settings: dict):
        import boto3
        from botocore.config import Config as BotoConfig

        from .. import private
        from ..store import default_home

        self.settings = settings
        self.home = Path(settings.get("home") or default_home()) / "ec2"
        private.make_dir(self.home)  # the key pair and the instances' host keys live here
        self.region = settings.get("ec2_region") or "us-east-1"
        self.instance_type = settings.get("ec2_instance_type") or "g5.xlarge"
        self.fallback_types = [t for t in str(settings.get("ec2_fallback_types") or "").split(",") if t.strip()]
        self.spot = bool(settings.get("ec2_spot"))
        self.spot_metadata = spot.metadata_url(settings, on_spot=self.spot)  # read by SSHBackend._start
        self.idle_timeout = float(settings.get("idle_timeout") or 600)
        endpoint = settings.get("ec2_endpoint_url") or None
        self.ec2 = boto3.client("ec2", region_name=self.region, endpoint_url=endpoint)
        self.ssm = boto3.client("ssm", region_name=self.region, endpoint_url=endpoint)
        self.endpoint = endpoint
        from ..staging import DEFAULT_THRESHOLD, Stager

        s3 = boto3.client("s3", region_name=self.region, endpoint_url=endpoint,
                          config=BotoConfig(signature_version="s3v4"))
        bucket = settings.get("ec2_s3_bucket") or f"lepton-magic-{_account(boto3, self.region, endpoint)}-{self.region}"
        self.stager = Stager(s3, bucket, self.region, int(settings.get("ec2_s3_threshold") or DEFAULT_THRESHOLD))
        self.report = settings.get("report") or print
        self.pool_id = settings.get("pool_id", "?")
        # SSH to the instances: our key pair, our known_hosts (fresh instances: trust on first use)
        self.key = str(self.home / f"lepton-{self.region}.pem")
        self.known_hosts = str(self.home / "known_hosts")
        self.policy = "accept-new"
        self.python = settings.get("ssh_python") or "python3"
        self.ssh_user = settings.get("ec2_ssh_user") or "ubuntu"
        self.hosts: list[Host] = []
        self._nodes = {}
        self.uploaded_bytes = 0
        self.instances: dict[str, dict] = {}  # node name -> {"id", "type", "price", "launched"}
        from .ssh import _Loop

        self._loop = _Loop.get()

    # --- the plan ---------------------------------------------------------------------------
    def describe(self, instance_type: str) -> dict:
        """GPU model, count and memory of a type; a made-up type is refused with close names."""
        try:
            info = self.ec2.describe_instance_types(InstanceTypes=[instance_type])["InstanceTypes"][0]
        except Exception as e:
            code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
            if code in ("InvalidInstanceType", "InvalidParameterValue"):
                close = difflib.get_close_matches(instance_type, list(PRICES), n=3, cutoff=0.5)
                hint = f"; did you mean {', '.join(close)}?" if close else f"; GPU types include {', '.join(list(PRICES)[:6])}"
                raise LeptonError(f"unknown EC2 instance type {instance_type!r}{hint}") from None
            raise LeptonError(f"cannot describe {instance_type} in {self.region}: {e}") from None
        gpus = (info.get("GpuInfo") or {}).get("Gpus") or []
        return {
            "type": instance_type,
            "gpu": gpus[0]["Name"] if gpus else None,
            "gpus": sum(g["Count"] for g in gpus),
            "gpu_memory_gib": round((info.get("GpuInfo") or {}).get("TotalGpuMemoryInMiB", 0) / 1024, 1),
            "price": self.price(instance_type),
        }

    def price(self, instance_type: str) -> float | None:
        if self.spot:
            history = self.ec2.describe_spot_price_history(
                InstanceTypes=[instance_type], ProductDescriptions=["Linux/UNIX"], MaxResults=1
            ).get("SpotPriceHistory") or []
            if history:
                return float(history[0]["SpotPrice"])
        return PRICES.get(instance_type)

    def plan(self, count: int) -> str:
        d = self.describe(self.instance_type)
        price = f"${d['price']:.3f}/h each, ${d['price'] * count:.2f}/h in all" if d["price"] else "price unknown"
        gpu = f"{d['gpus']} × {d['gpu']} ({d['gpu_memory_gib']} GiB)" if d["gpus"] else "no GPU"
        return (f"plan: {count} × {self.instance_type}{' spot' if self.spot else ''} in {self.region} · {gpu} "
                f"· {price} · each powers off after {self.idle_timeout / 60:g} min idle")

    # --- launching --------------------------------------------------------------------------
    def start_nodes(self, names: list[str], secret: bytes, on_message: OnMessage, on_lost: OnLost,
                    log_dir: str) -> list[NodeLink]:
        self.report(self.plan(len(names)))
        image = self._image()
        self._ensure_key_pair()
        group = self._ensure_security_group()
        launched = self._launch(len(names), image, group)
        ids = [i["InstanceId"] for i in launched]
        self.report(f"pending: {', '.join(ids)}")
        waiter = self.ec2.get_waiter("instance_running")
        waiter.wait(InstanceIds=ids, WaiterConfig={"Delay": 2 if self.endpoint else 10,
                                                  "MaxAttempts": WAIT_RUNNING_SECONDS // (2 if self.endpoint else 10)})
        described = {i["InstanceId"]: i for r in self.ec2.describe_instances(InstanceIds=ids)["Reservations"]
                     for i in r["Instances"]}
        self.report(f"running: {', '.join(ids)}; waiting for SSH")
        links = []
        for name, instance_id in zip(names, ids):
            instance = described[instance_id]
            host = self._ssh_target(instance)
            self.instances[name] = {"id": instance_id, "type": instance["InstanceType"],
                                    "price": self.price(instance["InstanceType"]), "launched": time.time(),
                                    "private_ip": instance.get("PrivateIpAddress")}
            links.append(self._loop.run(self._start_when_ready(name, host, secret, on_message, on_lost, log_dir),
                                        SSH_READY_SECONDS + 60))
        self.report(f"SSH ready on {len(links)} instance(s)")
        return links

    async def _start_when_ready(self, name, host, secret, on_message, on_lost, log_dir):
        import asyncio

        deadline = time.monotonic() + SSH_READY_SECONDS
        while True:
            try:
                return await self._start(name, host, secret, on_message, on_lost, log_dir)
            except Unreachable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(3)

    def _ssh_target(self, instance: dict) -> Host:
        override = self.settings.get("ec2_ssh_target")  # tests: every instance is this host:port
        if override:
            return Host.parse(f"{self.ssh_user}@{override}" if "@" not in override else override)
        address = instance.get("PublicIpAddress") or instance.get("PrivateIpAddress")
        if not address:
            raise LeptonError(f"{instance['InstanceId']} has no address to reach over SSH")
        return Host(self.ssh_user, address, int(self.settings.get("ec2_ssh_port") or 22))

    def _image(self) -> str:
        image = self.settings.get("ec2_ami")
        if image:
            return image
        try:
            return self.ssm.get_parameter(Name=DLAMI_PARAMETER)["Parameter"]["Value"]
        except Exception as e:
            raise LeptonError(f"cannot resolve the Deep Learning AMI ({DLAMI_PARAMETER}): {e}; "
                              "set one with %lepton config ec2_ami=ami-...") from None

    def _ensure_key_pair(self) -> None:
        name = f"lepton-{self.region}"
        path = Path(self.key)
        exists = bool(self.ec2.describe_key_pairs(Filters=[{"Name": "key-name", "Values": [name]}])["KeyPairs"])
        if exists and path.exists():
            return
        if exists:  # the private key is gone: replace the pair
            self.ec2.delete_key_pair(KeyName=name)
        material = self.ec2.create_key_pair(KeyName=name)["KeyMaterial"]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
        with os.fdopen(fd, "w") as f:
            f.write(material)

    def _ensure_security_group(self) -> str:
        cidr = self.settings.get("ec2_ssh_cidr") or _caller_cidr()
        name = "lepton-magic-ssh"
        groups = self.ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": [name]}])["SecurityGroups"]
        if groups:
            group = groups[0]["GroupId"]
            allowed = {r["CidrIp"] for p in groups[0].get("IpPermissions", []) for r in p.get("IpRanges", [])}
            if cidr in allowed:
                return group
        else:
            group = self.ec2.create_security_group(GroupName=name, Description="SSH from one address (lepton_magic)")["GroupId"]
            # The instances of a pool talk to each other (gloo/NCCL rendezvous and collectives).
            self.ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=[{
                "IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group}]}])
        self.ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=[{
            "IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": cidr}]}])
        return group

    def _launch(self, count: int, image: str, group: str) -> list[dict]:
        """run_instances, trying every availability zone, then every fallback type."""
        zones = [z["ZoneName"] for z in self.ec2.describe_availability_zones(
            Filters=[{"Name": "state", "Values": ["available"]}])["AvailabilityZones"]]
        tried = []
        for instance_type in [self.instance_type] + self.fallback_types:
            if instance_type != self.instance_type:
                self.describe(instance_type)  # refuse a made-up fallback before trying it
                self.report(f"no capacity for {tried[-1][0]} in any zone: trying {instance_type}")
            for zone in zones:
                options = dict(
                    ImageId=image, InstanceType=instance_type, MinCount=count, MaxCount=count,
                    KeyName=f"lepton-{self.region}", SecurityGroupIds=[group],
                    Placement={"AvailabilityZone": zone}, InstanceInitiatedShutdownBehavior="terminate",
                    UserData=user_data(self.idle_timeout),
                    TagSpecifications=[{"ResourceType": "instance", "Tags": [
                        {"Key": TAG_POOL, "Value": self.pool_id}, {"Key": TAG_OWNER, "Value": owner()},
                        {"Key": "Name", "Value": f"lepton {self.pool_id}"}]}],
                )
                if self.spot:
                    options["InstanceMarketOptions"] = {"MarketType": "spot"}
                try:
                    return self.ec2.run_instances(**options)["Instances"]
                except Exception as e:
                    code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
                    if code != "InsufficientInstanceCapacity":
                        raise LeptonError(f"AWS refused to launch {instance_type}: {e}") from None
                    tried.append((instance_type, zone))
                    self.report(f"no capacity for {instance_type} in {zone}: trying the next zone")
        raise LeptonError(
            f"no capacity for {', '.join(dict.fromkeys(t for t, _z in tried))} in {', '.join(zones)}; "
            "add fallbacks with %lepton config ec2_fallback_types=g5.2xlarge,g6.xlarge")

    def master_addr(self, link: NodeLink) -> str:
        """Rank 0's private address: the other instances of the VPC reach it there."""
        if self.settings.get("ec2_ssh_target"):
            return super().master_addr(link)
        return self.instances[link.name].get("private_ip") or super().master_addr(link)

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
        """Wait until every instance of the pool is gone."""
        ids = [i["id"] for i in self.instances.values()]
        if ids:
            self.ec2.get_waiter("instance_terminated").wait(
                InstanceIds=ids, WaiterConfig={"Delay": 2 if self.endpoint else 10, "MaxAttempts": 60})

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


def _account(boto3, region: str, endpoint: str | None) -> str:
    try:
        return boto3.client("sts", region_name=region, endpoint_url=endpoint).get_caller_identity()["Account"]
    except Exception:
        return getpass.getuser()


def _caller_cidr() -> str:
    """This machine's public address as a /32 (SSH is open to it only)."""
    import urllib.request

    try:
        with urllib.request.urlopen("https://checkip.amazonaws.com", timeout=5) as r:
            return r.read().decode().strip() + "/32"
    except OSError as e:
        raise LeptonError(f"cannot find this machine's public address ({e}); "
                          "set it with %lepton config ec2_ssh_cidr=203.0.113.7/32") from None


def find_orphans(ec2, live_pools: set[str]) -> list[dict]:
    """Instances this tool launched (tagged) that no live pool owns."""
    out = []
    pages = ec2.get_paginator("describe_instances").paginate(
        Filters=[{"Name": "tag-key", "Values": [TAG_POOL]},
                 {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]}])
    for page in pages:
        for reservation in page["Reservations"]:
            for instance in reservation["Instances"]:
                tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
                if tags.get(TAG_POOL) not in live_pools:
                    out.append({"id": instance["InstanceId"], "type": instance["InstanceType"],
                                "pool": tags.get(TAG_POOL), "owner": tags.get(TAG_OWNER),
                                "launched": instance["LaunchTime"].isoformat()})
    return out
