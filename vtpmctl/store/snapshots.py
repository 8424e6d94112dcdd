"""Snapshots: content-addressed state objects plus one compact index.

An object is one plaintext libtpms blob, named by its sha256 and stored in
swtpm's state-file format under the instance's state key, so snapshots are
encrypted at rest exactly like the live state (and a blob that did not change
between snapshots is stored once). The name reveals only whether two blobs
are equal, never their content.

``index.json`` holds every snapshot of the instance. A distinct combination
of blobs (a "state") is recorded once; a snapshot is then a tiny array
``[id, created, state, label?]``, so a hundred snapshots of an unchanged vTPM
cost a few kilobytes, not a hundred copies. Ids are small integers that are
never reused. The index also names the key fingerprint the objects are
encrypted with, so a wrong key is reported as such, and a pending key
rotation blocks new snapshots until it is settled.

Restoring replaces the state dir's files so that every intermediate state is
a whole TPM: the old volatile state is removed first, then permall is
renamed into place, then the new volatile state. A crash in between leaves
the old or the new permanent state without its volatile part (the TPM then
needs Startup, as after a reboot), never a mix. A marker file decides the
restore; whatever takes the state lock next finishes it (see
``settle_restore``), and ``verify`` reports it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vtpmctl.errors import StoreError
from vtpmctl.model import STATE_FILE_NAMES, BlobKind
from vtpmctl.store.atomic import fsync_dir, write_atomic
from vtpmctl.store.blob import AesKey, BlobError, unwrap_file, wrap_file
from vtpmctl.store.dirs import PRIVATE_MODE, ensure_dir
from vtpmctl.store.instances import InstancePaths
from vtpmctl.store.keys import key_fingerprint
from vtpmctl.store.statedir import StateDir

INDEX_VERSION = 1
REKEY_SUFFIX = ".rekey"
RESTORE_SUFFIX = ".restore"
_DIGEST = re.compile(r"[0-9a-f]{64}")
_MAX_LABEL = 64


def _sha256(data: bytes) -> str:
    """The hex SHA-256; hashlib is imported when a snapshot is read or written (it loads
    libcrypto), not by every command that settles a state first."""
    import hashlib

    return hashlib.sha256(data).hexdigest()


class SnapshotError(StoreError):
    """A snapshot operation failed; the message names the problem and the fix."""


def snapshots_dir(paths: InstancePaths) -> Path:
    """Beside ``tpmstate/``: removed with the instance, backed up with its state."""
    return paths.base / "snapshots"


@dataclass(frozen=True)
class Snapshot:
    """One snapshot as listed: its blobs are digests of plaintext objects."""

    id: int
    created: int  # seconds since the epoch (UTC)
    label: str | None
    blobs: dict[str, str]  # kind -> sha256 of the plaintext
    sizes: dict[str, int]  # kind -> plaintext bytes

    @property
    def ref(self) -> str:
        return str(self.id)

    def describe(self) -> str:
        return f"{self.id} ({self.label})" if self.label else str(self.id)

    def to_json(self) -> dict[str, Any]:
        """The record ``snapshot list --json`` shows (stable keys)."""
        return {
            "id": self.id,
            "label": self.label,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created)),
            "blobs": {str(k): self.blobs.get(k) for k in BlobKind},
            "sizes": {str(k): self.sizes.get(k) for k in BlobKind},
        }


def check_label(label: str) -> str:
    """Labels are refs on the command line: printable, no '/', not a bare number."""
    if (
        not label
        or len(label) > _MAX_LABEL
        or label.strip() != label
        or "/" in label
        or not label.isprintable()
        or label.isdigit()
    ):
        raise SnapshotError(
            f"bad snapshot label {label!r}: use 1-{_MAX_LABEL} printable "
            "characters, no '/', no surrounding spaces, not only digits"
        )
    return label


@dataclass
class _Index:
    next_id: int
    key: str | None  # fingerprint of the key the objects are encrypted with
    pending_key: str | None  # a key rotation staged but not committed
    states: dict[str, dict[str, list[Any]]]  # state id -> kind -> [digest, size]
    snaps: list[list[Any]]  # [id, created, state id] or [id, created, state id, label]

    @classmethod
    def empty(cls, key: str | None) -> _Index:
        return cls(1, key, None, {}, [])

    def to_bytes(self) -> bytes:
        doc = {
            "format_version": INDEX_VERSION,
            "next": self.next_id,
            "key": self.key,
            "pending_key": self.pending_key,
            "states": self.states,
            "snapshots": self.snaps,
        }
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()

    def snapshot(self, row: list[Any]) -> Snapshot:
        state = self.states[row[2]]
        return Snapshot(
            id=row[0],
            created=row[1],
            label=row[3] if len(row) > 3 else None,
            blobs={k: v[0] for k, v in state.items()},
            sizes={k: v[1] for k, v in state.items()},
        )


def _parse_index(raw: bytes) -> _Index:
    doc = json.loads(raw)
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    version = doc.get("format_version")
    if version != INDEX_VERSION:
        raise ValueError(f"unknown format_version {version!r}")
    states = doc["states"]
    snaps = doc["snapshots"]
    if not isinstance(states, dict) or not isinstance(snaps, list):
        raise ValueError("states or snapshots have the wrong type")
    for sid, state in states.items():
        if not isinstance(state, dict) or not state:
            raise ValueError(f"state {sid} is empty")
        for kind, (digest, size) in state.items():
            if (
                kind not in tuple(BlobKind)
                or not _DIGEST.fullmatch(digest)
                or not isinstance(size, int)
            ):
                raise ValueError(f"state {sid} has a bad {kind} entry")
    for row in snaps:
        if (
            not isinstance(row, list)
            or len(row) not in (3, 4)
            or not isinstance(row[0], int)
            or not isinstance(row[1], int)
            or row[2] not in states
            or (len(row) == 4 and not isinstance(row[3], str))
        ):
            raise ValueError(f"bad snapshot entry {row!r}")
    next_id = doc["next"]
    key, pending = doc.get("key"), doc.get("pending_key")
    if not isinstance(next_id, int) or not all(
        k is None or isinstance(k, str) for k in (key, pending)
    ):
        raise ValueError("bad next id or key fingerprint")
    return _Index(next_id, key, pending, states, snaps)


class SnapshotStore:
    """The snapshots of one instance, under ``root`` (``<instance>/snapshots``)."""

    def __init__(self, root: Path, key: AesKey | None) -> None:
        self.root = Path(root)
        self.key = key

    @property
    def fingerprint(self) -> str | None:
        return None if self.key is None else key_fingerprint(self.key)

    # ------------------------------------------------------------ paths & locking

    @property
    def index_path(self) -> Path:
        return self.root / "index.json"

    @property
    def objects_dir(self) -> Path:
        return self.root / "objects"

    def object_path(self, digest: str) -> Path:
        if not _DIGEST.fullmatch(digest):
            raise SnapshotError(f"bad object name {digest!r}")
        return self.objects_dir / digest

    def exists(self) -> bool:
        return self.index_path.exists()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise writers (two `snapshot create` at once must not lose one)."""
        ensure_dir(self.root, PRIVATE_MODE, parent_mode=PRIVATE_MODE)
        fd = os.open(
            self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # ------------------------------------------------------------ index

    def _read_index(self) -> _Index:
        try:
            raw = self.index_path.read_bytes()
        except FileNotFoundError:
            return _Index.empty(self.fingerprint)
        except OSError as exc:
            raise SnapshotError(f"cannot read {self.index_path}: {exc.strerror}") from None
        try:
            return _parse_index(raw)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise SnapshotError(
                f"{self.index_path} is corrupt ({exc}); restore it from a "
                "backup, or remove the snapshots dir to start afresh"
            ) from None

    def _write_index(self, index: _Index) -> None:
        write_atomic(self.index_path, index.to_bytes(), 0o600)

    def _check_key(self, index: _Index) -> None:
        if index.pending_key is not None:
            raise SnapshotError(
                "a key rotation of this instance was interrupted; run "
                "`vtpmctl key rotate` again or start the instance to settle it"
            )
        if index.key != self.fingerprint:
            raise SnapshotError(
                f"the snapshots are encrypted with key {index.key or '(none)'} but the "
                f"instance's key is {self.fingerprint or '(none)'}; restore the right key"
            )

    def stored_fingerprint(self) -> str | None:
        """The fingerprint of the key the objects are encrypted with (None: plain)."""
        return self._read_index().key

    def key_mismatch(self) -> str | None:
        """Why the objects are not under this store's key (whatever a rotation left), or None."""
        index = self._read_index()
        if not index.snaps or index.key == self.fingerprint:
            return None
        return (
            f"the snapshots are encrypted with key {index.key or '(none)'} but the "
            f"instance's key is {self.fingerprint or '(none)'}"
        )

    def all(self) -> list[Snapshot]:
        """Every snapshot, oldest first."""
        index = self._read_index()
        return [index.snapshot(row) for row in index.snaps]

    def find(self, ref: str) -> Snapshot:
        """By id, then by label."""
        snaps = self.all()
        for snap in snaps:
            if str(snap.id) == ref:
                return snap
        for snap in snaps:
            if snap.label == ref:
                return snap
        raise SnapshotError(f"no snapshot {ref!r}; see `vtpmctl snapshot list`")

    # ------------------------------------------------------------ objects

    def _put(self, plain: bytes) -> str:
        """Store one object (or keep the good copy already there); returns its digest."""
        digest = _sha256(plain)
        path = self.object_path(digest)
        if path.exists():
            try:
                self.read_object(digest)
                return digest
            except SnapshotError:
                pass  # damaged or under another key: replace it with a good copy
        ensure_dir(self.objects_dir, PRIVATE_MODE, parent_mode=PRIVATE_MODE)
        write_atomic(path, wrap_file(plain, self.key), 0o600)
        return digest

    def read_object(self, digest: str) -> bytes:
        """The plaintext of one object, checked against its name."""
        path = self.object_path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise SnapshotError(f"snapshot object {digest[:12]} is missing") from None
        except OSError as exc:
            raise SnapshotError(
                f"cannot read snapshot object {digest[:12]}: {exc.strerror}"
            ) from None
        try:
            plain = unwrap_file(data, self.key)
        except BlobError as exc:
            raise SnapshotError(
                f"snapshot object {digest[:12]} is unreadable ({exc.message})"
            ) from None
        if _sha256(plain) != digest:
            raise SnapshotError(
                f"snapshot object {digest[:12]} is corrupt (its content does not match its name)"
            )
        return plain

    def read_blobs(self, snap: Snapshot) -> dict[str, bytes]:
        """Every blob of a snapshot, each verified; raises before returning any."""
        return {kind: self.read_object(d) for kind, d in snap.blobs.items()}

    def object_names(self) -> list[str]:
        """Digests of the object files present (whatever the index says)."""
        try:
            return sorted(n for n in os.listdir(self.objects_dir) if _DIGEST.fullmatch(n))
        except FileNotFoundError:
            return []

    def referenced(self) -> set[str]:
        index = self._read_index()
        return {v[0] for state in index.states.values() for v in state.values()}

    # ------------------------------------------------------------ copies (remotes)

    def export_index(self) -> tuple[dict[str, Any], dict[str, bytes]] | None:
        """The index as a JSON object and every object it names, as stored (each checked).

        None when there are no snapshots. Refused while a key rotation is pending or
        when the objects are under another key than the store's.
        """
        with self.locked():
            if not self.exists():
                return None
            index = self._read_index()
            if not index.snaps:
                return None
            self._check_key(index)
            names = {v[0] for state in index.states.values() for v in state.values()}
            stored = {}
            for digest in sorted(names):
                self.read_object(digest)  # decrypts, checks the HMAC and the name
                stored[digest] = self.object_path(digest).read_bytes()
            return json.loads(index.to_bytes()), stored

    def adopt(self, doc: dict[str, Any], stored: dict[str, bytes]) -> list[Snapshot]:
        """Make an empty store hold the index ``doc`` and its ``stored`` objects.

        The objects must be in this store's format under its key (what
        ``export_index`` returned on a store with the same key); each is checked
        before anything is written, and the index is written last.
        """
        try:
            index = _parse_index(json.dumps(doc).encode())
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise SnapshotError(f"the snapshot index to adopt is invalid ({exc})") from None
        if index.key != self.fingerprint or index.pending_key is not None:
            raise SnapshotError(
                f"the snapshots to adopt are under key {index.key or '(none)'}, not this "
                f"store's {self.fingerprint or '(none)'}"
            )
        names = {v[0] for state in index.states.values() for v in state.values()}
        if set(stored) != names:
            raise SnapshotError("the snapshot objects to adopt are not the ones the index names")
        with self.locked():
            if self.exists():
                raise SnapshotError(f"{self.root} has snapshots already")
            for digest in sorted(names):
                try:
                    plain = unwrap_file(stored[digest], self.key)
                except BlobError as exc:
                    raise SnapshotError(
                        f"snapshot object {digest[:12]} is unreadable ({exc.message})"
                    ) from None
                if _sha256(plain) != digest:
                    raise SnapshotError(f"snapshot object {digest[:12]} is corrupt")
            ensure_dir(self.objects_dir, PRIVATE_MODE, parent_mode=PRIVATE_MODE)
            for digest in sorted(names):
                write_atomic(self.object_path(digest), stored[digest], 0o600)
            self._write_index(index)
            return [index.snapshot(row) for row in index.snaps]

    # ------------------------------------------------------------ operations

    def create(
        self, blobs: dict[str, bytes], label: str | None = None, now: float | None = None
    ) -> Snapshot:
        """Record ``blobs`` (kind -> plaintext) as a new snapshot."""
        blobs = {k: v for k, v in blobs.items() if v}
        if BlobKind.PERMANENT not in blobs or set(blobs) - set(BlobKind):
            raise SnapshotError("a snapshot needs the permanent state (and known kinds only)")
        if label is not None:
            check_label(label)
        with self.locked():
            index = self._read_index()
            self._check_key(index)
            if label is not None and any(len(r) > 3 and r[3] == label for r in index.snaps):
                raise SnapshotError(
                    f"a snapshot labelled {label!r} exists already; pick "
                    "another label or remove that one"
                )
            state = {kind: [self._put(data), len(data)] for kind, data in sorted(blobs.items())}
            sid = next((s for s, v in index.states.items() if v == state), None)
            if sid is None:
                sid = str(max((int(s) for s in index.states), default=0) + 1)
                index.states[sid] = state
            row: list[Any] = [index.next_id, int(time.time() if now is None else now), sid]
            if label is not None:
                row.append(label)
            index.snaps.append(row)
            index.next_id += 1
            index.key = self.fingerprint
            self._write_index(index)
            return index.snapshot(row)

    def remove(self, ref: str) -> Snapshot:
        with self.locked():
            snap = self.find(ref)
            index = self._read_index()
            index.snaps = [r for r in index.snaps if r[0] != snap.id]
            self._drop_unused(index)
            return snap

    def prune(self, keep: int) -> list[Snapshot]:
        """Keep the newest ``keep`` snapshots; returns the removed ones."""
        if keep < 1:
            raise SnapshotError("--keep must be 1 or more")
        with self.locked():
            index = self._read_index()
            cut = max(len(index.snaps) - keep, 0)
            removed = [index.snapshot(r) for r in index.snaps[:cut]]
            if removed:
                index.snaps = index.snaps[cut:]
                self._drop_unused(index)
            return removed

    def _drop_unused(self, index: _Index) -> None:
        """Write the index without unreferenced states, then delete unreferenced objects.

        The index goes first: a crash leaves at worst an orphan object, which
        the next removal deletes, never an index entry without its object.
        """
        used = {r[2] for r in index.snaps}
        index.states = {s: v for s, v in index.states.items() if s in used}
        self._write_index(index)
        live = {v[0] for state in index.states.values() for v in state.values()}
        try:
            names = os.listdir(self.objects_dir)
        except FileNotFoundError:
            return
        for name in names:
            base = name.removesuffix(REKEY_SUFFIX)
            if base not in live and (_DIGEST.fullmatch(base) or name.endswith(".tmp")):
                (self.objects_dir / name).unlink(missing_ok=True)

    # ------------------------------------------------------------ key rotation

    def stage_rekey(self, new_key: AesKey | None) -> None:
        """Phase 1 of a key rotation: every object re-encrypted beside the old one."""
        if not self.exists():
            return
        with self.locked():
            index = self._read_index()
            if index.key != self.fingerprint and index.pending_key is None:
                raise SnapshotError(
                    f"the snapshots are not encrypted with the current key "
                    f"({index.key or '(none)'}); cannot re-encrypt them"
                )
            for digest in sorted({v[0] for st in index.states.values() for v in st.values()}):
                try:
                    plain = self.read_object(digest)
                except SnapshotError as exc:
                    raise SnapshotError(
                        f"cannot re-encrypt the snapshots: {exc}; remove the "
                        "snapshots that use it (vtpmctl verify lists them)"
                    ) from None
                write_atomic(
                    self.objects_dir / (digest + REKEY_SUFFIX), wrap_file(plain, new_key), 0o600
                )
            index.pending_key = key_fingerprint(new_key) if new_key is not None else ""
            self._write_index(index)

    def commit_rekey(self, new_fingerprint: str | None) -> None:
        """Phase 2 (replayable): the staged objects replace the old ones."""
        if not self.exists():
            return
        with self.locked():
            index = self._read_index()
            for name in os.listdir(self.objects_dir) if self.objects_dir.is_dir() else []:
                if name.endswith(REKEY_SUFFIX):
                    os.rename(
                        self.objects_dir / name, self.objects_dir / name.removesuffix(REKEY_SUFFIX)
                    )
            if self.objects_dir.is_dir():
                fsync_dir(self.objects_dir)
            index.key = new_fingerprint
            index.pending_key = None
            self._write_index(index)

    def abort_rekey(self) -> bool:
        """Roll back a rotation that never reached its commit; True if there was one."""
        if not self.root.is_dir():
            return False
        found = False
        with self.locked():
            for name in os.listdir(self.objects_dir) if self.objects_dir.is_dir() else []:
                if name.endswith(REKEY_SUFFIX):
                    (self.objects_dir / name).unlink(missing_ok=True)
                    found = True
            if self.exists():
                index = self._read_index()
                if index.pending_key is not None:
                    index.pending_key = None
                    self._write_index(index)
                    found = True
        return found

    # ------------------------------------------------------------ accounting

    def disk_usage(self) -> tuple[int, int]:
        """(bytes in files, bytes allocated on disk incl. directories) of the whole store."""
        apparent = allocated = 0
        for dirpath, _dirs, files in os.walk(self.root):
            allocated += os.lstat(dirpath).st_blocks * 512
            for name in files:
                st = os.lstat(os.path.join(dirpath, name))
                apparent += st.st_size
                allocated += st.st_blocks * 512
        return apparent, allocated


# ---------------------------------------------------------------- restoring a state dir


class RestorePendingError(SnapshotError):
    """An interrupted restore that cannot be settled without the user."""


def restore_marker(state_dir: Path) -> Path:
    """Present while a restore is replacing the files of ``state_dir``."""
    return state_dir.parent / "restore.pending"


def staged_file(sd: StateDir, name: str) -> Path:
    """Where a restore stages the new content of state file ``name``."""
    target = sd.file(name)
    return target.with_name(target.name + RESTORE_SUFFIX)


def _digest(path: Path) -> str | None:
    try:
        return _sha256(path.read_bytes())
    except FileNotFoundError:
        return None


def replace_state(sd: StateDir, blobs: dict[str, bytes], note: str) -> None:
    """Make ``blobs`` the state of ``sd`` (caller holds its lock), in a crash-safe order.

    Files of kinds absent from ``blobs`` are removed (a permanent-only
    snapshot leaves no stale volatile state of another boot behind). The
    marker records the digests of the files it replaces and of the staged
    ones, so that settling it later can tell whether the state changed since.
    """
    if BlobKind.PERMANENT not in blobs:
        raise SnapshotError("refusing to restore a snapshot without permanent state")
    staged: dict[str, Path] = {}
    for kind, plain in blobs.items():
        path = staged_file(sd, BlobKind(kind).file_name)
        write_atomic(path, wrap_file(plain, sd.key), sd.mode)
        staged[kind] = path
    decision = {
        "snapshot": note,
        "kinds": sorted(staged),
        "before": {name: _digest(sd.file(name)) for name in STATE_FILE_NAMES},
        "after": {BlobKind(k).file_name: _digest(path) for k, path in staged.items()},
    }
    write_atomic(restore_marker(sd.path), json.dumps(decision).encode(), 0o600)
    _roll_forward(sd, decision)


def read_restore_marker(sd: StateDir) -> dict[str, Any] | None:
    """The decision of an interrupted restore, None if there is none."""
    marker = restore_marker(sd.path)
    try:
        decision = json.loads(marker.read_bytes())
        if not isinstance(decision, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RestorePendingError(
            f"{marker} is unreadable ({exc}), so an interrupted snapshot restore cannot "
            f"be finished; remove it to keep the state the instance has: "
            f"rm {shlex.quote(str(marker))}"
        ) from None
    return decision


def unchanged_since(sd: StateDir, decision: dict[str, Any]) -> bool:
    """Every state file is as the restore's marker found it, or as the restore left it."""
    before, after = decision.get("before"), decision.get("after")
    if not isinstance(before, dict) or not isinstance(after, dict):
        return False  # a marker of an older vtpmctl: the state it expected is unknown
    for name in STATE_FILE_NAMES:
        allowed = {before.get(name), after.get(name)}
        if name != BlobKind.PERMANENT.file_name:
            allowed.add(None)  # the restore removes the old volatile state first
        if _digest(sd.file(name)) not in allowed:
            return False
    return True


def settle_restore(sd: StateDir) -> str | None:
    """Settle an interrupted restore (caller holds the state lock); a note, or None.

    A restore whose marker is present is finished, unless a state file
    changed after the marker was written: then that newer state is kept and
    the restore is dropped. Staged files without a marker are left from a
    restore that never decided, and are removed.
    """
    decision = read_restore_marker(sd)
    if decision is not None and unchanged_since(sd, decision):
        _roll_forward(sd, decision)
        return f"finished the interrupted restore of snapshot {decision.get('snapshot')}"
    leftovers = [p for p in (staged_file(sd, n) for n in STATE_FILE_NAMES) if p.exists()]
    for path in leftovers:
        path.unlink(missing_ok=True)
    if leftovers:
        fsync_dir(sd.path)
    if decision is None:
        return None
    marker = restore_marker(sd.path)
    marker.unlink()
    fsync_dir(marker.parent)
    return (
        f"dropped the interrupted restore of snapshot {decision.get('snapshot')}: the "
        "state changed after it was interrupted, and that newer state is kept (restore "
        "the snapshot again if it is still wanted)"
    )


def _roll_forward(sd: StateDir, decision: dict[str, Any]) -> None:
    """Replay a decided restore (idempotent)."""
    kinds = set(decision.get("kinds", []))
    # 1. no volatile state of the old boot may survive next to the new permanent state
    for kind in (BlobKind.VOLATILE, BlobKind.SAVESTATE):
        if kind not in kinds or staged_file(sd, kind.file_name).exists():
            sd.file(kind.file_name).unlink(missing_ok=True)
    fsync_dir(sd.path)
    # 2. the permanent state, then 3. the volatile parts that belong to it
    for kind in BlobKind:
        staged = staged_file(sd, kind.file_name)
        if staged.exists():
            os.rename(staged, sd.file(kind.file_name))
            fsync_dir(sd.path)
    marker = restore_marker(sd.path)
    marker.unlink()
    fsync_dir(marker.parent)
