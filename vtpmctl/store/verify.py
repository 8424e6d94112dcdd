"""Offline health checks of one instance: files, keys, permissions, lock, snapshots.

Every check yields findings (``ok``/``warn``/``error``, what was seen, how to
fix it); nothing is changed. A fix is a shell command when one exists, and
none of them loses data: an operation a crash interrupted is finished by the
command that settles it, never by removing its files. Checks that need the engine (libtpms'
``ValidateState``, who holds the lock) are passed in as callables so that the
store layer stays free of it.
"""

from __future__ import annotations

import os
import shlex
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from vtpmctl.errors import InstanceError
from vtpmctl.model import STATE_FILE_NAMES, BlobKind, Transport
from vtpmctl.store import instance_keys
from vtpmctl.store.access import AccessError, format_mode
from vtpmctl.store.access import describe as describe_access
from vtpmctl.store.blob import (
    FLAG_ENCRYPTED,
    HEADER_SIZE,
    AesKey,
    BlobError,
    parse_header,
    parse_tlvs,
    unwrap_file,
)
from vtpmctl.store.dirs import dir_problem
from vtpmctl.store.instances import UNIX_PATH_MAX, Instance
from vtpmctl.store.keys import KeyFileError, check_secret_file_mode
from vtpmctl.store.snapshots import (
    REKEY_SUFFIX,
    RESTORE_SUFFIX,
    SnapshotError,
    SnapshotStore,
    read_restore_marker,
    restore_marker,
    snapshots_dir,
    unchanged_since,
)

Level = Literal["ok", "warn", "error"]
# plaintext blobs (kind -> bytes), tpm2 -> ({kind: ValidateState rc}, error or None)
Validator = Callable[[dict[str, bytes], bool], tuple[dict[str, int], str | None]]
# pid -> (is it this instance's daemon, a short description)
HolderInfo = Callable[[int], tuple[bool, str]]


@dataclass(frozen=True)
class Finding:
    level: Level
    check: str  # stable identifier of the check, e.g. "state.permall.hmac"
    what: str
    fix: str | None = None
    path: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "check": self.check,
            "what": self.what,
            "fix": self.fix,
            "path": self.path,
        }

    def line(self) -> str:
        return f"{self.level:<5}  {self.what}" + (f"; fix: {self.fix}" if self.fix else "")


def _mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(os.lstat(path).st_mode)
    except FileNotFoundError:
        return None


def _dir_checks(inst: Instance) -> Iterator[Finding]:
    p = inst.paths
    roots = [
        ("dir.root.config", p.roots.config),
        ("dir.root.state", p.roots.state),
        ("dir.root.runtime", p.roots.runtime),
        ("dir.root.logs", p.roots.logs),
        ("dir.instances", p.base.parent),
    ]
    private = [
        ("dir.instance", p.base),
        ("dir.state", p.state_dir),
        ("dir.secrets", p.secrets_dir),
        ("dir.snapshots", snapshots_dir(p)),
        ("dir.run", p.run_dir),
    ]
    if p.attached:  # its manager's dirs and modes: only whether the state is there
        roots, private = [], [("dir.state", p.state_dir)]
    for check, path in roots + private:
        mode = _mode(path)
        if mode is None:
            if check in ("dir.instance", "dir.state"):
                yield Finding(
                    "error", check, f"{path} is missing", "restore it from a backup", str(path)
                )
            continue
        problem = None if p.attached else dir_problem(path)
        if problem is not None:
            # start refuses such a dir: another user could swap what vtpmctl puts there
            yield Finding("error", check, problem[0], problem[1], str(path))
        elif (
            mode & 0o077
            and check in ("dir.secrets", "dir.state", "dir.snapshots")
            and not p.attached
        ):
            yield Finding(
                "warn",
                check,
                f"{path} is readable by group or others (mode {mode:04o})",
                f"chmod 700 {path}",
                str(path),
            )
        else:
            yield Finding("ok", check, f"{path}: mode {mode:04o}", None, str(path))


def _key_checks(inst: Instance) -> tuple[list[Finding], AesKey | None, bool]:
    """Findings, the state key, and whether the key could be loaded as configured."""
    out: list[Finding] = []
    key: AesKey | None = None
    usable = True
    if inst.config.encrypted:
        try:
            key = instance_keys.load_state_key(inst)
            if inst.key is not None:
                out.append(Finding("ok", "key.state", "the state key given opens the state"))
            else:
                out.append(
                    Finding(
                        "ok",
                        "key.state",
                        f"state key {inst.paths.state_key}: mode "
                        "0600, matches the recorded fingerprint",
                        None,
                        str(inst.paths.state_key),
                    )
                )
        except KeyFileError as exc:
            usable = False
            where = None if inst.paths.attached else str(inst.paths.state_key)
            out.append(Finding("error", "key.state", str(exc), None, where))
    if inst.config.migration_key and inst.paths.attached:
        out.append(Finding("ok", "key.migration", "its manager keeps its migration key"))
    elif inst.config.migration_key:
        path = inst.paths.migration_key
        try:
            check_secret_file_mode(path)
            instance_keys.load_migration_key(inst)
            out.append(
                Finding("ok", "key.migration", f"migration key {path}: mode 0600", None, str(path))
            )
        except KeyFileError as exc:
            out.append(Finding("error", "key.migration", str(exc), None, str(path)))
    return out, key, usable


def _damaged_fix(inst: Instance, name: str, running: bool, otherwise: str) -> str:
    """A bad volatile state is dropped (a reboot to the guest), never the NV data."""
    if name in instance_keys.VOLATILE_NAMES:
        return instance_keys.delete_volatile_fix(inst, running)
    return otherwise


def _state_file_checks(
    inst: Instance, key: AesKey | None, key_usable: bool, validate: Validator | None
) -> Iterator[Finding]:
    sd = inst.statedir(key)
    plains: dict[str, bytes] = {}
    running = sd.holder_pid() is not None

    def restore_fix(name: str, otherwise: str) -> str:
        return _damaged_fix(inst, name, running, otherwise)

    for kind in BlobKind:
        name = kind.file_name
        path = sd.file(name)
        check = f"state.{name}"
        raw = sd.read_raw(name)
        if raw is None:
            if kind is BlobKind.PERMANENT:
                yield Finding(
                    "error",
                    check,
                    f"{path} is missing: the TPM is gone",
                    "restore it from a snapshot (vtpmctl snapshot restore) or a backup",
                    str(path),
                )
            continue
        mode = _mode(path) or 0
        if mode & 0o137 and not inst.paths.attached:  # an attached state's modes: its manager's
            yield Finding(
                "error" if mode & 0o006 else "warn",
                f"{check}.mode",
                f"{path} has mode {mode:04o} (expected 0600 or 0640)",
                f"chmod 600 {path}",
                str(path),
            )
        try:
            header = parse_header(raw)
            if header.version >= 2:
                parse_tlvs(raw[HEADER_SIZE:])
        except BlobError as exc:
            yield Finding(
                "error",
                f"{check}.format",
                f"{path}: {exc.message}",
                restore_fix(name, "restore it from a snapshot or backup"),
                str(path),
            )
            continue
        encrypted = bool(header.flags & FLAG_ENCRYPTED)
        if encrypted != inst.config.encrypted:
            yield Finding(
                "error",
                f"{check}.format",
                f"{path} is {'' if encrypted else 'not '}encrypted but the instance "
                f"is configured {'with' if inst.config.encrypted else 'without'} a "
                "state key",
                "restore the matching file or key",
                str(path),
            )
            continue
        if not key_usable:
            continue
        try:
            plains[kind] = unwrap_file(raw, key)
        except BlobError as exc:
            yield Finding(
                "error",
                f"{check}.hmac",
                f"{path}: {exc.message}",
                restore_fix(name, "restore the right state key, or the file from a snapshot"),
                str(path),
            )
            continue
        how = "HMAC and decryption" if encrypted else "header and TLVs"
        yield Finding(
            "ok",
            f"{check}.format",
            f"{path}: {how} good ({len(plains[kind])} bytes of state)",
            None,
            str(path),
        )
    if validate is not None and BlobKind.PERMANENT in plains:
        rcs, error = validate(plains, inst.config.tpm2)
        if error and not rcs:
            yield Finding(
                "error",
                "state.validate",
                f"libtpms could not check the state: {error}",
                None,
                str(sd.path),
            )
        for word, rc in sorted(rcs.items()):
            if rc:
                yield Finding(
                    "error",
                    f"state.{BlobKind(word).file_name}.validate",
                    f"libtpms rejects the {word} state (TPMLIB_ValidateState 0x{rc:x})",
                    restore_fix(
                        BlobKind(word).file_name,
                        "restore it from a snapshot (vtpmctl snapshot restore) or a backup",
                    ),
                    str(sd.file(BlobKind(word).file_name)),
                )
            else:
                yield Finding(
                    "ok",
                    f"state.{BlobKind(word).file_name}.validate",
                    f"libtpms accepts the {word} state",
                    None,
                    str(sd.file(BlobKind(word).file_name)),
                )


def _settle_fix(inst: Instance) -> str:
    """The command that settles an interrupted operation: start does, before it runs the TPM."""
    running = inst.statedir().holder_pid() is not None
    return f"vtpmctl {'restart' if running else 'start'} {shlex.quote(inst.name)}"


def _rotation_check(inst: Instance) -> Finding | None:
    marker = inst.paths.secrets_dir / instance_keys.COMMIT_MARKER
    if not marker.exists():
        return None
    return Finding(
        "error",
        "key.rotation",
        "a key rotation was decided but not finished (the state, key and snapshots are "
        "between the old key and the new)",
        _settle_fix(inst),
        str(marker),
    )


def _restore_check(inst: Instance) -> Iterator[Finding]:
    sd = inst.statedir()
    marker = restore_marker(sd.path)
    try:
        decision = read_restore_marker(sd)
    except SnapshotError as exc:
        yield Finding(
            "error", "state.restore", str(exc), f"rm {shlex.quote(str(marker))}", str(marker)
        )
        return
    if decision is None:
        return
    ref = decision.get("snapshot")
    if unchanged_since(sd, decision):
        what = f"a restore of snapshot {ref} was decided but not finished"
    else:
        what = (
            f"an interrupted restore of snapshot {ref} is out of date (the state changed "
            "after it); settling it keeps the current state"
        )
    yield Finding("error", "state.restore", what, _settle_fix(inst), str(marker))


def _leftover_checks(inst: Instance) -> Iterator[Finding]:
    sd = inst.statedir()
    yield from _restore_check(inst)
    marker = restore_marker(sd.path)
    running = sd.holder_pid() is not None
    for name in STATE_FILE_NAMES:
        for suffix in (instance_keys.ROTATE_SUFFIX, RESTORE_SUFFIX):
            path = sd.file(name).with_name(sd.file(name).name + suffix)
            if path.exists() and not marker.exists():
                # staged by a rotation or restore that never decided: safe to drop
                yield Finding(
                    "warn",
                    "state.leftover",
                    f"{path} is left from an interrupted key rotation or restore",
                    f"rm {shlex.quote(str(path))}" if running else _settle_fix(inst),
                    str(path),
                )
        tmp = sd.path / (sd.tmp_prefix + name)
        if tmp.exists():
            yield Finding(
                "warn",
                "state.leftover",
                f"{tmp} is left from an interrupted write",
                f"rm {shlex.quote(str(tmp))}",
                str(tmp),
            )


def _runtime_checks(inst: Instance, holder_info: HolderInfo | None) -> Iterator[Finding]:
    p = inst.paths
    holder = inst.statedir().holder_pid()
    leftovers = [f for f in (p.pid_file, p.ctrl_socket, p.data_socket) if os.path.lexists(f)]
    if holder is not None:
        ours, desc = holder_info(holder) if holder_info else (True, "?")
        if ours or p.attached:
            yield Finding(
                "ok",
                "lock",
                f"running: the state lock is held by pid {holder} ({desc})",
                None,
                str(p.state_dir / ".lock"),
            )
        else:
            yield Finding(
                "warn",
                "lock",
                f"the state lock is held by pid {holder} ({desc}), "
                "which is not this instance's vtpmctl daemon",
                f"stop pid {holder} if it should not use this state",
                str(p.state_dir / ".lock"),
            )
        try:
            recorded = int(p.pid_file.read_text().strip())
        except (OSError, ValueError):
            recorded = None
        if ours and recorded is not None and recorded != holder:
            yield Finding(
                "warn",
                "pidfile",
                f"{p.pid_file} says {recorded}, but pid {holder} holds the lock",
                f"vtpmctl restart {inst.name}",
                str(p.pid_file),
            )
    else:
        yield Finding(
            "ok", "lock", "stopped: nobody holds the state lock", None, str(p.state_dir / ".lock")
        )
        for path in leftovers:
            yield Finding(
                "warn",
                "stale",
                f"{path} is left from a daemon that is gone",
                f"vtpmctl stop {shlex.quote(inst.name)}",  # removes what a dead daemon left
                str(path),
            )
    if inst.config.transport == Transport.SOCKET:
        for path in (p.ctrl_socket, p.data_socket):
            size = len(os.fsencode(path))
            if size > UNIX_PATH_MAX:
                yield Finding(
                    "error",
                    "socket.path",
                    f"socket path {path} is {size} bytes, over the {UNIX_PATH_MAX}-byte limit",
                    "use a shorter name or VTPMCTL_HOME",
                    str(path),
                )


def _access_checks(inst: Instance) -> Iterator[Finding]:
    """The run dir and sockets have exactly the configured group and mode (never wider),
    and the group can reach them through every dir above."""
    if inst.paths.attached:  # its sockets' modes are its manager's choice
        return
    if inst.config.transport != Transport.SOCKET:
        return
    p = inst.paths
    try:
        access = inst.config.access
        gid = access.gid
    except (InstanceError, AccessError) as exc:
        name = shlex.quote(inst.name)
        fix = f"vtpmctl stop {name} && vtpmctl start {name} --group GROUP"
        yield Finding("error", "access.config", str(exc), fix, str(p.config_file))
        return
    group = access.group
    for check, path, want in (
        ("access.run", p.run_dir, access.dir_mode),
        ("access.ctrl", p.ctrl_socket, access.socket_mode),
        ("access.data", p.data_socket, access.socket_mode),
    ):
        try:
            mode, owner_group = describe_access(path)
        except FileNotFoundError:
            continue
        gid_now = os.lstat(path).st_gid
        fix = f"chmod {format_mode(want)} {shlex.quote(str(path))}"
        if group is not None:
            fix += f" && chgrp {shlex.quote(group)} {shlex.quote(str(path))}"
        if mode & ~want:
            yield Finding(
                "error",
                check,
                f"{path} is mode {mode:04o}, wider than the configured {format_mode(want)}",
                fix,
                str(path),
            )
        elif mode != want or (group is not None and gid_now != gid):
            yield Finding(
                "warn",
                check,
                f"{path} is mode {mode:04o} group {owner_group}, not the configured "
                f"{format_mode(want)}" + (f" group {group}" if group else ""),
                fix,
                str(path),
            )
        else:
            yield Finding(
                "ok", check, f"{path}: mode {mode:04o} group {owner_group}", None, str(path)
            )
    if group is None:
        return
    for parent in p.run_dir.parents:
        try:
            st = os.stat(parent)
        except OSError:
            continue
        passable = st.st_mode & 0o001 or (st.st_gid == gid and st.st_mode & 0o010)
        if not passable:
            yield Finding(
                "warn",
                "access.path",
                f"group {group} cannot pass through {parent} (mode "
                f"{stat.S_IMODE(st.st_mode):04o}) to reach the control socket",
                f"chmod o+x {shlex.quote(str(parent))}",
                str(parent),
            )


def _snapshot_checks(inst: Instance, key: AesKey | None, key_usable: bool) -> Iterator[Finding]:
    store = SnapshotStore(snapshots_dir(inst.paths), key)
    if not store.root.exists():
        return
    try:
        snaps = store.all()
        referenced = store.referenced()
        mismatch = store.key_mismatch()
    except SnapshotError as exc:
        yield Finding("error", "snapshots.index", str(exc), None, str(store.index_path))
        return
    if not key_usable:
        return
    if mismatch is not None:  # objects that fail to open are fine under that key: keep them
        yield Finding(
            "error", "snapshots.key", mismatch, "restore the right key", str(store.index_path)
        )
        return
    bad = 0
    for digest in sorted(referenced):
        try:
            store.read_object(digest)
        except SnapshotError as exc:
            bad += 1
            users = [s for s in snaps if digest in s.blobs.values()]
            yield Finding(
                "error",
                "snapshots.object",
                f"{exc} (used by snapshot {', '.join(s.describe() for s in users)})",
                " && ".join(f"vtpmctl snapshot rm {shlex.quote(inst.name)} {s.id}" for s in users),
                str(store.object_path(digest)),
            )
    present = store.object_names()
    for digest in sorted(set(present) - referenced):
        yield Finding(
            "warn",
            "snapshots.orphan",
            f"snapshot object {digest[:12]} is used by no snapshot (the next snapshot rm "
            "removes it)",
            None,
            str(store.object_path(digest)),
        )
    for name in sorted(os.listdir(store.objects_dir)) if store.objects_dir.is_dir() else []:
        if name.endswith(REKEY_SUFFIX):
            yield Finding(
                "warn",
                "snapshots.leftover",
                f"{name} is left from an interrupted key rotation",
                _settle_fix(inst),
                str(store.objects_dir / name),
            )
    if not bad:
        yield Finding(
            "ok",
            "snapshots",
            f"{len(snaps)} snapshot(s), {len(referenced)} "
            "object(s): all readable and matching their hashes",
            None,
            str(store.root),
        )


def verify_instance(
    inst: Instance, *, validate: Validator | None = None, holder_info: HolderInfo | None = None
) -> list[Finding]:
    """Every finding about ``inst``; nothing on disk is changed."""
    findings = list(_dir_checks(inst))
    rotation = _rotation_check(inst)
    if rotation is not None:
        # Keys, state files and snapshot objects are between two keys until the
        # rotation is finished: what checks of them would say is explained by it.
        return [*findings, rotation, *_runtime_checks(inst, holder_info)]
    key_findings, key, usable = _key_checks(inst)
    findings += key_findings
    findings += _state_file_checks(inst, key, usable, validate)
    findings += _leftover_checks(inst)
    findings += _runtime_checks(inst, holder_info)
    findings += _access_checks(inst)
    findings += _snapshot_checks(inst, key, usable)
    return findings
