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
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_EC2_METADATA_DISABLED="true",
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
    use_sshd_key(aws, sshd, store.home / "ec2")
    return Session(config, store)


def use_sshd_key(aws, sshd, key_dir) -> str:
    """The test's sshd trusts the test user's key: make it this home's EC2 key pair."""
    from lepton_magic.aws.identity import key_pair_name

    key_dir.mkdir(parents=True, exist_ok=True)
    name = key_pair_name("us-east-1", key_dir)
    key = key_dir / f"{name}.pem"
    key.write_bytes(open(sshd["key"], "rb").read())
    os.chmod(key, 0o600)
    client = ec2_client(aws)
    if not client.describe_key_pairs(Filters=[{"Name": "key-name", "Values": [name]}])["KeyPairs"]:
        client.import_key_pair(KeyName=name, PublicKeyMaterial=open(sshd["key"] + ".pub", "rb").read())
    return name


def _states(client, ids):
    reservations = client.describe_instances(InstanceIds=ids)["Reservations"]
    return {i["InstanceId"]: i["State"]["Name"] for r in reservations for i in r["Instances"]}


def test_up_ddp_down_on_ec2(aws, sshd, tmp_path, capsys):
    session = ec2_session(aws, sshd, tmp_path)
    t0 = time.monotonic()
    pool = session.up(nodes=2)
    took = time.monotonic() - t0
    out = capsys.readouterr().out
    # moto has no Price List: the built-in list price, said to be an estimate
    assert ("plan: 2 × g5.xlarge in us-east-1 · 1 × A10G (22.4 GiB) · $1.006/h each "
            "(estimate: us-east-1 list price), $2.01/h in all") in out
    assert "each powers off after 10 min idle" in out and "SSH ready on 2 instance(s)" in out
    ids = [i["id"] for i in pool.backend.instances.values()]
    client = ec2_client(aws)
    described = client.describe_instances(InstanceIds=ids)["Reservations"][0]["Instances"][0]
    tags = {t["Key"]: t["Value"] for t in described["Tags"]}
    assert tags["lepton:pool"] == pool.id and "@" in tags["lepton:owner"]
    assert abs(float(tags["lepton:heartbeat"]) - time.time()) < 60
    attribute = client.describe_instance_attribute(InstanceId=ids[0], Attribute="instanceInitiatedShutdownBehavior")
    assert attribute["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
    data = client.describe_instance_attribute(InstanceId=ids[0], Attribute="userData")["UserData"]["Value"]
    import base64

    assert "lepton-watchdog" in base64.b64decode(data).decode()
    assert "ClientAliveInterval 15" in base64.b64decode(data).decode()
    key_mode = os.stat(pool.backend.key).st_mode & 0o777
    assert key_mode == 0o600
    group = client.describe_security_groups(GroupNames=[f"lepton-{pool.id}"])["SecurityGroups"][0]
    rules = group["IpPermissions"]
    assert [c["CidrIp"] for r in rules if r.get("FromPort") == 22 for c in r["IpRanges"]] == ["127.0.0.1/32"]
    assert any(p.get("GroupId") == group["GroupId"] for r in rules for p in r.get("UserIdGroupPairs", []))
    ns: dict = {}
    run = session.submit("import torch\ndist = lepton.init_distributed()\nt = torch.ones(1) * (lepton.rank + 1)\n"
                         "dist.all_reduce(t)\n", ns, nodes=2).wait(timeout=120)
    assert run.status == "succeeded" and ns["t"].item() == 3.0
    assert pool.backend.cost_so_far() > 0 and pool.backend.price_per_hour() == pytest.approx(2.012)
    session.down()
    assert set(_states(client, ids).values()) == {"terminated"}
    assert not client.describe_security_groups(Filters=[{"Name": "group-name", "Values": [f"lepton-{pool.id}"]}])[
        "SecurityGroups"]  # the pool's group goes with it
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
    from lepton_magic.aws import launch

    key_name, _path = launch.ensure_key_pair(backend.ec2, "us-east-1", tmp_path, said.append)
    instances = launch.run_instances(
        backend.ec2, count=1, image_id="ami-0123456789abcdef0", instance_types=["g5.xlarge", "g6.xlarge"],
        key_name=key_name, group=launch.ensure_pool_group(backend.ec2, "p-capacity", "127.0.0.1/32"),
        pool_id="p-capacity", idle_seconds=600, spot=False, report=said.append, check_type=backend.describe)
    assert instances[0]["InstanceType"] == "g6.xlarge"
    zones = [s for s in said if s.startswith("no capacity for g5.xlarge in us-east-1")]
    assert len(zones) == 6 and any("trying g6.xlarge" in s for s in said)
    backend.ec2.terminate_instances(InstanceIds=[instances[0]["InstanceId"]])


def test_the_watchdog_powers_off_only_when_idle(tmp_path):
    from lepton_magic.aws.launch import watchdog_script

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


def test_large_inputs_and_outputs_travel_through_s3_once(aws, sshd, tmp_path):
    import numpy as np

    session = ec2_session(aws, sshd, tmp_path, ec2_s3_threshold="1000000", ec2_s3_bucket="lepton-test-bucket")
    try:
        pool = session.up(nodes=1)
        stager = pool.backend.stager
        calls = []
        # The calls as sent (the header), not presigned URLs: a node fetching one sends no such header.
        stager.s3.meta.events.register("before-call.s3.*", lambda params, model, **kw: calls.append(
            (model.name, params["headers"].get("x-amz-expected-bucket-owner"))))
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
        # Every call but CreateBucket (which has no such parameter) names the expected owner,
        # the account STS gave (moto's): a same-named bucket of another account is never used.
        assert {op for op, _owner in calls} >= {"HeadBucket", "PutObject", "GetObject", "DeleteObject"}
        assert {owner for op, owner in calls if op != "CreateBucket"} == {"123456789012"}
        rules = {r["ID"]: r for r in s3.get_bucket_lifecycle_configuration(Bucket="lepton-test-bucket")["Rules"]}
        assert rules["lepton-magic-inputs"]["Filter"] == {"Prefix": "inputs/"}
        assert rules["lepton-magic-inputs"]["Expiration"] == {"Days": 7}
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


# --- no lost money, no broken neighbours ----------------------------------------------------------
def _alive(client, ids) -> list[str]:
    return [i for i, state in _states(client, ids).items() if state not in ("shutting-down", "terminated")]


def _pool_instances(client, pool_id) -> list[str]:
    reservations = client.describe_instances(Filters=[{"Name": "tag:lepton:pool", "Values": [pool_id]}])
    return [i["InstanceId"] for r in reservations["Reservations"] for i in r["Instances"]]


def test_ssh_never_ready_at_node_2_of_3_leaves_no_instance_and_no_connection(aws, sshd, tmp_path):
    from test_ssh_start_failures import _agents_of, _closed_port, _connections_to

    closed = _closed_port()
    good = f"127.0.0.1:{sshd['port']}"
    session = ec2_session(aws, sshd, tmp_path, ec2_ssh_target=f"{good},127.0.0.1:{closed},{good}",
                          ec2_ssh_wait="2s", preload="")
    client = ec2_client(aws)
    with pytest.raises(LeptonError) as info:
        session.up(nodes=3)
    message = str(info.value)
    pool = session.pool("ec2")
    ids = _pool_instances(client, pool.id)
    assert len(ids) == 3 and _alive(client, ids) == []  # terminated, and waited for, before the error
    second = pool.backend.instances["ec2-1"]["id"]
    assert message.startswith(f"node ec2-1 (2 of 3, {second}, {sshd['user']}@127.0.0.1:{closed}) did not start: "
                              "SSH did not answer within 2 s")
    assert message.endswith("terminated the 3 instance(s) of this request")
    assert not _connections_to(sshd["port"]) and not pool.backend._nodes
    deadline = time.monotonic() + 10
    while _agents_of(sshd) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _agents_of(sshd)
    t0 = time.monotonic()
    session.down()
    assert time.monotonic() - t0 < 5  # nothing left to wait for
    assert pool.backend.cost_so_far() > 0  # the minutes they ran still count


def test_an_instance_reclaimed_at_node_2_of_3_leaves_no_instance(aws, sshd, tmp_path):
    """AWS may end an instance of a request before it runs (Server.InsufficientInstanceCapacity
    in its state reason); here the test terminates node 2 right after RunInstances."""
    from lepton_magic.backends.ec2 import Ec2Backend
    from lepton_magic.protocol import new_secret

    use_sshd_key(aws, sshd, tmp_path / "ec2")
    said = []
    backend = Ec2Backend({"ec2_endpoint_url": aws, "home": str(tmp_path), "ec2_ssh_cidr": "127.0.0.1/32",
                          "ec2_ami": "ami-0123456789abcdef0", "ec2_ssh_target": f"127.0.0.1:{sshd['port']}",
                          "ec2_ssh_user": sshd["user"], "ssh_python": sys.executable, "report": said.append,
                          "pool_id": "p-reclaimed"})
    other = ec2_client(aws)

    def reclaim(parsed, **kwargs):
        other.terminate_instances(InstanceIds=[parsed["Instances"][1]["InstanceId"]])

    backend.ec2.meta.events.register("after-call.ec2.RunInstances", reclaim)
    with pytest.raises(LeptonError) as info:
        backend.start_nodes(["ec2-0", "ec2-1", "ec2-2"], new_secret(), lambda *a: None, lambda *a: None,
                            str(tmp_path))
    ids = _pool_instances(other, "p-reclaimed")
    assert len(ids) == 3 and _alive(other, ids) == []
    second = backend.instances["ec2-1"]["id"]
    assert str(info.value).startswith(f"node ec2-1 (2 of 3, {second}) did not start: it went terminated before it ran")
    assert "terminated the 3 instance(s) of this request" in str(info.value)
    t0 = time.monotonic()
    backend.close()
    assert time.monotonic() - t0 < 5


def test_gc_spares_pools_alive_elsewhere_and_acts_only_with_yes(aws, sshd, tmp_path):
    from lepton_magic.aws.identity import owner

    client = ec2_client(aws)
    now, stale = time.time(), time.time() - 3600

    def tags(pool, who, beat):
        return [{"Key": "lepton:pool", "Value": pool}, {"Key": "lepton:owner", "Value": who},
                {"Key": "lepton:heartbeat", "Value": str(int(beat))}]

    def instance(pool, who, beat, groups=()):
        return client.run_instances(ImageId="ami-0123456789abcdef0", InstanceType="g4dn.xlarge", MinCount=1,
                                    MaxCount=1, SecurityGroupIds=list(groups), TagSpecifications=[
                                        {"ResourceType": "instance", "Tags": tags(pool, who, beat)}]
                                    )["Instances"][0]["InstanceId"]

    def group(pool, who, beat):
        return client.create_security_group(GroupName=f"lepton-{pool}", Description="test", TagSpecifications=[
            {"ResourceType": "security-group", "Tags": tags(pool, who, beat)}])["GroupId"]

    # A kernel that died leaves its pool's security group too; its beat stops with its instances'.
    alices_group, dead_group = group("p-alice-old", "alice@her-laptop", stale), group("p-dead", owner(), stale)
    # A stale group of mine that an instance gc keeps is still in (that instance's beat is fresh).
    held_group = group("p-held", owner(), stale)
    groups = [alices_group, dead_group, held_group]
    alices_live = instance("p-alice", "alice@her-laptop", now)
    alices_stale = instance("p-alice-old", "alice@her-laptop", stale, [alices_group])  # hers, not ours
    mine_elsewhere = instance("p-other-notebook", owner(), now - 90, [held_group])  # mine, alive elsewhere
    mine_dead = instance("p-dead", owner(), stale, [dead_group])
    # A pool up in a first "kernel"; a second one runs gc: the first's pool is spared by its heartbeat.
    first = ec2_session(aws, sshd, tmp_path / "first")
    try:
        pool = first.up(nodes=1)
        live_id = pool.backend.instances["ec2-0"]["id"]
        before = _tags(client, live_id)["lepton:heartbeat"]
        time.sleep(1.1)
        pool.backend.beat()  # what its watch thread does every minute
        assert int(_tags(client, live_id)["lepton:heartbeat"]) > int(before)
        second = Session(first.config, Store(tmp_path / "second"))
        rows = {r["id"]: r for r in second.gc()}
        assert {i: rows[i]["action"] for i in (alices_live, alices_stale, mine_elsewhere, mine_dead, live_id)} == {
            alices_live: "keep", alices_stale: "keep", mine_elsewhere: "keep", mine_dead: "terminate",
            live_id: "keep"}
        assert "alive elsewhere (last heartbeat" in rows[live_id]["why"]
        assert rows[alices_stale]["why"].startswith("owned by alice@her-laptop, not ")
        assert "pool p-dead is not up anywhere (last heartbeat 60 min ago)" in rows[mine_dead]["why"]
        live_group = pool.backend.group
        assert {g: rows[g]["action"] for g in (*groups, live_group)} == {
            alices_group: "keep", dead_group: "delete", held_group: "keep", live_group: "keep"}
        assert rows[held_group]["why"] == f"instance(s) kept are in it: {mine_elsewhere}"
        assert rows[dead_group]["why"].startswith("yours, pool p-dead is not up anywhere (last heartbeat 60 min")
        assert _alive(client, [mine_dead]) == [mine_dead]  # listing changes nothing
        assert first.gc()[0]  # in its own kernel the pool is "up in this process"
        assert [r for r in first.gc() if r["id"] == live_id][0]["why"] == f"pool {pool.id} is up in this process"
        env = dict(os.environ, LEPTON_HOME=str(tmp_path / "cli"), LEPTON_EC2_ENDPOINT_URL=aws)
        listed = subprocess.run([sys.executable, "-m", "lepton_magic.cli", "gc"], capture_output=True, text=True,
                                env=env, timeout=60)
        assert f"terminate  {mine_dead}" in listed.stdout and f"keep       {live_id}" in listed.stdout
        assert f"delete     {dead_group}  security-group" in listed.stdout
        assert "1 instance(s) and 1 security group(s) would be removed" in listed.stdout
        assert "run lepton-magic gc --yes to remove them" in listed.stdout
        assert _alive(client, [mine_dead]) == [mine_dead] and _groups(client, groups) == set(groups)
        done = subprocess.run([sys.executable, "-m", "lepton_magic.cli", "gc", "--yes"], capture_output=True,
                              text=True, env=env, timeout=60)
        assert f"terminated {mine_dead}" in done.stdout and f"deleted    {dead_group}" in done.stdout
        assert "terminated 1 instance(s) and deleted 1 security group(s)" in done.stdout
        assert set(_alive(client, [alices_live, alices_stale, mine_elsewhere, mine_dead, live_id])) == {
            alices_live, alices_stale, mine_elsewhere, live_id}
        assert _groups(client, [*groups, live_group]) == {alices_group, held_group, live_group}
        assert pool.live_nodes  # the live pool still works
    finally:
        first.down()
        client.terminate_instances(InstanceIds=[alices_live, alices_stale, mine_elsewhere])
        for g in groups:
            try:
                client.delete_security_group(GroupId=g)
            except Exception:
                pass


def _groups(client, ids) -> set:
    return {g["GroupId"] for g in client.describe_security_groups()["SecurityGroups"] if g["GroupId"] in ids}


def _tags(client, instance_id) -> dict:
    described = client.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    return {t["Key"]: t["Value"] for t in described.get("Tags", [])}


def test_the_key_pair_of_another_machine_survives(aws, tmp_path):
    from lepton_magic.aws import launch
    from lepton_magic.aws.identity import key_pair_name

    client = ec2_client(aws)
    public = _public_key(tmp_path)
    for name in ("lepton-us-east-1", "lepton-bob-0123456789-us-east-1"):  # the old shared name; bob's machine
        if not client.describe_key_pairs(Filters=[{"Name": "key-name", "Values": [name]}])["KeyPairs"]:
            client.import_key_pair(KeyName=name, PublicKeyMaterial=public)
    said = []
    (tmp_path / "here").mkdir()
    name, path = launch.ensure_key_pair(client, "us-east-1", tmp_path / "here", said.append)
    assert name == key_pair_name("us-east-1", tmp_path / "here") and name.startswith("lepton-")
    assert os.stat(path).st_mode & 0o777 == 0o600
    names = {k["KeyName"] for k in client.describe_key_pairs()["KeyPairs"]}
    assert {"lepton-us-east-1", "lepton-bob-0123456789-us-east-1", name} <= names
    # Our own pair whose private key we lost: replaced, saying so.
    os.unlink(path)
    again, _ = launch.ensure_key_pair(client, "us-east-1", tmp_path / "here", said.append)
    assert again == name and os.path.exists(path) and "replacing the key pair this machine made" in said[-1]
    # A pair of our name that this machine did not create (imported by hand): refused, left alone.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    theirs = key_pair_name("us-east-1", elsewhere)
    client.import_key_pair(KeyName=theirs, PublicKeyMaterial=public)
    with pytest.raises(LeptonError, match=f"the key pair {theirs} in us-east-1 was not created here .* left alone"):
        launch.ensure_key_pair(client, "us-east-1", elsewhere, said.append)
    assert client.describe_key_pairs(KeyNames=[theirs])["KeyPairs"]
    assert {"lepton-us-east-1", "lepton-bob-0123456789-us-east-1"} <= {
        k["KeyName"] for k in client.describe_key_pairs()["KeyPairs"]}


def _public_key(tmp_path) -> bytes:
    key = tmp_path / "some_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return (tmp_path / "some_key.pub").read_bytes()


def test_the_pool_group_keeps_only_the_callers_current_address(aws):
    from lepton_magic.aws import launch

    client = ec2_client(aws)
    group = launch.ensure_pool_group(client, "p-moving", "198.51.100.7/32")
    assert launch.ensure_pool_group(client, "p-moving", "203.0.113.9/32") == group  # the caller moved
    rules = client.describe_security_groups(GroupIds=[group])["SecurityGroups"][0]["IpPermissions"]
    ssh = [r["CidrIp"] for p in rules if p.get("FromPort") == 22 for r in p["IpRanges"]]
    assert ssh == ["203.0.113.9/32"]
    assert any(p.get("GroupId") == group for r in rules for p in r.get("UserIdGroupPairs", []))
    other = launch.ensure_pool_group(client, "p-someone-else", "192.0.2.1/32")
    assert other != group  # another pool's instances do not share its ports
    assert launch.delete_group(client, group) and launch.delete_group(client, other)


def test_other_machines_for_an_existing_pool_are_refused(aws, sshd, tmp_path):
    session = ec2_session(aws, sshd, tmp_path, preload="")
    try:
        pool = session.up(nodes=1)
        session.up(nodes=1, ec2_instance_type="g5.xlarge")  # the same: fine
        with pytest.raises(LeptonError) as info:
            session.up(nodes=1, ec2_instance_type="g6.xlarge", ec2_spot=True)
        assert str(info.value) == (f"pool {pool.id} runs instance type g5.xlarge, spot False, not --instance-type "
                                   "g6.xlarge, --spot True: release it first (%lepton down --backend ec2), "
                                   "then start the new one")
        assert pool.settings["ec2_instance_type"] == "g5.xlarge" and len(pool.live_nodes) == 1
    finally:
        session.down()


def test_no_account_id_no_backend(aws, tmp_path):
    """STS failing (here: refused by the test) is one clear error, never a bucket named after
    the local user."""
    import boto3.session
    from botocore.exceptions import ClientError

    from lepton_magic.backends.ec2 import Ec2Backend

    def refuse(**kwargs):
        raise ClientError({"Error": {"Code": "ExpiredToken", "Message": "the token expired"}}, "GetCallerIdentity")

    original = boto3.session.Session.client

    def client(self, name, *args, **kwargs):
        made = original(self, name, *args, **kwargs)
        if name == "sts":
            made.meta.events.register("before-call.sts.GetCallerIdentity", refuse)
        return made

    boto3.session.Session.client = client
    try:
        with pytest.raises(LeptonError, match=r"^cannot read your AWS account id \(STS GetCallerIdentity failed: "
                                              r".*ExpiredToken.*\); the ec2 backend needs working AWS credentials"):
            Ec2Backend({"ec2_endpoint_url": aws, "home": str(tmp_path)})
    finally:
        boto3.session.Session.client = original

