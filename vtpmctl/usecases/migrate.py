"""``vtpmctl migrate export|import``: move a named vTPM to another store or host.

Export reads a *stopped* instance's state dir under its lock, so the bundle
is the TPM's final state and no start can race it. A running instance is
refused unless ``allow_running``: then its permanent state is fetched over
the control channel (a copy of a TPM that keeps changing, without its
volatile state; a running VM's TPM moves with QEMU's live migration instead).

Import verifies everything before it touches the registry: the bundle's
bytes (``store.bundle``), then libtpms on this host (``TPMLIB_ValidateState``
and a power-on in a throwaway process), then that the EKs the bundle
describes are the ones in the state. Only then is the name reserved and the
instance written, through the registry's reserve/commit, so a failure at any
point leaves the store as it was.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vtpmctl import __version__
from vtpmctl.errors import InstanceError, InstanceExists
from vtpmctl.model import BlobKind, TpmFamily, Transport
from vtpmctl.store.blob import AesKey, BlobError
from vtpmctl.store.bundle import (
    Bundle,
    BundleError,
    Manifest,
    Source,
    build_bundle,
    open_bundle,
)
from vtpmctl.store.instances import (
    Instance,
    InstanceConfig,
    InstanceMeta,
    InstancePaths,
    Registry,
    now_utc,
    validate_name,
)

if TYPE_CHECKING:
    from vtpmctl.usecases.inspect import InspectResult

CONTROL_TIMEOUT = 5.0
VERSION_TIMEOUT = 30.0  # seconds for the child that reads libtpms' version


class MigrateError(InstanceError):
    """An export or import could not be done; one line naming the cause and the fix."""


# ---------------------------------------------------------------- libtpms version


def libtpms_version(cache_dir: Path | None = None) -> str | None:
    """The libtpms installed here, as "0.9.2"; None when it cannot be loaded.

    Asked of a child process (``python -m vtpmctl _libtpms_version``): the CLI
    process never loads libtpms, not even to read its version. The answer is
    kept in ``cache_dir`` (the runtime root, cleared at boot) with what
    decides which file the dynamic loader picks — the library's path and
    identity, ``/etc/ld.so.cache`` and ``LD_LIBRARY_PATH`` — and reused while
    none of them changed: a libtpms upgrade replaces the file, so the next
    call asks a child again.
    """
    from vtpmctl.childproc import ChildError, run_child

    cached = _cached_version(cache_dir) if cache_dir is not None else None
    if cached is not None:
        return cached
    try:
        answer = run_child("_libtpms_version", {}, timeout=VERSION_TIMEOUT).answer
    except ChildError:
        return None
    version = answer.get("libtpms_version")
    if not isinstance(version, str):
        return None
    library = answer.get("library")
    if cache_dir is not None and isinstance(library, str):
        _cache_version(cache_dir, library, version)
    return version


VERSION_CACHE = "libtpms-version.json"


def _loader_key(library: str) -> list[object] | None:
    """What makes the loader pick this file with this content; None if it cannot be told."""
    import os

    key: list[object] = [library, os.environ.get("LD_LIBRARY_PATH")]
    for path in (library, "/etc/ld.so.cache"):
        try:
            st = os.stat(path)
        except OSError:
            if path == library:
                return None
            key.append(None)
            continue
        key.append([st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns])
    return key


def _cached_version(cache_dir: Path) -> str | None:
    import json

    try:
        data = json.loads((cache_dir / VERSION_CACHE).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("library"), str):
        return None
    version = data.get("libtpms_version")
    if not isinstance(version, str) or data.get("key") != _loader_key(data["library"]):
        return None
    return version


def _cache_version(cache_dir: Path, library: str, version: str) -> None:
    import contextlib
    import json

    from vtpmctl.store.atomic import write_atomic

    key = _loader_key(library)
    if key is None or not cache_dir.is_dir():
        return
    record = {"library": library, "key": key, "libtpms_version": version}
    with contextlib.suppress(OSError):  # a cache: the next export asks a child again
        write_atomic(cache_dir / VERSION_CACHE, json.dumps(record).encode(), 0o644, durable=False)


def _version_tuple(text: str | None) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in (text or "").split("."))
    except ValueError:
        return ()


# ---------------------------------------------------------------- export


@dataclass
class Exported:
    data: bytes
    manifest: Manifest
    settled: list[str] = field(default_factory=list)  # interrupted operations settled first


def ek_json_of(inst: Instance) -> bytes | None:
    """The instance's ek.json as recorded at create; None when it has none."""
    try:
        return inst.paths.ek_file.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise MigrateError(f"cannot read {inst.paths.ek_file}: {exc.strerror}") from None


def _stopped_state(
    registry: Registry, inst: Instance, settled: list[str]
) -> tuple[Instance, dict[str, bytes]]:
    """Plaintext blobs from the state dir; the caller holds the state lock."""
    from vtpmctl.store.instance_keys import load_state_key
    from vtpmctl.store.keys import KeyFileError
    from vtpmctl.store.pending import settle
    from vtpmctl.store.snapshots import SnapshotError
    from vtpmctl.store.statedir import StateDirError

    try:
        pending = settle(inst.paths, inst.config.tpm2)
        settled += pending.notes
        if pending.rotation is not None:
            inst = registry.get(inst.name)  # a finished key rotation changed config and meta
        sd = inst.statedir(load_state_key(inst))
        plain = sd.load_blobs(BlobKind)
    except (KeyFileError, StateDirError, SnapshotError) as exc:
        raise MigrateError(f"cannot export {inst.name}: {exc}") from None
    if BlobKind.PERMANENT not in plain:
        raise MigrateError(
            f"cannot export {inst.name}: {sd.file(BlobKind.PERMANENT.file_name)} is "
            "missing; restore it from a backup"
        )
    return inst, plain


def _running_state(inst: Instance) -> dict[str, bytes]:
    """The permanent state of a running instance, over its control channel."""
    from vtpmctl.device.client.control import ControlError, TargetError
    from vtpmctl.device.protocol import Res
    from vtpmctl.store.instance_keys import load_migration_key
    from vtpmctl.store.keys import KeyFileError
    from vtpmctl.usecases.live import instance_client, read_state

    try:
        daemon_key = load_migration_key(inst)
    except KeyFileError as exc:
        raise MigrateError(f"cannot export {inst.name}: {exc}") from None
    try:
        # The admin endpoint: it answers while a hypervisor holds the control channel.
        with instance_client(inst, timeout=CONTROL_TIMEOUT, read_only=True) as client:
            plain = read_state(client, BlobKind.PERMANENT, state_key=None, migration_key=daemon_key)
    except ControlError as exc:
        if exc.result == Res.BAD_ORDINAL:  # not initialised: its state file is all there is
            return _file_state(inst)
        raise MigrateError(f"cannot read the state of running {inst.name}: {exc}") from None
    except (TargetError, OSError) as exc:
        raise MigrateError(f"cannot reach running {inst.name}: {exc}") from None
    except BlobError as exc:
        raise MigrateError(
            f"the permanent state of running {inst.name} is unusable: {exc.message}"
        ) from None
    if not plain:
        raise MigrateError(f"running {inst.name} returned no permanent state")
    return {BlobKind.PERMANENT: plain}


@dataclass
class PlainState:
    """An instance's plaintext blobs as read for an export or a push."""

    instance: Instance
    blobs: dict[str, bytes]  # BlobKind word -> libtpms state
    state: str  # "stopped": the state dir, read under its lock; "running": from the daemon
    settled: list[str] = field(default_factory=list)


def read_plain_state(
    registry: Registry, name: str, *, allow_running: bool, key: str | None = None
) -> PlainState:
    """NAME's state: a stopped instance's files under its lock, or a running one's permanent
    state over its control channel (only with ``allow_running``); ``key``: a ``--key``."""
    from vtpmctl.store.instance_keys import with_state_key
    from vtpmctl.usecases.supervisor import probe

    inst = with_state_key(registry.get(name), key)
    sd = inst.statedir()
    settled: list[str] = []
    if sd.lock(0):
        try:
            inst, plain = _stopped_state(registry, inst, settled)
        finally:
            sd.unlock()
        return PlainState(inst, plain, "stopped", settled)
    status = probe(inst)
    if not allow_running:
        raise MigrateError(
            f"{name} is running (pid {status.pid}); stop it first (vtpmctl stop {name}) so "
            "the bundle holds its final state, or add --allow-running for a copy of its "
            "permanent state (for a running VM, use QEMU live migration)"
        )
    if not status.ours:
        raise MigrateError(
            f"the state dir of {name} is locked by pid {status.pid}, which is "
            "not its vtpmctl daemon; stop that process first"
        )
    if inst.found is not None and inst.found.migration_key:
        # its blobs come wrapped in its manager's migration key: read its state file instead
        return PlainState(inst, _file_state(inst), "running", settled)
    return PlainState(inst, _running_state(inst), "running", settled)


def _file_state(inst: Instance) -> dict[str, bytes]:
    """The permanent state of a running vTPM from its state file, which its daemon keeps
    current: when its TPM is not initialised yet, or an attached swtpm would hand it out
    under its manager's migration key."""
    from vtpmctl.store.instance_keys import load_state_key
    from vtpmctl.store.keys import KeyFileError
    from vtpmctl.store.statedir import StateDirError

    try:
        plain = inst.statedir(load_state_key(inst)).load(BlobKind.PERMANENT.file_name)
    except (KeyFileError, StateDirError) as exc:
        raise MigrateError(f"cannot export {inst.name}: {exc}") from None
    if not plain:
        raise MigrateError(f"cannot export {inst.name}: it has no permanent state")
    return {BlobKind.PERMANENT: plain}


def export_instance(
    registry: Registry,
    name: str,
    *,
    migration_key: AesKey | None = None,
    allow_running: bool = False,
    key: str | None = None,
) -> Exported:
    """A bundle of NAME; ``migration_key`` overrides the instance's own; ``key``: a ``--key``
    for a state whose key vtpmctl does not keep."""
    from vtpmctl.store.instance_keys import load_migration_key
    from vtpmctl.store.keys import KeyFileError

    read = read_plain_state(registry, name, allow_running=allow_running, key=key)
    inst, plain, state, settled = read.instance, read.blobs, read.state, read.settled
    if migration_key is None:
        try:
            migration_key = load_migration_key(inst)
        except KeyFileError as exc:
            raise MigrateError(f"cannot export {name}: {exc}") from None
    source = Source(
        name=name,
        host=os.uname().nodename,  # what socket.gethostname() returns, without socket.py
        state=state,
        created=now_utc(),
        vtpmctl_version=__version__,
        libtpms_version=libtpms_version(registry.roots.runtime) or inst.meta.libtpms_version,
        tpm_version=inst.config.tpm,
        transport=inst.config.transport,
        encrypted_at_rest=inst.config.encrypted,
        ek_fingerprints=inst.meta.ek_fingerprints,
    )
    data = build_bundle(plain, source, ek_json=ek_json_of(inst), migration_key=migration_key)
    return Exported(data, open_bundle(data, migration_key).manifest, settled)


# ---------------------------------------------------------------- import


@dataclass
class ImportOptions:
    name: str | None = None
    migration_key: AesKey | None = None
    # None: encrypt at rest if the source was (with a new random key)
    encrypt: bool | None = None
    state_key: AesKey | None = None
    key_source: str | None = None
    transport: Transport | None = None
    # more files for the new instance, written after its state and before it exists
    extra: Callable[[InstancePaths], None] | None = None


@dataclass
class Imported:
    instance: Instance
    manifest: Manifest
    libtpms_version: str | None
    notes: list[str]


def _check_ek(bundle: Bundle, state: InspectResult | None) -> None:
    """ek.json is well-formed and describes the EKs of the bundle's TPM state exactly.

    Without ``state`` only the file itself is checked (and against the manifest).
    With it, every field must be what the state holds: the EKs at their
    handles with their Names, each certificate byte for byte as in its NV
    index, the platform certificate and the lock, so that ``ek export`` of the
    imported instance shows what its TPM really holds.
    """
    from vtpmctl.store.ekfile import ek_file_from_json, read_ek_file

    m = bundle.manifest
    if bundle.ek_json is None:
        if m.ek_fingerprints:
            raise BundleError(
                "the bundle manifest is invalid: it lists EK fingerprints but has no ek.json"
            )
        return

    def bad(what: str) -> BundleError:
        return BundleError(f"ek.json in the bundle is not an EK description: {what}")

    info = read_ek_file(bundle.ek_json, bad)
    if {e.algorithm: e.fingerprint_sha256 for e in info.eks} != m.ek_fingerprints:
        raise BundleError(
            "the bundle manifest's EK fingerprints do not match its ek.json; the bundle was altered"
        )
    if state is None:
        return
    if m.tpm_version != "2.0":
        raise BundleError("a TPM 1.2 bundle has no ek.json; the bundle was altered")
    if state.persistent is None or state.ek is None:
        raise BundleError("the EKs of the bundle's TPM state could not be read")
    for e in info.eks:
        if state.persistent.get(e.handle) != e.name:
            raise BundleError(
                f"the EK at {e.handle} described in the bundle is not the one in "
                "its TPM state; the bundle was altered"
            )
    held = ek_file_from_json(state.ek, bad)
    for e in info.eks:
        twin = next((h for h in held.eks if h.handle == e.handle), None)
        if twin is None or twin != e:
            raise BundleError(
                f"the EK or certificate at {e.handle} in the bundle's ek.json is not the one "
                "in its TPM state; the bundle was altered"
            )
    if len(held.eks) != len(info.eks):
        raise BundleError(
            "the bundle's ek.json leaves out EKs that its TPM state holds; the bundle was altered"
        )
    if held.platform_certificate_pem != info.platform_certificate_pem:
        raise BundleError(
            "the platform certificate in the bundle's ek.json is not the one in its TPM "
            "state; the bundle was altered"
        )
    if held.locked != info.locked:
        raise BundleError(
            f"the bundle's ek.json says locked={str(info.locked).lower()} but the certificates "
            f"in its TPM state have locked={str(held.locked).lower()}; the bundle was altered"
        )


def verify_bundle(data: bytes, migration_key: AesKey | None) -> tuple[Bundle, str | None]:
    """Everything short of writing: bytes, keys, libtpms here, EKs. Returns libtpms' version."""
    from vtpmctl.usecases.inspect import inspect_blobs

    bundle = open_bundle(data, migration_key)
    m = bundle.manifest
    tpm2 = TpmFamily.from_version(m.tpm_version).tpm2
    _check_ek(bundle, None)
    # The child that validates the state also names its libtpms: one process, not two.
    result = inspect_blobs(bundle.plain, tpm2=tpm2, describe=True, ek=bundle.ek_json is not None)
    here = result.libtpms_version or libtpms_version()
    if not result.ok:
        bad = ", ".join(f"{k} 0x{rc:x}" for k, rc in result.validate.items() if rc)
        detail = f"TPMLIB_ValidateState failed ({bad})" if bad else (result.error or "failed")
        raise MigrateError(
            f"libtpms {here or '?'} on this host cannot load this TPM {m.tpm_version} state "
            f"(made with libtpms {m.libtpms_version or '?'}): {detail}; "
            + (
                "upgrade libtpms here"
                if _version_tuple(m.libtpms_version) > _version_tuple(here)
                else "the state is damaged or of another TPM version"
            )
        )
    _check_ek(bundle, result)
    return bundle, here


def import_bundle(registry: Registry, data: bytes, opts: ImportOptions) -> Imported:
    """Create an instance from a bundle, or change nothing."""
    from vtpmctl.store.instance_keys import store_key
    from vtpmctl.store.keys import generate_key, key_fingerprint
    from vtpmctl.store.statedir import StateDir

    bundle, here = verify_bundle(data, opts.migration_key)
    m = bundle.manifest
    name = validate_name(opts.name or m.source_name)
    paths = registry.paths(name)
    paths.check_socket_paths()
    if paths.base.exists():
        raise InstanceExists(
            f"an instance named {name} exists already; import under another "
            f"name with --name NEW, or remove it (vtpmctl rm {name})"
        )
    running = registry.running_attached(name)
    if running is not None:
        raise InstanceExists(
            f"{name} is a vTPM that {running.owner} runs (pid {running.pid}); vtpmctl never "
            "replaces its state: import under another name with --name NEW"
        )
    notes: list[str] = []
    if m.source_state == "running":
        notes.append(
            f"the bundle is a copy of running {m.source_name} taken on "
            f"{m.source_host}; do not run both"
        )
    encrypt = (
        m.encrypted_at_rest if opts.encrypt is None else opts.encrypt
    ) or opts.state_key is not None
    state_key = opts.state_key
    key_source = opts.key_source
    if encrypt and state_key is None:
        state_key, key_source = generate_key(256), "generated"
    if not encrypt:
        state_key = key_source = None
    mkey = opts.migration_key
    config = InstanceConfig(
        name=name,
        tpm=TpmFamily.from_version(m.tpm_version).version,
        transport=opts.transport or Transport(m.transport),
        encrypted=state_key is not None,
        migration_key=mkey is not None,
        ek=bundle.ek_json is not None,
    )
    meta = InstanceMeta(
        vtpmctl_version=__version__,
        libtpms_version=here or m.libtpms_version,
        cipher=state_key.cipher if state_key else None,
        key_source=key_source,
        key_fingerprint=key_fingerprint(state_key) if state_key else None,
        migration_key_fingerprint=key_fingerprint(mkey) if mkey else None,
        ek_fingerprints=dict(m.ek_fingerprints),
    )
    from vtpmctl.store.atomic import write_atomic

    paths.check_transport(config.transport)
    with registry.reserve(name) as paths:
        registry.ensure_dirs(paths)
        if state_key is not None:
            store_key(paths.state_key, state_key)
        if mkey is not None:
            store_key(paths.migration_key, mkey)
        sd = StateDir(paths.state_dir, tpm2=config.tpm2, key=state_key)
        sd.ensure()
        for kind, plain in bundle.plain.items():
            sd.store(BlobKind(kind).file_name, plain)
        if bundle.ek_json is not None:
            write_atomic(paths.ek_file, bundle.ek_json, 0o644)
        if opts.extra is not None:
            opts.extra(paths)
        registry.commit(paths, config, meta)
    return Imported(registry.get(name), m, here, notes)


def read_bundle_file(source: str) -> bytes:
    """The bundle from FILE or '-' (stdin), capped in size."""
    import sys

    from vtpmctl.store.bundle import read_capped

    if source == "-":
        if sys.stdin.isatty():
            raise MigrateError(
                "refusing to read a bundle from a terminal; give a FILE or pipe one in"
            )
        return read_capped(sys.stdin.buffer, "the bundle on stdin")
    try:
        with open(Path(source), "rb") as f:
            return read_capped(f, source)
    except OSError as exc:
        raise MigrateError(f"cannot read {source}: {exc.strerror or exc}") from None


__all__ = [
    "Exported",
    "ImportOptions",
    "Imported",
    "MigrateError",
    "PlainState",
    "ek_json_of",
    "export_instance",
    "import_bundle",
    "libtpms_version",
    "read_bundle_file",
    "read_plain_state",
    "verify_bundle",
]
