"""An instance's state and migration keys: stored, checked, rotated.

Keys are stored as swtpm ``format=hex`` files (0600) under the config root,
whatever form the user gave (a passphrase is stored as the key it derives,
so the passphrase itself is never kept) — except a key given on a
descriptor, which stays with the caller (as libvirt keeps its secrets) and
is given again to ``start``. Rotation re-encrypts every state
file under a two-phase commit: new files are written beside the old, a
commit marker makes the switch decided, and the renames that follow are
replayed after a crash; before the marker, a crash rolls back to the old
files, which are never touched until then.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
from pathlib import Path

from vtpmctl.errors import InstanceError
from vtpmctl.model import STATE_FILE_NAMES, BlobKind, KeyFormat
from vtpmctl.store.atomic import NoSpaceError, fsync_dir, write_atomic
from vtpmctl.store.blob import AesKey, wrap_file
from vtpmctl.store.dirs import PRIVATE_MODE, ensure_dir
from vtpmctl.store.instances import (
    Instance,
    InstanceConfig,
    InstanceMeta,
    InstancePaths,
    read_json,
    write_json,
)
from vtpmctl.store.keys import (
    KeyFileError,
    KeySource,
    check_secret_file_mode,
    encode_hex_key,
    key_fingerprint,
    load_key,
    write_secret_file,
)
from vtpmctl.store.snapshots import SnapshotStore, snapshots_dir
from vtpmctl.store.statedir import StateDir, StateDirError

ROTATE_SUFFIX = ".rotate"
COMMIT_MARKER = "rotate.commit"  # in the secrets dir: the rotation is decided


def _marker(paths: InstancePaths) -> Path:
    return paths.secrets_dir / COMMIT_MARKER


def _new_key_file(paths: InstancePaths) -> Path:
    return paths.secrets_dir / "state.key.new"


def store_key(path: Path, key: AesKey) -> None:
    ensure_dir(path.parent, PRIVATE_MODE, parent_mode=PRIVATE_MODE)
    write_secret_file(path, encode_hex_key(key))


def read_user_key(path: Path, kind: str) -> AesKey:
    """A key the user points at: must be private (0600, owned) and well-formed."""
    check_secret_file_mode(path)
    return load_key(path, kind=KeyFormat(kind))


def load_state_key(inst: Instance, given: AesKey | None = None) -> AesKey | None:
    """The instance's state key, checked against what its state was encrypted with.

    ``given`` is a key the caller brought (``start --key``): it is used instead of
    the stored one, which then need not exist, once it is known to be the right key.
    """
    if _marker(inst.paths).exists():  # neither key opens everything until it is finished
        raise KeyFileError(
            f"a key rotation of {inst.name} was decided but not finished; finish it "
            f"with: vtpmctl start {shlex.quote(inst.name)}"
        )
    if not inst.config.encrypted:
        if given is not None:
            raise KeyFileError(f"{inst.name} is not encrypted; start it without a state key")
        return None
    path = inst.paths.state_key
    given = given or inst.key
    if given is not None:
        key, where = given, "the state key given"
    elif inst.paths.attached:
        raise KeyFileError(attached_key_needed(inst))
    elif not path.exists() and inst.meta.key_source == "descriptor":
        raise KeyFileError(
            f"{inst.name} keeps no copy of its state key (it came on a descriptor); give "
            f"it with --key, e.g. vtpmctl start {shlex.quote(inst.name)} --key fd=3 3<KEY"
        )
    elif not path.exists():
        raise KeyFileError(
            f"the state key of {inst.name} ({path}) is missing; restore it, or give it "
            "with --key (the state cannot be opened without it)"
        )
    else:
        check_secret_file_mode(path)
        key, where = load_key(path, kind=KeyFormat.HEX), str(path)
    want = inst.meta.key_fingerprint
    if want and key_fingerprint(key) != want:
        raise KeyFileError(
            f"{where} is not the key {inst.name}'s state was encrypted with "
            f"(fingerprint {key_fingerprint(key)}, expected {want}); "
            + ("give the right key" if given is not None else "restore the right key")
        )
    return key


def attached_key_needed(inst: Instance) -> str:
    """Why an attached vTPM's encrypted state cannot be read, and the option that fixes it."""
    return (
        f"the state of {inst.name} is encrypted with the key its manager ({inst.owner}) gives "
        "its swtpm; give that key as swtpm's --key, e.g. --key pwdfd=3,mode=aes-256-cbc "
        "3<FILE (libvirt: the <encryption> secret's value) or --key file=KEYFILE"
    )


def bring_state_key(inst: Instance, source: KeySource) -> Instance:
    """``inst`` with the state key the caller brought (``--key``), once it opens the state."""
    permall = BlobKind.PERMANENT.file_name
    if not inst.config.encrypted:
        raise KeyFileError(f"the state of {inst.name} is not encrypted; leave out --key")
    probe = inst.statedir().read_raw(permall)
    key = source.resolve(probe=probe)
    if probe is not None:
        try:
            inst.statedir(key).load(permall)
        except StateDirError:
            raise KeyFileError(
                f"{source.where} does not open the state of {inst.name}; give the key "
                "its state was encrypted with"
            ) from None
    inst.key = key
    load_state_key(inst)  # a registered instance's recorded fingerprint must match too
    return inst


def with_state_key(inst: Instance, spec: str | None) -> Instance:
    """``inst``, with the key of a ``--key SPEC`` (swtpm's syntax) when one is given."""
    from vtpmctl.errors import UsageError
    from vtpmctl.store.keys import parse_key_spec

    if spec is None:
        return inst
    try:
        source = parse_key_spec(spec, "--key")
    except KeyFileError as exc:
        raise UsageError(str(exc)) from None
    return bring_state_key(inst, source)


def load_migration_key(inst: Instance, given: AesKey | None = None) -> AesKey | None:
    """The instance's migration key; ``given`` (``start --migration-key``) wins.

    An attached vTPM's migration key is its manager's (for its own migrations):
    vtpmctl has none, and reads such a vTPM's state from its state files instead.
    """
    if inst.paths.attached and given is None:
        return None
    if given is not None:
        want = inst.meta.migration_key_fingerprint
        if want and key_fingerprint(given) != want:
            raise KeyFileError(
                f"the migration key given is not {inst.name}'s (fingerprint "
                f"{key_fingerprint(given)}, expected {want}); give the right key"
            )
        return given
    if not inst.config.migration_key:
        return None
    path = inst.paths.migration_key
    if not path.exists():
        raise KeyFileError(f"the migration key of {inst.name} ({path}) is missing; restore it")
    check_secret_file_mode(path)
    return load_key(path, kind=KeyFormat.HEX)


# what `start --delete-volatile` removes
VOLATILE_NAMES = (BlobKind.VOLATILE.file_name, BlobKind.SAVESTATE.file_name)


def delete_volatile_fix(inst: Instance, running: bool = False) -> str:
    """The fix for a bad volatile state that keeps the permanent one: a reboot to the guest."""
    start = f"vtpmctl start {shlex.quote(inst.name)} --delete-volatile"
    return f"vtpmctl stop {shlex.quote(inst.name)} && {start}" if running else start


def check_state(inst: Instance, key: AesKey | None) -> None:
    """Every state file opens with ``key``; permall must exist (no silent new TPM)."""
    sd = inst.statedir(key)
    permall = BlobKind.PERMANENT.file_name
    if not sd.exists(permall):
        raise StateDirError(
            f"{sd.file(permall)} is missing: the TPM of {inst.name} is "
            "gone; restore it from a backup (vtpmctl will not make a new one)"
        )
    sd.load(permall)
    for name in VOLATILE_NAMES:
        try:
            sd.load(name)
        except StateDirError as exc:
            detail = f" ({exc.__cause__})" if exc.__cause__ else ""
            raise StateDirError(
                f"{sd.file(name)} is unusable{detail}; start without the volatile state "
                "(the guest sees a reboot, NV data is kept): " + delete_volatile_fix(inst)
            ) from None


# ---------------------------------------------------------------- rotation


def rotate(inst: Instance, new_key: AesKey, key_source: str) -> None:
    """Re-encrypt the state of a stopped instance (caller holds its state lock)."""
    paths = inst.paths
    old_key = load_state_key(inst)
    old = StateDir(paths.state_dir, tpm2=inst.config.tpm2, key=old_key)
    plains = {}
    for name in STATE_FILE_NAMES:
        data = old.load(name)
        if data is not None:
            plains[name] = data
    permall = BlobKind.PERMANENT.file_name
    if permall not in plains:
        raise StateDirError(f"{old.file(permall)} is missing; nothing to re-encrypt")
    # Phase 1: everything new is written beside the old; a crash here rolls back.
    try:
        store_key(_new_key_file(paths), new_key)
        for name, plain in plains.items():
            target = old.file(name)
            write_atomic(
                target.with_name(target.name + ROTATE_SUFFIX), wrap_file(plain, new_key), 0o600
            )
        meta = inst.meta
        meta.cipher = new_key.cipher
        meta.key_source = key_source
        meta.key_fingerprint = key_fingerprint(new_key)
        SnapshotStore(snapshots_dir(paths), old_key).stage_rekey(new_key)
        decision = {"files": sorted(plains), "meta": meta.to_json()}
        # Phase 2: the marker decides; finish() can be replayed until the marker is gone.
        write_atomic(_marker(paths), json.dumps(decision).encode(), 0o600)
    except NoSpaceError:
        # Undecided, and the disk is full: take back what phase 1 wrote now, as
        # the next start would, so that nothing is left over taking up space.
        if not _marker(paths).exists():
            with contextlib.suppress(OSError, InstanceError):
                recover(paths, inst.config.tpm2)
        raise
    finish(paths, inst.config.tpm2)


def finish(paths: InstancePaths, tpm2: bool) -> None:
    """Roll a decided rotation forward (idempotent)."""
    decision = read_json(_marker(paths))
    sd = StateDir(paths.state_dir, tpm2=tpm2)
    for name in decision.get("files", []):
        target = sd.file(name)
        staged = target.with_name(target.name + ROTATE_SUFFIX)
        if staged.exists():
            os.rename(staged, target)
    fsync_dir(paths.state_dir)
    new_key = _new_key_file(paths)
    if new_key.exists():
        os.rename(new_key, paths.state_key)
        fsync_dir(paths.secrets_dir)
    config = InstanceConfig.from_json(read_json(paths.config_file), paths.config_file)
    if not config.encrypted:
        config.encrypted = True
        write_json(paths.config_file, config.to_json())
    write_json(
        paths.meta_file, InstanceMeta.from_json(decision.get("meta", {}), paths.meta_file).to_json()
    )
    fingerprint = decision.get("meta", {}).get("key_fingerprint")
    SnapshotStore(snapshots_dir(paths), None).commit_rekey(fingerprint)
    _marker(paths).unlink()
    fsync_dir(paths.secrets_dir)


def recover(paths: InstancePaths, tpm2: bool) -> str | None:
    """Settle an interrupted rotation: "completed", "rolled back" or None (nothing to do)."""
    if _marker(paths).exists():
        try:
            finish(paths, tpm2)
        except (OSError, InstanceError) as exc:
            raise InstanceError(
                f"cannot complete the interrupted key rotation of {paths.name}: {exc}"
            ) from None
        return "completed"
    sd = StateDir(paths.state_dir, tpm2=tpm2)
    staged = [sd.file(n).with_name(sd.file(n).name + ROTATE_SUFFIX) for n in STATE_FILE_NAMES]
    leftovers = [p for p in [*staged, _new_key_file(paths)] if p.exists()]
    for path in leftovers:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    if SnapshotStore(snapshots_dir(paths), None).abort_rekey():
        leftovers.append(snapshots_dir(paths))
    return "rolled back" if leftovers else None
