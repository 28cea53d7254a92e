"""The ec2 backend against moto's server mode (no real AWS here), with the "instances" reached
over SSH on the loopback sshd (ec2_ssh_target), as shared/HARNESS.md describes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from lepton_magic.config import Config
from lepton_magic.errors import LeptonError
from lepton_magic.session import Session
from lepton_magic.store import Store

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")


@pytest.fixture(scope="module")
def aws():
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", MOTO_EC2_LOAD_DEFAULT_AMIS="false")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def ec2_client(aws):
    return boto3.client("ec2", region_name="us-east-1", endpoint_url=aws)


def ec2_session(aws, sshd, tmp_path, **overrides) -> Session:
    config = Config.defaults()
    settings = {"backend": "ec2", "ec2_endpoint_url": aws, "ec2_ami": "ami-0123456789abcdef0",
                "ec2_ssh_cidr": "127.0.0.1/32", "ec2_ssh_target": f"127.0.0.1:{sshd['port']}",
                "ec2_ssh_user": sshd["user"], "ssh_python": sys.executable, "preload": "torch",
                "idle_timeout": "10m"}
    settings.update(overrides)
    for key, value in settings.items():
        config.set(key, value)
    store = Store(tmp_path / "home")
    # The test's sshd trusts the test user's key: make it the pool's EC2 key pair.
    home = store.home / "ec2"
    home.mkdir(parents=True, exist_ok=True)
    key = home / "lepton-us-east-1.pem"
    key.write_bytes(open(sshd["key"], "rb").read())
    os.chmod(key, 0o600)
    client = ec2_client(aws)
    if not client.describe_key_pairs(Filters=[{"Name": "key-name", "Values": ["lepton-us-east-1"]}])["KeyPairs"]:
        client.import_key_pair(KeyName="lepton-us-east-1", PublicKeyMaterial=open(sshd["key"] + ".pub", "rb").read())
    return Session(config, store)


def _states(client, ids):
    reservations = client.describe_instances(InstanceIds=ids)["Reservations"]
    return {i["InstanceId"]: i["State"]["Name"] for r in reservations for i in r["Instances"]}


def test_up_ddp_down_on_ec2(aws, sshd, tmp_path, capsys):
    session = ec2_session(aws, sshd, tmp_path)
    t0 = time.monotonic()
    pool = session.up(nodes=2)
    took = time.monotonic() - t0
    out = capsys.readouterr().out
    assert "plan: 2 × g5.xlarge in us-east-1 · 1 × A10G (22.4 GiB) · $1.006/h each, $2.01/h in all" in out
    assert "each powers off after 10 min idle" in out and "SSH ready on 2 instance(s)" in out
    ids = [i["id"] for i in pool.backend.instances.values()]
    client = ec2_client(aws)
    described = client.describe_instances(InstanceIds=ids)["Reservations"][0]["Instances"][0]
    tags = {t["Key"]: t["Value"] for t in described["Tags"]}
    assert tags["lepton:pool"] == pool.id and "@" in tags["lepton:owner"]
    attribute = client.describe_instance_attribute(InstanceId=ids[0], Attribute="instanceInitiatedShutdownBehavior")
    assert attribute["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
    data = client.describe_instance_attribute(InstanceId=ids[0], Attribute="userData")["UserData"]["Value"]
    import base64

    assert "lepton-watchdog" in base64.b64decode(data).decode()
    key_mode = os.stat(pool.backend.key).st_mode & 0o777
    assert key_mode == 0o600
    group = client.describe_security_groups(GroupNames=["lepton-magic-ssh"])["SecurityGroups"][0]
    rules = group["IpPermissions"]
    assert any(r.get("FromPort") == 22 and r["IpRanges"] == [{"CidrIp": "127.0.0.1/32"}] for r in rules)
    assert any(p.get("GroupId") == group["GroupId"] for r in rules for p in r.get("UserIdGroupPairs", []))
    ns: dict = {}
    run = session.submit("import torch\ndist = lepton.init_distributed()\nt = torch.ones(1) * (lepton.rank + 1)\n"
                         "dist.all_reduce(t)\n", ns, nodes=2).wait(timeout=120)
    assert run.status == "succeeded" and ns["t"].item() == 3.0
    assert pool.backend.cost_so_far() > 0 and pool.backend.price_per_hour() == pytest.approx(2.012)
    session.down()
    assert set(_states(client, ids).values()) == {"terminated"}
    print(f"\nec2 up under moto (2 instances, SSH ready): {took:.2f} s")


def test_a_made_up_type_is_refused_with_close_names(aws, sshd, tmp_path):
    session = ec2_session(aws, sshd, tmp_path, ec2_instance_type="g5.xlarg")
    with pytest.raises(LeptonError, match=r"unknown EC2 instance type 'g5.xlarg'; did you mean g5.xlarge"):
        session.up(nodes=1)
    session.down()


def test_no_capacity_tries_every_zone_then_the_fallback_type(aws, sshd, tmp_path):
    from botocore.exceptions import ClientError

    from lepton_magic.backends.ec2 import Ec2Backend

    said = []
    backend = Ec2Backend({"ec2_endpoint_url": aws, "ec2_fallback_types": "g6.xlarge", "report": said.append,
                          "home": str(tmp_path), "ec2_ssh_cidr": "127.0.0.1/32"})

    def no_g5(params, **kwargs):
        if params.get("InstanceType") == "g5.xlarge":
            raise ClientError({"Error": {"Code": "InsufficientInstanceCapacity", "Message": "none"}}, "RunInstances")

    backend.ec2.meta.events.register("provide-client-params.ec2.RunInstances", no_g5)
    backend._ensure_key_pair()
    instances = backend._launch(1, "ami-0123456789abcdef0", backend._ensure_security_group())
    assert instances[0]["InstanceType"] == "g6.xlarge"
    zones = [s for s in said if s.startswith("no capacity for g5.xlarge in us-east-1")]
    assert len(zones) == 6 and any("trying g6.xlarge" in s for s in said)
    backend.ec2.terminate_instances(InstanceIds=[instances[0]["InstanceId"]])


def test_gc_finds_instances_no_live_pool_owns(aws):
    from lepton_magic.backends.ec2 import TAG_POOL, find_orphans

    client = ec2_client(aws)
    launched = client.run_instances(ImageId="ami-0123456789abcdef0", InstanceType="g4dn.xlarge", MinCount=1,
                                    MaxCount=1, TagSpecifications=[{"ResourceType": "instance", "Tags": [
                                        {"Key": TAG_POOL, "Value": "p-gone"}]}])["Instances"][0]["InstanceId"]
    orphans = find_orphans(client, live_pools={"p-live"})
    assert launched in [o["id"] for o in orphans]
    assert launched not in [o["id"] for o in find_orphans(client, live_pools={"p-gone"})]
    client.terminate_instances(InstanceIds=[launched])


def test_the_watchdog_powers_off_only_when_idle(tmp_path):
    from lepton_magic.backends.ec2 import watchdog_script

    script = tmp_path / "watchdog"
    script.write_text(watchdog_script(1))
    marker = tmp_path / "off"
    # A pattern of this test's own: other tests' agents may be running on this machine.
    env = dict(os.environ, CHECK="0.1", SHUTDOWN_CMD=f"touch {marker}", PATTERN="watchdog-test[.]agent")
    busy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)", "watchdog-test.agent"])
    watchdog = subprocess.Popen(["bash", str(script)], env=env)
    try:
        time.sleep(2.0)
        assert not marker.exists()  # an agent runs: not idle
        busy.wait()
        deadline = time.monotonic() + 5
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists()  # idle for a second after the agent ended: powered off
        assert watchdog.wait(5) == 0
    finally:
        busy.kill()
        watchdog.kill()


def test_cost_and_gc_of_a_session(aws, sshd, tmp_path):
    session = ec2_session(aws, sshd, tmp_path)
    try:
        pool = session.up(nodes=1)
        time.sleep(0.2)
        cost = session.cost()
        row = cost[cost["pool"] == pool.id].iloc[0]
        assert row["backend"] == "ec2" and row["dollars_per_hour"] == pytest.approx(1.006)
        assert row["cost_so_far"] >= 0
        orphans = session.gc()  # its own pool's instance is not an orphan
        assert pool.backend.instances["ec2-0"]["id"] not in [o["id"] for o in orphans]
    finally:
        session.down()
    stray = ec2_client(aws).run_instances(
        ImageId="ami-0123456789abcdef0", InstanceType="g4dn.xlarge", MinCount=1, MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "lepton:pool", "Value": "p-old"}]}],
    )["Instances"][0]["InstanceId"]
    found = session.gc(terminate=True)
    assert stray in [o["id"] for o in found]
    assert _states(ec2_client(aws), [stray])[stray] in ("shutting-down", "terminated")


def test_the_gc_command(aws, tmp_path):
    env = dict(os.environ, LEPTON_HOME=str(tmp_path), LEPTON_EC2_ENDPOINT_URL=aws)
    stray = ec2_client(aws).run_instances(
        ImageId="ami-0123456789abcdef0", InstanceType="g5.xlarge", MinCount=1, MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "lepton:pool", "Value": "p-cli"}]}],
    )["Instances"][0]["InstanceId"]
    listed = subprocess.run([sys.executable, "-m", "lepton_magic.cli", "gc"], capture_output=True, text=True,
                            env=env, timeout=60)
    assert stray in listed.stdout and "--yes" in listed.stdout
    done = subprocess.run([sys.executable, "-m", "lepton_magic.cli", "gc", "--yes"], capture_output=True,
                          text=True, env=env, timeout=60)
    assert "terminated" in done.stdout


def test_large_inputs_and_outputs_travel_through_s3_once(aws, sshd, tmp_path):
    import numpy as np

    session = ec2_session(aws, sshd, tmp_path, ec2_s3_threshold="1000000", ec2_s3_bucket="lepton-test-bucket")
    try:
        pool = session.up(nodes=1)
        stager = pool.backend.stager
        ns = {"big": np.arange(500_000, dtype=np.float64)}  # 4 MB: over the threshold
        code = "import numpy as np\ntotal = float(big.sum())\nback = big * 2\n"
        session.submit(code, ns, nodes=1).wait(timeout=120)
        first = stager.uploaded_bytes
        assert first > 4_000_000 and ns["total"] == float(np.arange(500_000).sum())
        assert ns["back"][-1] == 999_998.0  # the 4 MB output came back through the bucket
        session.submit(code, ns, nodes=1).wait(timeout=120)
        assert stager.uploaded_bytes == first  # unchanged input: the second run uploads nothing
        s3 = boto3.client("s3", region_name="us-east-1", endpoint_url=aws)
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="lepton-test-bucket").get("Contents", [])]
        assert len([k for k in keys if k.startswith("inputs/")]) == 1 and not [k for k in keys if k.startswith("outputs/")]
        head = s3.head_object(Bucket="lepton-test-bucket", Key=keys[0])
        assert head.get("ServerSideEncryption") == "AES256"
        print(f"\nbytes uploaded: first run {first}, second run {stager.uploaded_bytes - first}")
    finally:
        session.down()


def test_cost_reaches_the_store_the_panel_and_the_sidebar_api(aws, sshd, tmp_path):
    from lepton_magic.server.manager import LeptonManager
    from lepton_magic.ui.model import RunView
    from lepton_magic.ui.panel import PoolPanel

    session = ec2_session(aws, sshd, tmp_path)
    try:
        pool = session.up(nodes=1)
        run = session.submit("import time\ntime.sleep(0.5)\n", {}, nodes=1).wait(timeout=60)
        row = session.store.run_row(run.id)
        assert row["price_per_hour"] == pytest.approx(1.006) and row["cost"] > 0
        view = RunView(session.store, run.seq).refresh()
        assert view.header.cost == pytest.approx(row["cost"])
        panel = PoolPanel(session)
        panel.update()
        assert "$1.01/h" in panel.table.value and "released in" in panel.table.value
        api = [p for p in LeptonManager(session.store).pools() if p["id"] == pool.id][0]
        assert api["cost_per_hour"] == pytest.approx(1.006) and api["cost_so_far"] is not None
    finally:
        session.down()
