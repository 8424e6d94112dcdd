"""One owner per instance: a lease object in the remote, taken and kept by conditional writes.

The lease of an instance is one small JSON object beside its objects in the
remote. Whoever writes it last with the right precondition holds it:

- the first ``start`` ever creates it with ``If-None-Match: *`` (generation 1);
- every later write (renew, release, take-over, hand-over, and each
  replicated state push) is a PutObject with ``If-Match`` on the ETag the
  writer last saw. The object store answers 412 if anyone wrote it since, so
  of two hosts racing for it exactly one wins, and a host that lost it learns
  so at its next write, which does nothing (fencing).

Each write takes a fresh ``nonce``, so no two writes have the same bytes and
an ETag (an MD5 of the bytes on most stores) is never seen twice.

Clocks only decide *when* a lease counts as expired (``expires_ms`` is the
writer's wall clock plus the duration): skew can make a host take over early,
never make two writes both succeed. docs/remotes.md spells out the guarantees.

The client is the remote's ``RemoteClient`` (``store.remote.client``): a
conditional write that loses raises ``RemoteConflict``; any other failure is
a ``RemoteError`` naming the bucket, the key and the fix.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from vtpmctl.errors import LeaseHeld, LeaseLost, RemoteError, StoreError
from vtpmctl.store import records

if TYPE_CHECKING:
    from vtpmctl.store.remote.client import RemoteClient

FORMAT_VERSION = 1
LEASE_OBJECT = "lease"
DEFAULT_DURATION = 60.0  # seconds a lease lasts unless renewed
HOST_ID_FILE = "host-id"
_RACE_RETRIES = 4


class LeaseError(StoreError):
    """The lease object in the remote is malformed."""


def host_id(config_root: Path, create: bool = True) -> str:
    """This host's name in leases: ``HOSTNAME-RANDOM``, made once per store.

    Kept in the config root, so two stores on one machine (two VTPMCTL_HOMEs)
    are two hosts, and a renamed machine keeps its leases. ``create=False``:
    "" if it was never made (this host never held a lease).
    """
    from vtpmctl.store.atomic import write_atomic
    from vtpmctl.store.dirs import CONFIG_MODE, ensure_dir

    path = config_root / HOST_ID_FILE
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = ""
    if text or not create:
        return text
    ensure_dir(config_root, CONFIG_MODE)
    name = "".join(c if c.isalnum() or c in "-._" else "-" for c in socket.gethostname())
    text = f"{name or 'host'}-{secrets.token_hex(4)}"
    write_atomic(path, (text + "\n").encode(), 0o644)
    return text


def now_ms() -> int:
    return int(time.time() * 1000)


def iso(ms: int) -> str:
    """A lease time for people: UTC, to the second."""
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Replica:
    """The newest permanent state pushed under this lease: an object of the remote."""

    key: str  # object key of the state file's bytes (as stored: encrypted if the instance is)
    sha256: str
    size: int
    seq: int  # counts pushes, across generations
    pushed_ms: int
    generation: int  # the lease generation that pushed it


@dataclass(frozen=True)
class LeaseRecord:
    """The lease object's content."""

    holder: str  # host id of the holder (or of the last holder, once released)
    generation: int  # +1 at every change of holder (take, take-over, hand-over)
    expires_ms: int  # the holder's clock; 0: released
    renewed_ms: int
    nonce: str
    replica: Replica | None = None
    handed_to: str | None = None  # a hand-over in progress: only this host may take it

    @property
    def released(self) -> bool:
        return self.expires_ms == 0

    def expired(self, at_ms: int) -> bool:
        return self.released or at_ms >= self.expires_ms

    def to_bytes(self) -> bytes:
        doc = {"format_version": FORMAT_VERSION, **records.to_json(self)}
        return (json.dumps(doc, indent=1) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> LeaseRecord:
        def fail(what: str) -> Exception:
            return LeaseError(f"lease object {where} is malformed ({what}); remove it by hand")

        try:
            doc = json.loads(data)
        except ValueError:
            raise fail("not JSON") from None
        if not isinstance(doc, dict) or doc.get("format_version") != FORMAT_VERSION:
            raise fail(f"format_version is not {FORMAT_VERSION}")
        return records.from_json(cls, doc, fail)


@dataclass(frozen=True)
class Held:
    """A lease as this host last wrote or read it: the record and its ETag."""

    record: LeaseRecord
    etag: str


class Lease:
    """The lease of one instance in one remote, as seen by host ``holder``."""

    def __init__(
        self,
        client: RemoteClient,
        key: str,
        holder: str,
        name: str,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.client = client
        self.key = key
        self.holder = holder
        self.name = name
        self.clock = clock

    @property
    def where(self) -> str:
        return f"s3://{self.client.bucket}/{self.key}"

    # ------------------------------------------------------------ raw object

    def read(self) -> Held | None:
        """The lease as the remote has it now, or None if there is none."""
        found = self.client.get_etag(self.key)
        if found is None:
            return None
        data, etag = found
        return Held(LeaseRecord.from_bytes(data, self.where), etag)

    def _put(self, record: LeaseRecord, etag: str | None) -> Held:
        """Write ``record`` if the object is still at ``etag`` (None: if there is none).

        RemoteConflict if it is not.
        """
        body = replace(record, nonce=secrets.token_hex(8)).to_bytes()
        new_etag = self.client.put(self.key, body, if_none_match=etag is None, if_match=etag)
        return Held(LeaseRecord.from_bytes(body, self.where), new_etag)

    # ------------------------------------------------------------ taking

    def _new(self, generation: int, duration: float, old: LeaseRecord | None) -> LeaseRecord:
        now = self.clock()
        return LeaseRecord(
            holder=self.holder,
            generation=generation,
            expires_ms=now + int(duration * 1000),
            renewed_ms=now,
            nonce="",
            replica=old.replica if old is not None else None,
        )

    def held_error(self, rec: LeaseRecord, take_over: bool) -> LeaseHeld:
        """Who holds it and until when, and what may be done about it."""
        now = self.clock()
        if rec.handed_to is not None and rec.handed_to != self.holder:
            return LeaseHeld(
                f"{self.name} is being handed over to host {rec.handed_to} by host {rec.holder} "
                f"(generation {rec.generation}, until {iso(rec.expires_ms)})"
            )
        if not rec.expired(now):
            return LeaseHeld(
                f"{self.name} is leased to host {rec.holder} until {iso(rec.expires_ms)} "
                f"(generation {rec.generation}); stop it there"
                + ("" if take_over else ", or once the lease has expired: --take-over")
            )
        return LeaseHeld(
            f"the lease of {self.name} held by host {rec.holder} expired at "
            f"{iso(rec.expires_ms)} without being released (generation {rec.generation}); "
            "if that host is down, take it: vtpmctl start "
            f"{self.name} --take-over"
        )

    def acquire(self, duration: float = DEFAULT_DURATION, take_over: bool = False) -> Held:
        """Take the lease: free, ours, handed to us, or (``take_over``) expired.

        LeaseHeld names the holder and the expiry when it is not ours to take.
        A lost race (412) re-reads and judges again.
        """
        from vtpmctl.store.remote.client import RemoteConflict

        for _ in range(_RACE_RETRIES):
            current = self.read()
            try:
                if current is None:
                    return self._put(self._new(1, duration, None), None)
                rec = current.record
                mine = rec.holder == self.holder and rec.handed_to is None
                free = rec.released and rec.handed_to is None
                ours_now = rec.handed_to == self.holder
                expired = rec.expired(self.clock())
                if not (mine or free or ours_now or (take_over and expired)):
                    raise self.held_error(rec, take_over)
                return self._put(self._new(rec.generation + 1, duration, rec), current.etag)
            except RemoteConflict:
                continue  # another host wrote it meanwhile: judge again
        raise RemoteError(f"the lease of {self.name} at {self.where} keeps changing; try again")

    # ------------------------------------------------------------ keeping

    def renew(
        self, held: Held, duration: float = DEFAULT_DURATION, replica: Replica | None = None
    ) -> Held:
        """Extend the lease (and record ``replica``, a pushed state) if it is still ours.

        LeaseLost if anyone else wrote the lease since ``held`` (fencing):
        nothing is changed then.
        """
        from vtpmctl.store.remote.client import RemoteConflict

        rec = held.record
        now = self.clock()
        new = replace(
            rec,
            expires_ms=now + int(duration * 1000),
            renewed_ms=now,
            replica=replica if replica is not None else rec.replica,
        )
        try:
            return self._put(new, held.etag)
        except RemoteConflict:
            raise self._lost(rec) from None

    def _lost(self, rec: LeaseRecord) -> LeaseLost:
        try:
            now = self.read()
        except (RemoteError, LeaseError):
            now = None
        if now is None:
            who = "nobody (the object is gone)"
        elif now.record.handed_to is not None:
            who = f"host {now.record.handed_to} (handed over by host {now.record.holder})"
        else:
            who = f"host {now.record.holder} (generation {now.record.generation})"
        return LeaseLost(
            f"{self.name} lost its lease (generation {rec.generation}) at {self.where}: it is "
            f"now held by {who}; this host must not write its state there any more"
        )

    def release(self, held: Held) -> Held | None:
        """Give the lease up (expiry 0), keeping its generation and replica; None if lost."""
        from vtpmctl.store.remote.client import RemoteConflict

        try:
            return self._put(replace(held.record, expires_ms=0, handed_to=None), held.etag)
        except RemoteConflict:
            return None

    def hand_over(self, held: Held, to_host: str, duration: float = DEFAULT_DURATION) -> Held:
        """Pass the lease to host ``to_host``: only it may take it, until the lease expires."""
        from vtpmctl.store.remote.client import RemoteConflict

        now = self.clock()
        new = replace(
            held.record, handed_to=to_host, expires_ms=now + int(duration * 1000), renewed_ms=now
        )
        try:
            return self._put(new, held.etag)
        except RemoteConflict:
            raise self._lost(held.record) from None


def lease_key(instance_prefix: str) -> str:
    """The lease object's key under an instance's prefix in the remote."""
    return f"{instance_prefix.rstrip('/')}/{LEASE_OBJECT}" if instance_prefix else LEASE_OBJECT
