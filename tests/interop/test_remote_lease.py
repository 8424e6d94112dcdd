"""One owner across hosts, and continuous replication, on a real S3 server (SeaweedFS).

Two VTPMCTL_HOMEs play two hosts of one remote (one fleet key). Host A
pushes an instance, host B pulls it (same seeds and state key), and both
start it bound to the remote. Leases are short here (seconds), so expiry and
take-over fit in a test.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from instance_helpers import DataClient, Home, home_at, nv_define, nv_read, nv_write_cmd, rc
from s3_server import S3Server, s3_server

from vtpmctl.engine import tpm2 as t
from vtpmctl.errors import EXIT_LEASE_HELD, EXIT_LEASE_LOST, LeaseLost
from vtpmctl.store.blob import unwrap_file
from vtpmctl.store.keys import KeyFormat, load_key
from vtpmctl.store.lease import Held, Lease, LeaseRecord, host_id
from vtpmctl.store.paths import store_roots
from vtpmctl.store.remote import layout
from vtpmctl.store.remote.client import RemoteClient
from vtpmctl.store.remote.config import RemoteRegistry

NAME = "vm"
LEASE = "2"  # seconds
INTERVAL = "0.5"


class Host:
    """One host: a vtpmctl store with the remote ``r`` added (``remote add``, one fleet key)."""

    def __init__(self, home: Home, s3: S3Server, bucket: str, fleet_key: Path) -> None:
        self.home = home
        self.s3 = s3
        # s3.env() is all of os.environ: the host's own store must win over a caller's.
        self.env = {**s3.env(), "VTPMCTL_HOME": str(home.path)}
        url = f"s3://{bucket}/fleet"
        self.run("remote", "add", "r", url, "--endpoint", s3.endpoint, "--key-file", str(fleet_key))
        roots = store_roots({"VTPMCTL_HOME": str(home.path)})
        self.remote = RemoteRegistry(roots).get("r")
        self.id = host_id(roots.config)

    def run(self, *args: str, check: bool = True) -> Any:
        import subprocess

        from instance_helpers import VTPMCTL

        result = subprocess.run(
            [*VTPMCTL, *args], env=self.env, capture_output=True, text=True, timeout=60
        )
        if check and result.returncode != 0:
            raise AssertionError(f"vtpmctl {' '.join(args)}: {result.returncode} {result.stderr}")
        return result

    def start(self, *extra: str, check: bool = True) -> Any:
        return self.run(
            "start",
            NAME,
            "--replicate",
            "r",
            "--replicate-interval",
            INTERVAL,
            "--lease-duration",
            LEASE,
            "--lease-renew",
            "0.4",
            *extra,
            check=check,
        )

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.run("status", NAME, "--json", check=False).stdout)
        return data

    def data(self) -> DataClient:
        return DataClient(self.home.registry().paths(NAME).data_socket)

    def boot(self) -> DataClient:
        self.run("ctl", NAME, "init")
        client = self.data()
        t.startup(client.transact)
        return client

    def lease(self) -> Lease:
        old = os.environ.copy()
        os.environ.update(self.s3.env())
        try:
            client = RemoteClient(self.remote)
        finally:
            os.environ.clear()
            os.environ.update(old)
        return Lease(client, self.remote.key(layout.lease_name(NAME)), self.id, NAME)


def one_line(result: Any, code: int, *words: str) -> str:
    assert result.returncode == code, (result.returncode, result.stderr)
    err: str = result.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


def lease_record(host: Host) -> LeaseRecord:
    held = host.lease().read()
    assert held is not None
    return held.record


def fleet_key(tmp_path: Path) -> Path:
    path = tmp_path / "fleet.key"
    path.write_text(os.urandom(32).hex())
    path.chmod(0o600)
    return path


@pytest.fixture
def hosts(s3: S3Server, s3_bucket: str, tmp_path: Path) -> Iterator[tuple[Host, Host]]:
    """Host A makes an instance (encrypted at rest) and pushes it; host B pulls it."""
    key = fleet_key(tmp_path)
    with home_at(tmp_path / "a") as a_home, home_at(tmp_path / "b") as b_home:
        a_home.run("create", NAME, "--no-ek", "--encrypt")
        a, b = Host(a_home, s3, s3_bucket, key), Host(b_home, s3, s3_bucket, key)
        a.run("push", NAME, "r")
        b.run("pull", NAME, "r")
        yield a, b


def test_one_owner_take_over_and_fencing(hosts: tuple[Host, Host]) -> None:
    a, b = hosts
    a.start()
    first = lease_record(a)
    assert first.holder == a.id and first.generation == 1 and not first.released

    # B is refused while A runs, with who and until when, and its own exit code.
    err = one_line(b.start(check=False), EXIT_LEASE_HELD, a.id, "until", "stop it there")
    assert "Z" in err  # the expiry, in UTC
    one_line(b.start("--take-over", check=False), EXIT_LEASE_HELD, a.id)
    assert b.status()["state"] == "stopped"

    # A's daemon stalls (SIGSTOP) past its lease: only --take-over takes it then.
    a_pid = a.status()["pid"]
    os.kill(a_pid, signal.SIGSTOP)
    try:
        time.sleep(float(LEASE) + 0.5)
        one_line(b.start(check=False), EXIT_LEASE_HELD, "expired", "--take-over")
        b.start("--take-over")
    finally:
        os.kill(a_pid, signal.SIGCONT)
    taken = lease_record(b)
    assert taken.holder == b.id and taken.generation == first.generation + 1

    # Fencing: A's daemon wakes up, its TPM changes, and its push is refused.
    with a.boot() as tpm:
        nv_define(tpm.transact)
        assert rc(tpm.transact(nv_write_cmd(b"LOSTLOST"))) == 0
    deadline = time.monotonic() + 10
    while not (a.status()["replication"]["lease"] or {}).get("lost"):
        assert time.monotonic() < deadline, a.status()["replication"]
        time.sleep(0.1)
    after = lease_record(b)
    assert (after.holder, after.generation) == (b.id, taken.generation)
    assert after.replica == taken.replica  # nothing of A's reached what B reads
    rep = a.status()["replication"]
    assert b.id in rep["error"] and rep["lag_seconds"] > 0

    # The same refusal, by hand: a write on the lease as A last had it.
    with pytest.raises(LeaseLost) as lost:
        a.lease().renew(Held(first, '"stale"'), 3)
    assert lost.value.exit_code == EXIT_LEASE_LOST and b.id in str(lost.value)

    # Nor does a `push` from A publish its state over B's.
    one_line(a.run("push", NAME, "r", check=False), EXIT_LEASE_HELD, b.id)

    # A stops (nothing to release) and cannot start again while B runs; B's stop
    # releases the lease, and then A takes it without --take-over.
    a.run("stop", NAME)
    one_line(a.start(check=False), EXIT_LEASE_HELD, b.id)
    b.run("stop", NAME)
    released = lease_record(b)
    assert released.released and released.holder == b.id
    a.start()
    assert lease_record(a).generation == taken.generation + 1

    # A live migration: A hands the lease to B while it runs; B starts without
    # --take-over, A's daemon stops pushing.
    a.run("migrate", "hand-over", NAME, b.id)
    one_line(a.run("push", NAME, "r", check=False), EXIT_LEASE_HELD, b.id)
    b.start()
    moved = lease_record(b)
    assert (moved.holder, moved.generation) == (b.id, taken.generation + 2)
    deadline = time.monotonic() + 10
    while not (a.status()["replication"]["lease"] or {}).get("lost"):
        assert time.monotonic() < deadline, a.status()["replication"]
        time.sleep(0.1)
    a.run("stop", NAME)
    b.run("stop", NAME)
    b.run("push", NAME, "r")  # the last holder may push; the index names its generation
    index = b.lease().client.get(b.remote.key(layout.index_name(NAME)))
    assert json.loads(index)["lease_generation"] == moved.generation


def test_replication_survives_kill9_and_a_dead_remote(
    hosts: tuple[Host, Host], tmp_path: Path
) -> None:
    a, b = hosts
    a.start()
    with a.boot() as tpm:
        nv_define(tpm.transact)
        assert rc(tpm.transact(nv_write_cmd(b"AAAAAAAA"))) == 0
        written = time.monotonic()
        deadline = written + 10
        while time.monotonic() < deadline:
            rep = lease_record(a).replica
            st = a.status()["replication"]
            if rep is not None and st["lag_seconds"] == 0 and rep.seq >= 2:
                break
            time.sleep(0.1)
        lag = time.monotonic() - written
        assert lag < float(INTERVAL) + 2, lag
        assert rc(tpm.transact(nv_write_cmd(b"BBBBBBBB"))) == 0
        time.sleep(float(INTERVAL) + 1)
        pushed = lease_record(a).replica
        assert pushed is not None
    st = a.status()
    assert st["replication"]["remote"] == "r" and st["replication"]["lag_seconds"] == 0
    assert st["replication"]["lease"]["holder"] == a.id

    os.kill(st["pid"], signal.SIGKILL)
    time.sleep(float(LEASE) + 0.3)
    started = b.start("--take-over")
    assert "took its permanent state from the remote" in started.stderr
    with b.boot() as tpm:
        assert nv_read(tpm.transact) == b"BBBBBBBB"
    b.run("stop", NAME)


def test_daemon_keeps_serving_when_its_remote_goes_away(tmp_path: Path) -> None:
    """A server of its own, killed under a replicating daemon and brought back: the
    daemon serves throughout and replicates what changed meanwhile once it returns."""
    with s3_server(tmp_path / "s3") as s3, home_at(tmp_path / "a") as home:
        bucket = s3.make_bucket()
        a = Host(home, s3, bucket, fleet_key(tmp_path))
        one_line(a.run("create", "x", "--replicate", "nope", check=False), 1, "no remote named")
        assert "x" not in a.run("list", "--quiet").stdout.split()  # nothing was made
        a.run(
            "create", NAME, "--no-ek", "--encrypt", "--replicate", "r",
            "--replicate-interval", INTERVAL, "--lease-duration", LEASE, "--lease-renew", "0.4",
        )  # fmt: skip
        a.run("start", NAME)  # bound at create: the binding is kept
        with a.boot() as tpm:
            nv_define(tpm.transact)
            s3.kill()
            assert rc(tpm.transact(nv_write_cmd(b"CCCCCCCC"))) == 0
            deadline = time.monotonic() + 20
            while True:
                rep = a.status()["replication"]
                if rep["error"] and rep["lag_seconds"] >= 1.5:
                    break
                assert time.monotonic() < deadline, rep
                time.sleep(0.2)
            assert "cannot reach" in rep["error"], rep
            assert nv_read(tpm.transact) == b"CCCCCCCC"  # still serving
            assert rc(tpm.transact(nv_write_cmd(b"DDDDDDDD"))) == 0
            human = a.run("status", NAME).stdout
            assert "replication lag" in human and "remote error" in human
            s3.start()  # the same data and port: the remote is back
            deadline = time.monotonic() + 60
            while True:
                rep = a.status()["replication"]
                if not rep["error"] and rep["lag_seconds"] == 0:
                    break
                assert time.monotonic() < deadline, rep
                time.sleep(0.2)
            assert nv_read(tpm.transact) == b"DDDDDDDD"
        # The remote holds the state as it is here now, written while it was away.
        replica = lease_record(a).replica
        assert replica is not None
        paths = a.home.registry().paths(NAME)
        key = load_key(paths.state_key, kind=KeyFormat.HEX)
        stored = unwrap_file(s3.keys(bucket)[replica.key], key)
        assert replica.sha256 == hashlib.sha256(stored).hexdigest()
        assert stored == unwrap_file((paths.state_dir / "tpm2-00.permall").read_bytes(), key)
        one_line(a.run("remote", "unbind", NAME, check=False), 1, "running", "stop it first")
        s3.kill()
        stopped = time.monotonic()
        a.run("stop", NAME)  # the lease cannot be released: it expires
        assert time.monotonic() - stopped < 8
        # Unbound, it runs here alone: no lease to take, no remote to reach.
        assert "no longer replicates to r" in a.run("remote", "unbind", NAME).stdout
        one_line(a.run("remote", "unbind", NAME, check=False), 1, "not bound")
        a.run("start", NAME)
        assert a.status()["replication"] is None
        a.run("stop", NAME)
