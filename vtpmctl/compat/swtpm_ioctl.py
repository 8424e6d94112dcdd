"""``swtpm_ioctl``: swtpm 0.7.1's control client, with its options, output and exit codes.

libvirt stops leftover TPMs with ``swtpm_ioctl --unix SOCK -s``, scripts
save and load state blobs with ``--save``/``--load`` and parse the lines
``-c``, ``-e``, ``-g`` and ``-b`` print. Callers match those lines and the
exit status (0, or 1 for any failure), so they are reproduced as swtpm_ioctl
0.7.1 prints them (docs/protocol.md, spec §5), including its quirks: a
TCP port's range message quotes the argument from its second character, a
locality is read from the argv element that held it (``-l=3`` is refused),
``--lock-storage`` does not exist in 0.7.1, and GET_CAPABILITY's socket
reply is printed as one 64-bit number. Every message goes through the
protocol table; nothing here knows a byte offset.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import select
import socket
import sys
from collections.abc import Callable
from typing import BinaryIO

from vtpmctl import __version__
from vtpmctl.compat.getopt import NO_ARG, REQUIRED, GetoptLong, Opt
from vtpmctl.device.protocol import (
    HASH_DATA_MAX,
    MESSAGES,
    NON_FATAL,
    STATE_BLOB_CHUNK,
    BlobType,
    Cmd,
    InitFlag,
    StateFlag,
    decode_ioctl_response,
    encode_ioctl_request,
    encode_socket_request,
)
from vtpmctl.errors import DeviceError

DEFAULT_PORT = 6546  # what 0.7.1 uses (its manual says 6545)
DEFAULT_HOST = "127.0.0.1"
REPLY_WAIT = 20.0  # seconds swtpm_ioctl waits for a socket reply
READ_CHUNK = 4096
SUN_PATH_MAX = 108

# The commands ("l" is one too) and the one spelling that runs each: swtpm_ioctl 0.7.1
# accepts any spelling getopt does (-stop, --sto, --c), then prints its usage and fails.
_NAMES = ("c", "i", "stop", "s", "e", "r", "v", "C", "l", "h", "save", "load", "g", "b", "info")
COMMANDS = {name: ("--" if len(name) > 1 else "-") + name for name in _NAMES}
OPTIONS = [
    Opt("tpm-device", REQUIRED),
    Opt("tcp", REQUIRED),
    Opt("unix", REQUIRED),
    Opt("c"),
    Opt("i"),
    Opt("stop"),
    Opt("s"),
    Opt("e"),
    Opt("r", REQUIRED),
    Opt("v"),
    Opt("C"),
    Opt("l", REQUIRED),
    Opt("h", REQUIRED),
    Opt("save", REQUIRED),
    Opt("load", REQUIRED),
    Opt("g"),
    Opt("b", REQUIRED),
    Opt("info", REQUIRED),
    Opt("version", NO_ARG),
    Opt("help", NO_ARG),
]
BLOB_TYPES = {"permanent": BlobType.PERMANENT, "volatile": BlobType.VOLATILE}
BLOB_TYPES["savestate"] = BlobType.SAVESTATE

# The first line has swtpm_ioctl's shape ("... version 0.7.1, ..."), which scripts parse;
# --help starts with it too, as swtpm_ioctl's does.
VERSION = f"swtpm_ioctl-compatible TPM control tool version 0.7.1, from vtpmctl {__version__}\n"
HELP = f"""\
{VERSION}swtpm_ioctl (vtpmctl {__version__}): send control commands to a swtpm-compatible TPM

Usage: swtpm_ioctl COMMAND [DEVICE]
       swtpm_ioctl [--tcp [HOST]:[PORT] | --unix PATH | --tpm-device DEVICE] COMMAND

Where the TPM is:
--tpm-device DEVICE   a CUSE character device such as /dev/vtpm-NAME
--tcp [HOST]:[PORT]   a TCP control channel (HOST 127.0.0.1, PORT {DEFAULT_PORT} by default)
--unix PATH           a unix socket control channel

Commands (exactly one):
-c                    print the control capabilities
-i                    initialise the TPM (resumes from a stored volatile state)
--stop                stop the TPM; the process keeps running
-s                    shut the TPM down; its process exits
-e                    print the tpmEstablished bit
-r LOC                reset the tpmEstablished bit from locality LOC
-v                    store the volatile state
-C                    cancel the TPM command in progress
-l LOC                use locality LOC (0-4) for the next TPM commands
-h DATA               hash DATA into PCR 17 ('-' reads standard input)
--save TYPE FILE      write state blob TYPE (permanent, volatile, savestate) to FILE
--load TYPE FILE      load state blob TYPE from FILE into a stopped TPM
-g                    print the configuration flags (which keys are in use)
-b SIZE               set the buffer size (0 only asks) and print the sizes
--info FLAGS          print implementation information as JSON
--version             print the version
--help                print this help
"""


class SwtpmIoctlError(DeviceError):
    """A failure swtpm_ioctl 0.7.1 reports: the text is exactly its message (newline included)."""


def _strerror(exc: OSError) -> str:
    return os.strerror(exc.errno) if exc.errno else str(exc)


def _scan_unsigned(text: str) -> int | None:
    """What C's ``sscanf("%u")`` stores into an unsigned int, or None when it matches nothing."""
    m = re.match(r"\s*([+-]?)(\d+)", text)
    if m is None:
        return None
    value = min(int(m.group(2)), 2**64 - 1)
    if m.group(1) == "-":
        value = (-value) % 2**64
    return value % 2**32


def _strtoul_whole(text: str) -> int | None:
    """C's ``strtoul(text, &end, 0)`` that must consume the whole, non-empty text."""
    m = re.fullmatch(r"\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9]\d*)", text)
    if m is None:
        return None
    digits = m.group(2)
    if digits[:2].lower() == "0x":
        value = int(digits, 16)
    elif digits.startswith("0"):
        value = int(digits, 8)
    else:
        value = int(digits)
    value = min(value, 2**64 - 1)
    return (-value) % 2**64 if m.group(1) == "-" else value


def _locality(source: str) -> int:
    value = _scan_unsigned(source)
    if value is None:
        raise SwtpmIoctlError(f"Could not get locality number from {source}.\n")
    if value > 4:
        raise SwtpmIoctlError("Locality outside valid range of [0..4].\n")
    return value


def _tcp_target(arg: str) -> tuple[str, int]:
    host, colon, port_text = arg.rpartition(":")
    if not colon:
        return arg or DEFAULT_HOST, DEFAULT_PORT
    port = DEFAULT_PORT
    if port_text:
        m = re.fullmatch(r"\s*([+-]?\d+)", port_text)
        if m is None:
            raise SwtpmIoctlError(f"Invalid port '{port_text}'\n")
        value = int(m.group(1))
        if value > 65535:
            raise SwtpmIoctlError(f"Port '{arg[1:]}' outside valid range.\n")
        port = value % 65536
    return host or DEFAULT_HOST, port


# ---------------------------------------------------------------- channels


class Channel:
    """One control connection or open device; ``call`` returns the raw reply bytes."""

    def call(self, cmd: Cmd, fields: dict[str, int], data: bytes = b"") -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class SocketChannel(Channel):
    """A control socket: one write per request, one read of the reply (as swtpm_ioctl)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send(self, cmd: Cmd, buf: bytes) -> None:
        try:
            self.sock.sendall(buf)
        except OSError as exc:
            raise SwtpmIoctlError(f"Could not execute PTM_{cmd.name}: {_strerror(exc)}\n") from None

    def read(self, cmd: Cmd, size: int) -> bytes:
        ready, _, _ = select.select([self.sock], [], [], REPLY_WAIT)
        if not ready:
            reason = os.strerror(errno.ETIMEDOUT)
            raise SwtpmIoctlError(f"Could not execute PTM_{cmd.name}: {reason}\n")
        try:
            data = self.sock.recv(size)
        except OSError as exc:
            raise SwtpmIoctlError(f"Could not execute PTM_{cmd.name}: {_strerror(exc)}\n") from None
        return data

    def call(self, cmd: Cmd, fields: dict[str, int], data: bytes = b"") -> bytes:
        self.send(cmd, encode_socket_request(cmd, fields, data))
        reply = self.read(cmd, max(MESSAGES[cmd].response.size(), 8) + STATE_BLOB_CHUNK)
        if len(reply) < 4:
            raise SwtpmIoctlError(f"Could not execute PTM_{cmd.name}: {os.strerror(errno.EIO)}\n")
        return reply

    def close(self) -> None:
        self.sock.close()


# How 0.7.1 names a failed ioctl (not quite the names of its result messages).
IOCTL_NAMES = {
    Cmd.GET_TPMESTABLISHED: "PTM_GET_ESTABLISHED",
    Cmd.RESET_TPMESTABLISHED: "PTM_RESET_ESTABLISHED",
    Cmd.HASH_START: "ioctl PTM_HASH_START",
    Cmd.HASH_DATA: "ioctl PTM_HASH_DATA",
    Cmd.HASH_END: "ioctl PTM_HASH_END",
    Cmd.GET_STATEBLOB: "ioctl PTM_GET_STATEBLOB",
    Cmd.SET_STATEBLOB: "ioctl PTM_SET_STATEBLOB",
}


class DeviceChannel(Channel):
    """A CUSE device: one ioctl per request, native byte order."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def call(self, cmd: Cmd, fields: dict[str, int], data: bytes = b"") -> bytes:
        buf = encode_ioctl_request(cmd, fields, data)
        try:
            fcntl.ioctl(self.fd, MESSAGES[cmd].ioctl, buf, True)
        except OSError as exc:
            what = IOCTL_NAMES.get(cmd, f"PTM_{cmd.name}")
            raise SwtpmIoctlError(f"Could not execute {what}: {_strerror(exc)}\n") from None
        return bytes(buf)

    def close(self) -> None:
        os.close(self.fd)


def _open_device(path: str) -> Channel:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        raise SwtpmIoctlError(f"Unable to open device '{path}'.\n") from None
    return DeviceChannel(fd)


def _connect_unix(path: str) -> Channel:
    if len(os.fsencode(path)) >= SUN_PATH_MAX:
        raise SwtpmIoctlError("Socket path is too long.\n")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise SwtpmIoctlError(f"Connect failed: {_strerror(exc)}\n") from None
    return SocketChannel(sock)


def _connect_tcp(host: str, port: int) -> Channel:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise SwtpmIoctlError(f"getaddrinfo failed on host '{host}': {exc.strerror}\n") from None
    last: OSError | None = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind | socket.SOCK_CLOEXEC, proto)
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        return SocketChannel(sock)
    reason = _strerror(last) if last is not None else os.strerror(errno.ECONNREFUSED)
    where = f"host '{host}' on port '{port}'"
    raise SwtpmIoctlError(f"Could not connect to {where} using TCP socket: {reason}\n")


# ---------------------------------------------------------------- commands

Command = Callable[[Channel], str]


def _result(cmd: Cmd, channel: Channel, reply: bytes) -> dict[str, int]:
    """The reply's fields; a non-zero result is the usual one-line failure."""
    if isinstance(channel, DeviceChannel):
        values = decode_ioctl_response(cmd, reply)
    else:
        layout = MESSAGES[cmd].response
        values = layout.unpack("big", reply[: layout.size()].ljust(layout.size(), b"\0"))
    result = values.get("result", 0)
    if result:
        raise SwtpmIoctlError(f"TPM result from PTM_{cmd.name}: 0x{result:x}\n")
    return values


def _simple(cmd: Cmd, fields: dict[str, int] | None = None) -> Callable[[Channel], str]:
    def run(channel: Channel) -> str:
        _result(cmd, channel, channel.call(cmd, fields or {}))
        return ""

    return run


def _caps(channel: Channel) -> str:
    reply = channel.call(Cmd.GET_CAPABILITY, {})
    if isinstance(channel, DeviceChannel):
        caps = decode_ioctl_response(Cmd.GET_CAPABILITY, reply)["caps"]
    else:  # 0.7.1 reads result and caps together as one big-endian 64-bit value
        caps = int.from_bytes(reply[:8].ljust(8, b"\0"), "big")
    return f"ptm capability is 0x{caps:x}\n"


def _established(channel: Channel) -> str:
    values = _result(Cmd.GET_TPMESTABLISHED, channel, channel.call(Cmd.GET_TPMESTABLISHED, {}))
    return f"tpmEstablished is {values['bit']}\n"


def _config(channel: Channel) -> str:
    values = _result(Cmd.GET_CONFIG, channel, channel.call(Cmd.GET_CONFIG, {}))
    return f"ptm configuration flags: 0x{values['flags']:x}\n"


def _buffersize(size: int) -> Callable[[Channel], str]:
    def run(channel: Channel) -> str:
        reply = channel.call(Cmd.SET_BUFFERSIZE, {"buffersize": size})
        v = _result(Cmd.SET_BUFFERSIZE, channel, reply)
        return (
            f"TPM buffersize: {v['buffersize']}\n"
            f"minimum size  : {v['minsize']}\n"
            f"maximum size  : {v['maxsize']}\n"
        )

    return run


def _info(flags: int) -> Callable[[Channel], str]:
    def run(channel: Channel) -> str:
        head = MESSAGES[Cmd.GET_INFO].response.size()
        text = b""
        while True:
            reply = channel.call(Cmd.GET_INFO, {"flags": flags, "offset": len(text)})
            values = _result(Cmd.GET_INFO, channel, reply)
            chunk = reply[head : head + values["length"]]
            text += chunk
            if not chunk or len(text) >= values["totlength"]:
                break
        return text.split(b"\0", 1)[0].decode("utf-8", "replace") + "\n"

    return run


def _hash(data: str) -> Callable[[Channel], str]:
    def chunks() -> list[bytes] | BinaryIO:
        if data == "-":
            return sys.stdin.buffer
        raw = os.fsencode(data)
        return [raw[i : i + HASH_DATA_MAX] for i in range(0, len(raw), HASH_DATA_MAX)]

    def run(channel: Channel) -> str:
        _result(Cmd.HASH_START, channel, channel.call(Cmd.HASH_START, {}))
        source = chunks()
        if isinstance(source, list):
            pieces = iter(source)
        else:
            pieces = iter(lambda: source.read(HASH_DATA_MAX), b"")
        for piece in pieces:
            reply = channel.call(Cmd.HASH_DATA, {"length": len(piece)}, piece)
            _result(Cmd.HASH_DATA, channel, reply)
        _result(Cmd.HASH_END, channel, channel.call(Cmd.HASH_END, {}))
        return ""

    return run


def _blob_type(name: str) -> BlobType:
    kind = BLOB_TYPES.get(name)
    if kind is None:
        raise SwtpmIoctlError(f"Unknown TPM state type '{name}'")
    return kind


def _save(type_name: str, path: str) -> Callable[[Channel], str]:
    def run(channel: Channel) -> str:
        kind = _blob_type(type_name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            reason = _strerror(exc)
            raise SwtpmIoctlError(f"Could not open file '{path}' for writing: {reason}\n") from None
        with os.fdopen(fd, "wb") as out:
            blob = _get_blob(channel, kind)
            try:
                out.write(blob)
                out.flush()
            except OSError as exc:
                reason = _strerror(exc)
                raise SwtpmIoctlError(f"Could not write to file '{path}': {reason}\n") from None
        return ""

    return run


def _get_blob(channel: Channel, kind: BlobType) -> bytes:
    cmd = Cmd.GET_STATEBLOB
    head = MESSAGES[cmd].response.size()
    fields = {"state_flags": int(StateFlag.DECRYPTED), "type": int(kind), "offset": 0}
    if isinstance(channel, DeviceChannel):
        blob = b""
        while True:
            reply = channel.call(cmd, dict(fields, offset=len(blob)))
            values = decode_ioctl_response(cmd, reply)
            if values["result"] & NON_FATAL:
                return b""
            _result(cmd, channel, reply)
            chunk = reply[head : head + min(values["length"], STATE_BLOB_CHUNK)]
            blob += chunk
            if not chunk or len(blob) >= values["totlength"]:
                return blob
    assert isinstance(channel, SocketChannel)
    reply = channel.call(cmd, fields)
    result = int.from_bytes(reply[:4], "big")
    if result & NON_FATAL:
        return b""
    if result:
        raise SwtpmIoctlError(f"TPM result from PTM_{cmd.name}: 0x{result:x}\n")
    if len(reply) < head:
        reply += channel.read(cmd, head - len(reply))
    values = _result(cmd, channel, reply)
    blob = reply[head:]
    while len(blob) < values["length"]:
        more = channel.read(cmd, READ_CHUNK)
        if not more:
            raise SwtpmIoctlError(f"Could not execute PTM_{cmd.name}: {os.strerror(errno.EIO)}\n")
        blob += more
    return blob[: values["length"]]


def _load(type_name: str, path: str) -> Callable[[Channel], str]:
    def run(channel: Channel) -> str:
        kind = _blob_type(type_name)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            reason = _strerror(exc)
            raise SwtpmIoctlError(f"Could not open file '{path}' for reading: {reason}\n") from None
        cmd = Cmd.SET_STATEBLOB
        if isinstance(channel, SocketChannel):
            fields = {"state_flags": 0, "type": kind, "length": len(data)}
            _result(cmd, channel, channel.call(cmd, fields, data))
            return ""
        # A chunk shorter than 3072 bytes ends a CUSE transfer (an empty one if need be).
        offsets = list(range(0, len(data), STATE_BLOB_CHUNK))
        if len(data) % STATE_BLOB_CHUNK == 0:
            offsets.append(len(data))
        for off in offsets:
            chunk = data[off : off + STATE_BLOB_CHUNK]
            fields = {"state_flags": 0, "type": kind, "length": len(chunk)}
            _result(cmd, channel, channel.call(cmd, fields, chunk))
        return ""

    return run


# ---------------------------------------------------------------- main


def _command(name: str, value: str | None, source: str, path: str | None) -> Command:
    """One command from its option; ``source`` is the argv element swtpm_ioctl parses."""
    if name in ("save", "load"):
        if path is None:
            raise SwtpmIoctlError(f"Missing filename argument for --{name} option\n")
        return (_save if name == "save" else _load)(value or "", path)
    if name in ("r", "l"):
        cmd = Cmd.RESET_TPMESTABLISHED if name == "r" else Cmd.SET_LOCALITY
        return _simple(cmd, {"loc": _locality(source)})
    if name == "b":
        size = _scan_unsigned(source)
        if size is None:
            raise SwtpmIoctlError(f"Could not get buffersize from {source}.\n")
        return _buffersize(size)
    if name == "info":
        flags = _strtoul_whole(source)
        if flags is None:
            raise SwtpmIoctlError("Cannot parse info flags.\n")
        return _info(flags)
    if name == "h":
        return _hash(value or "")
    return _SIMPLE[name]


def _plan(argv: list[str], prog: str) -> tuple[Command, Callable[[], Channel]]:
    """Parse as swtpm_ioctl does: the command to run and how to reach the TPM."""
    parsed = GetoptLong(prog, OPTIONS, long_only=True).parse(
        argv, take_extra=frozenset({"save", "load"})
    )
    for message in parsed.errors:
        sys.stderr.write(message + "\n")
    where: dict[str, str | None] = {}
    tcp: tuple[str, int] | None = None
    commands: list[Command] = []
    options = iter(parsed.options)
    for name, value, source, typed in options:
        if name in ("help", "version"):
            sys.stdout.write(HELP if name == "help" else VERSION)
            raise SystemExit(0)
        if name == "tcp":
            tcp = _tcp_target(value or "")
        elif name in ("tpm-device", "unix"):
            where[name] = value
        else:
            path = next(options)[1] if name in ("save", "load") else None
            commands.append(_command(name, value, source, path))
            if typed != COMMANDS[name]:
                commands[-1] = _usage
    if not commands:
        raise SwtpmIoctlError("No valid command.\n")
    if len(commands) > 1:
        raise SwtpmIoctlError("Only one command may be given.\n")
    device, unix = where.get("tpm-device"), where.get("unix")
    if device is not None:
        return commands[0], lambda: _open_device(device)
    if tcp is not None:
        host, port = tcp
        return commands[0], lambda: _connect_tcp(host, port)
    if unix is not None:
        return commands[0], lambda: _connect_unix(unix)
    if parsed.operands:
        operand = parsed.operands[0]
        return commands[0], lambda: _open_device(operand)
    raise SwtpmIoctlError("Error: Missing device name.\n")


def _usage(channel: Channel) -> str:
    sys.stdout.write(HELP)
    raise SwtpmIoctlError("")


_SIMPLE: dict[str, Command] = {
    "c": _caps,
    "i": _simple(Cmd.INIT, {"init_flags": InitFlag.DELETE_VOLATILE}),
    "stop": _simple(Cmd.STOP),
    "s": _simple(Cmd.SHUTDOWN),
    "e": _established,
    "v": _simple(Cmd.STORE_VOLATILE),
    "C": _simple(Cmd.CANCEL_TPM_CMD),
    "g": _config,
}


def main(argv: list[str] | None = None, prog: str = "swtpm_ioctl") -> int:
    """Run one swtpm_ioctl command line; 0 on success, 1 on any failure."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        command, connect = _plan(args, prog)
        channel = connect()
        try:
            out = command(channel)
        finally:
            channel.close()
    except SwtpmIoctlError as exc:
        sys.stderr.write(str(exc))
        return 1
    except SystemExit as exc:
        return int(exc.code or 0)
    sys.stdout.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
