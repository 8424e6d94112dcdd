"""One owner per instance across hosts: the lease ``start`` takes, and what it brings back.

An instance bound to a remote (``start --replicate REMOTE`` writes its
``remote.json``, store.replication.Binding) is started only by the host that
holds its lease in that remote (store.lease). ``start`` takes the lease
under the instance's state lock, before the daemon is launched, and hands it
to the daemon in a spec file; the daemon renews it, pushes the permanent
state after changes and releases it when it ends (device.server.replication).

When the lease comes from another host, the remote's replica is the newest
state of the instance: it is fetched, checked (hash, the state key opens it,
libtpms validates it) and becomes the local permanent state; the local
volatile state, older than it, is dropped (the TPM starts as after a
reboot). When the lease comes back to this host, the local state is at least
as new as the remote's and is kept (it is pushed once the daemon runs).
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import TYPE_CHECKING, Any

from vtpmctl.errors import InstanceError, LeaseHeld, LeaseLost, RemoteError, StoreError
from vtpmctl.model import BlobKind
from vtpmctl.store.replication import (
    Binding,
    DaemonSpec,
    ReplicationStatus,
)

if TYPE_CHECKING:
    from pathlib import Path

    from vtpmctl.store.blob import AesKey
    from vtpmctl.store.instances import Instance
    from vtpmctl.store.lease import Held, Lease, LeaseRecord
    from vtpmctl.store.remote.config import Remote

_PERMALL = BlobKind.PERMANENT.file_name


class OwnershipError(InstanceError):
    """The instance's binding or its replicated state cannot be used; the fix is named."""


def binding(inst: Instance) -> Binding | None:
    return Binding.read(inst.paths.binding_file)


def bind(
    inst: Instance,
    remote_name: str,
    *,
    interval: float | None = None,
    lease: float | None = None,
    renew: float | None = None,
    allow_plaintext: bool = False,
) -> Binding:
    """Bind the instance to a remote (``remote.json``); options left None keep their value."""
    from vtpmctl.store.remote.config import RemoteRegistry
    from vtpmctl.store.replication import MIN_INTERVAL

    RemoteRegistry(inst.paths.roots).get(remote_name)  # it exists
    if not inst.config.encrypted and not allow_plaintext:
        raise OwnershipError(
            f"{inst.name} is not encrypted at rest, so its TPM state would reach the remote in "
            f"plaintext; encrypt it first (vtpmctl key rotate {inst.name} --new-key-file F) "
            "or add --allow-plaintext"
        )
    for what, value in (("--replicate-interval", interval), ("--lease-duration", lease)):
        if value is not None and value < MIN_INTERVAL:
            raise OwnershipError(f"{what} must be at least {MIN_INTERVAL} seconds")
    old = binding(inst)
    new = Binding(remote_name) if old is None or old.remote != remote_name else old
    if interval is not None:
        new.interval_ms = int(interval * 1000)
    if lease is not None:
        new.lease_ms = int(lease * 1000)
    if renew is not None:
        new.renew_ms = int(renew * 1000)
    if new.renew_every_ms >= new.lease_ms:
        raise OwnershipError(
            f"the lease must be renewed more often than it lasts ({new.renew_every_ms / 1000:g}s "
            f"renewal, {new.lease_ms / 1000:g}s lease); lower --lease-renew"
        )
    new.write(inst.paths.binding_file)
    return new


def unbind(inst: Instance) -> Binding:
    """Stop replicating a stopped instance: its binding goes, the remote is not touched.

    Under the state lock, so that a start cannot launch a daemon with the old
    binding meanwhile. The lease stays where it is (released by the last stop).
    """
    old = binding(inst)
    if old is None:
        raise OwnershipError(f"{inst.name} is not bound to a remote; nothing to unbind")
    sd = inst.statedir()
    if not sd.lock(0):
        raise OwnershipError(
            f"{inst.name} is running (it replicates while it runs); stop it first: "
            f"vtpmctl stop {inst.name}"
        )
    try:
        from vtpmctl.store.atomic import fsync_dir

        for path in (inst.paths.binding_file, inst.paths.replication_status):
            path.unlink(missing_ok=True)
        fsync_dir(inst.paths.binding_file.parent)
    finally:
        sd.unlock()
    return old


def _remote(inst: Instance, b: Binding) -> Remote:
    from vtpmctl.store.remote.config import RemoteRegistry

    return RemoteRegistry(inst.paths.roots).get(b.remote)


def _lease(inst: Instance, remote: Remote, client: Any = None, create_id: bool = True) -> Lease:
    from vtpmctl.store.lease import Lease, host_id
    from vtpmctl.store.remote import layout
    from vtpmctl.store.remote.client import RemoteClient

    return Lease(
        client if client is not None else RemoteClient(remote),
        remote.key(layout.lease_name(inst.name)),
        host_id(inst.paths.roots.config, create_id),
        inst.name,
    )


def take(inst: Instance, take_over: bool, key: AesKey | None, notes: list[str]) -> Path | None:
    """Take the lease of a bound instance and write the daemon's spec; None if unbound.

    The caller holds the state lock; ``key`` is the instance's state key. LeaseHeld
    names the holder and expiry.
    """
    from vtpmctl.store.remote import layout

    spec_file = inst.paths.remote_spec
    spec_file.unlink(missing_ok=True)
    inst.paths.replication_status.unlink(missing_ok=True)
    b = binding(inst)
    if b is None:
        return None
    remote = _remote(inst, b)
    lease = _lease(inst, remote)
    before = lease.read()
    held = lease.acquire(b.lease_ms / 1000, take_over)
    try:
        previous = before.record.holder if before is not None else None
        if previous is not None and previous != lease.holder:
            _restore(inst, lease, held, key, f"host {previous}", notes)
        spec = DaemonSpec(
            instance=inst.name,
            remote=remote,
            lease_key=lease.key,
            lease=held.record,
            etag=held.etag,
            objects_prefix=remote.key(layout.objects_prefix(inst.name, layout.keyid_of(key))),
            replicate=b.replicate,
            interval_ms=b.interval_ms,
            lease_ms=b.lease_ms,
            renew_ms=b.renew_every_ms,
            status_file=str(inst.paths.replication_status),
        )
        spec.write(spec_file)
    except BaseException:
        with contextlib.suppress(RemoteError):
            lease.release(held)
        raise
    return spec_file


def _restore(
    inst: Instance, lease: Lease, held: Held, key: AesKey | None, previous: str, notes: list[str]
) -> None:
    """Make the remote's replica the local permanent state, if it differs; checked first."""
    from vtpmctl.store.blob import BlobError, unwrap_file
    from vtpmctl.store.instance_keys import VOLATILE_NAMES
    from vtpmctl.store.lease import iso
    from vtpmctl.usecases.inspect import inspect_blobs

    rep = held.record.replica
    if rep is None:
        notes.append(
            f"no replicated state of {inst.name} in the remote; it starts from this host's state"
        )
        return
    sd = inst.statedir()
    raw = sd.read_raw(_PERMALL)
    if raw is not None:
        with contextlib.suppress(BlobError):
            if hashlib.sha256(unwrap_file(raw, key)).hexdigest() == rep.sha256:
                return
    where = lease.client.remote.where(rep.key)
    data = lease.client.get(rep.key)
    if data is None:
        raise OwnershipError(
            f"the replicated state of {inst.name} ({where}) is missing; nothing was changed"
        )
    try:
        plain = unwrap_file(data, key)
    except BlobError as exc:
        raise OwnershipError(
            f"the replicated state {where} does not open with the state key of {inst.name} "
            f"here ({exc}); pull the instance with its keys (vtpmctl pull {inst.name})"
        ) from None
    if hashlib.sha256(plain).hexdigest() != rep.sha256:
        raise OwnershipError(f"the replicated state {where} is corrupt (hash mismatch); not used")
    checked = inspect_blobs({BlobKind.PERMANENT: plain}, tpm2=inst.config.tpm2)
    if not checked.ok:
        raise OwnershipError(
            f"libtpms refuses the replicated state {where} ({checked.error or checked.validate})"
        )
    sd.write_raw(_PERMALL, data)
    for name in VOLATILE_NAMES:
        sd.delete(name)
    notes.append(
        f"{inst.name}: took its permanent state from the remote, as pushed at "
        f"{iso(rep.pushed_ms)} by {previous} (push {rep.seq}, lease generation "
        f"{rep.generation}); the TPM starts as after a reboot"
    )


def hand_over(inst: Instance, to_host: str) -> tuple[str, LeaseRecord]:
    """Give the lease this host holds to host ``to_host`` (a live migration's target).

    Only ``to_host`` may take it then (``start``, ``start --incoming``), until it
    expires; this host's daemon, if it runs, learns at its next renewal that the
    lease is gone and stops pushing (the VM's state now goes to the target).
    Returns this host's id and the lease as written.
    """
    from vtpmctl.store.lease import host_id

    b = binding(inst)
    if b is None:
        raise OwnershipError(
            f"{inst.name} is not bound to a remote: it has no lease to hand over "
            f"(vtpmctl start {inst.name} --replicate REMOTE binds it)"
        )
    me = host_id(inst.paths.roots.config)
    if to_host == me:
        raise OwnershipError(f"{to_host} is this host; give the host id of the target")
    lease = _lease(inst, _remote(inst, b))
    for _ in range(3):
        current = lease.read()
        if current is None:
            raise OwnershipError(
                f"{inst.name} has no lease in remote {b.remote} yet; start it on the target instead"
            )
        rec = current.record
        if rec.holder != me or (rec.handed_to not in (None, to_host)):
            raise lease.held_error(rec, take_over=False)
        try:
            return me, lease.hand_over(current, to_host, b.lease_ms / 1000).record
        except LeaseLost:
            continue  # this host's daemon renewed it meanwhile: read it again
    raise OwnershipError(f"the lease of {inst.name} keeps changing; try again")


def push_generation(inst: Instance, client: Any, remote: Remote) -> int | None:
    """The lease generation a ``push`` of NAME writes under, or why it may not push.

    A push may publish this host's state only if no host holds the instance's
    lease in the remote, or this host does: a lease of another host (held,
    expired or released) means the remote may hold newer state than this host
    (LeaseHeld names the host and what to do). None: the remote has no lease.
    """
    lease = _lease(inst, remote, client, create_id=False)  # a push writes nothing here
    current = lease.read()
    if current is None:
        return None
    rec = current.record
    if rec.holder == lease.holder and rec.handed_to is None:
        return rec.generation
    if rec.released and rec.handed_to is None:
        raise LeaseHeld(
            f"host {rec.holder} ran {inst.name} last (lease generation {rec.generation}): the "
            "remote may hold newer state than this host; take the lease and that state first "
            f"(vtpmctl start {inst.name} --replicate {remote.name}), then push"
        )
    raise lease.held_error(rec, take_over=False)


def abandon(inst: Instance) -> None:
    """Give back a lease that ``take`` took for a daemon that is gone (failed or killed).

    Only a lease this host holds in the generation it took is released.
    """
    try:
        spec = DaemonSpec.read(inst.paths.remote_spec)
    except StoreError:
        return
    status = ReplicationStatus.read(inst.paths.replication_status)
    if status is not None and (
        status.lease_lost or status.lease_expires_ms == 0 or status.last_error is not None
    ):
        return  # lost, released, or the remote did not answer the daemon: it expires
    b = binding(inst)
    if b is None:
        return
    with contextlib.suppress(RemoteError, StoreError, LeaseHeld, LeaseLost):
        lease = _lease(inst, _remote(inst, b))
        now = lease.read()
        if (
            now is not None
            and now.record.holder == lease.holder
            and now.record.generation == spec.lease.generation
            and not now.record.released
        ):
            lease.release(now)


def status_record(inst: Instance, running: bool) -> dict[str, Any] | None:
    """``status``'s ``replication`` object: from local files only (no remote round trip)."""
    from vtpmctl.store.lease import iso, now_ms

    try:
        b = binding(inst)
    except StoreError as exc:
        return {"remote": None, "error": str(exc)}
    if b is None:
        return None
    st = None
    if running:
        with contextlib.suppress(StoreError):
            st = ReplicationStatus.read(inst.paths.replication_status)
    now = now_ms()
    return {
        "remote": b.remote,
        "replicate": b.replicate,
        "interval": b.interval_ms / 1000,
        "lease_duration": b.lease_ms / 1000,
        "lag_seconds": None if st is None else round(st.lag_seconds(now), 3),
        "pending_since": _iso(iso, None if st is None else st.pending_since_ms),
        "last_push": _iso(iso, None if st is None else st.last_push_ms),
        "pushed_seq": None if st is None else st.pushed_seq,
        "lease": None
        if st is None
        else {
            "holder": st.holder,
            "generation": st.generation,
            "expires": None if st.lease_expires_ms == 0 else iso(st.lease_expires_ms),
            "lost": st.lease_lost,
        },
        "error": None if st is None else st.last_error,
    }


def _iso(iso: Any, ms: int | None) -> str | None:
    return None if ms is None else str(iso(ms))
