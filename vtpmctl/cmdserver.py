"""The command server: a pre-imported parent that forks one child per command.

``python -m vtpmctl _cmdserver ADDRESS`` imports the command line's code once
(the commands, use cases, store and client; never the engine: it never loads
libtpms, so forking it is always allowed) and then, for each console-script
call that ``vtpmctl.cmdclient`` hands it, forks a child that becomes that
call: its descriptors under the same numbers, its current directory,
environment, umask and limits, its command line; the child runs
``vtpmctl.cli.run`` and sends back the exit code. A command then costs the
client's interpreter start and a fork instead of an interpreter start and
every import.

It serves one user and one identity (``cmdclient.identity``: interpreter,
code, the environment that shapes the interpreter, cgroup, namespaces,
groups, security label), on an abstract unix socket named after them. It
refuses other uids, and exits, refusing, when a source file it imported
changed on disk, so that an upgrade never runs old code. It exits once it has
had no request and no running child for ``IDLE_EXIT`` seconds.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import pkgutil
import resource
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable

from vtpmctl import childproc, cli, cmdclient

IDLE_EXIT = 120.0  # seconds without a request or a running child

# What commands use, imported once here rather than by each child. The engine
# and the daemon's side are not among them (the CLI never loads libtpms).
PACKAGES = ("vtpmctl.commands", "vtpmctl.usecases", "vtpmctl.store", "vtpmctl.device.client")
SKIP = ("vtpmctl.commands.serve",)  # the daemon's entry: never run by a child of this
LIBRARIES = (
    "hashlib",
    "hmac",
    "secrets",
    "shutil",
    "subprocess",
    "tarfile",
    "cryptography.x509",
    "cryptography.hazmat.primitives.ciphers",
    "cryptography.hazmat.primitives.serialization",
    "cryptography.hazmat.primitives.asymmetric.rsa",
    "cryptography.hazmat.primitives.asymmetric.ec",
)

# child pid -> the connection of the client it runs for (to report how it ended)
_children: dict[int, socket.socket] = {}
_watched: set[int] = set()  # children whose client is still connected
_idle = childproc.IdleClock(IDLE_EXIT)
_OWN_LIMITS: dict[int, tuple[int, int]] = {}  # this server's, which each child starts with


def preload() -> None:
    """Import what the commands import, so that no child imports it again."""
    for name in PACKAGES:
        package = importlib.import_module(name)
        for info in pkgutil.walk_packages(package.__path__, name + "."):
            if info.name not in SKIP:
                with contextlib.suppress(ImportError):
                    importlib.import_module(info.name)
    for name in LIBRARIES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    from vtpmctl.store import blob

    with contextlib.suppress(Exception):  # a missing libcrypto is the command's to report
        blob.preload_keys()


def _relay(pid: int, conn: socket.socket) -> None:
    """What the client of child ``pid`` sent: a signal to raise in it, or its end.

    A client that ends (killed, say) takes its command with it, as the end of an
    exec'd command would: the child is killed.
    """
    try:
        data = conn.recv(64, socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return
    except OSError:
        data = b""
    if pid not in _children:
        return  # reaped meanwhile: the pid may be another process's now
    if not data:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        _watched.discard(pid)
    elif data[:1] == cmdclient.SIGNAL:
        with contextlib.suppress(ValueError, OSError):
            os.kill(pid, int(data[1:]))


def _reap(signum: int = 0, frame: object = None) -> None:
    for pid, status in childproc.reaped():
        conn = _children.pop(pid, None)
        _watched.discard(pid)
        _spare_pids.discard(pid)
        if conn is not None:
            # The child sent its exit code first if it could; this is for a child
            # that a signal ended.
            with contextlib.suppress(OSError):
                conn.send(cmdclient.WAIT_STATUS + str(status).encode())
            conn.close()
        _idle.touch()


class Request:
    """One command as ``cmdclient.request`` sent it."""

    __slots__ = ("argv", "env", "fd_numbers", "limits", "raw", "umask")

    def __init__(self, message: bytes) -> None:
        self.raw = message
        fields = message.split(b"\0")
        if len(fields) < 5 or fields[0] != cmdclient.PROTOCOL:
            raise ValueError("not a command request")
        self.umask = int(fields[1])
        self.limits = [tuple(map(int, x.split(b":"))) for x in fields[2].split(b",") if x]
        self.fd_numbers = [int(x) for x in fields[3].split(b",") if x]
        argc = int(fields[4])
        if argc < 1 or 5 + argc > len(fields):
            raise ValueError("a command line of the wrong length")
        self.argv = [os.fsdecode(a) for a in fields[5 : 5 + argc]]
        self.env: dict[str, str] = {}
        for entry in fields[5 + argc :]:
            key, sep, value = os.fsdecode(entry).partition("=")
            if sep:
                self.env[key] = value
        if not 0 <= self.umask <= 0o777 or any(n < 0 for n in self.fd_numbers):
            raise ValueError("a bad umask or descriptor number")


def _receive(conn: socket.socket) -> tuple[Request, int, list[int]]:
    """The request, the client's cwd and its descriptors (in the request's order)."""
    msg, received, flags, _ = socket.recv_fds(
        conn, cmdclient.MAX_MESSAGE + 1, cmdclient.MAX_FDS + 1
    )
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ValueError("a request too large")
        request = Request(msg)
        if len(received) != 1 + len(request.fd_numbers):
            raise ValueError("descriptors that do not match the request")
    except ValueError:
        for fd in received:
            os.close(fd)
        raise
    return request, received[0], received[1:]


def _serve_one(listener: socket.socket, conn: socket.socket, code: childproc.Sources) -> bool:
    """Run one client's command in a child; False when this server must exit (its code changed)."""
    received: list[int] = []
    try:
        if childproc.peer_uid(conn) != os.getuid():
            conn.close()
            return True
        conn.settimeout(5.0)
        request, cwd, received = _receive(conn)
        received = [cwd, *received]
        if childproc.stale(code):
            conn.send(cmdclient.REFUSED + cmdclient.STALE)
            conn.close()
            return False
        conn.settimeout(None)
        client = childproc.peer_pid(conn)
        if not _hand_over(conn, request, received, client):
            _fork(listener, lambda: _child(conn, request, cwd, received[1:], client), conn)
        return True
    except (OSError, ValueError):
        with contextlib.suppress(OSError):
            conn.send(cmdclient.REFUSED)
        conn.close()
        return True
    finally:
        for fd in received:
            os.close(fd)


def _fork(listener: socket.socket, body: Callable[[], None], conn: socket.socket | None) -> int:
    """Fork a child that leaves the server's sockets and runs ``body``; its pid.

    ``conn`` is the client the child runs for (None for a spare), recorded
    before SIGCHLD can report the child's end.
    """
    gc.freeze()  # what was imported stays out of the collector's reach in the child
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        pid = os.fork()
        if pid == 0:
            try:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
                listener.close()
                for other in _children.values():
                    other.close()  # the server's connections to other clients
                _children.clear()
                _watched.clear()
                for _, channel in _spare:
                    channel.close()
                _spare.clear()
                body()
            finally:
                os._exit(1)  # body ends the process itself; this is for a failure
        if conn is None:
            _spare_pids.add(pid)
        else:
            _children[pid] = conn
            _watched.add(pid)
        return pid
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})


# A child forked ahead of the next command, waiting on its end of a socket pair:
# handing it a command costs a message instead of a fork (about 1.5 ms here).
_spare: list[tuple[int, socket.socket]] = []
_spare_pids: set[int] = set()  # spares not yet reaped


def _new_spare(listener: socket.socket) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        pid = _fork(listener, lambda: _spare_waits(ours, theirs), None)
    except OSError:
        ours.close()
        return
    finally:
        theirs.close()
    _spare.append((pid, ours))


def _spare_waits(ours: socket.socket, channel: socket.socket) -> None:
    """In a spare: wait for a command from the server, then run it as ``_child``."""
    ours.close()
    try:
        msg, fds, _, _ = socket.recv_fds(channel, cmdclient.MAX_MESSAGE + 64, cmdclient.MAX_FDS + 2)
    except OSError:
        os._exit(0)
    channel.close()
    if not msg or len(fds) < 2:
        os._exit(0)  # the server is gone
    client, _, raw = msg.partition(b"\0")
    conn = socket.socket(fileno=fds[0])
    _child(conn, Request(raw), fds[1], fds[2:], int(client))


def _hand_over(conn: socket.socket, request: Request, fds: list[int], client: int) -> bool:
    """Give the command to the spare; False if there is none (or it died)."""
    if not _spare:
        return False
    pid, channel = _spare.pop()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        if pid not in _spare_pids:
            return False
        socket.send_fds(
            channel, [str(client).encode() + b"\0" + request.raw], [conn.fileno(), *fds]
        )
        _spare_pids.discard(pid)
        _children[pid] = conn
        _watched.add(pid)
        return True
    except OSError:
        return False
    finally:
        channel.close()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})


def _child(
    conn: socket.socket,
    request: Request,
    cwd: int,
    fds: list[int],
    client_pid: int,
) -> None:
    """In the forked child: become the client's command, run it, report its exit code."""
    code = 1
    try:
        conn.send(cmdclient.ACCEPTED)  # from here on, the command is this process's
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.fchdir(cwd)
        os.close(cwd)
        os.umask(request.umask)
        for number, soft, hard in request.limits:
            if _OWN_LIMITS.get(number) != (soft, hard):
                with contextlib.suppress(ValueError, OSError):
                    resource.setrlimit(number, (soft, hard))
        childproc.set_environ(request.env)
        time.tzset()
        conn = _place_fds(fds, request.fd_numbers, conn)
        _new_stdio()
        childproc.serve_for(client_pid)
        gc.enable()
        sys.argv = list(request.argv)
        code = cli.run(request.argv[1:])
        code = _finish(code)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException as exc:  # noqa: BLE001 - one line, as the console script would
        with contextlib.suppress(Exception):
            os.write(2, f"vtpmctl: {type(exc).__name__}: {exc}\n".encode())
    finally:
        with contextlib.suppress(OSError):
            conn.send(cmdclient.EXIT + str(code).encode())
        os._exit(code)


def _place_fds(fds: list[int], numbers: list[int], conn: socket.socket) -> socket.socket:
    """Put the client's descriptors under their numbers; the connection, moved out of the way.

    Everything is first moved above all the numbers involved, so that no
    placement overwrites a descriptor still to be placed.
    """
    base = max([*numbers, *fds, conn.fileno(), 2]) + 1
    moved = socket.socket(fileno=_dup_above(conn.fileno(), base))
    conn.close()
    high = [_dup_above(fd, base) for fd in fds]
    for fd in fds:
        os.close(fd)
    wanted = set(numbers)
    for n in range(3):
        if n not in wanted:
            with contextlib.suppress(OSError):
                os.close(n)  # the client had it closed: so does its command
    for fd, number in zip(high, numbers, strict=True):
        os.dup2(fd, number, inheritable=True)
        os.close(fd)
    return moved


def _dup_above(fd: int, base: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, base)


def _new_stdio() -> None:
    """sys.stdin/stdout/stderr on descriptors 0-2 as an interpreter start would make them."""
    import io

    def stream(fd: int, model: object, write: bool) -> io.TextIOWrapper | None:
        try:
            os.fstat(fd)
        except OSError:
            return None
        encoding = getattr(model, "encoding", None) or "utf-8"
        errors = getattr(model, "errors", None) or "strict"
        raw = io.FileIO(fd, "w" if write else "r", closefd=False)
        if write:
            tty = raw.isatty()
            unbuffered = bool(getattr(model, "write_through", False))
            return io.TextIOWrapper(
                io.BufferedWriter(raw),
                encoding=encoding,
                errors=errors,
                line_buffering=(tty or fd == 2) and not unbuffered,
                write_through=bool(unbuffered),
            )
        return io.TextIOWrapper(io.BufferedReader(raw), encoding=encoding, errors=errors)

    sys.stdin = sys.__stdin__ = stream(0, sys.__stdin__, False)  # type: ignore[misc]
    sys.stdout = sys.__stdout__ = stream(1, sys.__stdout__, True)  # type: ignore[misc]
    sys.stderr = sys.__stderr__ = stream(2, sys.__stderr__, True)  # type: ignore[misc]


def _finish(code: int) -> int:
    """What the interpreter's exit would do: wait for threads, run atexit, flush stdio."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            if code == 0:
                code = 120  # as the interpreter reports a failed flush at exit
    return code


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        sys.stderr.write("usage: python -m vtpmctl _cmdserver ADDRESS\n")
        return 2
    address = b"\0" + bytes.fromhex(args[0])
    os.closerange(3, 1 << 16)  # nothing the client that spawned us had open stays open
    code = childproc.source_stamps(childproc.package_sources())
    preload()
    if childproc.stale(code):
        return 0  # changed while we imported it (an upgrade): the next command starts another
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        listener.bind(address)
    except OSError:
        return 0  # another server won the race
    listener.listen(64)
    listener.setblocking(False)
    signal.signal(signal.SIGCHLD, _reap)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for number in range(cmdclient.RLIMIT_COUNT):
        with contextlib.suppress(ValueError, OSError):
            _OWN_LIMITS[number] = resource.getrlimit(number)
    gc.collect()
    gc.freeze()
    _idle.touch()
    _new_spare(listener)
    while True:
        _reap()
        timeout = _idle.remaining(busy=bool(_children))
        if timeout is None:
            return 0
        if not _wait(listener, timeout):
            continue
        try:
            conn, _ = listener.accept()
        except OSError:
            continue
        _idle.touch()
        if not _serve_one(listener, conn, code):
            return 0
        if not _spare:
            _new_spare(listener)  # for the next command, while this one runs


def _wait(listener: socket.socket, timeout: float) -> bool:
    """Wait for a client (True) while relaying what running children's clients send."""
    poller = select.poll()
    poller.register(listener, select.POLLIN)
    by_fd = {}
    for pid in list(_watched):
        conn = _children[pid]
        by_fd[conn.fileno()] = pid
        poller.register(conn, select.POLLIN)
    try:
        events = poller.poll(int(timeout * 1000) + 1)
    except InterruptedError:
        return False
    incoming = False
    for fd, _ in events:
        if fd == listener.fileno():
            incoming = True
        elif fd in by_fd and by_fd[fd] in _children:
            _relay(by_fd[fd], _children[by_fd[fd]])
    return incoming


if __name__ == "__main__":
    sys.exit(main())
