"""The lease object and the replication files: their bytes, and what a reader refuses.

The conditional writes themselves run against a real S3 server in
tests/interop/test_remote_lease.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vtpmctl.errors import EXIT_LEASE_HELD, EXIT_LEASE_LOST, LeaseHeld, LeaseLost
from vtpmctl.store.lease import LeaseError, LeaseRecord, Replica, host_id, iso
from vtpmctl.store.replication import Binding, ReplicationFileError, ReplicationStatus


def record(**changes: object) -> LeaseRecord:
    base: dict[str, object] = {
        "holder": "hv1-0a1b2c3d",
        "generation": 3,
        "expires_ms": 1_800_000_000_000,
        "renewed_ms": 1_799_999_980_000,
        "nonce": "00",
        "replica": Replica("p/instances/vm/objects/k/ab", "ab" * 32, 1468, 7, 1, 3),
    }
    base.update(changes)
    return LeaseRecord(**base)  # type: ignore[arg-type]


def test_lease_record_round_trips_and_says_when_it_is_free() -> None:
    rec = record()
    assert LeaseRecord.from_bytes(rec.to_bytes(), "x") == rec
    doc = json.loads(rec.to_bytes())
    assert doc["format_version"] == 1 and doc["replica"]["seq"] == 7
    assert not rec.released and not rec.expired(rec.expires_ms - 1) and rec.expired(rec.expires_ms)
    released = record(expires_ms=0, replica=None)
    assert released.released and released.expired(0)
    assert LeaseRecord.from_bytes(released.to_bytes(), "x").replica is None
    assert iso(1_800_000_000_000) == "2027-01-15T08:00:00Z"


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"[]",
        b'{"format_version": 2}',
        json.dumps({"format_version": 1, "holder": "h", "generation": "3"}).encode(),
    ],
)
def test_a_malformed_lease_is_an_error_naming_it(data: bytes) -> None:
    with pytest.raises(LeaseError, match="s3://b/k is malformed"):
        LeaseRecord.from_bytes(data, "s3://b/k")


def test_lease_errors_have_their_own_exit_codes() -> None:
    assert (LeaseHeld.exit_code, LeaseLost.exit_code) == (EXIT_LEASE_HELD, EXIT_LEASE_LOST)
    assert len({0, 1, 2, 3, 4, EXIT_LEASE_HELD, EXIT_LEASE_LOST}) == 7


def test_host_id_is_made_once_per_store(tmp_path: Path) -> None:
    root = tmp_path / "etc"
    assert host_id(root, create=False) == ""
    assert not root.exists()  # asking never writes
    made = host_id(root)
    assert made and host_id(root) == made == host_id(root, create=False)
    assert (root / "host-id").stat().st_mode & 0o777 == 0o644
    assert host_id(tmp_path / "other") != made


def test_binding_and_status_files(tmp_path: Path) -> None:
    path = tmp_path / "remote.json"
    assert Binding.read(path) is None
    b = Binding("r")
    assert (b.interval_ms, b.lease_ms, b.renew_every_ms) == (5000, 60000, 20000)
    b.write(path)
    assert Binding.read(path) == b
    path.write_text('{"format_version": 1, "remote": 5}')
    with pytest.raises(ReplicationFileError, match="remote.json is malformed"):
        Binding.read(path)
    st = ReplicationStatus("r", "h", 1, 0, pending_since_ms=1000)
    assert st.lag_seconds(3500) == 2.5
    st.pending_since_ms = None
    assert st.lag_seconds(3500) == 0.0
