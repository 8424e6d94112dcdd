"""remote gc through a real S3 server: what no index or lease names goes, nothing else.

Three pushes with changes in between leave an old state object that no index
names; a dry run only reports it; the age guard keeps it (and a fresh object
a push could be uploading); ``--older-than 0`` deletes exactly it, and the
instance still pulls with its NV and snapshots. A damaged index stops gc
before it deletes anything.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from remote_helpers import Host
from s3_server import S3Server
from test_remote_sync import NV, fleet, make_vm  # noqa: F401  (fleet is a fixture)

from vtpmctl.store.lease import LeaseRecord, Replica

pytestmark = pytest.mark.timeout(180)

PREFIX = "fleet/instances/"
MARKERS = (b"second-nv-marker", b"third-nv-marker!")


def write_nv(host: Host, marker: bytes) -> None:
    host.run("start", "vm")
    host.run("ctl", "vm", "init")
    host.home.tpm2("vm", "startup", "-c")
    host.home.tpm2("vm", "nvwrite", NV, "-C", "o", "-i", "-", input=marker)
    host.run("stop", "vm")


def test_gc_deletes_only_unreferenced_old_objects(
    fleet: list[Host],  # noqa: F811
    s3: S3Server,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    a, b = fleet
    make_vm(a)  # snapshots "first" and "second" hold the first state
    a.json("push", "vm")
    write_nv(a, MARKERS[0])
    a.run("snapshot", "create", "vm", "--label", "third")
    a.json("push", "vm")
    write_nv(a, MARKERS[1])
    a.run("snapshot", "rm", "vm", "first")
    a.run("snapshot", "rm", "vm", "second")
    a.json("push", "vm")  # names the third state and snapshot "third": the first is garbage

    c = s3.client()
    index_key = PREFIX + "vm/index.json"
    index_bytes = s3.keys(s3_bucket, index_key)[index_key]
    index = json.loads(index_bytes)
    objects_prefix = f"{PREFIX}vm/objects/{index['keyid']}/"
    live = {objects_prefix + d for d in index["objects"]}
    dead = set(s3.keys(s3_bucket, objects_prefix)) - live
    assert dead and live

    # a lease's replica pins an object no index names; names vtpmctl does not write stay
    pinned_body = b"replicated state"
    pinned = f"{PREFIX}ghost/objects/plain/{hashlib.sha256(pinned_body).hexdigest()}"
    c.put_object(Bucket=s3_bucket, Key=pinned, Body=pinned_body)
    replica = Replica(pinned, hashlib.sha256(pinned_body).hexdigest(), 16, 1, 0, 1)
    lease = LeaseRecord("host-x", 1, 0, 0, "n", replica)
    c.put_object(Bucket=s3_bucket, Key=PREFIX + "ghost/lease", Body=lease.to_bytes())
    for odd in (objects_prefix + "README", "fleet/notes.txt", PREFIX + "vm/objects/x/y"):
        c.put_object(Bucket=s3_bucket, Key=odd, Body=b"not vtpmctl's")
    before = s3.keys(s3_bucket)

    # an index that fails authentication: nothing is deleted, the index is named
    c.put_object(
        Bucket=s3_bucket, Key=index_key, Body=index_bytes.replace(b'"host":"', b'"host":"x')
    )
    code, _, err = a.run("remote", "gc", "--older-than", "0", check=False)
    assert code == 1 and "gc deleted nothing" in err and index_key in err, err
    assert len(err.strip().splitlines()) == 1
    c.put_object(Bucket=s3_bucket, Key=index_key, Body=index_bytes)
    assert s3.keys(s3_bucket) == before

    dry = a.json("remote", "gc", "r", "--older-than", "0", "--dry-run")
    assert dry["dry_run"] and dry["collected"] == len(dead) and dry["kept_recent"] == 0
    assert dry["collected_bytes"] == sum(len(before[k]) for k in dead)
    assert dry["objects"] == len(live) + len(dead) + 1 and dry["live"] == len(live) + 1
    assert dry["instances"] == 2 and dry["unrecognised"] == 2
    assert s3.keys(s3_bucket) == before

    # the default guard (a day) keeps what a push in flight may have uploaded
    kept = a.json("remote", "gc")
    assert kept["collected"] == 0 and kept["kept_recent"] == len(dead)
    assert kept["older_than"] == 86400 and not kept["dry_run"]
    assert s3.keys(s3_bucket) == before

    done = a.json("remote", "gc", "--older-than", "0")
    assert done["collected"] == len(dead) and not done["dry_run"]
    after = s3.keys(s3_bucket)
    assert set(after) == set(before) - dead

    # a fresh unreferenced object is younger than the guard: kept
    fresh_body = b"a push in flight"
    fresh = objects_prefix + hashlib.sha256(fresh_body).hexdigest()
    c.put_object(Bucket=s3_bucket, Key=fresh, Body=fresh_body)
    code, out, _ = a.run("remote", "gc", "--older-than", "3600")
    assert code == 0 and "deleted 0 unreferenced objects" in out
    assert fresh in s3.keys(s3_bucket, objects_prefix)

    b.json("pull", "vm")
    assert [s["label"] for s in b.json("snapshot", "list", "vm")["snapshots"]] == ["third"]
    b.run("start", "vm")
    b.run("ctl", "vm", "init")
    b.home.tpm2("vm", "startup", "-c")
    got = b.home.tpm2("vm", "nvread", NV, "-C", "o", "-s", str(len(MARKERS[1])))
    assert got.stdout == MARKERS[1]
    b.run("stop", "vm")


def test_a_push_uploads_again_an_old_object_no_index_names(
    fleet: list[Host],  # noqa: F811
    s3: S3Server,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A state reverted to one an older push uploaded: gc may be about to delete that
    object (no index names it), so the push uploads it again instead of reusing it."""
    from vtpmctl.usecases import remote as remote_uc

    a, _ = fleet
    a.run("create", "rv", "--encrypt", "--no-ek")
    permall = a.home.registry().paths("rv").state_dir / "tpm2-00.permall"
    first = permall.read_bytes()
    a.json("push", "rv")
    write_nv_define(a, "rv")
    assert permall.read_bytes() != first
    a.json("push", "rv")  # the index names the new state only
    permall.write_bytes(first)  # back to the first state: its object is in the remote
    monkeypatch.setattr(remote_uc, "REVIVE_AGE", 0)  # as if that object were old
    assert a.json("push", "rv")["uploaded"] == 1
    pushed = a.json("push", "rv")  # named by the index now: reused
    assert pushed["uploaded"] == 0, pushed


def write_nv_define(host: Host, name: str) -> None:
    host.run("start", name)
    host.run("ctl", name, "init")
    host.home.tpm2(name, "startup", "-c")
    host.home.tpm2(name, "nvdefine", NV, "-C", "o", "-s", "8", "-a", "ownerread|ownerwrite")
    host.run("stop", name)
