"""Start, stop and judge instance daemons from the outside.

This module never loads libtpms: ``start`` execs ``python -m vtpmctl
_daemon`` in a new session (never a fork of a live TPM) and
waits until the control channel answers (or the daemon dies, and then shows
why from its log). Liveness is the state dir's ``.lock``: a pid file or a
socket without a lock holder is stale, whatever the pid file says.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from vtpmctl.childproc import DAEMON_ENTRY, ZYGOTE_ENTRY, child_env, entry_argv, own_pids
from vtpmctl.errors import InstanceError, NoSuchInstance
from vtpmctl.model import BlobKind, OnShutdown, TpmFamily, Transport
from vtpmctl.store.access import Access, format_mode
from vtpmctl.store.instances import Instance
from vtpmctl.store.statedir import StateDir

if TYPE_CHECKING:
    import subprocess

    from vtpmctl.store.blob import AesKey
    from vtpmctl.store.keys import KeySource

# Daemons started by earlier versions ran under these module paths; they are still ours.
FORMER_DAEMON_MODULES = (b"vtpmctl.engine.daemon", b"vtpmctl.device.server.daemon")
# VTPMCTL_ZYGOTE=0: exec each daemon as a new interpreter instead of forking it
# from the zygote (slower to start, more memory; for debugging and tests).
NO_ZYGOTE_ENV = "VTPMCTL_ZYGOTE"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
TERM_TIMEOUT = 5.0
POLL = 0.01
LOG_LIMIT = 4 << 20  # bytes; beyond this a start moves the log to NAME.log.1
VOLATILE_REJECTED = "the volatile state "  # how the daemon's message begins (engine.tpm)

State = Literal["running", "stopped", "stale"]


class LifecycleError(InstanceError):
    """A start/stop could not be done; one line naming the cause and the fix."""


@dataclass
class Status:
    """What ``status`` reports; ``pid`` is the lock holder, not the pid file."""

    state: State
    pid: int | None
    ours: bool  # the holder is this instance's vtpmctl daemon (not e.g. a swtpm)
    leftovers: list[Path]


def _leftovers(inst: Instance) -> list[Path]:
    p = inst.paths
    return [
        f for f in (p.pid_file, p.ctrl_socket, p.data_socket, p.admin_socket) if os.path.lexists(f)
    ]


def _read_cmdline(pid: int) -> bytes:
    """``/proc/PID/cmdline`` as it is, or b"" (no file object: this runs for every process)."""
    try:
        fd = os.open(f"/proc/{pid}/cmdline", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:
        return b""
    finally:
        os.close(fd)


def _cmdline(pid: int) -> list[bytes]:
    """The arguments. A process forked by the zygote has the zygote's 4 KiB of room,
    NUL-padded after its arguments: the padding is not thousands of empty ones."""
    return _arguments(_read_cmdline(pid))


def _arguments(raw: bytes) -> list[bytes]:
    return raw.rstrip(b"\0").split(b"\0") if raw else []


def _entry(args: list[bytes]) -> bytes | None:
    """The module (or ``vtpmctl ENTRY``) a ``python -m`` command line runs."""
    for i, arg in enumerate(args):
        if arg == b"-m" and i + 1 < len(args):
            module = args[i + 1]
            if module == b"vtpmctl":
                return b"vtpmctl " + b"".join(args[i + 2 : i + 3])
            return module
    return None


def runs_daemon(args: list[bytes]) -> bool:
    """A command line of a vtpmctl daemon, as this version or an earlier one starts it."""
    entry = _entry(args)
    return entry in FORMER_DAEMON_MODULES or entry == b"vtpmctl " + DAEMON_ENTRY.encode()


def runs_zygote(args: list[bytes]) -> bool:
    """A command line of the zygote, which its forked daemons keep (they are not exec'd)."""
    return _entry(args) == b"vtpmctl " + ZYGOTE_ENTRY.encode()


def holds_open(pid: int, path: Path) -> bool:
    """``pid`` has ``path`` open (a forked daemon its state dir's ``.lock``)."""
    try:
        want = os.stat(path)
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
            return True
    return False


def serves(pid: int, state_dir: Path) -> bool:
    """The process is a vtpmctl daemon serving ``state_dir``.

    An exec'd daemon names the state dir on its command line; one forked by
    the zygote has the zygote's command line and holds the dir's ``.lock``.
    """
    args = _cmdline(pid)
    if runs_daemon(args):
        return os.fsencode(state_dir) in args
    return runs_zygote(args) and holds_open(pid, state_dir / ".lock")


def is_our_daemon(pid: int, inst: Instance) -> bool:
    """The process is a vtpmctl daemon serving this instance's state dir."""
    return serves(pid, inst.paths.state_dir)


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def foreign_holder_error(name: str, pid: int) -> LifecycleError:
    """Another program (a swtpm) holds the state: what start, stop and rm all say."""
    return LifecycleError(
        f"the state dir of {name} is locked by pid {pid} ({process_name(pid)}), "
        "which is not its vtpmctl daemon; stop that process yourself"
    )


def busy_error(name: str, state_dir: Path) -> LifecycleError:
    """Why the state lock of NAME could not be taken, and what to do about it."""
    pid = StateDir(state_dir).holder_pid()
    if pid is None:
        return LifecycleError(f"{name} is busy (another vtpmctl command holds it); try again")
    if serves(pid, state_dir):
        return LifecycleError(f"{name} is running (pid {pid}); stop it first: vtpmctl stop {name}")
    return foreign_holder_error(name, pid)


def _tpmstate_dirs(args: list[bytes]) -> Iterator[bytes]:
    """The dirs of swtpm's ``--tpmstate dir=D`` / ``backend-uri=dir://D`` in a command line."""
    for i, arg in enumerate(args):
        if arg == b"--tpmstate" and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(b"--tpmstate="):
            value = arg[len(b"--tpmstate=") :]
        else:
            continue
        for option in value.split(b","):
            for prefix in (b"dir=", b"backend-uri=dir://"):
                if option.startswith(prefix):
                    yield option[len(prefix) :]


def tpmstate_users(state_dir: Path) -> list[int]:
    """Processes that name ``state_dir`` as their ``--tpmstate`` (a swtpm, as far as /proc shows).

    swtpm 0.7.1 takes ``.lock`` only at CMD_INIT, so an uninitialised one is
    invisible to the lock; its command line is not. Processes of other users
    are seen only where /proc lets this user read them.
    """
    try:
        want = os.stat(state_dir)
    except OSError:
        return []
    found = []
    ours = own_pids()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in ours:
            continue
        command_line = _read_cmdline(int(entry))
        if b"--tpmstate" not in command_line:
            continue  # most processes: not worth splitting into arguments
        for raw in _tpmstate_dirs(_arguments(command_line)):
            path = os.fsdecode(raw)
            try:
                if not os.path.isabs(path):
                    path = os.path.join(os.readlink(f"/proc/{entry}/cwd"), path)
                st = os.stat(path)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
                found.append(int(entry))
                break
    return found


def refuse_attached(inst: Instance, what: str) -> None:
    """vtpmctl reads the vTPMs other managers run; starting and stopping them is theirs."""
    if inst.paths.attached:
        raise LifecycleError(
            f"{inst.name} is run by {inst.owner} (pid of its swtpm in vtpmctl list); vtpmctl "
            f"does not {what} it: use its manager (e.g. virsh for a libvirt domain)"
        )


def probe(inst: Instance) -> Status:
    holder = inst.statedir().holder_pid()
    if holder is not None:
        # an attached instance is its manager's swtpm: the holder serves it
        ours = inst.paths.attached or is_our_daemon(holder, inst)
        return Status("running", holder, ours, [])
    leftovers = _leftovers(inst)
    return Status("stale" if leftovers else "stopped", None, False, leftovers)


def clean_stale(inst: Instance) -> list[Path]:
    """Remove a dead daemon's pid file and sockets (only if nobody holds the lock)."""
    if inst.statedir().holder_pid() is not None:
        return []
    removed = []
    for path in _leftovers(inst):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


# ---------------------------------------------------------------- start


def reconfigure(
    inst: Instance,
    *,
    group: str | None = None,
    socket_mode: str | None = None,
    dir_mode: str | None = None,
    on_shutdown: OnShutdown | None = None,
) -> bool:
    """Settings given to ``start``, saved in config.json (a unit's plain start uses them).

    Given access options replace the stored ones (a group not given stays;
    modes not given take their defaults for the group). Refused while the
    daemon runs: its sockets were made with the old settings. True if changed.
    """
    from vtpmctl.store.access import Access
    from vtpmctl.store.instances import write_json

    if group is None and socket_mode is None and dir_mode is None and on_shutdown is None:
        return False
    config = inst.config
    new_access = config.access
    if group is not None or socket_mode is not None or dir_mode is not None:
        new_access = Access.of(config.group if group is None else group, socket_mode, dir_mode)
    new_mode = config.on_shutdown if on_shutdown is None else on_shutdown
    if new_access == config.access and new_mode == config.on_shutdown:
        return False
    status = probe(inst)
    if status.state == "running":
        raise LifecycleError(
            f"{inst.name} is running (pid {status.pid}); stop it to change its socket "
            f"access or --on-shutdown: vtpmctl stop {inst.name}"
        )
    config.set_access(new_access)
    config.on_shutdown = new_mode
    write_json(inst.paths.config_file, config.to_json())
    return True


@dataclass
class DaemonKeys:
    """The keys a daemon starts with. Keys the caller brought (``start --key``) are
    read once, under the state lock, by preflight, which fills in the keys."""

    state_source: KeySource | None = None
    migration_source: KeySource | None = None
    state: AesKey | None = None
    migration: AesKey | None = None

    def pipes(self) -> tuple[dict[str, str], list[int]]:
        """The daemon's --key/--migration-key values and the pipes behind them.

        Each key goes to the daemon through a pipe it inherits: never a file, never
        its command line. The caller closes the descriptors once it has started it.
        """
        from vtpmctl.store.keys import key_pipe, key_pipe_spec

        specs: dict[str, str] = {}
        fds: list[int] = []
        for dest, key in (("key", self.state), ("migration_key", self.migration)):
            if key is not None:
                fd = key_pipe(key)
                fds.append(fd)
                specs[dest] = key_pipe_spec(fd, key)
        return specs, fds


def daemon_argv(
    inst: Instance,
    *,
    incoming: bool = False,
    ctrl_only: bool = False,
    key_specs: dict[str, str] | None = None,
    remote_spec: Path | None = None,
) -> list[str]:
    """The daemon's command line: paths and descriptor numbers, never key material.

    ``key_specs`` (from DaemonKeys.pipes) hands the keys over on descriptors;
    without it the daemon reads the instance's key files itself.
    """
    return [
        *entry_argv(DAEMON_ENTRY),
        *daemon_args(
            inst,
            incoming=incoming,
            ctrl_only=ctrl_only,
            key_specs=key_specs,
            remote_spec=remote_spec,
        ),
    ]


def daemon_args(
    inst: Instance,
    *,
    incoming: bool = False,
    ctrl_only: bool = False,
    key_specs: dict[str, str] | None = None,
    remote_spec: Path | None = None,
) -> list[str]:
    """The daemon's options (``vtpmctl serve``'s) for this instance."""
    from vtpmctl.device.server.options import serve_argv

    p = inst.paths
    cuse = inst.config.transport == Transport.CUSE
    power_off = inst.config.on_shutdown == OnShutdown.POWER_OFF
    # QEMU brings the data channel itself (CMD_SET_DATAFD, refused while a data
    # listener exists, as by swtpm): an incoming or QEMU-bound instance has none,
    # nor has one that outlives VM runs: it exists for a hypervisor.
    data = not (cuse or incoming or ctrl_only or power_off)
    access = inst.config.access
    return [
        *serve_argv(
            state=p.state_dir,
            tpm=TpmFamily.of(inst.config.tpm2),
            pid_file=p.pid_file,
            log_file=p.log_file,
            existing=True,
            cuse=p.cuse_name if cuse else None,
            ctrl=None if cuse else f"unix:{p.ctrl_socket}",
            admin=None if cuse else f"unix:{p.admin_socket}",
            data=f"unix:{p.data_socket}" if data else None,
            **(
                key_specs
                if key_specs is not None
                else {
                    "key_file": p.state_key if inst.config.encrypted else None,
                    "key_kind": "hex" if inst.config.encrypted else None,
                    "migration_key_file": p.migration_key if inst.config.migration_key else None,
                }
            ),
            incoming=incoming,
            remote_spec=remote_spec,
            on_shutdown=OnShutdown.POWER_OFF if power_off else None,
            group=None if cuse else access.group,
            socket_mode=None if cuse or access == Access() else format_mode(access.socket_mode),
        ),
    ]


def rotate_log(path: Path, limit: int = LOG_LIMIT) -> None:
    """Keep one previous log: a daemon appends for its whole life, so trim between runs."""
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size > limit:
            os.replace(path, path.with_name(path.name + ".1"))


def _open_log(path: Path) -> int:
    from vtpmctl.store.atomic import open_log

    try:
        return open_log(path)
    except OSError as exc:
        raise LifecycleError(f"cannot open log file {path}: {exc.strerror}") from None


def failure_reason(log_lines: list[str]) -> str:
    """The most telling line of a daemon's last words."""
    for line in reversed(log_lines):
        if line.startswith("vtpmctl: "):
            return line[len("vtpmctl: ") :]
    for line in reversed(log_lines):
        if " ERROR " in line:
            return line.split(": ", 1)[-1]
    return log_lines[-1] if log_lines else "no message"


@dataclass
class Started:
    pid: int
    already: bool
    notes: list[str] = field(default_factory=list)  # what was settled before the start


def preflight(
    inst: Instance,
    timeout: float = START_TIMEOUT,
    notes: list[str] | None = None,
    delete_volatile: bool = False,
    keys: DaemonKeys | None = None,
    take_over: bool = False,
) -> Started | None:
    """Check keys and state before a daemon is launched, so errors are clear and early.

    Holds the state lock meanwhile (an interrupted key rotation or restore is
    settled first and must not race another one); what was settled is added
    to ``notes``. ``delete_volatile`` drops the saved volatile state first
    (the TPM starts as after a reboot; the permanent state, NV included, is
    kept). The keys the daemon needs are put in ``keys``, if given. An
    instance bound to a remote gets its lease here (``take_over``: even one
    another host let expire) and the spec its daemon keeps it with
    (usecases.ownership); LeaseHeld says who has it. Returns Started if the
    instance turned out to be running already.
    """
    from vtpmctl.errors import InstanceError, LeaseHeld
    from vtpmctl.store.instance_keys import (
        check_state,
        load_migration_key,
        load_state_key,
    )
    from vtpmctl.store.instances import InstanceMeta, read_json
    from vtpmctl.store.keys import KeyFileError
    from vtpmctl.store.pending import settle
    from vtpmctl.store.snapshots import SnapshotError
    from vtpmctl.store.statedir import StateDirError

    sd = inst.statedir()
    deadline = time.monotonic() + timeout
    while True:
        if not inst.paths.config_file.exists():
            raise _vanished(inst)
        if sd.lock(0):
            break
        status = probe(inst)
        if status.state == "running" and (status.ours or time.monotonic() > deadline):
            return _running_already(inst, status)
        time.sleep(POLL)  # another vtpmctl command holds it for a moment
    if not inst.paths.config_file.exists():  # an rm finished just before the lock was ours
        sd.unlock()
        raise _vanished(inst)
    users = tpmstate_users(inst.paths.state_dir)
    if users:
        sd.unlock()
        raise LifecycleError(
            f"cannot start {inst.name}: {process_name(users[0])} (pid {users[0]}) serves its "
            "state dir and takes the lock only at CMD_INIT; stop that process first"
        )
    try:
        settled = settle(inst.paths, inst.config.tpm2)
        if notes is not None:
            notes += settled.notes
        if settled.rotation == "completed":
            inst.meta = InstanceMeta.from_json(
                read_json(inst.paths.meta_file), inst.paths.meta_file
            )
            inst.config.encrypted = True
        if delete_volatile:
            _drop_volatile(inst, sd, notes)
        keys = keys or DaemonKeys()
        if keys.state_source is not None:
            permall = sd.read_raw(BlobKind.PERMANENT.file_name)
            keys.state = keys.state_source.resolve(permall)
        if keys.migration_source is not None:
            keys.migration = keys.migration_source.resolve()
        keys.state = load_state_key(inst, keys.state)
        check_state(inst, keys.state)
        keys.migration = load_migration_key(inst, keys.migration)
        _take_lease(inst, take_over, keys, notes)
    except LeaseHeld:
        raise
    except (KeyFileError, StateDirError, InstanceError, SnapshotError) as exc:
        raise LifecycleError(f"cannot start {inst.name}: {exc}") from None
    finally:
        sd.unlock()
    return None


def _drop_volatile(inst: Instance, sd: StateDir, notes: list[str] | None) -> None:
    from vtpmctl.store.instance_keys import VOLATILE_NAMES

    if any(sd.exists(name) for name in VOLATILE_NAMES):
        for name in VOLATILE_NAMES:
            sd.delete(name)
        if notes is not None:
            notes.append(
                f"deleted the volatile state of {inst.name}: its TPM starts as after a "
                "reboot, NV data kept"
            )


def _take_lease(inst: Instance, take_over: bool, keys: DaemonKeys, notes: list[str] | None) -> None:
    """The lease of an instance bound to a remote, and the spec its daemon keeps it with."""
    inst.paths.remote_spec.unlink(missing_ok=True)
    if inst.paths.binding_file.exists():  # only then: the remote (boto3)
        from vtpmctl.usecases.ownership import take

        take(inst, take_over, keys.state, notes if notes is not None else [])


def start(
    inst: Instance,
    *,
    incoming: bool = False,
    ctrl_only: bool = False,
    timeout: float = START_TIMEOUT,
    delete_volatile: bool = False,
    keys: DaemonKeys | None = None,
    take_over: bool = False,
) -> Started:
    """Launch the daemon detached; return once its control channel answers."""
    refuse_attached(inst, "start")
    status = probe(inst)
    if status.state == "running" and not _vtpmctl_command(status.pid):
        return _running_already(inst, status)
    inst.paths.ensure_run_dirs(inst.config.access)
    notes: list[str] = []
    keys = keys or DaemonKeys()
    running = preflight(inst, timeout, notes, delete_volatile, keys, take_over)
    if running is not None:
        return running
    try:
        started = _launch(inst, incoming, ctrl_only, timeout, keys)
    except BaseException:
        _give_back_lease(inst)
        raise
    started.notes = notes
    return started


def _remote_spec(inst: Instance) -> Path | None:
    spec = inst.paths.remote_spec
    return spec if spec.exists() else None


def _give_back_lease(inst: Instance) -> None:
    """The lease preflight took, when no daemon of ours kept it (failed start, kill -9)."""
    if _remote_spec(inst) is None or probe(inst).state == "running":
        return
    from vtpmctl.usecases.ownership import abandon

    abandon(inst)


def _launch(
    inst: Instance, incoming: bool, ctrl_only: bool, timeout: float, keys: DaemonKeys
) -> Started:
    clean_stale(inst)
    rotate_log(inst.paths.log_file)
    log_fd = _open_log(inst.paths.log_file)
    mark = os.lseek(log_fd, 0, os.SEEK_END)
    specs, key_fds = keys.pipes()
    try:
        child = _spawn(
            inst,
            log_fd,
            incoming=incoming,
            ctrl_only=ctrl_only,
            key_specs=specs,
            key_fds=key_fds,
            remote_spec=_remote_spec(inst),
        )
    finally:
        os.close(log_fd)
        for fd in key_fds:
            os.close(fd)
    try:
        started = _wait_ready(inst, child, timeout, incoming=incoming)
    finally:
        child.close()
    if started is not None:
        return started
    if child.alive():  # timed out: do not leave a half-started daemon behind
        _terminate(child.pid, inst)
        child.wait(TERM_TIMEOUT)
        raise LifecycleError(
            f"{inst.name} did not become ready within {timeout:.0f}s; see {inst.paths.log_file}"
        )
    # The daemon died. If another start won the race for the lock, that is success.
    if not inst.paths.config_file.exists():
        raise _vanished(inst)  # an rm ran between the checks and the launch
    lines = _log_since(inst.paths.log_file, mark)
    reason = failure_reason(lines) if lines else _silent_failure(inst)
    deadline = time.monotonic() + (timeout if "locked by another process" in reason else 0)
    while True:
        status = probe(inst)
        if status.state == "running" and status.ours:
            return Started(status.pid or 0, True)
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL)
    log = f"(log: {inst.paths.log_file})"
    if reason.startswith(VOLATILE_REJECTED):  # the daemon's libtpms check: offer the fix
        from vtpmctl.store.instance_keys import delete_volatile_fix

        raise LifecycleError(
            f"{inst.name} failed to start: {reason.split(';')[0]} {log}; start without it "
            "(the guest sees a reboot, NV data is kept): " + delete_volatile_fix(inst)
        )
    raise LifecycleError(f"{inst.name} failed to start: {reason} {log}")


def _vanished(inst: Instance) -> NoSuchInstance:
    """An rm won the race with this start: take back what the start made, say so.

    The run dir, the log and a state dir holding nothing but ``.lock`` would
    otherwise outlive the instance and block ``create NAME``. Nothing is touched
    while someone holds the lock or a create of the same name is under way.
    """
    from vtpmctl.store.instances import Registry

    p = inst.paths
    gone = NoSuchInstance(f"no instance named {inst.name}; see vtpmctl list")
    if p.config_file.exists() or Registry(p.roots).creation_in_progress(p):
        return gone
    if inst.statedir().holder_pid() is not None:
        return gone
    import shutil

    shutil.rmtree(p.run_dir, ignore_errors=True)
    for log in (p.log_file, p.log_file.with_name(p.log_file.name + ".1")):
        log.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        if set(os.listdir(p.state_dir)) <= {".lock"}:
            (p.state_dir / ".lock").unlink(missing_ok=True)
            p.state_dir.rmdir()
        p.base.rmdir()  # only if empty
    return gone


def _silent_failure(inst: Instance) -> str:
    """Why a daemon that could not even write its log died: most often a full disk."""
    from vtpmctl.store.atomic import NoSpaceError

    p = inst.paths
    # In the order the daemon writes: its pid file, then the state, then the log.
    for path in (p.pid_file, p.state_dir / BlobKind.PERMANENT.file_name, p.log_file):
        try:
            st = os.statvfs(path.parent)
        except OSError:
            continue
        if (st.f_bfree if os.geteuid() == 0 else st.f_bavail) == 0:
            return str(NoSpaceError(errno.ENOSPC, path))
    return "no message"


def _log_since(path: Path, offset: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read(65536).decode(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-20:]


def _vtpmctl_command(pid: int | None) -> bool:
    """A vtpmctl command (another start, a snapshot) holds the lock for a moment:
    preflight waits for it, where a foreign holder is an error at once."""
    args = _cmdline(pid) if pid is not None else []
    ours = any(os.path.basename(a) == b"vtpmctl" for a in args[:3])
    return ours and not runs_daemon(args) and not runs_zygote(args)


def _running_already(inst: Instance, status: Status) -> Started:
    if status.ours:
        return Started(status.pid or 0, True)
    raise foreign_holder_error(inst.name, status.pid or 0)


class _Child:
    """The daemon being started: forked by the zygote, or exec'd as our own child.

    A forked daemon writes one byte to ``ready`` once it serves; the fd reads
    empty when it died first. An exec'd one is watched by polling its control
    channel, as before the zygote.
    """

    def __init__(
        self, pid: int, proc: subprocess.Popen[bytes] | None = None, ready: int | None = None
    ) -> None:
        self.pid = pid
        self.proc = proc
        self.ready = ready

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return not _gone(self.pid)

    def wait(self, timeout: float) -> None:
        if self.proc is not None:
            import subprocess

            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        else:
            _wait_exit(self.pid, timeout)

    def close(self) -> None:
        if self.ready is not None:
            os.close(self.ready)
            self.ready = None


def _spawn(
    inst: Instance,
    log_fd: int,
    *,
    incoming: bool,
    ctrl_only: bool,
    key_specs: dict[str, str],
    key_fds: list[int],
    remote_spec: Path | None,
) -> _Child:
    """Have the zygote fork the daemon; exec it when no zygote can be used.

    The key pipes reach a forked daemon under the same descriptor numbers its
    options name, as they reach an exec'd one.
    """
    from vtpmctl.childproc import fork_daemon

    args = daemon_args(
        inst,
        incoming=incoming,
        ctrl_only=ctrl_only,
        key_specs=key_specs,
        remote_spec=remote_spec,
    )
    env = child_env()
    if os.environ.get(NO_ZYGOTE_ENV) == "0":
        return _exec(args, env, log_fd, key_fds)
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = fork_daemon(args, env, log_fd, w, key_fds)
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    if pid is not None:
        return _Child(pid, ready=r)
    os.close(r)
    return _exec(args, env, log_fd, key_fds)


def _exec(args: list[str], env: dict[str, str], log_fd: int, key_fds: list[int]) -> _Child:
    import subprocess

    proc = subprocess.Popen(
        [*entry_argv(DAEMON_ENTRY), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log_fd,
        close_fds=True,
        pass_fds=key_fds,
        start_new_session=True,
        env=env,
        cwd="/",
    )
    return _Child(proc.pid, proc=proc)


def _wait_ready(
    inst: Instance, child: _Child, timeout: float, incoming: bool = False
) -> Started | None:
    """Started once our daemon answers; None if it died (or timed out).

    An answer may come from the daemon of a concurrent start that won the
    lock; then ours is about to exit, and the caller looks at who won only
    once it has, so that a start never returns with two daemons alive.
    """
    deadline = time.monotonic() + timeout
    if child.ready is not None:
        poller = select.poll()
        poller.register(child.ready, select.POLLIN)
        if not poller.poll(int(timeout * 1000)):
            return None
        if os.read(child.ready, 1) != b"R":
            child.wait(TERM_TIMEOUT)  # it is ending: let the caller read why
            return None
        if not incoming and probe(inst).pid == child.pid:
            return Started(child.pid, False)  # it takes the lock before it serves
    while time.monotonic() < deadline:
        alive = child.alive()
        if incoming and alive:
            _claim_storage(inst)
        if _answers(inst) and probe(inst).pid == child.pid:
            return Started(child.pid, False)
        if not alive:
            return None
        time.sleep(POLL)
    return None


def _claim_storage(inst: Instance) -> None:
    """CMD_LOCK_STORAGE to an incoming daemon, which otherwise locks only when QEMU's
    state arrives (swtpm's rule, for a state dir shared with the source). A named
    instance's state dir is its own, and the lock is how it is seen to be running."""
    from vtpmctl.device.client.control import ControlError, TargetError
    from vtpmctl.usecases.live import control_path, instance_client

    if not os.path.exists(control_path(inst)):
        return
    try:
        with instance_client(inst, timeout=2.0) as client:
            client.lock_storage(0)
    except (TargetError, ControlError, OSError):
        pass  # not up yet, or the dir is locked by another process: the wait goes on


def _answers(inst: Instance) -> bool:
    """CMD_GET_CAPABILITY on the control channel (for CUSE: the device exists)."""
    if inst.config.transport == Transport.CUSE:
        return inst.paths.device.exists() and probe(inst).state == "running"
    from vtpmctl.device.client.control import TargetError
    from vtpmctl.usecases.live import instance_client

    if not inst.paths.ctrl_socket.exists():
        return False
    try:
        with instance_client(inst, timeout=2.0) as c:
            c.caps()
    except (TargetError, OSError):
        return False
    return True


def exec_foreground(
    inst: Instance,
    *,
    incoming: bool = False,
    ctrl_only: bool = False,
    delete_volatile: bool = False,
    keys: DaemonKeys | None = None,
    take_over: bool = False,
) -> None:
    """Become the daemon (systemd Type=notify keeps $NOTIFY_SOCKET for it)."""
    status = probe(inst)
    if status.state != "running":
        inst.paths.ensure_run_dirs(inst.config.access)
    notes: list[str] = []
    keys = keys or DaemonKeys()
    if (
        status.state == "running"
        or preflight(inst, 0, notes, delete_volatile, keys, take_over) is not None
    ):
        _running_already(inst, probe(inst))
        raise LifecycleError(f"{inst.name} is already running (pid {status.pid})")
    clean_stale(inst)
    env = child_env()
    if "NOTIFY_SOCKET" in os.environ:
        env["NOTIFY_SOCKET"] = os.environ["NOTIFY_SOCKET"]
    specs, key_fds = keys.pipes()
    for fd in key_fds:
        os.set_inheritable(fd, True)
    argv = daemon_argv(
        inst,
        incoming=incoming,
        ctrl_only=ctrl_only,
        key_specs=specs,
        remote_spec=_remote_spec(inst),
    )
    for note in notes:  # the journal keeps what was settled before the daemon took over
        sys.stderr.write(f"vtpmctl: {note}\n")
    sys.stderr.flush()
    os.execve(argv[0], argv, env)


# ---------------------------------------------------------------- stop


def _gone(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it happens to be our child
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[-1].split()
        # A zombie, one being reaped by its parent, or one released meanwhile (empty).
        return fields[:1] in ([], [b"Z"], [b"X"])
    except (FileNotFoundError, ProcessLookupError):  # ESRCH: released while being read
        return True
    except OSError:
        return False


def _wait_exit(pid: int, timeout: float) -> None:
    """Block until ``pid`` has exited or ``timeout`` passed: one poll on a pidfd.

    A pidfd becomes readable when the process ends, whoever its parent is; the
    kernel has released the process's locks by then. Without pidfds (Linux
    before 5.3) the caller's polling loop does the waiting.
    """
    try:
        fd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        return  # gone already (ESRCH), or no pidfds here
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.poll(max(0, int(timeout * 1000)))
    finally:
        os.close(fd)


def wait_stopped(inst: Instance, pid: int, timeout: float) -> bool:
    """The lock is free and ``pid`` has exited (reaped here if it is our child)."""
    sd: StateDir = inst.statedir()
    deadline = time.monotonic() + timeout
    _wait_exit(pid, timeout)
    while True:
        if sd.holder_pid() is None and _gone(pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL)  # the lock passed to another process: rare, not worth a pidfd


def _terminate(pid: int, inst: Instance) -> bool:
    """SIGTERM, then SIGKILL: only ever to this instance's own daemon."""
    import signal

    for sig, wait in ((signal.SIGTERM, TERM_TIMEOUT), (signal.SIGKILL, TERM_TIMEOUT)):
        if not is_our_daemon(pid, inst):
            return _gone(pid)
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        except PermissionError as exc:
            raise LifecycleError(f"cannot signal pid {pid}: {exc.strerror}") from None
        if wait_stopped(inst, pid, wait):
            return True
    return False


def _send_shutdown(inst: Instance, timeout: float) -> None:
    from vtpmctl.usecases.live import instance_client

    with instance_client(inst, timeout=timeout) as client:
        client.shutdown()


def _outlives_shutdown(pid: int) -> bool:
    """The daemon was started with ``--on-shutdown power-off``: CMD_SHUTDOWN does not end it."""
    args = _cmdline(pid)
    want = [b"--on-shutdown", OnShutdown.POWER_OFF.value.encode()]
    return any(args[i : i + 2] == want for i in range(len(args)))


def _stop_by_signal(inst: Instance, pid: int, *, force: bool, timeout: float) -> int:
    """SIGTERM, the daemon's graceful end (the TPM is saved as at CMD_SHUTDOWN).

    For a daemon that outlives CMD_SHUTDOWN; a hypervisor may also hold its
    control channel, so a signal is the one way that always gets through.
    """
    import signal

    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    except PermissionError as exc:
        raise LifecycleError(f"cannot signal pid {pid}: {exc.strerror}") from None
    return _await_exit(inst, pid, force=force, timeout=timeout)


def _await_exit(inst: Instance, pid: int, *, force: bool, timeout: float) -> int:
    """Wait for a daemon already asked to end; with force, kill what outlives the wait."""
    if not wait_stopped(inst, pid, TERM_TIMEOUT if force else timeout):
        if not force:
            raise LifecycleError(
                f"{inst.name} (pid {pid}) did not stop within {timeout:.0f}s; retry with --force"
            )
        if not _terminate(pid, inst):
            raise LifecycleError(f"{inst.name} (pid {pid}) survived SIGKILL; check the process")
    clean_stale(inst)
    return pid


def stop(inst: Instance, *, force: bool = False, timeout: float = STOP_TIMEOUT) -> int | None:
    """CMD_SHUTDOWN (SIGTERM to a power-off daemon) and wait; ``force`` escalates to
    SIGTERM, then SIGKILL.

    Returns the pid that was stopped, or None if the instance was not running.
    """
    refuse_attached(inst, "stop")
    status = probe(inst)
    if status.state != "running":
        clean_stale(inst)
        _give_back_lease(inst)
        return None
    pid = status.pid or 0
    if not status.ours:
        raise foreign_holder_error(inst.name, pid)
    if _outlives_shutdown(pid):
        return _stop_by_signal(inst, pid, force=force, timeout=timeout)
    try:
        return _stop(inst, pid, force, timeout)
    finally:
        _give_back_lease(inst)


def _stop(inst: Instance, pid: int, force: bool, timeout: float) -> int | None:
    from vtpmctl.device.client.control import ControlError, TargetError

    try:
        _send_shutdown(inst, timeout=2.0 if force else timeout)
    except (TargetError, ControlError, OSError) as exc:
        # A connection that breaks (or a socket that is gone) most often means the
        # daemon is ending: another stop's CMD_SHUTDOWN won. Judge by the lock.
        timed_out = isinstance(exc.__cause__, TimeoutError)
        broke = not timed_out and not isinstance(exc, ControlError)
        if broke and wait_stopped(inst, pid, TERM_TIMEOUT):
            clean_stale(inst)
            return pid
        if not force:
            raise LifecycleError(
                f"{inst.name} (pid {pid}) did not accept CMD_SHUTDOWN ({exc}); retry with --force"
            ) from None
    return _await_exit(inst, pid, force=force, timeout=timeout)
