"""Snapshots of named instances: take, restore, compare.

The blob store (``vtpmctl.store.snapshots``) only keeps bytes; this module
decides where the bytes come from and when they may replace the live state.

* A running instance is asked through its control channel
  (CMD_GET_STATEBLOB, decrypted; a migration-key layer is removed with the
  instance's migration key): the guest's TPM keeps running. The permanent
  state is one blob, so it is consistent by construction; with the volatile
  state, permanent is read again afterwards and the pair retaken until both
  reads agree. When the control channel is held by another client (QEMU keeps
  it for the life of the VM) the permanent state is read from ``permall``,
  which the daemon replaces atomically on every NV change: the same bytes
  CMD_GET_STATEBLOB would return.
* A stopped instance is read from its state dir under the state lock.
* A restore checks every object (hash, decryption, ``TPMLIB_ValidateState``)
  before it touches anything, then takes a safety snapshot of the current
  state, then replaces the files (see ``replace_state``).
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vtpmctl.model import BlobKind
from vtpmctl.store import instance_keys
from vtpmctl.store.blob import AesKey, BlobError
from vtpmctl.store.instances import Instance, Registry, now_utc
from vtpmctl.store.pending import settle
from vtpmctl.store.snapshots import (
    Snapshot,
    SnapshotError,
    SnapshotStore,
    replace_state,
    snapshots_dir,
)
from vtpmctl.store.statedir import StateDir, StateDirError
from vtpmctl.usecases import supervisor
from vtpmctl.usecases.inspect import InspectResult, inspect_blobs

if TYPE_CHECKING:
    from vtpmctl.device.client.control import ControlClient
    from vtpmctl.store.keys import KeySource
    from vtpmctl.store.tpmstate import TpmState

# An attached swtpm run with --migration-key hands out its state under its manager's key.
ATTACHED_MIGRATION_KEY = "its swtpm hands out its state only under its manager's migration key"
BUSY_TIMEOUT = 3.0  # a control channel that does not answer in this time is held by QEMU
CONSISTENT_TRIES = 5


def settle_if_stopped(inst: Instance) -> tuple[Instance, list[str]]:
    """Settle what a crash interrupted (rotation, restore) if the state lock is free.

    Returns the instance as it is afterwards (a completed rotation changes its
    key) and what was settled. A running instance was settled when it started.
    """
    sd = inst.statedir()
    if not sd.lock(0):
        return inst, []
    try:
        settled = settle(inst.paths, inst.config.tpm2)
    finally:
        sd.unlock()
    if settled.rotation is not None:
        inst = Registry(inst.paths.roots).get(inst.name)
    return inst, settled.notes


def open_store(inst: Instance) -> SnapshotStore:
    """The instance's snapshot store, opened with its state key."""
    from vtpmctl.store.keys import KeyFileError

    try:
        key = instance_keys.load_state_key(inst)
    except KeyFileError as exc:
        raise SnapshotError(f"cannot open the snapshots of {inst.name}: {exc}") from None
    return SnapshotStore(snapshots_dir(inst.paths), key)


# ---------------------------------------------------------------- reading the live state


@dataclass
class Captured:
    blobs: dict[str, bytes]
    source: str  # "control channel", "state dir" or "state file"
    note: str | None = None  # why the state file was read instead of the control channel
    settled: list[str] = field(default_factory=list)  # interrupted operations settled first


def _fetch(
    client: ControlClient, kind: BlobKind, state_key: AesKey | None, migration_key: AesKey | None
) -> bytes:
    from vtpmctl.usecases.live import read_state

    try:
        return read_state(client, kind, state_key=state_key, migration_key=migration_key)
    except BlobError as exc:
        raise SnapshotError(
            f"the {kind} state blob cannot be opened ({exc.message}); check "
            "the instance's migration key"
        ) from None


def _from_control(
    inst: Instance, volatile: bool, state_key: AesKey | None, timeout: float
) -> dict[str, bytes]:
    mkey = instance_keys.load_migration_key(inst)
    from vtpmctl.usecases.live import instance_client

    # The permanent state alone comes through the admin endpoint, which answers while
    # QEMU holds the control channel; volatile state needs the control channel.
    with instance_client(inst, timeout=timeout, read_only=not volatile) as client:
        perm = _fetch(client, BlobKind.PERMANENT, state_key, mkey)
        if not perm:
            raise SnapshotError(f"{inst.name} has no permanent state to snapshot")
        if not volatile:
            return {BlobKind.PERMANENT: perm}
        kinds = [BlobKind.VOLATILE] + ([] if inst.config.tpm2 else [BlobKind.SAVESTATE])
        for _ in range(CONSISTENT_TRIES):
            extra = {k: _fetch(client, k, state_key, mkey) for k in kinds}
            again = _fetch(client, BlobKind.PERMANENT, state_key, mkey)
            if again == perm:
                return {BlobKind.PERMANENT: perm, **{k: v for k, v in extra.items() if v}}
            perm = again  # the guest changed NV meanwhile: take the pair again
    raise SnapshotError(
        f"the state of {inst.name} kept changing while it was read; retry, "
        "or snapshot without --volatile"
    )


def _from_dir(inst: Instance, sd: StateDir, volatile: bool) -> dict[str, bytes]:
    try:
        blobs = sd.load_blobs(BlobKind if volatile else [BlobKind.PERMANENT])
    except StateDirError as exc:
        raise SnapshotError(str(exc)) from None
    if BlobKind.PERMANENT not in blobs:
        raise SnapshotError(
            f"{sd.file(BlobKind.PERMANENT.file_name)} is missing: {inst.name} has no TPM "
            "state to snapshot"
        )
    return blobs


def capture(inst: Instance, store: SnapshotStore, *, volatile: bool) -> Captured:
    """The instance's current state, without stopping it."""
    from vtpmctl.device.client.control import ControlError, TargetError
    from vtpmctl.device.protocol import Res

    sd = inst.statedir(store.key)
    if sd.lock(0):
        try:
            settled = settle(inst.paths, inst.config.tpm2)
            blobs = _from_dir(inst, sd, volatile)
        finally:
            sd.unlock()
        if volatile and set(blobs) == {"permanent"}:
            raise SnapshotError(
                f"{inst.name} is stopped and has no saved volatile state, so a --volatile "
                "snapshot would hold the permanent state only; snapshot it without "
                "--volatile, or while it runs"
            )
        return Captured(blobs, "state dir", settled=settled.notes)
    status = supervisor.probe(inst)
    if not status.ours:
        raise SnapshotError(
            f"the state dir of {inst.name} is locked by pid {status.pid} "
            f"({supervisor.process_name(status.pid or 0)}), which is not its "
            "vtpmctl daemon; stop that process first"
        )
    try:
        if inst.found is not None and inst.found.migration_key:
            why = ATTACHED_MIGRATION_KEY
        else:
            return Captured(
                _from_control(inst, volatile, store.key, BUSY_TIMEOUT), "control channel"
            )
    except TargetError:
        why = "its control channel does not answer (is QEMU holding it?)"
    except ControlError as exc:
        if exc.result != Res.BAD_ORDINAL:
            raise SnapshotError(f"{inst.name} refused to hand out its state: {exc}") from None
        why = "its TPM is not initialised yet"
    if volatile:
        raise SnapshotError(
            f"cannot read the volatile state of {inst.name}: {why}; snapshot "
            "without --volatile (the permanent state is read from disk then)"
        )
    return Captured(
        _from_dir(inst, sd, False),
        "state file",
        f"{why}, so the permanent state was read from its state file, which the "
        "daemon keeps current",
    )


def create(
    inst: Instance, *, label: str | None = None, volatile: bool = False, keep: int | None = None
) -> tuple[Snapshot, Captured, list[Snapshot]]:
    """Take a snapshot; with ``keep``, prune to the newest ``keep`` afterwards."""
    if keep is not None and keep < 1:
        raise SnapshotError("--keep must be 1 or more")
    inst, settled = settle_if_stopped(inst)
    fresh = not snapshots_dir(inst.paths).exists()
    store = open_store(inst)
    try:
        captured = capture(inst, store, volatile=volatile)
        captured.settled[:0] = settled
        snap = store.create(captured.blobs, label=label)
    except OSError:
        # The first snapshot failed (a full disk): take back the empty store it made.
        if fresh and not store.index_path.exists():
            shutil.rmtree(store.root, ignore_errors=True)
        raise
    pruned = store.prune(keep) if keep is not None else []
    return snap, captured, pruned


# ---------------------------------------------------------------- restore


@dataclass
class Restored:
    snapshot: Snapshot
    safety: Snapshot | None
    safety_error: str | None
    stopped: bool  # the instance was running and was stopped for the restore
    restarted: bool
    settled: list[str] = field(default_factory=list)  # interrupted operations settled first


def _safety_label(store: SnapshotStore) -> str:
    base = "pre-restore-" + now_utc().replace("-", "").replace(":", "")
    labels = {s.label for s in store.all()}
    label, n = base, 2
    while label in labels:
        label, n = f"{base}-{n}", n + 1
    return label


def check_blobs(inst: Instance, blobs: dict[str, bytes], what: str) -> None:
    """libtpms must accept the blobs (before anything is replaced)."""
    res = inspect_blobs(blobs, tpm2=inst.config.tpm2)
    if not res.ok:
        bad = ", ".join(f"{k} 0x{v:x}" for k, v in res.validate.items() if v)
        raise SnapshotError(f"{what} does not validate ({bad or res.error}); it was not restored")


def restore(inst: Instance, ref: str, *, force: bool = False) -> Restored:
    """Make snapshot ``ref`` the instance's state; stops (and restarts) it only with force."""
    if inst.found is not None:
        raise SnapshotError(
            f"{inst.name} is a vTPM that {inst.owner} runs (pid {inst.found.pid}); vtpmctl "
            f"never replaces its state while it runs: {SHUT_DOWN}, then add --tpmstate "
            f"{'backend-uri=file://' if inst.found.state_file else 'dir='}"
            f"{inst.found.state_dir} (its swtpm's)"
        )
    inst, settled = settle_if_stopped(inst)
    store = open_store(inst)
    snap = store.find(ref)
    blobs = store.read_blobs(snap)  # every object verified before anything is touched
    check_blobs(inst, blobs, f"snapshot {snap.describe()}")
    stopped = False
    status = supervisor.probe(inst)
    if status.state == "running":
        if not force:
            raise SnapshotError(
                f"{inst.name} is running; stop it first (vtpmctl stop "
                f"{inst.name}) or add --force to stop and restart it"
            )
        # CMD_SHUTDOWN, then SIGTERM (a graceful stop in the daemon) if QEMU holds the channel
        supervisor.stop(inst, force=True)
        stopped = True
    try:
        safety, safety_error = _replace(inst, store, snap, blobs, settled)
    except BaseException:
        if stopped:  # back to work on whatever state is there; the restore's error counts
            with contextlib.suppress(Exception):
                supervisor.start(inst)
        raise
    if stopped:
        supervisor.start(inst)
    return Restored(snap, safety, safety_error, stopped, stopped, settled)


def _replace(
    inst: Instance,
    store: SnapshotStore,
    snap: Snapshot,
    blobs: dict[str, bytes],
    settled: list[str],
) -> tuple[Snapshot | None, str | None]:
    sd = inst.statedir(store.key)
    if not sd.lock(0):
        raise SnapshotError(
            f"{inst.name} was started meanwhile (pid {sd.holder_pid()}); nothing was restored"
        )
    try:
        # An earlier rotation or restore that was interrupted is settled before the
        # safety snapshot, which must hold what the instance runs on.
        settled += settle(inst.paths, inst.config.tpm2).notes
        safety = _safety_snapshot(inst, sd, store)
        replace_state(sd, blobs, note=snap.ref)
        return safety
    finally:
        sd.unlock()


def _safety_snapshot(
    inst: Instance, sd: StateDir, store: SnapshotStore
) -> tuple[Snapshot | None, str | None]:
    """The current state, so a restore can be undone; None if it is unreadable or gone."""
    try:
        current = _from_dir(inst, sd, volatile=True)
    except SnapshotError as exc:
        return None, str(exc)
    return store.create(current, label=_safety_label(store)), None


# ---------------------------------------------------------------- diff


def _changes(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any]:
    if a is None or b is None:
        return {"added": None, "removed": None, "changed": None}
    changed = []
    for key in sorted(set(a) & set(b)):
        if a[key] != b[key]:
            entry: dict[str, Any] = {"handle": key}
            if isinstance(a[key], dict):
                entry["fields"] = sorted(
                    f for f in set(a[key]) | set(b[key]) if a[key].get(f) != b[key].get(f)
                )
            changed.append(entry)
    return {
        "added": sorted(set(b) - set(a)),
        "removed": sorted(set(a) - set(b)),
        "changed": changed,
    }


def diff(inst: Instance, ref_a: str, ref_b: str) -> dict[str, Any]:
    """Which blobs differ, and (decoded) which persistent handles and NV indexes."""
    store = open_store(inst)
    a, b = store.find(ref_a), store.find(ref_b)
    blobs: dict[str, str] = {}
    for kind in BlobKind:
        da, db = a.blobs.get(kind), b.blobs.get(kind)
        if da is None and db is None:
            continue
        blobs[kind] = (
            "same"
            if da == db
            else "added"
            if da is None
            else "removed"
            if db is None
            else "changed"
        )
    ra, rb = (_describe(inst, store, s) for s in (a, b))
    errors = [f"snapshot {s.describe()}: {r.error}" for s, r in ((a, ra), (b, rb)) if r.error]
    return {
        "a": a.to_json(),
        "b": b.to_json(),
        "blobs": blobs,
        "persistent": _changes(ra.persistent, rb.persistent),
        "nv": _changes(ra.nv, rb.nv),
        "error": "; ".join(errors) or None,
    }


def _describe(inst: Instance, store: SnapshotStore, snap: Snapshot) -> InspectResult:
    blobs = store.read_blobs(snap)
    if not inst.config.tpm2:
        return InspectResult(ok=True, validate={}, error=None)
    return inspect_blobs(blobs, tpm2=True, describe=True)


def timestamp(created: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created))


# ---------------------------------------------------------------- restore into swtpm's files

SHUT_DOWN = "shut the VM down first (virsh shutdown, qm shutdown)"


@dataclass
class Written:
    """A snapshot written into a stopped swtpm's state location (``restore --tpmstate``)."""

    snapshot: Snapshot
    target: TpmState
    tpm2: bool
    encrypted: bool
    safety: Snapshot | None  # the state that was there, kept as a snapshot
    dropped_volatile: list[str]  # saved volatile state removed (the guest sees a reboot)


def restore_to(name: str, ref: str, target: TpmState, key: KeySource | None) -> Written:
    """Write snapshot ``ref`` of vTPM ``name`` into swtpm state files at ``target``.

    For a vTPM another manager runs (libvirt, Proxmox) while its swtpm is stopped:
    vtpmctl then does not see it, so the caller names the state location as that
    swtpm's ``--tpmstate`` does. Only the permanent state is written; a saved
    volatile state is removed, so the TPM starts as after a reboot.
    """
    from vtpmctl.store.attached import serving
    from vtpmctl.store.instances import InstancePaths, Registry, validate_name
    from vtpmctl.store.linearfile import LinearFile

    registry = Registry()
    if registry.exists(name):
        raise SnapshotError(
            f"{name} is a vTPM of vtpmctl's own; restore it without --tpmstate "
            f"(vtpmctl snapshot restore {name} {ref})"
        )
    found = registry.running_attached(name)
    if found is not None:
        raise SnapshotError(
            f"{name} is running (pid {found.pid}, {found.owner}); {SHUT_DOWN}, then restore"
        )
    paths = InstancePaths(validate_name(name), registry.roots, target.path, None)
    root = snapshots_dir(paths)
    if not (root / "index.json").exists():
        raise SnapshotError(
            f"{name} has no snapshots in {root}; take one while it runs: "
            f"vtpmctl snapshot create {name}"
        )
    running = serving(target.path)
    if running is not None:
        raise SnapshotError(
            f"{target.path} is in use by {running.program} (pid {running.pid}, "
            f"{running.name}); {SHUT_DOWN}, then restore"
        )
    sd = _target(target)
    try:
        _check_free(sd, target)
        return _write(name, ref, sd, target, SnapshotStore(root, None), key)
    finally:
        sd.unlock()
        if isinstance(sd, LinearFile):
            sd.close()


def _target(target: TpmState) -> StateDir:
    """The location as swtpm would open it (the family is set once the snapshot is read)."""
    from vtpmctl.store.linearfile import LinearFile

    if target.backend == "file":
        if not target.path.exists():
            raise SnapshotError(
                f"{target.path} does not exist; give the linear file or block device the "
                "stopped swtpm's --tpmstate names"
            )
        return LinearFile(target.path, mode=target.mode, use_lock=target.lock)
    if not target.path.is_dir():
        raise SnapshotError(
            f"{target.path} is not a state dir; give the dir the stopped swtpm's "
            "--tpmstate names (libvirt: /var/lib/libvirt/swtpm/UUID/tpm2)"
        )
    return StateDir(target.path, mode=target.mode, use_lock=target.lock)


def _check_free(sd: StateDir, target: TpmState) -> None:
    """Nobody serves the location: its lock is free and no process has the file open."""
    from vtpmctl.store.attached import users

    if not sd.lock(0):
        raise SnapshotError(
            f"{target.path} is locked by pid {sd.holder_pid()} "
            f"({supervisor.process_name(sd.holder_pid() or 0)}); {SHUT_DOWN}, then restore"
        )
    if target.backend == "file":
        pids = users(target.path)
        if pids:
            raise SnapshotError(
                f"{target.path} is open in pid {pids[0]} "
                f"({supervisor.process_name(pids[0])}); {SHUT_DOWN}, then restore"
            )


def _family(perm: bytes) -> bool:
    """True for TPM 2 (the snapshot does not record it: libtpms says which it accepts)."""
    for tpm2 in (True, False):
        if inspect_blobs({BlobKind.PERMANENT: perm}, tpm2=tpm2).ok:
            return tpm2
    raise SnapshotError("the snapshot's permanent state does not validate; it was not written")


def _write(
    name: str,
    ref: str,
    sd: StateDir,
    target: TpmState,
    store: SnapshotStore,
    source: KeySource | None,
) -> Written:
    import os

    from vtpmctl.store.blob import FLAG_ENCRYPTED, BlobError, parse_header
    from vtpmctl.store.keys import KeyFileError, key_fingerprint

    perm_name = BlobKind.PERMANENT.file_name
    existing = sd.read_raw(perm_name)
    try:
        key = None if source is None else source.resolve(probe=existing)
    except KeyFileError as exc:
        raise SnapshotError(str(exc)) from None
    stored = store.stored_fingerprint()
    if stored is not None:
        if key is None:
            raise SnapshotError(
                f"the snapshots of {name} are encrypted with its state key; give it as "
                "swtpm's --key, e.g. --key pwdfd=3,mode=aes-256-cbc 3<FILE"
            )
        if key_fingerprint(key) != stored:
            raise SnapshotError(
                f"the key given is not the one the snapshots of {name} are encrypted with "
                f"(fingerprint {key_fingerprint(key)}, expected {stored}); nothing was written"
            )
        store = SnapshotStore(store.root, key)
    snap = store.find(ref)
    blobs = store.read_blobs(snap)
    perm = blobs.get(BlobKind.PERMANENT)
    if not perm:
        raise SnapshotError(f"snapshot {snap.describe()} holds no permanent state")
    sd.tpm2 = _family(perm)
    existing = sd.read_raw(perm_name)  # under the family's file name now
    current: bytes | None = None
    try:
        encrypted = existing is not None and bool(parse_header(existing).flags & FLAG_ENCRYPTED)
    except BlobError:
        existing = None  # not a state blob: nothing there to keep or to check the key on
    if existing is not None:
        if encrypted and key is None:
            raise SnapshotError(
                f"the state at {target.path} is encrypted; give its key as swtpm's --key "
                "(as its manager does); nothing was written"
            )
        if not encrypted and key is not None:
            raise SnapshotError(
                f"the state at {target.path} is not encrypted (its swtpm runs without "
                "--key); leave out --key; nothing was written"
            )
        sd.key = key
        try:
            current = sd.load(perm_name)
        except StateDirError:
            raise SnapshotError(
                f"the key given does not open the state at {target.path}; give the key "
                "its swtpm runs with; nothing was written"
            ) from None
    if target.backend == "dir":
        # the file's owner and mode, else the dir's owner (libvirt's is tss) and swtpm's mode
        st = os.stat(sd.file(perm_name) if existing is not None else target.path)
        sd.owner = (st.st_uid, st.st_gid)
        if existing is not None and not target.mode_given:
            sd.mode = st.st_mode & 0o777
    sd.key = key
    safety = None
    if current:
        safety = store.create({BlobKind.PERMANENT: current}, label=_safety_label(store))
    dropped = [k for k in (BlobKind.VOLATILE, BlobKind.SAVESTATE) if sd.exists(k.file_name)]
    for kind in dropped:  # first: a crash in between leaves the old TPM, rebooted
        sd.delete(kind.file_name)
    sd.store(perm_name, perm)
    return Written(snap, target, sd.tpm2, key is not None, safety, [str(k) for k in dropped])
