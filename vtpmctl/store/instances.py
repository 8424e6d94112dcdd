"""The registry of named vTPMs: where each one lives and what it is.

One directory per instance under the state root holds the swtpm-compatible
``tpmstate/`` dir, ``config.json`` (how to run it) and ``meta.json`` (facts
recorded when it was made). Its keys live apart, under the config root, so
a copy or backup of the state tree never carries the key that opens it.
``config.json`` is written last at create and removed first at rm: an
instance exists exactly when that file does.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vtpmctl.errors import EXIT_FAILURE, InstanceError, InstanceExists, NoSuchInstance
from vtpmctl.model import CUSE_NAME_MAX, OnShutdown, TpmFamily, Transport
from vtpmctl.store import records
from vtpmctl.store.access import (
    PRIVATE_DIR_MODE,
    PRIVATE_SOCKET_MODE,
    Access,
    AccessError,
    apply_to_dir,
    format_mode,
    parse_mode,
)
from vtpmctl.store.atomic import write_atomic
from vtpmctl.store.dirs import (
    CONFIG_MODE,
    LOGS_MODE,
    PRIVATE_MODE,
    RUNTIME_MODE,
    STATE_MODE,
    check_dir,
    ensure_dir,
)
from vtpmctl.store.paths import Roots, store_roots

if TYPE_CHECKING:
    from vtpmctl.store.attached import Attached
    from vtpmctl.store.blob import AesKey
from vtpmctl.store.statedir import StateDir

FORMAT_VERSION = 1
ATTACHED_ENV = "VTPMCTL_ATTACHED"
ADMIN_SUFFIX = ".admin"  # a compatible swtpm's admin endpoint: its control socket's path + this
MAX_NAME = 64
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def validate_name(name: str) -> str:
    """Names become file names, socket paths and /dev/vtpm-NAME: keep them plain."""
    if not name or len(name) > MAX_NAME or not _NAME.fullmatch(name):
        raise InstanceError(
            f"invalid instance name {name!r}: use 1-{MAX_NAME} letters, digits, '.', '_' or "
            "'-', starting with a letter or digit"
        )
    return name


def now_utc() -> str:
    import time  # not datetime: the status path does not pay for it

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------- paths


@dataclass(frozen=True)
class InstancePaths:
    """Every path of one instance, derived from its name and the roots.

    An attached instance (a swtpm another manager runs, see vtpmctl.store.attached)
    keeps its own state dir and control socket; vtpmctl's files for it (snapshots)
    live under ``attached/NAME``.
    """

    name: str
    roots: Roots
    attached_state: Path | None = None
    attached_ctrl: Path | None = None

    @property
    def attached(self) -> bool:
        return self.attached_state is not None

    @property
    def base(self) -> Path:
        return self.roots.state / ("attached" if self.attached else "instances") / self.name

    @property
    def config_file(self) -> Path:
        return self.base / "config.json"

    @property
    def meta_file(self) -> Path:
        return self.base / "meta.json"

    @property
    def ek_file(self) -> Path:
        return self.base / "ek.json"

    @property
    def state_dir(self) -> Path:
        return self.attached_state or self.base / "tpmstate"

    @property
    def binding_file(self) -> Path:
        """The remote the instance is bound to (store.replication.Binding), if any."""
        return self.base / "remote.json"

    @property
    def creating_lock(self) -> Path:
        return self.base / ".creating"

    @property
    def secrets_dir(self) -> Path:
        return self.roots.config / "instances" / self.name

    @property
    def state_key(self) -> Path:
        return self.secrets_dir / "state.key"

    @property
    def migration_key(self) -> Path:
        return self.secrets_dir / "migration.key"

    @property
    def ca_dir(self) -> Path:
        return self.roots.config / "ca"

    @property
    def run_dir(self) -> Path:
        return self.roots.runtime / self.name

    @property
    def data_socket(self) -> Path:
        # DATA and DATA.ctrl: the layout the tss2 swtpm TCTI expects for path=DATA.
        return self.run_dir / "tpm"

    @property
    def ctrl_socket(self) -> Path:
        if self.attached:
            return self.attached_ctrl or self.run_dir / "tpm.ctrl"
        return self.run_dir / "tpm.ctrl"

    @property
    def admin_socket(self) -> Path:
        """The daemon's read-only admin endpoint (shorter than tpm.ctrl, so it always fits).

        vtpmctl's swtpm serves one beside a unixio control socket, at CTRL.admin.
        """
        if self.attached_ctrl is not None:
            return self.attached_ctrl.with_name(self.attached_ctrl.name + ADMIN_SUFFIX)
        return self.run_dir / "admin"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "pid"

    @property
    def remote_spec(self) -> Path:
        """What start hands a bound instance's daemon (store.replication.DaemonSpec)."""
        return self.run_dir / "replication-spec.json"

    @property
    def replication_status(self) -> Path:
        """What a bound instance's daemon last did (store.replication.ReplicationStatus)."""
        return self.run_dir / "replication.json"

    @property
    def log_file(self) -> Path:
        return self.roots.logs / f"{self.name}.log"

    @property
    def cuse_name(self) -> str:
        return f"vtpm-{self.name}"

    @property
    def device(self) -> Path:
        return Path("/dev") / self.cuse_name

    def check_socket_paths(self) -> None:
        """AF_UNIX paths have a hard limit; say so before anything is created."""
        for path in (self.ctrl_socket, self.data_socket):
            size = len(os.fsencode(path))
            if size > UNIX_PATH_MAX:
                raise InstanceError(
                    f"socket path {path} would be {size} bytes, over the {UNIX_PATH_MAX}-byte "
                    "limit; use a shorter name or a shorter VTPMCTL_HOME"
                )

    def ensure_run_dirs(self, access: Access | None = None) -> None:
        """What a daemon writes (run dir, log dir), made or checked, after checking the
        instance's own dirs: none may be another user's or writable by others. The run
        dir then gets exactly the group and mode of ``access`` (default: private)."""
        for directory in (
            self.roots.config,
            self.secrets_dir,
            self.roots.state,
            self.base.parent,
            self.base,
            self.state_dir,
        ):
            check_dir(directory)
        ensure_dir(self.roots.runtime, RUNTIME_MODE)
        ensure_dir(self.run_dir, PRIVATE_MODE)
        apply_to_dir(self.run_dir, access or Access())
        ensure_dir(self.roots.logs, LOGS_MODE)

    def check_transport(self, transport: Transport) -> None:
        """A name the transport cannot carry would make an instance that never starts."""
        if transport == Transport.CUSE and len(self.name) > CUSE_NAME_MAX:
            raise InstanceError(
                f"a CUSE device name takes at most {CUSE_NAME_MAX} characters after vtpm-, "
                f"and {self.name} has {len(self.name)}; use a shorter name or --transport socket"
            )


# ---------------------------------------------------------------- records


@dataclass
class InstanceConfig:
    """How to run the instance: what the user chose at create."""

    name: str
    # as config.json spells it: TpmFamily.version, "2.0" or "1.2"
    tpm: str = field(
        default=TpmFamily.TPM2.version,
        metadata={**records.required(), **records.one_of(*(f.version for f in TpmFamily))},
    )
    transport: Transport = field(default=Transport.SOCKET, metadata=records.required())
    encrypted: bool = False
    migration_key: bool = False
    # A config without the key records no EK: never assume one was made.
    ek: bool = field(default=True, metadata=records.when_absent(False))
    # For a hypervisor (README.md, libvirt): what CMD_SHUTDOWN does, who may reach the sockets.
    on_shutdown: OnShutdown = field(default=OnShutdown.EXIT, metadata=records.omitted_at_default())
    group: str | None = field(default=None, metadata=records.omitted_at_default())
    socket_mode: str = field(
        default=format_mode(PRIVATE_SOCKET_MODE), metadata=records.omitted_at_default()
    )
    dir_mode: str = field(
        default=format_mode(PRIVATE_DIR_MODE), metadata=records.omitted_at_default()
    )

    def to_json(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **records.to_json(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: Path) -> InstanceConfig:
        return records.from_json(cls, data, _restore(where))

    @property
    def family(self) -> TpmFamily:
        return TpmFamily.from_version(self.tpm)

    @property
    def access(self) -> Access:
        """The group and modes of the sockets and run dir (InstanceError if unreadable)."""
        try:
            return Access(
                self.group,
                parse_mode(self.socket_mode, "socket_mode"),
                parse_mode(self.dir_mode, "dir_mode"),
            )
        except AccessError as exc:
            raise InstanceError(f"config.json of {self.name}: {exc}") from None

    def set_access(self, access: Access) -> None:
        self.group = access.group
        self.socket_mode = format_mode(access.socket_mode)
        self.dir_mode = format_mode(access.dir_mode)

    @property
    def tpm2(self) -> bool:
        return self.family.tpm2


@dataclass
class InstanceMeta:
    """Facts recorded when the instance was made (and by key rotate)."""

    created: str = field(default_factory=now_utc)
    vtpmctl_version: str = ""
    libtpms_version: str | None = None
    cipher: str | None = None
    key_source: str | None = None  # what the user gave: hex, binary, passphrase, generated
    key_fingerprint: str | None = None
    migration_key_fingerprint: str | None = None
    ek_fingerprints: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **records.to_json(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: Path) -> InstanceMeta:
        return records.from_json(cls, data, _restore(where))


def _restore(where: Path) -> Callable[[str], InstanceError]:
    """How a bad record file is reported: the file, what is wrong, and the fix."""
    return lambda what: InstanceError(f"{where}: {what}; restore it from a backup")


class InstanceUnreadable(InstanceError):
    """An instance's files exist but this user may not read them (not a missing instance)."""

    lsb_code = EXIT_FAILURE


def _owner(path: Path) -> int | None:
    """The owner of ``path`` or of the nearest parent this user may look at."""
    for p in (path, *path.parents):
        try:
            return os.stat(p).st_uid
        except OSError:
            continue
    return None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from disk; InstanceError (one line) if it is not one."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise
    except PermissionError:
        raise InstanceUnreadable(
            f"cannot read {path}: permission denied (the files belong to uid {_owner(path)}); "
            "run vtpmctl as that user or as root"
        ) from None
    except (OSError, ValueError, RecursionError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not valid JSON"
        raise InstanceError(f"cannot read {path}: {reason}; restore it from a backup") from None
    if not isinstance(data, dict):
        raise InstanceError(f"{path} does not hold a JSON object; restore it from a backup")
    version = data.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise InstanceError(
            f"{path} has format_version {version!r}, newer than this vtpmctl "
            "understands; upgrade vtpmctl"
        )
    return data


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), 0o644)


@dataclass
class Instance:
    """One registered vTPM, or one attached (run by another manager; ``owner`` says who)."""

    paths: InstancePaths
    config: InstanceConfig
    meta: InstanceMeta
    owner: str | None = None
    found: Attached | None = None  # the swtpm process an attached instance is
    # A state key the caller brought (``--key``), already checked against the state:
    # it opens the state instead of the stored one (vtpmctl.store.instance_keys).
    key: AesKey | None = None

    @property
    def name(self) -> str:
        return self.paths.name

    def statedir(self, key: AesKey | None = None) -> StateDir:
        """The state (a dir, or an attached swtpm's linear file); without a key it is
        enough for locking and liveness."""
        if self.found is not None and self.found.state_file:
            from vtpmctl.store.linearfile import HeldFile

            return HeldFile(self.paths.state_dir, self.found.pid, self.config.tpm2, key)
        return StateDir(self.paths.state_dir, tpm2=self.config.tpm2, key=key)


# ---------------------------------------------------------------- the registry


def _registered(base: Path) -> bool:
    """``config.json`` is there; an instance dir this user may not read counts (list marks it)."""
    try:
        return stat.S_ISREG(os.stat(base / "config.json").st_mode)
    except PermissionError:
        return True
    except OSError:
        return False


class Registry:
    """Instances under one set of roots."""

    def __init__(self, roots: Roots | None = None) -> None:
        self.roots = roots or store_roots()

    @property
    def instances_dir(self) -> Path:
        return self.roots.state / "instances"

    def paths(self, name: str) -> InstancePaths:
        return InstancePaths(validate_name(name), self.roots)

    def names(self) -> list[str]:
        """Registered names, sorted; half-made or half-removed dirs are skipped."""
        try:
            entries = os.listdir(self.instances_dir)
        except FileNotFoundError:
            return []
        return sorted(
            n for n in entries if _NAME.fullmatch(n) and _registered(self.instances_dir / n)
        )

    def exists(self, name: str) -> bool:
        return _registered(self.paths(name).base)

    def get(self, name: str) -> Instance:
        paths = self.paths(name)
        try:
            config = InstanceConfig.from_json(read_json(paths.config_file), paths.config_file)
        except FileNotFoundError:
            found = self.running_attached(name)
            if found is None:
                raise NoSuchInstance(f"no instance named {name}; see vtpmctl list") from None
            return self.attached_instance(found)
        try:
            meta = InstanceMeta.from_json(read_json(paths.meta_file), paths.meta_file)
        except FileNotFoundError:
            meta = InstanceMeta(created="")
        return Instance(paths, config, meta)

    @property
    def sees_attached(self) -> bool:
        """Host-wide vTPMs belong to the system and user stores; a ``$VTPMCTL_HOME``
        store (a private one, as tests use) sees them only with VTPMCTL_ATTACHED=1."""
        return self.roots.origin != "home" or os.environ.get(ATTACHED_ENV) == "1"

    def running_attached(self, name: str) -> Attached | None:
        """The swtpm another manager runs under NAME, if this store sees one."""
        from vtpmctl.store.attached import find

        return find(name) if self.sees_attached else None

    def attached(self) -> list[Instance]:
        """The vTPMs other managers run on swtpm-compatible programs, not named like ours."""
        from vtpmctl.store.attached import discover

        if not self.sees_attached:
            return []
        ours = set(self.names())
        return [self.attached_instance(a) for a in discover() if a.name not in ours]

    def attached_instance(self, found: Attached) -> Instance:
        """An Instance over an attached swtpm's own state dir and control socket."""
        paths = InstancePaths(found.name, self.roots, found.state_dir, found.ctrl)
        config = InstanceConfig(
            name=found.name,
            tpm=(TpmFamily.TPM2 if found.tpm2 else TpmFamily.TPM12).version,
            transport=Transport.SOCKET,
            encrypted=found.encrypted,
            migration_key=found.migration_key,
            ek=False,
        )
        return Instance(paths, config, InstanceMeta(created=""), owner=found.owner, found=found)

    def all(self) -> Iterator[Instance | InstanceError]:
        """Every instance, or the error that makes one unreadable (listing goes on)."""
        for name in self.names():
            try:
                yield self.get(name)
            except InstanceError as exc:
                yield exc

    # -- create and remove

    @contextlib.contextmanager
    def reserve(self, name: str) -> Iterator[InstancePaths]:
        """Claim NAME for a create; everything made here is removed unless committed.

        The claim is the instance dir itself (mkdir is atomic) plus a lock on
        ``.creating`` so that rm can tell a create in progress from a crashed one.
        """
        paths = self.paths(name)
        paths.check_socket_paths()
        ensure_dir(self.roots.state, STATE_MODE)
        ensure_dir(self.instances_dir, STATE_MODE)
        try:
            paths.base.mkdir(mode=0o700)
        except FileExistsError:
            if paths.config_file.exists():
                raise InstanceExists(
                    f"an instance named {name} exists already; pick another "
                    f"name or remove it (vtpmctl rm {name})"
                ) from None
            raise InstanceExists(
                f"{paths.base} is left from an interrupted create (or one is running); "
                f"clean it up with: vtpmctl rm {name} --yes"
            ) from None
        fd = os.open(
            paths.creating_lock, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        fcntl.lockf(fd, fcntl.LOCK_EX)
        try:
            yield paths
        except BaseException:
            self._remove_files(paths)
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                paths.creating_lock.unlink()
            os.close(fd)

    def commit(self, paths: InstancePaths, config: InstanceConfig, meta: InstanceMeta) -> None:
        """Write metadata, then the config: from here on the instance exists."""
        write_json(paths.meta_file, meta.to_json())
        write_json(paths.config_file, config.to_json())

    def creation_in_progress(self, paths: InstancePaths) -> bool:
        try:
            fd = os.open(paths.creating_lock, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                return True
            raise
        finally:
            os.close(fd)
        return False

    def remove(self, name: str) -> None:
        """Forget NAME and delete its files; the caller made sure it is not running.

        The config goes first, so a crash half-way leaves no half instance in
        the listing, only files that a second rm removes.
        """
        paths = self.paths(name)
        if not paths.base.exists():
            raise NoSuchInstance(f"no instance named {name}; see vtpmctl list")
        if self.creation_in_progress(paths):
            raise InstanceError(
                f"{name} is being created right now; try again when that create has finished"
            )
        paths.config_file.unlink(missing_ok=True)
        self._remove_files(paths)

    @staticmethod
    def _remove_files(paths: InstancePaths) -> None:
        for directory in (paths.base, paths.secrets_dir, paths.run_dir):
            import shutil

            shutil.rmtree(directory, ignore_errors=True)
        paths.log_file.unlink(missing_ok=True)
        paths.log_file.with_name(paths.log_file.name + ".1").unlink(missing_ok=True)

    def ensure_dirs(self, paths: InstancePaths) -> None:
        """Runtime, log and secrets dirs (private; created on demand)."""
        ensure_dir(self.roots.config, CONFIG_MODE)
        ensure_dir(paths.secrets_dir, PRIVATE_MODE, parent_mode=PRIVATE_MODE)
        paths.ensure_run_dirs()
