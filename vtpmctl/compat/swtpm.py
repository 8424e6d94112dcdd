"""``swtpm socket|chardev|cuse``: swtpm 0.7.1's command line on vtpmctl's daemon.

The options, their ``key=value,…`` values, the JSON of ``--print-capabilities``
and ``--print-states``, the files and the exit codes are swtpm's; what runs is
vtpmctl's engine behind its socket or CUSE server (``device.server``), on a
state dir or a linear state file (``store``). A value swtpm accepts is
accepted (a key file others may read is used, with a warning in the log);
a value it refuses is refused with one ``swtpm: …`` line and exit 1.

Order of start-up, as swtpm's: options and keys are read, the log opened,
the sockets bound (or the CUSE device made), then the process daemonizes
(``--daemon``: the parent waits until the child serves or failed, and exits
0 or 1 accordingly), chroots, writes its pid file, drops to ``--runas`` and
only then starts the TPM. No TPM exists in the process before the fork.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vtpmctl.compat.getopt import NO_ARG, REQUIRED, GetoptLong, Opt
from vtpmctl.errors import ServeError, SwtpmOptionError
from vtpmctl.store import tpmstate
from vtpmctl.store.tpmstate import TpmState

if TYPE_CHECKING:
    from collections.abc import Iterator

    from vtpmctl.engine.tpm import Engine
    from vtpmctl.store.blob import AesKey
    from vtpmctl.store.statedir import StateDir

VERSION = "0.7.1"  # the swtpm release whose options, output and exit codes these are
INTERFACES = ("socket", "chardev", "cuse")
VTPMX = "/dev/vtpmx"
log = logging.getLogger("swtpm")

_LONG = [
    Opt(name, REQUIRED)
    for name in (
        "port", "fd", "server", "ctrl", "tpmstate", "key", "migration-key", "pid", "log",
        "locality", "flags", "runas", "chroot", "seccomp", "chardev", "name", "maj", "min",
        "migration",
    )
] + [
    Opt(name, NO_ARG)
    for name in (
        "terminate", "daemon", "tpm2", "print-capabilities", "print-states", "vtpm-proxy",
        "help", "print-capabilites",
    )
]  # fmt: skip
# -v/--version is only swtpm's first word: after the interface it is an unknown option.
_SHORT = {
    "p": "port", "f": "fd", "t": "terminate", "d": "daemon", "r": "runas", "R": "chroot",
    "h": "help", "c": "chardev", "n": "name", "M": "maj", "m": "min",
}  # fmt: skip
# Which options each interface takes (for the others, it is an unknown option).
_ONLY = {
    "port": ("socket",), "server": ("socket",), "terminate": ("socket",),
    "fd": ("socket", "chardev"), "daemon": ("socket", "chardev"), "ctrl": ("socket", "chardev"),
    "chardev": ("chardev",), "vtpm-proxy": ("chardev",),
    "name": ("cuse",), "maj": ("cuse",), "min": ("cuse",),
}  # fmt: skip


class SwtpmError(ServeError):
    """What swtpm 0.7.1 would report (its message, if any), and its exit code.

    ``main`` prints the message and returns the code; after ``--help`` or
    ``--version`` the code is 0 and there is no message.
    """

    def __init__(self, message: str | None, code: int = 1) -> None:
        super().__init__(message or "")
        self.message = message
        self.code = code
        self.exit_code = code


def _fail(message: str) -> SwtpmError:
    return SwtpmError(f"swtpm: {message}")


# ---------------------------------------------------------------- option values


@contextlib.contextmanager
def _as_swtpm() -> Iterator[None]:
    """A bad value is reported as swtpm reports it."""
    try:
        yield
    except SwtpmOptionError as exc:
        raise _fail(str(exc)) from None


def parse_values(text: str, option: str, keys: dict[str, str]) -> dict[str, str]:
    with _as_swtpm():
        return tpmstate.parse_values(text, option, keys)


def _int(values: dict[str, str], key: str, option: str, base: int = 10) -> int | None:
    with _as_swtpm():
        return tpmstate.int_value(values, key, option, base)


def _mode(values: dict[str, str], option: str, default: int) -> int:
    with _as_swtpm():
        return tpmstate.mode_value(values, option, default)


def _bool(values: dict[str, str], key: str, default: bool) -> bool:
    with _as_swtpm():
        return tpmstate.bool_value(values, key, default)


@dataclass
class Channel:
    """A --ctrl or --server value."""

    kind: str  # unixio | tcp
    path: str | None = None
    port: int | None = None
    bindaddr: str = "127.0.0.1"
    fd: int | None = None
    clientfd: int | None = None
    mode: int = 0o770
    uid: int | None = None
    gid: int | None = None
    disconnect: bool = False


_CHANNEL_KEYS = {
    "type": "value", "path": "value", "port": "value", "bindaddr": "value", "ifname": "value",
    "fd": "value", "clientfd": "value", "mode": "value", "uid": "value", "gid": "value",
    "disconnect": "flag", "terminate": "flag",
}  # fmt: skip


def parse_channel(text: str, option: str) -> Channel:
    values = parse_values(text, option, _CHANNEL_KEYS)
    kind = values.get("type", "tcp" if option == "server" else "")
    if kind not in ("unixio", "tcp"):
        what = "control channel" if option == "ctrl" else "server"
        raise _fail(f"Unsupport {what} type: {kind}")
    ch = Channel(kind=kind, mode=_mode(values, option, 0o770))
    ch.path = values.get("path")
    ch.port = _int(values, "port", option)
    ch.fd = _int(values, "fd", option)
    ch.clientfd = _int(values, "clientfd", option)
    ch.uid = _int(values, "uid", option)
    ch.gid = _int(values, "gid", option)
    ch.bindaddr = values.get("bindaddr", ch.bindaddr)
    ch.disconnect = "disconnect" in values
    if ch.fd is not None and ch.clientfd is not None:
        raise _fail(f"--{option}: fd and clientfd are mutually exclusive")
    if kind == "unixio" and ch.path is None and ch.fd is None and ch.clientfd is None:
        raise _fail(f"--{option} type=unixio needs path=, fd= or clientfd=")
    if kind == "tcp" and ch.port is None and ch.fd is None and ch.clientfd is None:
        raise _fail(f"--{option} type=tcp needs port= or fd=")
    if ch.port is not None and not 0 <= ch.port <= 65535:
        raise _fail(f"--{option}: port {ch.port} is out of range")
    return ch


def parse_tpmstate(text: str | None) -> TpmState | None:
    if text is None:
        env = os.environ.get("TPM_PATH")
        return TpmState("dir", Path(env)) if env else None
    with _as_swtpm():
        return tpmstate.parse_tpmstate(text)


@dataclass
class LogSpec:
    path: str | None = None
    fd: int | None = None
    level: int = 1
    prefix: str = ""
    truncate: bool = False


def parse_log(text: str | None) -> LogSpec:
    if text is None:
        return LogSpec(fd=2)
    keys = {"file": "value", "fd": "value", "level": "value", "prefix": "value"}
    keys["truncate"] = "flag"
    values = parse_values(text, "log", keys)
    spec = LogSpec(path=values.get("file"), fd=_int(values, "fd", "log"))
    spec.level = _int(values, "level", "log") or 1
    spec.prefix = values.get("prefix", "")
    spec.truncate = "truncate" in values
    if spec.path is None and spec.fd is None:
        raise _fail("--log needs file= or fd=")
    return spec


@dataclass
class Options:
    """Everything the command line said, checked."""

    iface: str
    tpm2: bool = False
    tpmstate: TpmState | None = None
    ctrl: Channel | None = None
    server: Channel | None = None
    data_fd: int | None = None
    terminate: bool = False
    daemon: bool = False
    pid_file: str | None = None
    pid_fd: int | None = None
    log: LogSpec = field(default_factory=LogSpec)
    key: str | None = None
    migration_key: str | None = None
    runas: str | None = None
    chroot: str | None = None
    not_need_init: bool = False
    startup: str = "none"
    startup_given: bool = False
    disable_auto_shutdown: bool = False
    reject_locality_4: bool = False
    allow_set_locality: bool = False
    incoming: bool = False
    chardev: str | None = None
    vtpm_proxy: bool = False
    cuse_name: str | None = None
    print_capabilities: bool = False
    print_states: bool = False
    seccomp: str = "kill"  # a device.server.seccomp.SeccompAction; swtpm's default


def _flags(opts: Options, text: str) -> None:
    for flag in filter(None, text.split(",")):
        if flag == "not-need-init":
            opts.not_need_init = True
        elif flag.startswith("startup-") and flag[8:] in ("clear", "state", "deactivated", "none"):
            opts.startup = flag[8:]
            opts.startup_given = True
        elif flag == "disable-auto-shutdown":
            opts.disable_auto_shutdown = True
        else:
            raise _fail(f"Unknown flag '{flag}' for option --flags")
    if opts.startup == "deactivated" and opts.tpm2:
        raise _fail("--flags startup-deactivated is only valid for a TPM 1.2")


def _locality(opts: Options, text: str) -> None:
    for word in filter(None, text.split(",")):
        if word == "reject-locality-4":
            opts.reject_locality_4 = True
        elif word == "allow-set-locality":
            opts.allow_set_locality = True
        else:
            raise _fail(f"Unknown parameter '{word}' for option --locality")


def _options_of(iface: str) -> list[Opt]:
    return [o for o in _LONG if iface in _ONLY.get(o.name, (iface,))]


def _expand_short(argv: list[str], iface: str) -> list[str]:
    """swtpm's short options (``-p 2321``, ``-t``, ``-dt``) as their long spellings."""
    known = {o.name: o for o in _options_of(iface)}
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        if len(arg) < 2 or arg[0] != "-" or arg[1] == "-":
            out.append(arg)
            continue
        letters = arg[1:]
        while letters:
            name = _SHORT.get(letters[0])
            if name not in known:
                out.append(f"--\0{letters[0]}")  # reported as an unknown option
                letters = letters[1:]
                continue
            takes = known[name].arg == REQUIRED
            if takes and len(letters) > 1:
                out.append(f"--{name}={letters[1:]}")
                break
            out.append(f"--{name}")
            letters = letters[1:]
    return out


def parse_args(argv: list[str], prog: str) -> Options:
    if not argv or argv[0] not in INTERFACES:
        if argv and argv[0] in ("-v", "--version"):
            raise SwtpmError(None, _version())
        if argv and argv[0] in ("-h", "--help"):
            sys.stdout.write(_usage_top())
            raise SwtpmError(None, 0)
        if not argv:
            sys.stderr.write("Missing TPM interface type.\n")
        else:
            sys.stderr.write(f"Unsupported TPM interface type '{argv[0]}'.\n")
        sys.stderr.write(_usage_top())
        raise SwtpmError(None, 1)
    opts = Options(iface=argv[0])
    # swtpm hands getopt its arguments after the interface word, which getopt names itself by
    parsed = GetoptLong(opts.iface, _options_of(opts.iface), long_only=False).parse(
        _expand_short(argv[1:], opts.iface)
    )
    # As swtpm's getopt loop: --help wins over what follows it, an error over what follows
    # it; the values and the operands are judged after the loop.
    if any(name == "help" for name, *_ in parsed.before_error()):
        sys.stdout.write(_usage(opts.iface))
        raise SwtpmError(None, 0)
    if parsed.errors:
        message = re.sub(
            r"unrecognized option '--\0(.)'", r"invalid option -- '\1'", parsed.errors[0]
        )
        raise SwtpmError(f"{message}\n{_usage(opts.iface)}")
    if parsed.operands:
        raise _fail(f"Unknown argument '{parsed.operands[0]}'")
    values: dict[str, str | None] = {name: value for name, value, *_ in parsed.options}
    if "print-capabilities" in values or "print-capabilites" in values:
        opts.print_capabilities, opts.tpm2 = True, "tpm2" in values  # nothing else matters
        return opts
    _apply(opts, values)
    return opts


def _apply(opts: Options, values: dict[str, str | None]) -> None:
    def get(name: str) -> str | None:
        return values.get(name)

    opts.tpm2 = "tpm2" in values
    opts.print_states = "print-states" in values
    opts.terminate = "terminate" in values
    opts.daemon = "daemon" in values
    opts.vtpm_proxy = "vtpm-proxy" in values
    opts.tpmstate = parse_tpmstate(get("tpmstate"))
    opts.log = parse_log(get("log"))
    opts.key, opts.migration_key = get("key"), get("migration-key")
    opts.runas, opts.chroot = get("runas"), get("chroot")
    opts.chardev, opts.cuse_name = get("chardev"), get("name")
    for name in ("maj", "min"):
        if get(name) is not None and not (get(name) or "").isdigit():
            raise _fail(f"Invalid {name}or number '{get(name)}'")
    if (text := get("flags")) is not None:
        _flags(opts, text)
    if (text := get("locality")) is not None:
        _locality(opts, text)
    if (text := get("seccomp")) is not None:
        from vtpmctl.device.server.seccomp import DEFAULT_ACTION, SeccompAction

        action = parse_values(text, "seccomp", {"action": "value"}).get("action", DEFAULT_ACTION)
        if action not in tuple(SeccompAction):
            choices = ", ".join(SeccompAction)
            raise _fail(f"Unsupported seccomp action '{action}'; use {choices}")
        opts.seccomp = action
    if (text := get("migration")) is not None:
        words = set(filter(None, text.split(",")))
        if words - {"incoming", "release-lock-outgoing"}:
            raise _fail(f"Unknown parameter for option --migration: {text}")
        opts.incoming = "incoming" in words
    if (text := get("pid")) is not None:
        pid = parse_values(text, "pid", {"file": "value", "fd": "value"})
        opts.pid_file, opts.pid_fd = pid.get("file"), _int(pid, "fd", "pid")
        if opts.pid_file is None and opts.pid_fd is None:
            raise _fail("--pid needs file= or fd=")
    if (text := get("ctrl")) is not None:
        opts.ctrl = parse_channel(text, "ctrl")
    _data_channel(opts, values)


def _data_channel(opts: Options, values: dict[str, str | None]) -> None:
    if (text := values.get("server")) is not None:
        opts.server = parse_channel(text, "server")
    if (port := values.get("port")) is not None:
        if opts.server is not None:
            raise _fail("give --server or --port, not both")
        opts.server = parse_channel(f"type=tcp,port={port},disconnect", "server")
    if (fd := values.get("fd")) is not None:
        if not fd.isdigit():
            raise _fail(f"Invalid file descriptor '{fd}' for option --fd")
        opts.data_fd = int(fd)
        opts.terminate = opts.terminate or opts.iface == "socket"
    if (
        opts.iface == "socket"
        and opts.server is None
        and opts.data_fd is None
        and opts.ctrl is None
        and not opts.print_states
    ):
        env = os.environ.get("TPM_PORT")
        if not env:
            raise _fail("No port given; use --server, --port, --fd or set TPM_PORT")
        opts.server = parse_channel(f"type=tcp,port={env},disconnect", "server")


def _usage_top() -> str:
    return (
        "TPM emulator served by vtpmctl, with swtpm's command line.\n\n"
        "Usage: swtpm socket|chardev|cuse [options]\n"
        "       swtpm -v|--version\n\n"
        "Give --help after the interface type for its options.\n"
    )


def _usage(iface: str) -> str:
    common = (
        "--tpmstate dir=<dir>[,mode=0...][,lock]|backend-uri=dir://<dir>|file://<path>\n"
        "--tpm2 --flags [not-need-init][,startup-clear|startup-state|startup-deactivated"
        "|startup-none][,disable-auto-shutdown]\n"
        "--key file=<path>|fd=<fd>|pwdfile=<path>|pwdfd=<fd>[,mode=aes-cbc|aes-256-cbc]"
        "[,format=hex|binary][,kdf=sha512|pbkdf2][,remove]\n"
        "--migration-key (as --key)   --pid file=<path>|fd=<fd>\n"
        "--log file=<path>|fd=<fd>[,level=n][,prefix=<prefix>][,truncate]\n"
        "--locality [reject-locality-4][,allow-set-locality]\n"
        "-r|--runas <user>   -R|--chroot <dir>   --seccomp action=none|kill|log\n"
        "--print-capabilities   --print-states   -h|--help   -v|--version\n"
    )
    per = {
        "socket": (
            "-p|--port <port>   -f|--fd <fd>   -t|--terminate   -d|--daemon\n"
            "--server type=tcp[,port=<port>][,bindaddr=<addr>][,fd=<fd>][,disconnect]\n"
            "--server type=unixio[,path=<path>][,fd=<fd>][,mode=0...][,uid=<uid>][,gid=<gid>]\n"
            "--ctrl type=unixio|tcp[,path=<path>][,port=<port>][,bindaddr=<addr>]"
            "[,fd=<fd>|clientfd=<fd>][,mode=0...][,uid=<uid>][,gid=<gid>]\n"
        ),
        "chardev": (
            "-c|--chardev <device>   -f|--fd <fd>   --vtpm-proxy   -d|--daemon\n"
            "--ctrl (as for socket)\n"
        ),
        "cuse": "-n|--name <NAME>   -M|--maj <major>   -m|--min <minor>\n",
    }
    return f"Usage: swtpm {iface} [options]\n\n{per[iface]}{common}"


def _version() -> int:
    from vtpmctl import __version__

    sys.stdout.write(f"TPM emulator version {VERSION}, served by vtpmctl {__version__}\n")
    return 0


# ---------------------------------------------------------------- the two print options


_FAMILY_WORDS = (("1.2", "tpm-1.2"), ("2", "tpm-2.0"))


def capabilities(iface: str, tpm2: bool) -> dict[str, Any]:
    """swtpm 0.7.1's feature words, for what this vtpmctl really does.

    ``cmdarg-seccomp`` only where ``device.server.seccomp`` has a filter for the machine.
    """
    from vtpmctl.device.server import seccomp
    from vtpmctl.engine.libtpms import Libtpms, LibtpmsError
    from vtpmctl.model import TpmFamily

    tpm = Libtpms()

    def has(family: TpmFamily) -> bool:
        try:
            tpm.choose(family)
        except LibtpmsError:
            return False
        return True

    features = [word for family, word in _FAMILY_WORDS if has(TpmFamily(family))]
    if iface != "cuse":
        features.append("tpm-send-command-header")
    features.append("flags-opt-startup")
    if seccomp.available():
        features.append("cmdarg-seccomp")
    features += [
        "cmdarg-key-fd",
        "cmdarg-pwd-fd",
        "cmdarg-print-states",
        "nvram-backend-dir",
        "nvram-backend-file",
    ]
    if tpm2 and has(TpmFamily.TPM2):
        import json

        info = json.loads(tpm.get_info(4) or "{}")  # TPMLIB_INFO_TPMFEATURES
        sizes = info.get("TPMFeatures", {}).get("RSAKeySizes", [])
        features += [f"rsa-keysize-{size}" for size in sizes]
    return {"type": "swtpm", "features": features, "version": VERSION}


def _json_line(obj: dict[str, Any]) -> str:
    """swtpm's spacing: ``{ "type": "swtpm", "features": [ "a", "b" ], … }``."""
    import json

    def render(value: Any) -> str:
        if isinstance(value, dict):
            inner = ", ".join(f"{json.dumps(k)}: {render(v)}" for k, v in value.items())
            return f"{{ {inner} }}" if inner else "{ }"
        if isinstance(value, list):
            return f"[ {', '.join(render(v) for v in value)} ]" if value else "[]"
        return json.dumps(value)

    return render(obj)


def print_states(opts: Options) -> str:
    if opts.tpmstate is None:
        raise _fail("Error: --tpmstate option is required for --print-states")
    sizes = _statedir(opts, None).sizes()
    states = ", ".join(f'{{"name": "{name}", "size": {size}}}' for name, size in sizes.items())
    return (
        f'{{ "type": "swtpm", "states": [ {states} ] }}'
        if states
        else ('{ "type": "swtpm", "states": [] }')
    )


# ---------------------------------------------------------------- running


def _statedir(opts: Options, key: AesKey | None) -> StateDir:
    assert opts.tpmstate is not None
    ts = opts.tpmstate
    if ts.backend == "file":
        from vtpmctl.store.linearfile import LinearFile

        return LinearFile(ts.path, tpm2=opts.tpm2, key=key, mode=ts.mode, use_lock=ts.lock)
    from vtpmctl.store.statedir import StateDir

    return StateDir(ts.path, tpm2=opts.tpm2, key=key, mode=ts.mode, use_lock=ts.lock)


def _open_log(spec: LogSpec) -> int | None:
    """The log's descriptor (None: no log); swtpm's file= is appended to, or truncated."""
    if spec.path == "-":
        return None
    if spec.fd is not None:
        return spec.fd
    assert spec.path is not None
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    if spec.truncate:
        flags |= os.O_TRUNC
    try:
        return os.open(spec.path, flags, 0o640)
    except OSError as exc:
        raise _fail(f"Could not open logfile '{spec.path}': {exc.strerror}") from None


def _setup_logging(spec: LogSpec) -> int | None:
    fd = _open_log(spec)
    root = logging.getLogger()
    if fd is None:
        root.handlers[:] = [logging.NullHandler()]
        return None
    handler = logging.StreamHandler(os.fdopen(fd, "a", buffering=1, closefd=fd > 2))
    prefix = spec.prefix.replace("%", "%%")
    handler.setFormatter(logging.Formatter(f"{prefix}%(message)s"))
    root.handlers[:] = [handler]
    # Level 1 shows what swtpm shows by default; higher levels vtpmctl's details.
    root.setLevel(logging.WARNING if spec.level <= 1 else logging.INFO)
    return fd


def _read_key(spec: str | None, option: str, probe: bytes | None) -> AesKey | None:
    if spec is None:
        return None
    from vtpmctl.store.keys import KeyFileError, parse_key_spec

    try:
        source = parse_key_spec(spec, option)
        if source.path is not None:
            _warn_mode(source.path)
        return source.resolve(probe)
    except KeyFileError as exc:
        raise _fail(str(exc)) from None


def _warn_mode(path: str) -> None:
    """swtpm reads a key file others may read; so does this program, with a warning."""
    try:
        mode = os.stat(path).st_mode & 0o777
    except OSError:
        return
    if mode & 0o077:
        log.warning("key file %s is accessible by group or others (mode %04o)", path, mode)


def _adopt(fd: int, what: str) -> socket.socket:
    try:
        return socket.socket(fileno=fd)
    except OSError as exc:
        raise _fail(f"{what}: file descriptor {fd} is not a socket ({exc.strerror})") from None


def _endpoint(ch: Channel) -> Any:
    from vtpmctl.device.server.sockets import UNIX_PATH_MAX, Endpoint

    if ch.kind == "unixio":
        assert ch.path is not None
        if len(os.fsencode(ch.path)) > UNIX_PATH_MAX:
            raise _fail(f"UnixIO socket path is too long: {ch.path}")
        return Endpoint("unix", path=ch.path, mode=ch.mode)
    return Endpoint("tcp", host=ch.bindaddr, port=ch.port or 0)


def _admin_endpoint(ctrl: Any) -> Any:
    """vtpmctl's read-only admin endpoint beside a unixio control socket (CTRL.admin).

    libvirt's QEMU holds the control channel for the VM's life; the admin endpoint
    lets ``vtpmctl list``/``snapshot`` read the vTPM meanwhile (vtpmctl.store.attached).
    """
    from vtpmctl.device.server.sockets import UNIX_PATH_MAX, Endpoint
    from vtpmctl.store.instances import ADMIN_SUFFIX

    if not isinstance(ctrl, Endpoint) or ctrl.kind != "unix" or not ctrl.path:
        return None
    path = str(ctrl.path) + ADMIN_SUFFIX
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        return None
    return Endpoint("unix", path=path, mode=0o600)


def _make_socket_server(opts: Options, engine: Engine, chardev: Any = None) -> Any:
    from vtpmctl.device.server.sockets import EndpointError, SocketServer, is_listening

    ctrl: Any = None
    data: Any = None
    ctrl_client: socket.socket | None = None
    data_conn: Any = None
    if opts.ctrl is not None:
        fd = opts.ctrl.fd if opts.ctrl.fd is not None else opts.ctrl.clientfd
        if fd is not None:
            sock = _adopt(fd, "--ctrl")
            if opts.ctrl.clientfd is None and is_listening(sock):
                ctrl = sock
            else:
                ctrl_client = sock
        else:
            ctrl = _endpoint(opts.ctrl)
    if chardev is not None:
        data_conn = chardev
    elif opts.server is not None:
        if opts.server.fd is not None:
            sock = _adopt(opts.server.fd, "--server")
            if is_listening(sock):
                data = sock
            else:
                data_conn = sock
        else:
            data = _endpoint(opts.server)
    if opts.data_fd is not None and chardev is None:
        data_conn = _adopt(opts.data_fd, "--fd")
    try:
        server = SocketServer(
            engine,
            ctrl,
            data,
            terminate=opts.terminate,
            ctrl_client=ctrl_client,
            data_conn=data_conn,
            disconnect=opts.server is not None and opts.server.disconnect,
            admin=_admin_endpoint(ctrl),
        )
    except EndpointError as exc:
        raise _fail(str(exc)) from None
    for ch in (opts.ctrl, opts.server):
        if ch is not None and ch.kind == "unixio" and ch.path and (ch.uid, ch.gid) != (None, None):
            try:
                uid, gid = (-1 if v is None else v for v in (ch.uid, ch.gid))
                os.chown(ch.path, uid, gid)
            except OSError as exc:
                server.close()
                raise _fail(f"Could not chown {ch.path}: {exc.strerror}") from None
    return server


def _make_chardev_server(opts: Options, engine: Engine) -> Any:
    """chardev: the data channel is a character device (or a vTPM proxy's backend)."""
    from vtpmctl.device.server.sockets import CharDevStream

    if opts.vtpm_proxy:
        fd = _vtpm_proxy(opts.tpm2)
    elif opts.data_fd is not None:
        fd = opts.data_fd
    elif opts.chardev is not None:
        try:
            fd = os.open(opts.chardev, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise _fail(f"Could not open {opts.chardev}: {exc.strerror}") from None
    else:
        raise _fail("chardev needs --chardev, --fd or --vtpm-proxy")
    return _make_socket_server(opts, engine, chardev=CharDevStream(fd))


def _vtpm_proxy(tpm2: bool) -> int:
    """A new /dev/tpmN from the kernel's vTPM proxy; its backend fd carries the commands."""
    import fcntl
    import struct

    if not os.path.exists(VTPMX):
        raise _fail(
            f"--vtpm-proxy needs the kernel's vTPM proxy and {VTPMX} does not exist; "
            "load it with `modprobe tpm_vtpm_proxy`"
        )
    try:
        vtpmx = os.open(VTPMX, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise _fail(f"Could not open {VTPMX}: {exc.strerror}") from None
    # struct vtpm_proxy_new_dev {u32 flags, tpm_num, fd, major, minor}; _IOWR(0xa1, 0x00, …)
    request = struct.pack("=5I", 1 if tpm2 else 0, 0, 0, 0, 0)
    try:
        reply = fcntl.ioctl(vtpmx, 0xC014A100, request)
    except OSError as exc:
        raise _fail(f"Could not create a vTPM proxy device: {exc.strerror}") from None
    finally:
        os.close(vtpmx)
    _flags, num, fd, major, minor = struct.unpack("=5I", reply)
    sys.stdout.write(f"New TPM device: /dev/tpm{num} (major/minor = {major}/{minor})\n")
    sys.stdout.flush()
    return int(fd)


def _make_cuse_server(opts: Options, engine: Engine) -> Any:
    from vtpmctl.device.server.cuse.server import CuseServer
    from vtpmctl.device.server.cuse.wire import CuseError

    assert opts.cuse_name is not None
    try:
        return CuseServer(engine, opts.cuse_name, exact_name=True)
    except CuseError as exc:
        raise _fail(str(exc)) from None


class _Readiness:
    """--daemon: the parent exits once the child serves (0) or reports a failure (1)."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.null: int | None = None

    def daemonize(self) -> None:
        read_end, write_end = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            os.close(write_end)
            message = b""
            while chunk := os.read(read_end, 4096):
                message += chunk
            if message == b"ok":
                os._exit(0)
            if message:
                sys.stderr.write(message.decode(errors="replace"))
            else:
                os.waitpid(pid, 0)
            sys.stderr.flush()
            os._exit(1)
        os.close(read_end)
        os.set_inheritable(write_end, False)
        self.fd = write_end
        os.setsid()
        # kept open: after --chroot there may be no /dev/null to open
        self.null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        os.dup2(self.null, 0)
        os.dup2(self.null, 1)

    def report(self, message: str | None) -> None:
        if self.fd is None:
            if message:
                sys.stderr.write(message + "\n")
            return
        os.write(self.fd, b"ok" if message is None else (message + "\n").encode())
        os.close(self.fd)
        self.fd = None
        if message is None and self.null is not None:
            os.dup2(self.null, 2)


def _write_pid(opts: Options) -> None:
    text = f"{os.getpid()}".encode()
    if opts.pid_fd is not None:
        import stat

        try:
            if not stat.S_ISREG(os.fstat(opts.pid_fd).st_mode):
                raise _fail(f"--pid fd={opts.pid_fd} is not a regular file")
            os.write(opts.pid_fd, text)
            os.close(opts.pid_fd)
        except OSError as exc:
            raise _fail(f"Could not write the pid to fd {opts.pid_fd}: {exc.strerror}") from None
    if opts.pid_file is not None:
        from vtpmctl.store.atomic import write_atomic

        try:
            write_atomic(Path(opts.pid_file), text, 0o644)
        except OSError as exc:
            raise _fail(f"Could not write pidfile '{opts.pid_file}': {exc.strerror}") from None


def _change_root(directory: str) -> None:
    # What the TPM needs later is loaded now: nothing can be imported inside the chroot.
    import vtpmctl.device.server.seccomp  # noqa: F401  (installed after the chroot)
    import vtpmctl.engine.tpm2.commands  # noqa: F401
    from vtpmctl.errors import StoreError
    from vtpmctl.store import blob

    try:
        blob.preload_keys()  # state and migration keys: their HMAC and AES
    except StoreError as exc:
        raise _fail(str(exc)) from None

    try:
        os.chroot(directory)
        os.chdir("/")
    except OSError as exc:
        raise _fail(f"chroot to {directory} failed: {exc.strerror}") from None


def _run_as(user: str) -> None:
    import pwd

    try:
        entry = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    except KeyError:
        raise _fail(f"User '{user}' does not exist") from None
    try:
        os.initgroups(entry.pw_name, entry.pw_gid)
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    except OSError as exc:
        raise _fail(f"Could not switch to user '{user}': {exc.strerror}") from None


def _filter_syscalls(action: str) -> None:
    """Deny what a serving vTPM never needs (--seccomp), once nothing else is to be set up."""
    from vtpmctl.device.server import seccomp

    if not seccomp.available():
        if action != seccomp.DEFAULT_ACTION:
            log.warning("no seccomp filter on this machine; --seccomp action=%s ignored", action)
        return
    try:
        seccomp.install(seccomp.SeccompAction(action))
    except OSError as exc:
        raise _fail(f"Could not install the seccomp filter: {exc.strerror}") from None


def _check(opts: Options) -> None:
    if opts.tpmstate is None:
        raise _fail("Error: --tpmstate option or the TPM_PATH environment variable is required")
    if opts.iface == "cuse" and not opts.cuse_name:
        raise _fail("Error: the CUSE device needs a name: -n NAME")
    if opts.vtpm_proxy and not opts.startup_given:
        opts.startup, opts.not_need_init = "clear", True
    if opts.vtpm_proxy:
        opts.allow_set_locality = True


def serve(opts: Options) -> int:
    from vtpmctl.engine.tpm import Engine, EngineConfig
    from vtpmctl.errors import VtpmctlError
    from vtpmctl.model import BlobKind, Transport

    if opts.print_states:
        sys.stdout.write(print_states(opts))
        return 0
    _check(opts)
    libtpms_fd = _setup_logging(opts.log)
    permall = _statedir(opts, None).read_raw(BlobKind.PERMANENT.file_name)
    state_key = _read_key(opts.key, "--key", permall)
    migration_key = _read_key(opts.migration_key, "--migration-key", None)
    statedir = _statedir(opts, state_key)
    config = EngineConfig(
        tpm2=opts.tpm2,
        transport=Transport.CUSE if opts.iface == "cuse" else Transport.SOCKET,
        state_key=state_key,
        migration_key=migration_key,
        startup=opts.startup,  # type: ignore[arg-type]
        not_need_init=opts.not_need_init or opts.startup != "none",
        disable_auto_shutdown=opts.disable_auto_shutdown,
        incoming=opts.incoming,
        reject_locality_4=opts.reject_locality_4,
        allow_set_locality=opts.allow_set_locality,
    )
    try:
        statedir.ensure()
    except (OSError, VtpmctlError) as exc:
        raise _fail(f"cannot use the TPM state {statedir.path}: {exc}") from None
    engine = Engine(statedir, config)
    if libtpms_fd is not None and opts.log.level >= 5:
        # libtpms' own trace from level 5 on, more of it the higher the level (as swtpm)
        engine.tpm.set_debug_fd(libtpms_fd)
        engine.tpm.set_debug_level(opts.log.level - 4)
    make = {"socket": _make_socket_server, "chardev": _make_chardev_server}
    server = make.get(opts.iface, _make_cuse_server)(opts, engine)
    ready = _Readiness()
    if opts.daemon:
        ready.daemonize()
    try:
        if opts.chroot:
            _change_root(opts.chroot)
        _write_pid(opts)
        if opts.runas:
            _run_as(opts.runas)
        _filter_syscalls(opts.seccomp)
        try:
            engine.start()
        except VtpmctlError as exc:
            raise _fail(str(exc)) from None
    except SwtpmError as exc:
        if opts.log.fd != 2:  # on stderr, report() prints it
            log.error("%s", exc.message)
        ready.report(exc.message)
        server.close()
        engine.close()
        if opts.pid_file is not None:  # a TPM that never served leaves no pid behind
            with contextlib.suppress(OSError):
                Path(opts.pid_file).unlink(missing_ok=True)
        return exc.code
    return _serve(opts, engine, server, ready)


def _serve(opts: Options, engine: Engine, server: Any, ready: _Readiness) -> int:
    def on_signal(signum: int, frame: object) -> None:
        server.request_exit()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    ready.report(None)
    try:
        server.serve_forever()
    finally:
        engine.close()
        if opts.pid_file is not None:
            with contextlib.suppress(OSError):  # e.g. after --runas, in another's dir
                Path(opts.pid_file).unlink(missing_ok=True)
    return 1 if getattr(server, "exit_message", None) else 0


def main(argv: list[str] | None = None, prog: str = "swtpm") -> int:
    """Run one swtpm command line; swtpm's exit codes (0, or 1 on any failure)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        opts = parse_args(args, os.path.basename(prog))
        if opts.print_capabilities:
            sys.stdout.write(_json_line(capabilities(opts.iface, opts.tpm2)) + "\n")
            return 0
        return serve(opts)
    except SwtpmError as exc:
        if exc.message:
            sys.stderr.write(exc.message.rstrip("\n") + "\n")
        return exc.code
