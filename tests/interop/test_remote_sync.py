"""push and pull through a real S3 server: two stores play two hosts of one fleet.

The instance moves with its EK, NV contents and snapshots; a second push of
an unchanged instance uploads nothing; what the bucket holds is never
plaintext TPM state; and every way a pull can find the remote damaged or
unreachable leaves the pulling host's store exactly as it was.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from remote_helpers import Host, hosts, tree, write_key
from s3_server import READER, S3Server

from vtpmctl.store.blob import AesKey, unwrap_file
from vtpmctl.store.keys import key_fingerprint

pytestmark = pytest.mark.timeout(180)

NV = "0x1500016"
EK_RSA = "0x81010001"
MARKER = b"fleet-nv-marker!"


@pytest.fixture
def fleet(
    tmp_path: Path, s3: S3Server, s3_bucket: str, capsys: pytest.CaptureFixture[str]
) -> Iterator[list[Host]]:
    """Two hosts that both know remote ``r`` (one bucket, one fleet key)."""
    key = write_key(tmp_path / "fleet.key", os.urandom(32))
    with hosts(tmp_path, s3, capsys) as found:
        for host in found:
            host.run(
                "remote", "add", "r", f"s3://{s3_bucket}/fleet", "--endpoint", s3.endpoint,
                "--key-file", str(key),
            )  # fmt: skip
        yield found


def ek_public(host: Host, name: str) -> str:
    return host.home.tpm2(name, "readpublic", "-c", EK_RSA).stdout.decode()


def make_vm(host: Host, name: str = "vm") -> str:
    """An encrypted instance with a marker in NV and two snapshots; returns its EK public."""
    host.run("create", name, "--encrypt")
    host.run("start", name)
    host.run("ctl", name, "init")
    host.home.tpm2(name, "startup", "-c")
    host.home.tpm2(
        name, "nvdefine", NV, "-C", "o", "-s", str(len(MARKER)), "-a", "ownerread|ownerwrite"
    )
    host.home.tpm2(name, "nvwrite", NV, "-C", "o", "-i", "-", input=MARKER)
    ek = ek_public(host, name)
    host.run("stop", name)
    host.run("snapshot", "create", name, "--label", "first")
    host.run("snapshot", "create", name, "--label", "second")
    return ek


def test_push_pull_start_with_the_same_ek_and_nv(
    fleet: list[Host], s3: S3Server, s3_bucket: str
) -> None:
    a, b = fleet
    ek = make_vm(a)

    first = a.json("push", "vm")
    assert first["generation"] == 1 and first["uploaded"] == first["objects"] > 0
    assert first["snapshots"] == 2 and first["source_state"] == "stopped"
    again = a.json("push", "vm", "r")
    assert again["generation"] == 2 and again["uploaded"] == 0 and again["uploaded_bytes"] == 0

    # nothing in the bucket is plaintext state: objects open only with the state key
    objects = s3.keys(s3_bucket, "fleet/instances/vm/objects/")
    assert objects and all(MARKER not in data for data in objects.values())
    state_key = a.home.registry().get("vm").paths.state_key.read_text().strip()
    key = AesKey(bytes.fromhex(state_key))
    assert {k.split("/")[-2] for k in objects} == {key_fingerprint(key)}
    for data in objects.values():
        unwrap_file(data, key)  # HMAC and decryption check out
    blob = b"".join(s3.keys(s3_bucket).values())
    assert state_key.encode() not in blob and key.material not in blob

    listed = b.json("remote", "ls")
    (entry,) = listed["instances"]
    assert entry["name"] == "vm" and entry["generation"] == 2 and entry["snapshots"] == 2
    assert entry["lease"]["state"] == "none" and entry["size"] > 0

    pulled = b.json("pull", "vm")
    assert pulled["name"] == "vm" and pulled["generation"] == 2 and pulled["encrypted"]
    assert [s["label"] for s in b.json("snapshot", "list", "vm")["snapshots"]] == [
        "first",
        "second",
    ]
    b.run("verify", "vm")
    b.run("start", "vm")
    b.run("ctl", "vm", "init")
    b.home.tpm2("vm", "startup", "-c")
    assert ek_public(b, "vm") == ek
    assert b.home.tpm2("vm", "nvread", NV, "-C", "o", "-s", str(len(MARKER))).stdout == MARKER
    b.run("stop", "vm")
    # the EK data travelled (the CA certificate is each host's own, as with a bundle)
    exported = [h.json("ek", "export", "vm") for h in (a, b)]
    for record in exported:
        record.pop("ca_certificate_pem")
    assert exported[0] == exported[1]

    # pulled again under another name, through migrate import s3://…
    imported = b.json("migrate", "import", f"s3://{s3_bucket}/fleet/vm", "--name", "vm2")
    assert imported["name"] == "vm2" and imported["source_name"] == "vm"
    code, _, err = b.run("pull", "vm", check=False)
    assert code == 1 and "exists already" in err


def test_plaintext_needs_consent(fleet: list[Host], s3: S3Server, s3_bucket: str) -> None:
    a, b = fleet
    a.run("create", "clear", "--no-ek")
    code, _, err = a.run("push", "clear", check=False)
    assert code == 1 and "--allow-plaintext" in err
    assert s3.keys(s3_bucket, "fleet/instances/") == {}
    assert a.json("push", "clear", "--allow-plaintext")["generation"] == 1
    pulled = b.json("pull", "clear")
    assert not pulled["encrypted"]


def test_a_damaged_remote_changes_nothing_here(
    fleet: list[Host], s3: S3Server, s3_bucket: str
) -> None:
    a, b = fleet
    a.run("create", "vm", "--encrypt", "--no-ek")
    a.run("snapshot", "create", "vm")
    a.json("push", "vm")
    c = s3.client()
    originals = s3.keys(s3_bucket, "fleet/instances/vm/")
    before = tree(b.path)

    def refused(text: str) -> None:
        code, _, err = b.run("pull", "vm", check=False)
        assert code == 1 and text in err, err
        assert err.count("\n") == 1
        assert tree(b.path) == before
        assert b.json("list")["instances"] == []

    def put(key: str, data: bytes) -> None:
        c.put_object(Bucket=s3_bucket, Key=key, Body=data)

    for key, data in originals.items():
        if "/objects/" not in key:
            continue
        put(key, data[:-7])  # truncated
        refused("truncated or altered")
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 1
        put(key, bytes(flipped))  # one bit flipped, same size
        refused("corrupt")
        c.delete_object(Bucket=s3_bucket, Key=key)
        refused("is missing")
        put(key, data)
    index_key = "fleet/instances/vm/index.json"
    put(index_key, originals[index_key].replace(b'"generation":1', b'"generation":7'))
    refused("fails authentication")
    (kkey,) = [k for k in originals if "/keys/" in k]
    put(kkey, originals[kkey].replace(b'"sealed":"', b'"sealed":"00', 1))
    put(index_key, originals[index_key])
    refused("does not open with the fleet key")
    put(kkey, originals[kkey])
    # another instance's key object in its place
    a.run("create", "other", "--encrypt", "--no-ek")
    a.json("push", "other")
    other = s3.keys(s3_bucket, "fleet/instances/other/keys/")
    put(kkey, next(iter(other.values())))
    refused("not the key object of instance vm")
    put(kkey, originals[kkey])
    assert b.json("pull", "vm")["name"] == "vm"


def test_no_access_changes_nothing_here(fleet: list[Host], s3: S3Server, s3_bucket: str) -> None:
    a, b = fleet
    a.run("create", "vm", "--encrypt", "--no-ek")
    before_a, before_b = tree(a.path), tree(b.path)
    wrong = s3.env((s3.env()["AWS_ACCESS_KEY_ID"], "wrong-secret"))
    code, _, err = a.run("push", "vm", check=False, env=wrong)
    assert code == 77 and "refused the credentials" in err and s3_bucket in err
    code, _, err = a.run("push", "vm", check=False, env=s3.env(READER))
    assert code == 77 and "access denied" in err
    code, _, err = b.run("pull", "vm", check=False, env=wrong)
    assert code == 77 and "refused the credentials" in err
    code, _, err = b.run("pull", "vm", check=False)
    assert code == 1 and "there is no instance vm" in err
    assert tree(a.path) == before_a and tree(b.path) == before_b
    assert s3.keys(s3_bucket, "fleet/instances/") == {}

    # the endpoint stops answering (the remote's record points at a closed port)
    for host in (a, b):
        conf = host.path / "etc" / "remotes.json"
        conf.write_text(conf.read_text().replace(s3.endpoint, "http://127.0.0.1:9"))
    before_a, before_b = tree(a.path), tree(b.path)
    code, _, err = a.run("push", "vm", check=False)
    assert code == 75 and "cannot reach http://127.0.0.1:9" in err and s3_bucket in err
    code, _, err = b.run("pull", "vm", check=False)
    assert code == 75 and "cannot reach" in err
    assert tree(a.path) == before_a and tree(b.path) == before_b
    for host in (a, b):
        conf = host.path / "etc" / "remotes.json"
        conf.write_text(conf.read_text().replace("http://127.0.0.1:9", s3.endpoint))
    before_a, before_b = tree(a.path), tree(b.path)

    # the bucket goes away
    c = s3.client()
    for key in s3.keys(s3_bucket):
        c.delete_object(Bucket=s3_bucket, Key=key)
    c.delete_bucket(Bucket=s3_bucket)
    code, _, err = a.run("push", "vm", check=False)
    assert code == 1 and f"bucket {s3_bucket} does not exist" in err and "aws s3 mb" in err
    code, _, err = b.run("pull", "vm", check=False)
    assert code == 1 and f"bucket {s3_bucket} does not exist" in err
    code, _, err = b.run("remote", "ls", check=False)
    assert code == 1 and f"bucket {s3_bucket} does not exist" in err
    assert tree(a.path) == before_a and tree(b.path) == before_b


def test_fleet_key_rotation_rewraps_only_the_key_objects(
    fleet: list[Host], s3: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    a, b = fleet
    a.run("create", "vm", "--encrypt", "--no-ek")
    a.run("create", "clear", "--no-ek")
    a.json("push", "vm")
    a.json("push", "clear", "--allow-plaintext")
    before = s3.keys(s3_bucket)
    new = write_key(tmp_path / "new.key", os.urandom(32))
    done = a.json("remote", "rotate-key", "r", "--new-key-file", str(new))
    assert done["key_objects"] == 2 and done["fleet_key"] != done["old_fleet_key"]
    after = s3.keys(s3_bucket)
    changed = {k for k in before if before[k] != after.get(k)}
    assert after.keys() == before.keys()
    assert changed == {"fleet/fleet.json"} | {k for k in before if "/keys/" in k}
    for k in changed - {"fleet/fleet.json"}:
        assert done["old_fleet_key"] not in after[k].decode()
    assert a.json("remote", "list")["remotes"][0]["fleet_key"] == done["fleet_key"]
    # a second run finds nothing left to do
    assert a.json("remote", "rotate-key", "r", "--new-key-file", str(new))["key_objects"] == 2
    assert s3.keys(s3_bucket) == after

    # the host with the old key is told what happened, then joins with the new key
    code, _, err = b.run("pull", "vm", check=False)
    assert code == 1 and "it was rotated" in err and done["fleet_key"] in err
    b.run("remote", "rm", "r")
    b.run(
        "remote", "add", "r", f"s3://{s3_bucket}/fleet", "--endpoint", s3.endpoint,
        "--key-file", str(new),
    )  # fmt: skip
    assert b.json("pull", "vm")["encrypted"]
    a.json("push", "vm")  # the rotating host goes on pushing


def test_a_push_cut_short_shows_the_old_instance_and_resumes(
    fleet: list[Host], s3: S3Server, s3_bucket: str
) -> None:
    """The server dies in the middle of a push: a reader sees the previous push, whole;
    the next push uploads only what is missing and publishes the new one."""
    import subprocess
    import sys
    import time

    from instance_helpers import DataClient, nv_define, nv_write_cmd

    a, b = fleet
    prefix = "fleet/instances/vm/"
    a.run("create", "vm", "--encrypt", "--no-ek")
    a.json("push", "vm")
    old_index = s3.keys(s3_bucket, prefix + "index.json")
    old_objects = set(s3.keys(s3_bucket, prefix + "objects/"))

    # snapshots of a dozen different states: a dozen new objects to upload
    a.run("start", "vm")
    a.run("ctl", "vm", "init")
    status = a.json("status", "vm")
    with DataClient(Path(status["endpoints"]["data"][5:])) as tpm:
        tpm.transact(bytes.fromhex("80010000000c000001440000"))  # Startup(CLEAR)
        nv_define(tpm.transact)
        for i in range(12):
            tpm.transact(nv_write_cmd(i.to_bytes(8, "big")))
            a.run("snapshot", "create", "vm")
    a.run("stop", "vm")

    env = dict(s3.env(), VTPMCTL_HOME=str(a.path))
    vtpmctl = str(Path(sys.executable).with_name("vtpmctl"))
    push = subprocess.Popen(
        [vtpmctl, "push", "vm"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    watcher = s3.client()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and push.poll() is None:
            listing = watcher.list_objects_v2(Bucket=s3_bucket, Prefix=prefix + "objects/")
            if len(listing.get("Contents", [])) > len(old_objects):
                break
            time.sleep(0.005)
        s3.kill()  # the session's server: started again below, same dirs and ports
        push.wait(60)
    finally:
        if not s3.running:
            s3.start()
    cut = push.returncode != 0
    if cut:
        err = push.stderr.read().decode()
        assert push.returncode == 75 and "try again" in err, err  # refused, or a 5xx
        assert s3.keys(s3_bucket, prefix + "index.json") == old_index  # the old one, whole
        assert b.json("pull", "vm")["snapshots"] == 0
        b.run("rm", "vm", "--yes")
        # what the crash left (SIGKILL may lose the last writes, or keep them cut off)
        left = {
            k: v for k, v in s3.keys(s3_bucket, prefix + "objects/").items() if k not in old_objects
        }
    resumed = a.json("push", "vm")
    assert resumed["snapshots"] == 12
    if cut:
        # what made it whole is not uploaded again; a cut-off object is (new bytes: a new IV)
        after = s3.keys(s3_bucket, prefix + "objects/")
        intact = [k for k, v in left.items() if after[k] == v]
        # exactly the others are uploaded (the first push's object may still be in use)
        skipped = resumed["objects"] - resumed["uploaded"] - len(intact)
        assert skipped in (0, len(old_objects)), (resumed, len(intact))
    assert b.json("pull", "vm")["snapshots"] == 12
