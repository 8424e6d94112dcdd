"""The console script's side of the command server (``vtpmctl.cmdserver``).

A command a script runs often costs an interpreter start (11 ms) and the
imports of the code it runs (30-90 ms); the command server has made the
imports once, and forks a child per command. This side sends the command
line, the environment, the umask and limits, and the caller's descriptors
(current directory, stdio and every other inherited fd, under the same
numbers), forwards the signals a shell sends, and ends as the command ended.
Whenever the server cannot be used (none runs, another uid, an error) the
caller runs the command itself, and a server is started in the background
for the next one.

Only ``_socket``, ``os`` and ``sys`` on this path: it runs before every command.
"""

import _socket
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

ENV = "VTPMCTL_COMMAND_SERVER"  # "0": never use it
# Set by systemd for a unit's processes: a command run by a unit stays in its own
# process (a server would outlive it in the unit's cgroup; a notify socket
# expects the main process itself).
SERVICE_ENV = ("INVOCATION_ID", "NOTIFY_SOCKET")
PROTOCOL = b"vtpmctl-command/1"
MAX_MESSAGE = 1 << 17  # bytes: one datagram (argv and environment)
MAX_FDS = 250  # SCM_RIGHTS carries at most 253 per message
# What a child inherits unchanged only if the server has it too: these name the
# interpreter's behaviour and the libraries it loaded, so they pick the server.
IDENTITY_ENV = ("LANG", "LC_ALL", "LC_CTYPE", "LD_LIBRARY_PATH", "LD_PRELOAD")
RLIMIT_COUNT = 16  # Linux's RLIMIT_CPU (0) .. RLIMIT_RTTIME (15); the module has no count
FORWARDED_SIGNALS = (1, 2, 3, 15)  # SIGHUP, SIGINT, SIGQUIT, SIGTERM (no `signal` import)

# Replies on the connection: from the child, that it took the command, then its
# exit code; from the server, the child's wait status when it ended without one;
# a refusal.
EXIT, WAIT_STATUS, REFUSED, ACCEPTED = b"E", b"W", b"R", b"A"
STALE = b"stale"  # what follows REFUSED when the server's code changed on disk
# From this side to the child: a signal to raise.
SIGNAL = b"S"


def identity() -> str:
    """What a server must share with its client for a fork of it to be what an exec
    would have made: interpreter, code, environment that shapes the interpreter,
    and where the process lands (cgroup, namespaces, groups, security label)."""

    def read(path: str) -> str:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return ""
        try:
            return os.read(fd, 65536).decode(errors="replace")
        except OSError:
            return ""
        finally:
            os.close(fd)

    def link(path: str) -> str:
        try:
            return os.readlink(path)
        except OSError:
            return ""

    env = sorted(
        f"{k}={v}" for k, v in os.environ.items() if k.startswith("PYTHON") or k in IDENTITY_ENV
    )
    # Capabilities (a bounding set a caller dropped), no_new_privs, seccomp.
    privileges = [
        line
        for line in read("/proc/self/status").splitlines()
        if line.startswith(("Cap", "NoNewPrivs", "Seccomp"))
    ]
    root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    return "\n".join(
        [
            sys.executable,
            root,
            *env,
            *privileges,
            read("/proc/self/cgroup"),
            read("/proc/self/attr/current"),
            *(link(f"/proc/self/ns/{ns}") for ns in ("mnt", "pid", "net", "user", "ipc", "uts")),
            " ".join(map(str, [os.getuid(), os.getgid(), *sorted(os.getgroups())])),
            # How it is scheduled: `nice`, `taskset`, `chrt`, the OOM killer's view.
            str(os.getpriority(os.PRIO_PROCESS, 0)),
            " ".join(map(str, sorted(os.sched_getaffinity(0)))),
            str(os.sched_getscheduler(0)),
            read("/proc/self/oom_score_adj"),
        ]
    )


def address(ident: str) -> bytes:
    """The server's abstract socket name for this user and identity.

    The identity's bytes as one integer, modulo the Mersenne prime 2**61 - 1:
    stable across processes (unlike ``hash`` of a string) and computed without
    loading a module for it (zlib costs as much as the rest of this side).
    """
    key = int.from_bytes(ident.encode(errors="replace"), "little") % ((1 << 61) - 1)
    return f"\0vtpmctl-command-{os.getuid()}-{key:016x}".encode()


def inherited_fds() -> list[int]:
    """The descriptors an exec'd command would have had: open and inheritable."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if fd <= 2 or os.get_inheritable(fd):
                os.fstat(fd)
                out.append(fd)
        except OSError:
            continue  # the listing's own descriptor, closed by now
    return sorted(out)


def run(args: list[str]) -> "int | None":
    """Have the server run ``args``; the exit code, or None to run it here."""
    if os.environ.get(ENV) == "0" or any(k in os.environ for k in SERVICE_ENV):
        return None
    ident = identity()
    addr = address(ident)
    fds = inherited_fds()
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        sock.connect(addr)
    except OSError:
        sock.close()
        spawn_server(addr, fds)
        return None
    try:
        return _served(sock, args, fds)
    finally:
        sock.close()


def _served(sock: "Any", args: list[str], fds: list[int]) -> "int | None":
    creds = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)  # pid, uid, gid
    if int.from_bytes(creds[4:8], sys.byteorder) != os.getuid() or len(fds) > MAX_FDS:
        return None  # someone else squats the name: never hand them our fds
    cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        message = request(args, fds)
        if len(message) > MAX_MESSAGE:
            return None
        rights = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (cwd, *fds))
        sock.sendmsg([message], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])
    except OSError:
        return None
    finally:
        os.close(cwd)
    restore = _forward_signals(sock)
    try:
        reply = _reply(sock)
    finally:
        restore()
    if reply is None:
        return None
    kind, value = reply
    if kind == REFUSED:
        spawn_server(sock.getpeername(), fds)  # the stale one is on its way out
        return None
    if kind == EXIT:
        return value
    return _end_like(value)


def request(args: list[str], fds: list[int]) -> bytes:
    """The command as one datagram of NUL-separated fields (none can hold a NUL)."""
    import resource

    mask = os.umask(0o077)
    os.umask(mask)
    limits = []
    for number in range(RLIMIT_COUNT):
        try:
            soft, hard = resource.getrlimit(number)
        except (ValueError, OSError):
            continue
        limits.append(f"{number}:{soft}:{hard}")
    argv = [sys.argv[0] if sys.argv else "vtpmctl", *args]
    env = [f"{k}={v}" for k, v in os.environ.items()]
    fields = [
        PROTOCOL,
        str(mask).encode(),
        ",".join(limits).encode(),
        ",".join(map(str, fds)).encode(),
        str(len(argv)).encode(),
        *map(os.fsencode, argv),
        *map(os.fsencode, env),
    ]
    return b"\0".join(fields)


def _forward_signals(sock: "Any") -> "Any":
    """Pass the signals a shell or a supervisor sends to the child; undo with the result."""
    import _signal as signal  # type: ignore[import-not-found]  # `signal` imports enum

    def forward(signum: int, frame: object) -> None:
        try:
            sock.send(SIGNAL + str(signum).encode())
        except OSError:  # the child has ended: its reply follows
            return

    previous = {}
    for signum in FORWARDED_SIGNALS:
        current = signal.getsignal(signum)
        if current in (signal.SIG_DFL, signal.default_int_handler):
            previous[signum] = signal.signal(signum, forward)

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    return restore


def _reply(sock: "Any") -> "tuple[bytes, int] | None":
    """How the command ended: (EXIT, code) or (WAIT_STATUS, status).

    None when it never started, so that the caller runs it itself: refused,
    or the server gone before a child took the command (ACCEPTED comes first
    from the child, before the command does anything). (REFUSED, 1) when the
    server refused because its code is stale: it exits, and a new one is due.
    """
    accepted = False
    while True:
        try:
            data = sock.recv(64)
        except InterruptedError:
            continue
        except OSError:
            data = b""
        if not data:
            # Nobody holds the other end: the child ended without a word (with
            # the server, that reports how children end, gone too): like SIGKILL.
            return (WAIT_STATUS, 9) if accepted else None
        kind, rest = data[:1], data[1:]
        if kind == ACCEPTED:
            accepted = True
        elif kind == REFUSED:
            return (REFUSED, 1) if rest == STALE else None
        elif kind in (EXIT, WAIT_STATUS):
            try:
                return (kind, int(rest))
            except ValueError:
                return None


def _end_like(status: int) -> int:
    """End this process as the child ended: by its signal, or with its exit code."""
    if os.WIFSIGNALED(status):
        import _signal as signal  # type: ignore[import-not-found]

        signum = os.WTERMSIG(status)
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):
                pass
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return 128 + signum
    return os.waitstatus_to_exitcode(status)


def spawn_server(addr: bytes, fds: list[int]) -> None:
    """Start a server for the next command, detached; this one runs here meanwhile."""
    from vtpmctl.childproc import CMDSERVER_ENTRY, child_env, entry_argv

    devnull = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    try:
        actions: list[Any] = [(os.POSIX_SPAWN_DUP2, devnull, n) for n in (0, 1, 2)]
        actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in fds if fd > 2]
        argv = entry_argv(CMDSERVER_ENTRY)
        os.posix_spawn(
            argv[0],
            [*argv, addr[1:].hex()],
            child_env(),
            file_actions=actions,
            setsid=True,
        )
    except OSError:
        pass
    finally:
        os.close(devnull)
