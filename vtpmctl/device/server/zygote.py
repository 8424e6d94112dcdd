"""The zygote: a pre-imported parent that forks daemons (``python -m vtpmctl _zygote``).

It imports the daemon's code and maps libtpms, but never makes a TPM, so
forking it keeps the rule of the process model (no process forks after
libtpms has made a TPM in it). A daemon forked from it starts in about a
millisecond instead of an interpreter start and the imports, and shares
with its siblings the pages of everything the zygote imported: ``gc.freeze``
before each fork keeps the collector from writing to (and so copying) them.

One zygote serves one user and one installation (``childproc.zygote_address``:
an abstract unix socket, so there is no file to clean up). It takes one
request per connection, ``childproc.fork_daemon``'s: the daemon's arguments,
environment and umask, and two fds (the daemon's stderr, the log, and the fd
on which it reports that it serves). It answers the daemon's pid. It refuses
clients of another uid, and requests from another interpreter or code tree;
when a source file of the package changes on disk (stamped before its imports)
it answers nothing and exits, so that an upgrade never forks old code (the client falls back to exec
and the next start spawns a fresh zygote). It exits once it has had no
daemon and no request for ``IDLE_EXIT`` seconds.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc

# For the daemons that encrypt (store.blob imports them late), and for every daemon:
# importing hashlib initialises OpenSSL here, once; without it each daemon does so for
# libtpms and runs 0.7 MiB more of libcrypto (RSS +0.6 MiB, PSS +0.1 MiB each).
import hashlib  # noqa: F401
import hmac  # noqa: F401
import os
import resource  # each child takes its starter's limits
import signal
import socket
import sys
import time

from vtpmctl.childproc import (
    DAEMON_ENTRY,
    RLIMITS,
    ZYGOTE_ENTRY,
    ZYGOTE_MAX_FDS,
    ZYGOTE_MAX_MESSAGE,
    ZYGOTE_REFUSED,
    ZYGOTE_STALE,
    IdleClock,
    Sources,
    ZygoteRequest,
    entry_argv,
    package_sources,
    peer_uid,
    reaped,
    set_environ,
    source_stamps,
    stale,
    zygote_address,
    zygote_identity,
    zygote_reply,
)

# The code on disk as it was before the imports below: a file changed while they
# run (an upgrade) is then caught by the first request's check, not missed.
_STAMPED = source_stamps(package_sources())

# Imported here to be shared: everything a daemon imports on its way to serving.
# A module first imported after the fork is loaded again by each daemon, into
# pages of its own (docs/architecture.md, "The zygote").
from vtpmctl.device.server import admin, daemon, options, sockets  # noqa: E402, F401
from vtpmctl.engine import libtpms  # noqa: E402
from vtpmctl.store import access, blob  # noqa: E402, F401
from vtpmctl.store import keys as store_keys  # noqa: E402, F401

IDLE_EXIT = 30.0  # seconds without a daemon or a request

_children: set[int] = set()
_idle = IdleClock(IDLE_EXIT)


def _reap(signum: int = 0, frame: object = None) -> None:
    for pid, _ in reaped():
        _children.discard(pid)
        _idle.touch()


def _recv_request(conn: socket.socket) -> tuple[ZygoteRequest | None, list[int]]:
    """The request (None if it is cut short or malformed) and the fds that came with it."""
    msg, fds, flags, _ = socket.recv_fds(conn, ZYGOTE_MAX_MESSAGE, ZYGOTE_MAX_FDS)
    if flags & socket.MSG_TRUNC:
        return None, fds
    try:
        return ZygoteRequest.decode(msg), fds
    except ValueError:
        return None, fds


def _child(
    listener: socket.socket, conn: socket.socket, request: ZygoteRequest, fds: list[int]
) -> None:
    """In the forked child: become the daemon as ``python -m vtpmctl _daemon`` would."""
    code = 1
    err_fd = fds[0]  # the log, which becomes fd 2 once the fds are placed
    try:
        listener.close()
        conn.close()
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        os.setsid()
        os.chdir("/")
        os.umask(request.umask)
        _set_rlimits(request.rlimits)
        set_environ(request.env)
        time.tzset()
        ready_fd = _place_fds(fds, request.fds)
        err_fd = 2
        gc.enable()
        # What ps and status see: the command line an exec would have had.
        set_command_line([*entry_argv(DAEMON_ENTRY), *request.argv])
        code = daemon.main(request.argv, ready_fd=ready_fd)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # noqa: BLE001 - one line in the log, never a traceback
        with contextlib.suppress(Exception):
            os.write(err_fd, f"vtpmctl: the daemon failed: {exc}\n".encode())
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os._exit(code)


def _place_fds(fds: list[int], numbers: list[int]) -> int:
    """Put the received fds where the daemon expects them; the ready fd's number.

    ``fds`` are stderr, the ready pipe, then one per entry of ``numbers``, the
    descriptor numbers the daemon's options name (its key pipes). Everything is
    first moved above all of those numbers, so no placement overwrites another.
    """
    base = max([*numbers, 2]) + 1  # not a fixed high number: RLIMIT_NOFILE may be 1024
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, base) for fd in fds]
    for fd in fds:
        os.close(fd)
    stderr_fd, ready_fd, *keys = high
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(stderr_fd, 2)
    os.close(null)
    os.close(stderr_fd)
    for fd, number in zip(keys, numbers, strict=True):
        os.dup2(fd, number)
        os.close(fd)
    return ready_fd


def _set_rlimits(limits: dict[str, tuple[int, int]]) -> None:
    """The starter's resource limits, where this process may set them."""
    for name in RLIMITS:
        value = limits.get(name)
        if value is not None:
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(getattr(resource, "RLIMIT_" + name), value)


def _serve_one(
    listener: socket.socket,
    conn: socket.socket,
    identity: dict[str, str],
    sources: Sources,
) -> bool:
    """Answer one client; False when this zygote must exit (its code changed)."""
    fds: list[int] = []
    try:
        if peer_uid(conn) != os.getuid():
            return True
        conn.settimeout(5.0)
        request, fds = _recv_request(conn)
        if (
            request is None
            or not all(n > 2 for n in request.fds)
            or len(fds) != 2 + len(request.fds)
            or request.identity != identity
        ):
            conn.send(ZYGOTE_REFUSED)
            return True
        if stale(sources):
            conn.send(ZYGOTE_STALE)
            return False
        gc.freeze()  # what was imported stays out of the collector's reach in the child
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # reaped only once counted
        try:
            pid = os.fork()
            if pid == 0:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
                _child(listener, conn, request, fds)
            _children.add(pid)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        # Formatted (childproc.zygote_reply), not built from objects: whatever the zygote
        # writes while the new daemon still shares its pages becomes that daemon's own copy.
        conn.send(zygote_reply(pid))
        return True
    except (OSError, ValueError):
        return True
    finally:
        for fd in fds:
            os.close(fd)
        conn.close()


def set_command_line(args: list[str]) -> bool:
    """Show ``args`` as this process's command line (``/proc/PID/cmdline``, ``ps``).

    The kernel shows the memory where the process's arguments were: it is
    overwritten in place (through ``/proc/self/mem``), NUL-padded to its end;
    the interpreter keeps its own copies. False if ``args`` do not fit.
    """
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (fields 48, 49)
        data = b"\0".join(os.fsencode(a) for a in args) + b"\0"
        if not start or len(data) > end - start:
            return False
        with open("/proc/self/mem", "r+b", buffering=0) as mem:
            mem.seek(start)
            mem.write(data.ljust(end - start, b"\0"))
    except (OSError, ValueError, IndexError):
        return False
    return True


def prepare() -> None:
    """What the zygote loads for its daemons beyond its imports."""
    libtpms.preload()
    # libcrypto's AES with hashlib and hmac (imported above), for the daemons that
    # encrypt: about 24-136 KiB more, so plain and encrypted daemons share one zygote.
    blob.preload_keys()


def settle() -> Sources:
    """Once loaded: the sources to check requests against, and no garbage to inherit."""
    # Each request is checked against these tuples only (stamped before the imports).
    sources = _STAMPED
    gc.collect()
    libtpms.trim_heap()  # what the imports freed, before any daemon inherits it
    return sources


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    # Spawned with room to spare (--title-room), which the daemons' command lines use.
    set_command_line(entry_argv(ZYGOTE_ENTRY))
    ready_fd = int(args[args.index("--ready-fd") + 1]) if "--ready-fd" in args else None
    # Nothing a spawner left open reaches the daemons (only the ready fd, 3, is ours).
    if ready_fd is None:
        os.closerange(3, 1 << 16)
    else:
        os.closerange(3, ready_fd)
        os.closerange(ready_fd + 1, 1 << 16)
    identity = zygote_identity()
    prepare()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        listener.bind(zygote_address(identity))
    except OSError:
        return 0  # another zygote won the race: the client connects to that one
    listener.listen(16)
    if os.fork() != 0:  # leave the process that spawned us; it reaps our first half
        os._exit(0)
    signal.signal(signal.SIGCHLD, _reap)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    sources = settle()
    if ready_fd is not None:
        os.write(ready_fd, b"Z")
        os.close(ready_fd)
    _idle.touch()
    while True:
        _reap()
        timeout = _idle.remaining(busy=bool(_children))
        if timeout is None:
            return 0
        listener.settimeout(timeout)
        try:
            conn, _ = listener.accept()
        except OSError:  # the timeout, or an interrupted accept
            continue
        _idle.touch()
        if not _serve_one(listener, conn, identity, sources):
            return 0


if __name__ == "__main__":
    sys.exit(main())
