"""The per-vTPM process: lock, state, frontends, signals, readiness.

Runs in the foreground (``vtpmctl serve``, systemd ``Type=notify``) or is
exec'd detached by ``vtpmctl start`` as ``python -m vtpmctl _daemon``.
It never forks once libtpms is loaded (a forked TPM clones its DRBG).
Its options are declared once, in ``vtpmctl.device.server.options``.

Every option is checked before anything is created (a bad ``--ctrl`` must
not leave a new state dir behind); a value that cannot be used is a usage
error (exit 2). A detached daemon reports a failed start the way a
long-lived process can: one ``vtpmctl: …`` line on stderr, which ``vtpmctl
start`` redirects to the instance's log and reads back
(``usecases.supervisor.failure_reason``). A JSON answer on stdout, as the
short-lived children give (``vtpmctl.childproc``), does not fit a process
that answers nothing once it is up and whose stdout is /dev/null.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys

from vtpmctl import logger
from vtpmctl.engine.tpm import Engine, EngineConfig
from vtpmctl.errors import EXIT_FAILURE, EXIT_OK, ServeError, StoreError, UsageError
from vtpmctl.fspath import clean
from vtpmctl.model import BlobKind, KeyFormat, OnShutdown, TpmFamily, Transport
from vtpmctl.store.blob import AesKey
from vtpmctl.store.statedir import StateDir, StateDirError

# Off `typing` at run time: the zygote, and so every daemon, would carry it
# (0.4 MiB; docs/architecture.md, "The zygote").
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Mapping
    from types import FrameType
    from typing import Any

    from vtpmctl.device.server.sockets import Endpoint
    from vtpmctl.engine.tpm import Startup
    from vtpmctl.fspath import StrPath
    from vtpmctl.store.keys import KeySource

log = logger.get("vtpmctl.daemon")


class DaemonError(ServeError):
    """The daemon cannot start; one line that names the problem and the fix."""


class ServeOptionError(UsageError):
    """An option's value cannot be used; nothing was created or started."""


def _path(value: StrPath | None) -> str | None:
    return None if value is None else clean(value)


class DaemonOptions:
    """One daemon's settings; file names as ``str`` (``vtpmctl.fspath``)."""

    def __init__(
        self,
        state_dir: StrPath,
        ctrl: str | None = None,
        data: str | None = None,
        admin: str | None = None,  # unix:PATH of the read-only admin endpoint
        cuse: str | None = None,
        tpm2: bool = True,
        flags: list[str] | None = None,
        key_file: StrPath | None = None,
        key_kind: str = KeyFormat.AUTO,
        key: str | None = None,  # swtpm's --key syntax (file=, fd=, pwdfile=, pwdfd=)
        migration_key_file: StrPath | None = None,
        migration_key_kind: str = KeyFormat.AUTO,
        migration_key: str | None = None,
        pid_file: StrPath | None = None,
        log_file: StrPath | None = None,
        terminate: bool = False,
        incoming: bool = False,
        allow_manufacture: bool | None = None,
        reject_locality_4: bool = False,
        remote_spec: StrPath | None = None,
        on_shutdown: OnShutdown = OnShutdown.EXIT,
        group: str | None = None,
        socket_mode: str | None = None,
    ) -> None:
        self.state_dir = clean(state_dir)
        self.ctrl = ctrl
        self.data = data
        self.admin = admin
        self.cuse = cuse
        self.tpm2 = tpm2
        self.flags = [] if flags is None else flags
        self.key_file = _path(key_file)
        self.key_kind = key_kind
        self.key = key
        self.migration_key_file = _path(migration_key_file)
        self.migration_key_kind = migration_key_kind
        self.migration_key = migration_key
        self.pid_file = _path(pid_file)
        self.log_file = _path(log_file)
        self.terminate = terminate
        self.incoming = incoming
        self.allow_manufacture = allow_manufacture
        self.reject_locality_4 = reject_locality_4
        self.remote_spec = _path(remote_spec)
        self.on_shutdown = on_shutdown
        self.group = group
        self.socket_mode = socket_mode


def parse_flags(flags: list[str]) -> tuple[bool, Startup, bool]:
    """``--flags`` as swtpm spells them -> (not_need_init, startup, no_auto_shutdown)."""
    not_need_init = False
    startup: Startup = "none"
    no_auto = False
    for item in flags:
        for flag in filter(None, (f.strip() for f in item.split(","))):
            if flag == "not-need-init":
                not_need_init = True
            elif flag == "startup-clear":
                startup = "clear"
            elif flag == "startup-state":
                startup = "state"
            elif flag == "startup-none":
                startup = "none"
            elif flag == "disable-auto-shutdown":
                no_auto = True
            else:
                raise ServeOptionError(
                    f"unknown flag {flag!r}; use not-need-init, startup-clear, startup-state, "
                    "startup-none or disable-auto-shutdown"
                )
    return not_need_init, startup, no_auto


def key_sources(opts: DaemonOptions) -> tuple[KeySource | None, KeySource | None]:
    """Where the state and migration keys come from (nothing is read yet)."""
    from vtpmctl.store.keys import KeyFileError, KeySource, parse_key_spec

    found: list[KeySource | None] = []
    for flag, path, kind, spec in (
        ("--key", opts.key_file, opts.key_kind, opts.key),
        ("--migration-key", opts.migration_key_file, opts.migration_key_kind, opts.migration_key),
    ):
        if path is not None and spec is not None:
            raise ServeOptionError(f"give {flag}-file or {flag}, not both")
        if spec is not None:
            try:
                found.append(parse_key_spec(spec, flag))
            except KeyFileError as exc:
                raise ServeOptionError(str(exc)) from None
        elif path is not None:
            found.append(KeySource(path=path, kind=KeyFormat(kind)))
        else:
            found.append(None)
    return found[0], found[1]


def _load_key(source: KeySource | None, own: bool, probe: bytes | None = None) -> AesKey | None:
    """Read a key; a file named on the command line must be private, as vtpmctl wants."""
    if source is None:
        return None
    from vtpmctl.store.keys import (
        OWN_PASSPHRASE_BITS,
        SWTPM_PASSPHRASE_BITS,
        check_secret_file_mode,
    )

    if source.path is not None:
        check_secret_file_mode(source.path)
    # --key-file with --key-format passphrase keeps vtpmctl's size; --key is swtpm's.
    return source.resolve(probe, OWN_PASSPHRASE_BITS if own else SWTPM_PASSPHRASE_BITS)


def _setup_logging(log_file: str | None) -> int | None:
    """Log to the file (0600) or stderr; returns the fd libtpms should use.

    Written by ``vtpmctl.logger``, not a ``logging`` handler: the daemon stays
    off ``logging`` (docs/architecture.md, "The zygote").
    """
    if log_file is not None:
        from vtpmctl.store.atomic import open_log

        try:
            fd = open_log(log_file)
        except OSError as exc:
            raise DaemonError(f"cannot open log file {log_file}: {exc.strerror}") from None
        logger.write_to(os.fdopen(fd, "a", buffering=1))
        libtpms_fd: int | None = fd
    else:
        logger.write_to(sys.stderr)
        libtpms_fd = None
    return libtpms_fd


def _write_pid_file(path: str) -> None:
    from vtpmctl.store.atomic import write_atomic

    write_atomic(path, f"{os.getpid()}\n".encode(), 0o644)


def _notify(message: str) -> None:
    """sd_notify without libsystemd: one datagram to $NOTIFY_SOCKET."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(addr)
            sock.sendall(message.encode())
        except OSError as exc:
            log.warning("cannot notify systemd: %s", exc.strerror)


def check_options(
    opts: DaemonOptions,
) -> tuple[Endpoint | None, Endpoint | None, Endpoint | None]:
    """Every option's value, before anything is created: the (ctrl, data, admin) endpoints."""
    if (opts.ctrl is None) == (opts.cuse is None):
        raise ServeOptionError("give exactly one of --ctrl or --cuse")
    if opts.admin is not None and opts.cuse is not None:
        raise ServeOptionError("--admin goes with --ctrl; a CUSE device has no admin endpoint")
    parse_flags(opts.flags)
    key_sources(opts)
    if opts.cuse is not None:
        from vtpmctl.device.server.cuse.wire import CuseError, device_name

        try:
            device_name(opts.cuse)
        except CuseError as exc:
            raise ServeOptionError(str(exc)) from None
        return None, None, None
    from vtpmctl.device.server.sockets import EndpointError, parse_endpoint
    from vtpmctl.store.access import Access, AccessError

    try:
        ctrl = parse_endpoint(opts.ctrl or "")
        data = parse_endpoint(opts.data) if opts.data else None
        admin = parse_endpoint(opts.admin) if opts.admin else None
        access = Access.of(opts.group, opts.socket_mode, None)
    except (EndpointError, AccessError) as exc:
        raise ServeOptionError(str(exc)) from None
    if admin is not None and admin.kind != "unix":
        # It hands out the permanent state: only a socket the file system guards.
        raise ServeOptionError("--admin takes unix:PATH only (a 0600 socket)")

    def with_access(ep: Endpoint) -> Endpoint:
        # The unix sockets get exactly the asked mode and group (TCP has neither); the
        # admin socket stays the owner's.
        if ep.kind != "unix":
            return ep
        return ep.replace(mode=access.socket_mode, gid=access.gid)

    return with_access(ctrl), None if data is None else with_access(data), admin


def run(opts: DaemonOptions, ready_fd: int | None = None) -> int:
    """Serve until CMD_SHUTDOWN or SIGTERM; bad setup raises ServeError, StoreError, UsageError.

    ``ready_fd`` (from the zygote) gets one byte once the daemon serves; it is
    closed then, or when the process ends, which the starter sees as a failure.
    """
    ctrl, data, admin = check_options(opts)
    not_need_init, startup, no_auto = parse_flags(opts.flags)
    state_source, migration_source = key_sources(opts)
    permall = StateDir(opts.state_dir, tpm2=opts.tpm2).read_raw(BlobKind.PERMANENT.file_name)
    state_key = _load_key(state_source, opts.key is None, permall)
    migration_key = _load_key(migration_source, opts.migration_key is None)
    libtpms_fd = _setup_logging(opts.log_file)

    replicator = None
    if opts.remote_spec is not None:  # only then: boto3 and a thread
        logger.take_stdlib_records()  # boto3 logs through `logging`, into the same log
        from vtpmctl.device.server.replication import Replicator, WatchedStateDir, load

        watched = WatchedStateDir(opts.state_dir, tpm2=opts.tpm2, key=state_key)
        replicator = Replicator(load(opts.remote_spec), watched, state_key)
        watched.on_permanent = replicator.changed
        statedir: StateDir = watched
    else:
        statedir = StateDir(opts.state_dir, tpm2=opts.tpm2, key=state_key)
    if opts.allow_manufacture is False and not os.path.isdir(opts.state_dir):
        # An instance removed while it was being started: recreating its dir (and
        # .lock) would leave files behind that block a new instance of that name.
        raise DaemonError(f"no TPM state dir {opts.state_dir}; is the instance removed?")
    try:
        statedir.ensure()
    except OSError as exc:
        raise DaemonError(f"cannot create state dir {opts.state_dir}: {exc.strerror}") from None
    config = EngineConfig(
        tpm2=opts.tpm2,
        transport=Transport.CUSE if opts.cuse else Transport.SOCKET,
        state_key=state_key,
        migration_key=migration_key,
        startup=startup,
        not_need_init=not_need_init,
        disable_auto_shutdown=no_auto,
        incoming=opts.incoming,
        allow_manufacture=opts.allow_manufacture,
        reject_locality_4=opts.reject_locality_4,
        on_shutdown=opts.on_shutdown,
    )
    engine = Engine(statedir, config)
    if libtpms_fd is not None:
        engine.tpm.set_debug_fd(libtpms_fd)
    try:
        engine.start()
    except StateDirError:
        engine.close()
        raise

    server = _make_frontend(opts, engine, ctrl, data, admin)
    if opts.pid_file is not None:
        try:
            _write_pid_file(opts.pid_file)
        except OSError as exc:  # a full disk, most likely: leave no socket behind
            server.close()
            engine.close()
            raise DaemonError(f"cannot write the pid file: {exc}") from None

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: shutting down", signum)
        server.request_exit()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    log.info(
        "serving %s (TPM %s) on %s",
        opts.state_dir,
        TpmFamily.of(opts.tpm2).version,
        getattr(server, "path", None) or opts.ctrl,
    )
    if replicator is not None:
        replicator.start()
    _notify("READY=1")
    if ready_fd is not None:
        try:
            os.write(ready_fd, b"R")
        except OSError as exc:
            log.warning("cannot report readiness: %s", exc.strerror)
        os.close(ready_fd)
    try:
        server.serve_forever()
    finally:
        _notify("STOPPING=1")
        engine.close()
        if replicator is not None:
            replicator.stop()
        if opts.pid_file is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(opts.pid_file)
        log.info("stopped")
    message = getattr(server, "exit_message", None)
    return EXIT_FAILURE if message else EXIT_OK


def _make_frontend(  # type: ignore[no-untyped-def]
    opts: DaemonOptions,
    engine: Engine,
    ctrl: Endpoint | None,
    data: Endpoint | None,
    admin: Endpoint | None = None,
):
    if opts.cuse is not None:
        from vtpmctl.device.server.cuse.server import CuseServer
        from vtpmctl.device.server.cuse.wire import CuseError

        try:
            return CuseServer(engine, opts.cuse)
        except CuseError:
            engine.close()
            raise
    from vtpmctl.device.server.sockets import EndpointError, SocketServer

    assert ctrl is not None
    try:
        return SocketServer(engine, ctrl, data, terminate=opts.terminate, admin=admin)
    except EndpointError:
        engine.close()
        raise


def parse_serve_args(args: list[str]) -> argparse.Namespace | None:
    """``vtpmctl serve`` arguments if they are well-formed, else None (typer explains)."""
    from vtpmctl.device.server.options import build_parser

    try:
        ns = build_parser(quiet=True).parse_args(args)
    except ValueError:
        return None
    if (ns.ctrl is None) == (ns.cuse is None):
        return None
    return ns


def run_args(ns: argparse.Namespace) -> int:
    return run(options_from_values(vars(ns)))


def options_from_values(values: Mapping[str, Any]) -> DaemonOptions:
    """DaemonOptions from the values of ``options.SERVE_OPTIONS``, by dest."""
    return DaemonOptions(
        state_dir=values["state"],
        ctrl=values["ctrl"],
        data=values["data"],
        admin=values["admin"],
        cuse=values["cuse"],
        tpm2=TpmFamily(values["tpm"]).tpm2,
        flags=list(values["flags"]),
        key_file=values["key_file"],
        key_kind=values["key_kind"],
        key=values["key"],
        migration_key_file=values["migration_key_file"],
        migration_key_kind=values["migration_key_kind"],
        migration_key=values["migration_key"],
        pid_file=values["pid_file"],
        log_file=values["log_file"],
        terminate=values["terminate"],
        incoming=values["incoming"],
        allow_manufacture=False if values["existing"] else None,
        remote_spec=values["remote_spec"],
        on_shutdown=OnShutdown(values["on_shutdown"]),
        group=values["group"],
        socket_mode=values["socket_mode"],
    )


_parser: list[argparse.ArgumentParser] = []  # built once, when first needed


def parser() -> argparse.ArgumentParser:
    """The daemon's argument parser (``options.build_parser``), built on first use."""
    if not _parser:
        from vtpmctl.device.server.options import build_parser

        _parser.append(build_parser())
    return _parser[0]


def main(argv: list[str] | None = None, ready_fd: int | None = None) -> int:
    from vtpmctl.device.server.options import parse_plain

    args = sys.argv[1:] if argv is None else argv
    values = parse_plain(args)  # the command line ``vtpmctl start`` writes
    if values is None:
        values = vars(parser().parse_args(args))  # any other, and its usage errors
    try:
        return run(options_from_values(values), ready_fd)
    except (ServeError, StoreError, UsageError) as exc:  # bad setup; anything else is a bug
        print(f"vtpmctl: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
