"""The swtpm control protocol as one table.

Every control message — socket (big-endian) and CUSE ioctl (host-native) —
is declared here once as a field table, and both the servers and the client
encode and decode through it. Nothing else in vtpmctl knows a byte offset of
the control protocol.
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag

from vtpmctl.model import BlobKind

# Every vtpmctl command imports this module, so it stays off `typing` and
# `dataclasses` at run time (together they cost more than a control round trip).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Literal

    Endian = Literal["big", "native"]


class Cmd(IntEnum):
    """Control command codes (socket); the ioctl nr is code - 1."""

    GET_CAPABILITY = 0x01
    INIT = 0x02
    SHUTDOWN = 0x03
    GET_TPMESTABLISHED = 0x04
    SET_LOCALITY = 0x05
    HASH_START = 0x06
    HASH_DATA = 0x07
    HASH_END = 0x08
    CANCEL_TPM_CMD = 0x09
    STORE_VOLATILE = 0x0A
    RESET_TPMESTABLISHED = 0x0B
    GET_STATEBLOB = 0x0C
    SET_STATEBLOB = 0x0D
    STOP = 0x0E
    GET_CONFIG = 0x0F
    SET_DATAFD = 0x10
    SET_BUFFERSIZE = 0x11
    GET_INFO = 0x12
    LOCK_STORAGE = 0x13


class Res(IntEnum):
    """Result codes that appear on the control interface (TPM 1.2 numbering)."""

    SUCCESS = 0x00
    BAD_PARAMETER = 0x03
    FAIL = 0x09
    BAD_ORDINAL = 0x0A
    KEYNOTFOUND = 0x0D
    SIZE = 0x17
    IOERROR = 0x1F
    DECRYPT_ERROR = 0x21
    INVALID_POSTINIT = 0x26
    BAD_KEY_PROPERTY = 0x28
    BAD_DATASIZE = 0x2B
    BAD_MODE = 0x2C
    BAD_VERSION = 0x2E
    BAD_TYPE = 0x34
    BAD_LOCALITY = 0x3D
    RETRY = 0x800
    TPM2_FAILURE = 0x101


NON_FATAL = 0x800  # any GET_STATEBLOB result with this bit means "empty blob"


class Cap(IntFlag):
    INIT = 1 << 0
    SHUTDOWN = 1 << 1
    GET_TPMESTABLISHED = 1 << 2
    SET_LOCALITY = 1 << 3
    HASHING = 1 << 4
    CANCEL_TPM_CMD = 1 << 5
    STORE_VOLATILE = 1 << 6
    RESET_TPMESTABLISHED = 1 << 7
    GET_STATEBLOB = 1 << 8
    SET_STATEBLOB = 1 << 9
    STOP = 1 << 10
    GET_CONFIG = 1 << 11
    SET_DATAFD = 1 << 12
    SET_BUFFERSIZE = 1 << 13
    GET_INFO = 1 << 14
    SEND_COMMAND_HEADER = 1 << 15
    LOCK_STORAGE = 1 << 16


# What swtpm reports, and therefore what we report (docs/protocol.md#capabilities).
CAPS_SOCKET_TPM2 = 0x0001FFFF
CAPS_SOCKET_TPM12 = 0x00017FFF
CAPS_CUSE = 0x00016FFF
# QEMU refuses a backend without these.
CAPS_QEMU_REQUIRED = 0x340F
CAPS_QEMU_REQUIRED_TPM2 = 0x348F


class BlobType(IntEnum):
    """The ptm numbers of the blob kinds; member names are BlobKind's."""

    PERMANENT = 1
    VOLATILE = 2
    SAVESTATE = 3

    @classmethod
    def of(cls, kind: BlobKind) -> BlobType:
        return cls[kind.name]

    @property
    def kind(self) -> BlobKind:
        return BlobKind[self.name]


class StateFlag(IntFlag):
    DECRYPTED = 1  # request: give me the state without state-key encryption
    ENCRYPTED = 2  # payload is state-key encrypted


class InitFlag(IntFlag):
    DELETE_VOLATILE = 1


class ConfigFlag(IntFlag):
    FILE_KEY = 1
    MIGRATION_KEY = 2


class InfoFlag(IntFlag):
    TPMSPECIFICATION = 0x01
    TPMATTRIBUTES = 0x02
    TPMFEATURES = 0x04
    RUNTIME_ALGORITHMS = 0x08
    RUNTIME_COMMANDS = 0x10
    ACTIVE_PROFILE = 0x20
    AVAILABLE_PROFILES = 0x40
    RUNTIME_ATTRIBUTES = 0x80


LOCALITY_MAX = 4  # SET_LOCALITY and RESET_TPMESTABLISHED refuse more (BAD_LOCALITY)
STATE_BLOB_CHUNK = 3072  # PTM_STATE_BLOB_SIZE: CUSE chunk and GET_INFO chunk
HASH_DATA_MAX = 4096
SET_STATEBLOB_MAX = 512 * 1024
CTRL_FIRST_READ = 4104  # 4-byte code + sizeof(ptm_hdata)
CTRL_DEADLINE = 0.5  # seconds to receive the rest of a control message


class _Record:
    """A small immutable value object (what a frozen dataclass would give)."""

    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _names(self) -> tuple[str, ...]:
        names: tuple[str, ...] = type(self).__slots__
        return names

    def _key(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self._names())

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, _Record)
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        args = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._names())
        return f"{type(self).__name__}({args})"


class Layout(_Record):
    """A fixed struct: (name, struct code) pairs; '' names are padding."""

    __slots__ = ("fields",)
    fields: tuple[tuple[str, str], ...]

    def __init__(self, fields: tuple[tuple[str, str], ...]) -> None:
        object.__setattr__(self, "fields", fields)

    def fmt(self, endian: Endian) -> str:
        return (">" if endian == "big" else "=") + "".join(code for _, code in self.fields)

    def _compiled(self, endian: Endian) -> tuple[struct.Struct, tuple[str, ...]]:
        """The Struct and value names, built once per layout (control-path cost)."""
        key = (self.fields, endian)
        hit = _COMPILED.get(key)
        if hit is None:
            names = tuple(name for name, code in self.fields if not code.endswith("x"))
            hit = _COMPILED[key] = (struct.Struct(self.fmt(endian)), names)
        return hit

    def size(self) -> int:
        return self._compiled("big")[0].size

    def offset(self, name: str) -> int:
        """Where field ``name`` starts (layouts have no implicit padding)."""
        at = 0
        for field, code in self.fields:
            if field == name:
                return at
            at += struct.calcsize(">" + code)
        raise KeyError(name)

    def pack(self, endian: Endian, values: dict[str, int]) -> bytes:
        packer, names = self._compiled(endian)
        return packer.pack(*[values.get(name, 0) for name in names])

    def unpack(self, endian: Endian, buf: bytes | bytearray | memoryview) -> dict[str, int]:
        packer, names = self._compiled(endian)
        return dict(zip(names, packer.unpack_from(buf), strict=True))


_COMPILED: dict[tuple[tuple[tuple[str, str], ...], str], tuple[struct.Struct, tuple[str, ...]]] = {}


def L(*fields: tuple[str, str]) -> Layout:  # noqa: N802 - a table constructor
    return Layout(tuple(fields))


RESULT = L(("result", "I"))
NONE = L()
CODE = L(("code", "I"))  # what starts every socket request


class Message(_Record):
    """One control command: its socket and ioctl layouts.

    ``req_rule`` is how the socket server checks the request body length
    (docs/protocol.md#control-commands): ``("exact", n)``, ``("min", n)`` or ``None`` (not checked).
    ``data`` says whether variable bytes follow the fixed request ('req') or
    response ('resp'). The per-command rules every frontend and the engine
    apply come from here too:

    - ``needs_running``: True, the TPM must be running; False, it must not be
      (the others answer TPM_BAD_ORDINAL); None, any state.
    - ``stopped_to_set``: a request field that, when non-zero, changes a
      setting only a stopped TPM may change (SET_BUFFERSIZE).
    - ``await_body``: the socket server waits (within the deadline) for the
      whole fixed request and any data it announces before it runs the
      command; any other command runs with what the first read brought
      (docs/protocol.md#socket-framing).
    - ``while_busy``: answered at once, without the engine lock, even while
      a TPM command runs.
    """

    __slots__ = (
        "cmd",
        "request",
        "response",
        "req_rule",
        "ioctl_dir",
        "ioctl_size",
        "ioctl_request",
        "ioctl_response",
        "error_response",
        "needs_running",
        "data",
        "stopped_to_set",
        "await_body",
        "while_busy",
    )
    cmd: Cmd
    request: Layout
    response: Layout
    req_rule: tuple[str, int] | None
    ioctl_dir: int  # 2 = _IOR, 3 = _IOWR
    ioctl_size: int
    ioctl_request: Layout
    ioctl_response: Layout | None  # None: same as socket response
    error_response: Layout  # what a failure looks like on a socket
    needs_running: bool | None  # True: running, False: stopped, None: any
    data: str | None
    stopped_to_set: str | None
    await_body: bool
    while_busy: bool

    def __init__(
        self,
        cmd: Cmd,
        request: Layout,
        response: Layout,
        req_rule: tuple[str, int] | None,
        ioctl_dir: int,
        ioctl_size: int,
        ioctl_request: Layout = NONE,
        ioctl_response: Layout | None = None,
        error_response: Layout = RESULT,
        needs_running: bool | None = None,
        data: str | None = None,
        stopped_to_set: str | None = None,
        await_body: bool = False,
        while_busy: bool = False,
    ) -> None:
        for name, value in (
            ("cmd", cmd),
            ("request", request),
            ("response", response),
            ("req_rule", req_rule),
            ("ioctl_dir", ioctl_dir),
            ("ioctl_size", ioctl_size),
            ("ioctl_request", ioctl_request),
            ("ioctl_response", ioctl_response),
            ("error_response", error_response),
            ("needs_running", needs_running),
            ("data", data),
            ("stopped_to_set", stopped_to_set),
            ("await_body", await_body),
            ("while_busy", while_busy),
        ):
            object.__setattr__(self, name, value)

    def allowed(self, running: bool, fields: dict[str, int] | None = None) -> bool:
        """Whether the TPM's running state allows this command (else TPM_BAD_ORDINAL).

        Without ``fields`` only the state rule is checked, as a socket server
        does before it looks at the request's length (docs/protocol.md#control-commands).
        """
        if self.needs_running is not None and self.needs_running != running:
            return False
        if running and self.stopped_to_set is not None and fields is not None:
            return not fields.get(self.stopped_to_set, 0)
        return True

    @property
    def ioctl(self) -> int:
        return ioctl_number(self.ioctl_dir, self.ioctl_size, self.cmd)

    @property
    def ioctl_resp(self) -> Layout:
        return self.response if self.ioctl_response is None else self.ioctl_response


# Linux ioctl numbers: direction (2 bits), size (14 bits), type (8 bits), nr (8 bits).
IOC_WRITE = 1
IOC_READ = 2
IOC_RW = IOC_READ | IOC_WRITE
PTM_IOCTL_TYPE = ord("P")  # 0x50


def ioctl_number(direction: int, size: int, cmd: int) -> int:
    """The PTM ioctl of a control command: its nr is the socket code - 1."""
    return (direction << 30) | (size << 16) | (PTM_IOCTL_TYPE << 8) | (cmd - 1)


def ioctl_fields(request: int) -> tuple[int, int, int]:
    """(direction, size, type and nr) of any ioctl number."""
    return request >> 30, (request >> 16) & 0x3FFF, request & 0xFFFF


def ioctl_sizes(request: int) -> tuple[int, int]:
    """(in, out) bytes the kernel copies for a restricted ioctl number."""
    direction, size, _ = ioctl_fields(request)
    return (size if direction & IOC_WRITE else 0), (size if direction & IOC_READ else 0)


_BLOB_HDR = L(("result", "I"), ("state_flags", "I"), ("totlength", "I"), ("length", "I"))

MESSAGES: dict[Cmd, Message] = {
    m.cmd: m
    for m in (
        Message(
            Cmd.GET_CAPABILITY,
            NONE,
            L(("result", "I"), ("caps", "I")),
            None,
            IOC_READ,
            8,
            ioctl_response=L(("caps", "Q")),
            while_busy=True,
        ),
        Message(
            Cmd.INIT,
            L(("init_flags", "I")),
            RESULT,
            ("exact", 4),
            IOC_RW,
            4,
            ioctl_request=L(("init_flags", "I")),
            await_body=True,
        ),
        Message(Cmd.SHUTDOWN, NONE, RESULT, ("exact", 0), IOC_READ, 4),
        Message(
            Cmd.GET_TPMESTABLISHED,
            NONE,
            L(("result", "I"), ("bit", "B"), ("", "3x")),
            ("exact", 0),
            IOC_READ,
            8,
            needs_running=True,
        ),
        Message(
            Cmd.SET_LOCALITY,
            L(("loc", "B")),
            RESULT,
            ("min", 1),
            IOC_RW,
            4,
            ioctl_request=L(("loc", "B"), ("", "3x")),
            await_body=True,
        ),
        Message(Cmd.HASH_START, NONE, RESULT, ("exact", 0), IOC_READ, 4, needs_running=True),
        Message(
            Cmd.HASH_DATA,
            L(("length", "I")),
            RESULT,
            ("min", 4),
            IOC_RW,
            4 + HASH_DATA_MAX,
            ioctl_request=L(("length", "I")),
            needs_running=True,
            data="req",
            await_body=True,
        ),
        Message(Cmd.HASH_END, NONE, RESULT, ("exact", 0), IOC_READ, 4, needs_running=True),
        Message(
            Cmd.CANCEL_TPM_CMD,
            NONE,
            RESULT,
            ("exact", 0),
            IOC_READ,
            4,
            needs_running=True,
            while_busy=True,
        ),
        Message(Cmd.STORE_VOLATILE, NONE, RESULT, ("exact", 0), IOC_READ, 4, needs_running=True),
        Message(
            Cmd.RESET_TPMESTABLISHED,
            L(("loc", "B")),
            RESULT,
            ("min", 1),
            IOC_RW,
            4,
            ioctl_request=L(("loc", "B"), ("", "3x")),
            needs_running=True,
            await_body=True,
        ),
        Message(
            Cmd.GET_STATEBLOB,
            L(("state_flags", "I"), ("type", "I"), ("offset", "I")),
            _BLOB_HDR,
            ("min", 12),
            IOC_RW,
            16 + STATE_BLOB_CHUNK,
            ioctl_request=L(("state_flags", "I"), ("type", "I"), ("offset", "I")),
            error_response=_BLOB_HDR,
            needs_running=True,
            data="resp",
            await_body=True,
        ),
        Message(
            Cmd.SET_STATEBLOB,
            L(("state_flags", "I"), ("type", "I"), ("length", "I")),
            RESULT,
            ("min", 12),
            IOC_RW,
            12 + STATE_BLOB_CHUNK,
            ioctl_request=L(("state_flags", "I"), ("type", "I"), ("length", "I")),
            needs_running=False,
            data="req",
            await_body=True,
        ),
        Message(Cmd.STOP, NONE, RESULT, ("exact", 0), IOC_READ, 4),
        Message(
            Cmd.GET_CONFIG, NONE, L(("result", "I"), ("flags", "I")), ("exact", 0), IOC_READ, 8
        ),
        Message(Cmd.SET_DATAFD, NONE, RESULT, None, IOC_READ, 4),
        Message(
            Cmd.SET_BUFFERSIZE,
            L(("buffersize", "I")),
            L(("result", "I"), ("buffersize", "I"), ("minsize", "I"), ("maxsize", "I")),
            ("min", 4),
            IOC_RW,
            16,
            ioctl_request=L(("buffersize", "I")),
            stopped_to_set="buffersize",
        ),
        Message(
            Cmd.GET_INFO,
            L(("flags", "Q"), ("offset", "I"), ("", "4x")),
            L(("result", "I"), ("totlength", "I"), ("length", "I")),
            ("min", 16),
            IOC_RW,
            16 + STATE_BLOB_CHUNK,
            ioctl_request=L(("flags", "Q"), ("offset", "I"), ("", "4x")),
            data="resp",
        ),
        Message(
            Cmd.LOCK_STORAGE,
            L(("retries", "I")),
            RESULT,
            ("min", 4),
            IOC_RW,
            4,
            ioctl_request=L(("retries", "I")),
        ),
    )
}

_BY_CODE: dict[int, Message] = {int(cmd): msg for cmd, msg in MESSAGES.items()}
IOCTL_TO_CMD: dict[int, Cmd] = {m.ioctl: m.cmd for m in MESSAGES.values()}


def response_head_size(cmd: Cmd) -> int:
    """Bytes a socket client reads before it knows whether the call failed."""
    return MESSAGES[cmd].error_response.size()


def socket_error_size(cmd: Cmd, result: int) -> int:
    """Length of a failed socket reply with this result.

    GET_STATEBLOB answers most failures with its 16-byte header, but swtpm
    checks "running" before it builds that header, so "not running" (0x0a) is
    the bare 4-byte result (docs/protocol.md#state-blobs). A client that always waited for 16
    bytes would hang there.
    """
    if cmd == Cmd.GET_STATEBLOB and result == Res.BAD_ORDINAL:
        return RESULT.size()
    return response_head_size(cmd)


# ---------------------------------------------------------------- socket framing


def encode_socket_request(
    cmd: Cmd, fields: dict[str, int] | None = None, data: bytes = b""
) -> bytes:
    """Code + body, as one buffer to send in a single write."""
    msg = MESSAGES[cmd]
    return CODE.pack("big", {"code": cmd}) + msg.request.pack("big", fields or {}) + data


def socket_request_code(data: bytes) -> int:
    """The command code a socket request starts with (it need not be a Cmd)."""
    code: int = _unpack_code(data)[0]
    return code


_unpack_code = CODE._compiled("big")[0].unpack_from  # per control request: kept cheap


def socket_data_length(data: bytes) -> int | None:
    """The data length a request's fixed part announces, once that part is in."""
    msg = _BY_CODE.get(socket_request_code(data))
    if msg is None or msg.data != "req":
        return None
    fixed = CODE.size() + msg.request.size()
    if len(data) < fixed:
        return None
    return msg.request.unpack("big", data[CODE.size() : fixed])["length"]


def socket_request_need(data: bytes) -> int:
    """How many bytes of the request in ``data`` the server waits for.

    See docs/protocol.md#socket-framing.
    """
    if len(data) < CODE.size():
        return CODE.size()
    msg = _BY_CODE.get(socket_request_code(data))
    if msg is None or not msg.await_body:
        return len(data)
    return CODE.size() + msg.request.size() + (socket_data_length(data) or 0)


def encode_socket_response(
    cmd: Cmd, result: int, fields: dict[str, Any] | None = None, data: bytes = b""
) -> bytes:
    """A success reply, or the short error reply the spec prescribes."""
    msg = MESSAGES[cmd]
    if result != Res.SUCCESS:
        vals = dict(fields or {})
        vals["result"] = result
        if socket_error_size(cmd, result) == RESULT.size():
            return RESULT.pack("big", vals)
        return msg.error_response.pack("big", vals) + (data if cmd == Cmd.GET_STATEBLOB else b"")
    vals = dict(fields or {})
    vals["result"] = result
    return msg.response.pack("big", vals) + data


# ---------------------------------------------------------------- ioctl framing


def encode_ioctl_request(
    cmd: Cmd, fields: dict[str, int] | None = None, data: bytes = b""
) -> bytearray:
    """The whole union buffer for an ioctl call, native byte order."""
    msg = MESSAGES[cmd]
    buf = bytearray(msg.ioctl_size)
    raw = msg.ioctl_request.pack("native", fields or {}) + data
    buf[: len(raw)] = raw
    return buf


def decode_ioctl_request(cmd: Cmd, buf: bytes | bytearray | memoryview) -> dict[str, int]:
    return MESSAGES[cmd].ioctl_request.unpack("native", buf)


def encode_ioctl_response(cmd: Cmd, fields: dict[str, Any], data: bytes = b"") -> bytes:
    """The whole union buffer for an ioctl reply (result at offset 0)."""
    msg = MESSAGES[cmd]
    raw = msg.ioctl_resp.pack("native", fields) + data
    return raw.ljust(msg.ioctl_size, b"\0")[: msg.ioctl_size]


def decode_ioctl_response(cmd: Cmd, buf: bytes | bytearray | memoryview) -> dict[str, int]:
    return MESSAGES[cmd].ioctl_resp.unpack("native", buf)


# ---------------------------------------------------------------- data channel

# Every TPM command and response of both families starts with this header
# (big-endian); ``code`` is a command's ordinal and a response's result.
TPM_HEADER = L(("tag", "H"), ("size", "I"), ("code", "I"))
TPM_HEADER_SIZE = TPM_HEADER.size()
TPM_CODE_AT = TPM_HEADER.offset("code")
TPM2_ST_NO_SESSIONS = 0x8001
TPM12_TAG_RQU_COMMAND = 0x00C1
TPM12_TAG_RSP_COMMAND = 0x00C4
TPM2_RC_INSUFFICIENT = 0x09A
TPM2_RC_LOCALITY = 0x107
TPM12_BAD_PARAM_SIZE = 0x19
# The vendor SetLocality command (both families; the locality is the byte after the
# header), which the data channel refuses unless --locality allow-set-locality.
TPM_ORD_SET_LOCALITY = 0x20001000


def tpm_code(buf: bytes | bytearray | memoryview) -> int:
    """A command's ordinal or a response's result; -1 when shorter than a header."""
    if len(buf) < TPM_HEADER_SIZE:
        return -1
    return TPM_HEADER.unpack("big", buf)["code"]


def _tpm_message(tag: int, code: int, params: bytes = b"") -> bytes:
    size = TPM_HEADER_SIZE + len(params)
    return TPM_HEADER.pack("big", {"tag": tag, "size": size, "code": code}) + params


# What the data channel answers when the TPM cannot run a command
# (docs/protocol.md#the-data-channel).
TPM2_FATAL_RESPONSE = _tpm_message(TPM2_ST_NO_SESSIONS, Res.TPM2_FAILURE)
TPM12_FATAL_RESPONSE = _tpm_message(TPM12_TAG_RSP_COMMAND, Res.FAIL)
# A CUSE write() shorter than a header.
TPM2_SHORT_WRITE_RESPONSE = _tpm_message(TPM2_ST_NO_SESSIONS, TPM2_RC_INSUFFICIENT)
TPM12_SHORT_WRITE_RESPONSE = _tpm_message(TPM12_TAG_RSP_COMMAND, TPM12_BAD_PARAM_SIZE)


def set_locality_response(tpm2: bool, ok: bool) -> bytes:
    """The answer to an allowed vendor SetLocality: success, or a bad locality."""
    if tpm2:
        return _tpm_message(TPM2_ST_NO_SESSIONS, 0 if ok else TPM2_RC_LOCALITY)
    return _tpm_message(TPM12_TAG_RSP_COMMAND, 0 if ok else Res.BAD_LOCALITY)


# TPM 1.2 commands vtpmctl sends or recognises itself (TPM 2 ones are built by
# engine.tpm2, which this bottom-layer module does not import).
TPM12_ORD_STARTUP = 0x99
TPM12_ST_CLEAR = 1
TPM12_ST_STATE = 2
TPM12_ST_DEACTIVATED = 3
# TPM 1.2 commands that generate keys (seconds under emulation): TakeOwnership,
# CMK_CreateKey, CreateWrapKey, CreateEndorsementKeyPair, MakeIdentity, CreateRevocableEK.
TPM12_KEYGEN_ORDINALS = frozenset({0x0D, 0x13, 0x1F, 0x78, 0x79, 0x7F})
_U16 = L(("value", "H"))


def tpm12_startup(startup_type: int) -> bytes:
    """TPM_Startup(ST_CLEAR, ST_STATE or ST_DEACTIVATED)."""
    return _tpm_message(
        TPM12_TAG_RQU_COMMAND, TPM12_ORD_STARTUP, _U16.pack("big", {"value": startup_type})
    )


# TCG simulator framing on a TPM 2 data socket (docs/protocol.md#the-data-channel): this
# head, the command; answered with the response's length, the response and a zero acknowledgement.
TPM_SEND_COMMAND = 8
SEND_COMMAND_HEAD = L(("command", "I"), ("locality", "B"), ("length", "I"))
SEND_COMMAND_CODE = CODE.pack("big", {"code": TPM_SEND_COMMAND})
SEND_COMMAND_LENGTH = L(("length", "I"))
SEND_COMMAND_ACK = RESULT.pack("big", {"result": Res.SUCCESS})
