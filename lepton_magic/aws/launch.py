"""Getting instances up: the image, the key pair, the pool's security group, run_instances
across zones and fallback types, and the wait until they run; and taking them down again.

Every instance terminates itself when idle (the watchdog in its user data powers it off;
InstanceInitiatedShutdownBehavior=terminate), and its sshd drops a client that stopped
answering, so the agent sees EOF and exits: a vanished laptop leaves no GPU billed for long.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path
from typing import Callable

from ..errors import LeptonError
from .identity import TAG_HEARTBEAT, TAG_KEY_HOLDER, TAG_OWNER, TAG_POOL, key_holder, key_pair_name, owner

DLAMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
WAIT_RUNNING_SECONDS = 600
WAIT_TERMINATED_SECONDS = 600

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

#: sshd on the instance ends a session whose client stopped answering within about a minute
#: (not TCP's two hours): the agent reads EOF, stops its ranks, and the watchdog takes over.
SSHD_CLIENT_ALIVE = "ClientAliveInterval 15\nClientAliveCountMax 4\n"


def watchdog_script(idle_seconds: float) -> str:
    return WATCHDOG.replace("__IDLE__", str(int(idle_seconds)))


def user_data(idle_seconds: float) -> str:
    """Cloud-init user data: sshd's client keepalives, then the watchdog (nohup, no systemd needed)."""
    return ("#!/bin/bash\nmkdir -p /etc/ssh/sshd_config.d\n"
            f"printf '{SSHD_CLIENT_ALIVE.replace(chr(10), chr(92) + 'n')}' > /etc/ssh/sshd_config.d/lepton.conf\n"
            "(systemctl reload ssh || systemctl reload sshd || true) 2>/dev/null\n"
            "cat > /usr/local/bin/lepton-watchdog <<'LEPTON_EOF'\n"
            + watchdog_script(idle_seconds)
            + "LEPTON_EOF\nchmod +x /usr/local/bin/lepton-watchdog\n"
              "nohup /usr/local/bin/lepton-watchdog >/var/log/lepton-watchdog.log 2>&1 &\n")


def _code(error: Exception) -> str:
    return getattr(error, "response", {}).get("Error", {}).get("Code", "")


def image(settings: dict, ssm) -> str:
    chosen = settings.get("ec2_ami")
    if chosen:
        return chosen
    try:
        return ssm.get_parameter(Name=DLAMI_PARAMETER)["Parameter"]["Value"]
    except Exception as e:
        raise LeptonError(f"cannot resolve the Deep Learning AMI ({DLAMI_PARAMETER}): {e}; "
                          "set one with %lepton config ec2_ami=ami-...") from None


# --- the key pair ------------------------------------------------------------------------------
def ensure_key_pair(ec2, region: str, key_dir: Path, report: Callable[[str], None]) -> tuple[str, str]:
    """This machine's key pair (name, private key path), created when missing. A pair is
    replaced only when this key holder created it (its tag says so) and lost the private key:
    a pair of another machine or user, or one imported by hand, is never deleted."""
    name = key_pair_name(region, key_dir)
    path = Path(key_dir) / f"{name}.pem"
    holder = key_holder(key_dir)
    pairs = ec2.describe_key_pairs(Filters=[{"Name": "key-name", "Values": [name]}])["KeyPairs"]
    if pairs and path.exists():
        return name, str(path)
    if pairs:
        tags = {t["Key"]: t["Value"] for t in pairs[0].get("Tags") or []}
        if tags.get(TAG_KEY_HOLDER) != holder:
            raise LeptonError(f"the key pair {name} in {region} was not created here and its private key is "
                              f"not at {path}: it is left alone; put its .pem there, or delete the pair "
                              "yourself if it is yours")
        report(f"the private key of {name} is gone from {path}: replacing the key pair this machine made")
        ec2.delete_key_pair(KeyName=name)
    material = ec2.create_key_pair(KeyName=name, TagSpecifications=[{"ResourceType": "key-pair", "Tags": [
        {"Key": TAG_KEY_HOLDER, "Value": holder}, {"Key": TAG_OWNER, "Value": owner()}]}])["KeyMaterial"]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "w") as f:
        f.write(material)
    return name, str(path)


# --- the pool's security group -----------------------------------------------------------------
def pool_group_name(pool_id: str) -> str:
    return f"lepton-{pool_id}"


def ensure_pool_group(ec2, pool_id: str, cidr: str) -> str:
    """One security group per pool: its instances reach each other (rendezvous, collectives) and
    SSH is open to ``cidr`` only. Scoped to the pool, no other pool (another user's) reaches
    its ports, and rules of addresses the caller no longer has are revoked here, without
    touching anyone else's."""
    name = pool_group_name(pool_id)
    groups = ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": [name]}])["SecurityGroups"]
    if groups:
        group, rules = groups[0]["GroupId"], groups[0].get("IpPermissions", [])
    else:
        group = ec2.create_security_group(
            GroupName=name, Description=f"lepton_magic pool {pool_id}: SSH from its kernel's address",
            TagSpecifications=[{"ResourceType": "security-group", "Tags": [
                {"Key": TAG_POOL, "Value": pool_id}, {"Key": TAG_OWNER, "Value": owner()},
                {"Key": TAG_HEARTBEAT, "Value": str(int(time.time()))}]}])["GroupId"]
        ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=[{
            "IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group}]}])
        rules = []
    ssh = [r["CidrIp"] for p in rules if p.get("FromPort") == 22 for r in p.get("IpRanges", [])]
    stale = [c for c in ssh if c != cidr]
    if stale:  # the caller moved (another network): its old addresses lose SSH
        ec2.revoke_security_group_ingress(GroupId=group, IpPermissions=[{
            "IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": c} for c in stale]}])
    if cidr not in ssh:
        ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=[{
            "IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
            "IpRanges": [{"CidrIp": cidr, "Description": f"lepton_magic {owner()}"}]}])
    return group


def delete_group(ec2, group: str, attempts: int = 10, delay: float = 3.0) -> bool:
    """After its instances terminated (AWS may hold their interfaces a little longer)."""
    return group_deletion_error(ec2, group, attempts, delay) is None


def group_deletion_error(ec2, group: str, attempts: int = 10, delay: float = 3.0) -> str | None:
    """Delete the group, waiting while AWS holds it for instances that terminated; None once it
    is gone, else why not ("DependencyViolation: ..." while it is still held)."""
    for attempt in range(attempts):
        try:
            ec2.delete_security_group(GroupId=group)
            return None
        except Exception as e:
            if _code(e) == "InvalidGroup.NotFound":
                return None
            if _code(e) != "DependencyViolation" or attempt == attempts - 1:
                return f"{_code(e) or type(e).__name__}: {e}"
            time.sleep(delay)
    return "not tried"


def caller_cidr() -> str:
    """This machine's public address as a /32 (SSH is open to it only)."""
    import urllib.request

    try:
        with urllib.request.urlopen("https://checkip.amazonaws.com", timeout=5) as r:
            return r.read().decode().strip() + "/32"
    except OSError as e:
        raise LeptonError(f"cannot find this machine's public address ({e}); "
                          "set it with %lepton config ec2_ssh_cidr=203.0.113.7/32") from None


# --- instances ---------------------------------------------------------------------------------
def run_instances(ec2, *, count: int, image_id: str, instance_types: list[str], key_name: str, group: str,
                  pool_id: str, idle_seconds: float, spot: bool, report: Callable[[str], None],
                  check_type: Callable[[str], object]) -> list[dict]:
    """All ``count`` instances or none (MinCount = MaxCount), trying every availability zone,
    then every fallback type."""
    zones = [z["ZoneName"] for z in ec2.describe_availability_zones(
        Filters=[{"Name": "state", "Values": ["available"]}])["AvailabilityZones"]]
    tried = []
    for instance_type in instance_types:
        if instance_type != instance_types[0]:
            check_type(instance_type)  # refuse a made-up fallback before trying it
            report(f"no capacity for {tried[-1][0]} in any zone: trying {instance_type}")
        for zone in zones:
            options = dict(
                ImageId=image_id, InstanceType=instance_type, MinCount=count, MaxCount=count,
                KeyName=key_name, SecurityGroupIds=[group],
                Placement={"AvailabilityZone": zone}, InstanceInitiatedShutdownBehavior="terminate",
                UserData=user_data(idle_seconds),
                TagSpecifications=[{"ResourceType": "instance", "Tags": [
                    {"Key": TAG_POOL, "Value": pool_id}, {"Key": TAG_OWNER, "Value": owner()},
                    {"Key": TAG_HEARTBEAT, "Value": str(int(time.time()))},
                    {"Key": "Name", "Value": f"lepton {pool_id}"}]}],
            )
            if spot:
                options["InstanceMarketOptions"] = {"MarketType": "spot"}
            try:
                return ec2.run_instances(**options)["Instances"]
            except Exception as e:
                if _code(e) != "InsufficientInstanceCapacity":
                    raise LeptonError(f"AWS refused to launch {instance_type}: {e}") from None
                tried.append((instance_type, zone))
                report(f"no capacity for {instance_type} in {zone}: trying the next zone")
    raise LeptonError(
        f"no capacity for {', '.join(dict.fromkeys(t for t, _z in tried))} in {', '.join(zones)}; "
        "add fallbacks with %lepton config ec2_fallback_types=g5.2xlarge,g6.xlarge")


class NotRunning(LeptonError):
    """An instance of a request ended before it ran (AWS reclaimed it, no capacity after all)."""

    def __init__(self, instance_id: str, why: str):
        super().__init__(why)
        self.instance_id = instance_id


def wait_running(ec2, ids: list[str], poll: float) -> dict[str, dict]:
    """Every instance running, described; the first that will never run raises NotRunning."""
    deadline = time.monotonic() + WAIT_RUNNING_SECONDS
    while True:
        described = describe(ec2, ids)
        for instance_id in ids:
            state = described[instance_id]["State"]["Name"]
            if state in ("shutting-down", "terminated", "stopping", "stopped"):
                reason = (described[instance_id].get("StateReason") or {}).get("Message") or "no reason given"
                raise NotRunning(instance_id, f"it went {state} before it ran ({reason})")
        if all(described[i]["State"]["Name"] == "running" for i in ids):
            return described
        if time.monotonic() > deadline:
            late = next(i for i in ids if described[i]["State"]["Name"] != "running")
            raise NotRunning(late, f"still {described[late]['State']['Name']} after {WAIT_RUNNING_SECONDS} s")
        time.sleep(poll)


def describe(ec2, ids: list[str]) -> dict[str, dict]:
    return {i["InstanceId"]: i for r in ec2.describe_instances(InstanceIds=ids)["Reservations"]
            for i in r["Instances"]}


def terminate_and_wait(ec2, ids: list[str], poll: float) -> None:
    if not ids:
        return
    ec2.terminate_instances(InstanceIds=ids)
    ec2.get_waiter("instance_terminated").wait(
        InstanceIds=ids, WaiterConfig={"Delay": poll, "MaxAttempts": int(WAIT_TERMINATED_SECONDS / poll)})
