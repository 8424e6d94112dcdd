"""Raw TPM 2.0 commands, marshaled by hand.

vtpmctl only needs a dozen commands (manufacturing, inspection, health
checks), so a full TSS would be a heavy dependency for little gain. Every
command here is a pair of pure functions (``build_x`` → bytes, ``parse_x`` ←
bytes) that unit tests can pin against known bytes, plus a convenience
``x(transact, …)`` that runs them through any ``Transact``: a data socket, a
CUSE device or libtpms in-process.

Numbers come from the TCG TPM 2.0 Library specification, Parts 2 and 3.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import IntEnum

Transact = Callable[[bytes], bytes]
"""Send one complete TPM command, return its complete response."""

ST_NO_SESSIONS = 0x8001
ST_SESSIONS = 0x8002
HEADER_SIZE = 10

# Startup / Shutdown types.
SU_CLEAR = 0x0000
SU_STATE = 0x0001

# Permanent handles.
RH_OWNER = 0x40000001
RH_NULL = 0x40000007
RS_PW = 0x40000009
RH_LOCKOUT = 0x4000000A
RH_ENDORSEMENT = 0x4000000B
RH_PLATFORM = 0x4000000C

# Handle ranges (the top byte is the handle type).
HR_PCR = 0x00000000
HR_NV_INDEX = 0x01000000
HR_TRANSIENT = 0x80000000
HR_PERSISTENT = 0x81000000


class Alg(IntEnum):
    """TPM_ALG_ID values this module understands."""

    RSA = 0x0001
    SHA1 = 0x0004
    HMAC = 0x0005
    AES = 0x0006
    MGF1 = 0x0007
    KEYEDHASH = 0x0008
    XOR = 0x000A
    SHA256 = 0x000B
    SHA384 = 0x000C
    SHA512 = 0x000D
    NULL = 0x0010
    SM3_256 = 0x0012
    SM4 = 0x0013
    RSASSA = 0x0014
    RSAES = 0x0015
    RSAPSS = 0x0016
    OAEP = 0x0017
    ECDSA = 0x0018
    ECDH = 0x0019
    ECDAA = 0x001A
    SM2 = 0x001B
    ECSCHNORR = 0x001C
    ECMQV = 0x001D
    KDF1_SP800_56A = 0x0020
    KDF2 = 0x0021
    KDF1_SP800_108 = 0x0022
    ECC = 0x0023
    SYMCIPHER = 0x0025
    CAMELLIA = 0x0026
    SHA3_256 = 0x0027
    SHA3_384 = 0x0028
    SHA3_512 = 0x0029
    CTR = 0x0040
    OFB = 0x0041
    CBC = 0x0042
    CFB = 0x0043
    ECB = 0x0044


class Curve(IntEnum):
    """TPM_ECC_CURVE values."""

    NIST_P192 = 0x0001
    NIST_P224 = 0x0002
    NIST_P256 = 0x0003
    NIST_P384 = 0x0004
    NIST_P521 = 0x0005
    BN_P256 = 0x0010
    BN_P638 = 0x0011
    SM2_P256 = 0x0020


class ObjAttr:
    """TPMA_OBJECT bits."""

    FIXED_TPM = 0x00000002
    ST_CLEAR = 0x00000004
    FIXED_PARENT = 0x00000010
    SENSITIVE_DATA_ORIGIN = 0x00000020
    USER_WITH_AUTH = 0x00000040
    ADMIN_WITH_POLICY = 0x00000080
    NO_DA = 0x00000400
    ENCRYPTED_DUPLICATION = 0x00000800
    RESTRICTED = 0x00010000
    DECRYPT = 0x00020000
    SIGN_ENCRYPT = 0x00040000


class NvAttr:
    """TPMA_NV bits."""

    PPWRITE = 0x00000001
    OWNERWRITE = 0x00000002
    AUTHWRITE = 0x00000004
    POLICYWRITE = 0x00000008
    POLICY_DELETE = 0x00000400
    WRITELOCKED = 0x00000800
    WRITEALL = 0x00001000
    WRITEDEFINE = 0x00002000
    WRITE_STCLEAR = 0x00004000
    GLOBALLOCK = 0x00008000
    PPREAD = 0x00010000
    OWNERREAD = 0x00020000
    AUTHREAD = 0x00040000
    POLICYREAD = 0x00080000
    NO_DA = 0x02000000
    ORDERLY = 0x04000000
    CLEAR_STCLEAR = 0x08000000
    READLOCKED = 0x10000000
    WRITTEN = 0x20000000
    PLATFORMCREATE = 0x40000000
    READ_STCLEAR = 0x80000000


class Cap(IntEnum):
    """TPM_CAP values."""

    ALGS = 0x00000000
    HANDLES = 0x00000001
    COMMANDS = 0x00000002
    PCRS = 0x00000005
    TPM_PROPERTIES = 0x00000006


class PT(IntEnum):
    """TPM_PT property tags (fixed group starts at 0x100)."""

    FAMILY_INDICATOR = 0x100
    LEVEL = 0x101
    REVISION = 0x102
    DAY_OF_YEAR = 0x103
    YEAR = 0x104
    MANUFACTURER = 0x105
    VENDOR_STRING_1 = 0x106
    VENDOR_STRING_2 = 0x107
    VENDOR_STRING_3 = 0x108
    VENDOR_STRING_4 = 0x109
    VENDOR_TPM_TYPE = 0x10A
    FIRMWARE_VERSION_1 = 0x10B
    FIRMWARE_VERSION_2 = 0x10C
    INPUT_BUFFER = 0x10D
    HR_TRANSIENT_MIN = 0x10E
    HR_PERSISTENT_MIN = 0x10F
    HR_LOADED_MIN = 0x110
    ACTIVE_SESSIONS_MAX = 0x111
    PCR_COUNT = 0x112
    NV_INDEX_MAX = 0x117
    MAX_COMMAND_SIZE = 0x11E
    MAX_RESPONSE_SIZE = 0x11F
    MAX_DIGEST = 0x120
    NV_BUFFER_MAX = 0x12C
    PERMANENT = 0x200
    STARTUP_CLEAR = 0x201


class CC(IntEnum):
    """TPM_CC values of the commands built here."""

    NV_UndefineSpace = 0x122
    EvictControl = 0x120
    NV_DefineSpace = 0x12A
    PCR_Allocate = 0x12B
    CreatePrimary = 0x131
    NV_Write = 0x137
    NV_WriteLock = 0x138
    Startup = 0x144
    Shutdown = 0x145
    NV_Read = 0x14E
    FlushContext = 0x165
    NV_ReadPublic = 0x169
    ReadPublic = 0x173
    GetCapability = 0x17A
    GetRandom = 0x17B
    PCR_Read = 0x17E


@dataclass(frozen=True)
class Shape:
    """Where a command keeps its handles; the rest of the bytes are parameters."""

    handles: int
    """Handles in the command's handle area."""
    auths: int
    """How many of those (the first ones) need an authorization session."""
    resp_handles: int = 0
    """Handles in the response's handle area."""


SHAPES: dict[CC, Shape] = {
    CC.Startup: Shape(0, 0),
    CC.Shutdown: Shape(0, 0),
    CC.GetRandom: Shape(0, 0),
    CC.GetCapability: Shape(0, 0),
    CC.ReadPublic: Shape(1, 0),
    CC.CreatePrimary: Shape(1, 1, resp_handles=1),
    CC.EvictControl: Shape(2, 1),
    CC.FlushContext: Shape(0, 0),  # the handle to flush is a parameter
    CC.NV_DefineSpace: Shape(1, 1),
    CC.NV_UndefineSpace: Shape(2, 1),
    CC.NV_Write: Shape(2, 1),
    CC.NV_Read: Shape(2, 1),
    CC.NV_ReadPublic: Shape(1, 0),
    CC.NV_WriteLock: Shape(2, 1),
    CC.PCR_Read: Shape(0, 0),
    CC.PCR_Allocate: Shape(1, 1),
}

# --------------------------------------------------------------------------- errors

_FMT0_VER1 = {
    0x000: "INITIALIZE",
    0x001: "FAILURE",
    0x003: "SEQUENCE",
    0x00B: "PRIVATE",
    0x019: "HMAC",
    0x020: "DISABLED",
    0x021: "EXCLUSIVE",
    0x024: "AUTH_TYPE",
    0x025: "AUTH_MISSING",
    0x026: "POLICY",
    0x027: "PCR",
    0x028: "PCR_CHANGED",
    0x02D: "UPGRADE",
    0x02E: "TOO_MANY_CONTEXTS",
    0x02F: "AUTH_UNAVAILABLE",
    0x030: "REBOOT",
    0x031: "UNBALANCED",
    0x042: "COMMAND_SIZE",
    0x043: "COMMAND_CODE",
    0x044: "AUTHSIZE",
    0x045: "AUTH_CONTEXT",
    0x046: "NV_RANGE",
    0x047: "NV_SIZE",
    0x048: "NV_LOCKED",
    0x049: "NV_AUTHORIZATION",
    0x04A: "NV_UNINITIALIZED",
    0x04B: "NV_SPACE",
    0x04C: "NV_DEFINED",
    0x050: "BAD_CONTEXT",
    0x051: "CPHASH",
    0x052: "PARENT",
    0x053: "NEEDS_TEST",
    0x054: "NO_RESULT",
    0x055: "SENSITIVE",
}
_FMT1 = {
    0x001: "ASYMMETRIC",
    0x002: "ATTRIBUTES",
    0x003: "HASH",
    0x004: "VALUE",
    0x005: "HIERARCHY",
    0x007: "KEY_SIZE",
    0x008: "MGF",
    0x009: "MODE",
    0x00A: "TYPE",
    0x00B: "HANDLE",
    0x00C: "KDF",
    0x00D: "RANGE",
    0x00E: "AUTH_FAIL",
    0x00F: "NONCE",
    0x010: "PP",
    0x012: "SCHEME",
    0x015: "SIZE",
    0x016: "SYMMETRIC",
    0x017: "TAG",
    0x018: "SELECTOR",
    0x01A: "INSUFFICIENT",
    0x01B: "SIGNATURE",
    0x01C: "KEY",
    0x01D: "POLICY_FAIL",
    0x01F: "INTEGRITY",
    0x020: "TICKET",
    0x021: "RESERVED_BITS",
    0x022: "BAD_AUTH",
    0x023: "EXPIRED",
    0x024: "POLICY_CC",
    0x025: "BINDING",
    0x026: "CURVE",
    0x027: "ECC_POINT",
}
_WARN = {
    0x001: "CONTEXT_GAP",
    0x002: "OBJECT_MEMORY",
    0x003: "SESSION_MEMORY",
    0x004: "MEMORY",
    0x005: "SESSION_HANDLES",
    0x006: "OBJECT_HANDLES",
    0x007: "LOCALITY",
    0x008: "YIELDED",
    0x009: "CANCELED",
    0x00A: "TESTING",
    0x020: "NV_RATE",
    0x021: "LOCKOUT",
    0x022: "RETRY",
    0x023: "NV_UNAVAILABLE",
    **{0x010 + i: f"REFERENCE_H{i}" for i in range(7)},
    **{0x018 + i: f"REFERENCE_S{i}" for i in range(7)},
}


class RC(IntEnum):
    """Base response codes that callers commonly test for (compare with TpmError.base)."""

    SUCCESS = 0x000
    INITIALIZE = 0x100
    FAILURE = 0x101
    COMMAND_CODE = 0x143
    NV_RANGE = 0x146
    NV_SIZE = 0x147
    NV_LOCKED = 0x148
    NV_AUTHORIZATION = 0x149
    NV_UNINITIALIZED = 0x14A
    NV_SPACE = 0x14B
    NV_DEFINED = 0x14C
    VALUE = 0x084
    HIERARCHY = 0x085
    HANDLE = 0x08B
    AUTH_FAIL = 0x08E
    ATTRIBUTES = 0x082
    SIZE = 0x095
    BAD_AUTH = 0x0A2
    CURVE = 0x0A6
    LOCKOUT = 0x921
    RETRY = 0x922


def rc_base(rc: int) -> int:
    """The response code without its handle/session/parameter number."""
    return rc & 0xBF if rc & 0x080 else rc


def decode_rc(rc: int) -> str:
    """A readable name for a TPM 2.0 response code, with the position it blames."""
    if rc == 0:
        return "TPM_RC_SUCCESS"
    if rc & 0x080:  # format one: error tied to a handle, session or parameter
        name = _FMT1.get(rc & 0x03F, f"0x{rc & 0x03F:03x}")
        n = (rc >> 8) & 0x0F
        if rc & 0x040:
            where = f"parameter {n}"
        elif n & 0x08:
            where = f"session {n & 0x07}"
        else:
            where = f"handle {n}" if n else ""
        return f"TPM_RC_{name}" + (f" ({where})" if where else "")
    if not rc & 0x100:
        return f"TPM 1.2 error 0x{rc:x}"
    if rc & 0x400:
        return f"vendor error 0x{rc & 0x7F:02x}"
    table = _WARN if rc & 0x800 else _FMT0_VER1
    return "TPM_RC_" + table.get(rc & 0x7F, f"0x{rc:03x}")


class TpmError(Exception):
    """The TPM answered with a non-zero response code."""

    def __init__(self, rc: int, command: int | None = None) -> None:
        self.rc = rc
        self.command = command
        where = ""
        if command is not None:
            try:
                where = f"{CC(command).name}: "
            except ValueError:
                where = f"command 0x{command:x}: "
        super().__init__(f"{where}{decode_rc(rc)} (rc=0x{rc:x})")

    @property
    def base(self) -> int:
        """The code to compare against ``RC`` members, position bits removed."""
        return rc_base(self.rc)


class MalformedResponse(ValueError):
    """The response bytes do not have the shape the command promises."""


# --------------------------------------------------------------------------- marshaling


def u8(v: int) -> bytes:
    return struct.pack(">B", v)


def u16(v: int) -> bytes:
    return struct.pack(">H", v)


def u32(v: int) -> bytes:
    return struct.pack(">I", v)


def tpm2b(data: bytes) -> bytes:
    """A TPM2B: 16-bit size then the bytes."""
    if len(data) > 0xFFFF:
        raise ValueError("TPM2B payload longer than 65535 bytes")
    return u16(len(data)) + data


class Reader:
    """Sequential big-endian reader that fails loudly on truncated input."""

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise MalformedResponse(
                f"need {n} bytes at offset {self.pos}, only {len(self.data) - self.pos} left"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def u64(self) -> int:
        return int.from_bytes(self.take(8), "big")

    def tpm2b(self) -> bytes:
        return self.take(self.u16())

    def rest(self) -> bytes:
        return self.take(len(self.data) - self.pos)

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def end(self) -> None:
        if self.pos != len(self.data):
            raise MalformedResponse(f"{len(self.data) - self.pos} unexpected trailing bytes")


@dataclass(frozen=True)
class PasswordSession:
    """TPM_RS_PW: the authorization value travels in clear in the hmac field."""

    auth: bytes = b""

    def marshal(self) -> bytes:
        # handle, empty nonce, attributes (continueSession), password
        return u32(RS_PW) + tpm2b(b"") + u8(0x01) + tpm2b(self.auth)


def build_command(
    cc: CC,
    handles: Iterable[int] = (),
    params: bytes = b"",
    sessions: Iterable[PasswordSession] = (),
) -> bytes:
    """Assemble header, handle area, authorization area and parameters."""
    hs = list(handles)
    auths = list(sessions)
    shape = SHAPES[cc]
    if len(hs) != shape.handles:
        raise ValueError(f"{cc.name} takes {shape.handles} handles, got {len(hs)}")
    if len(auths) != shape.auths:
        raise ValueError(f"{cc.name} takes {shape.auths} sessions, got {len(auths)}")
    body = b"".join(u32(h) for h in hs)
    if auths:
        area = b"".join(s.marshal() for s in auths)
        body += u32(len(area)) + area
    body += params
    tag = ST_SESSIONS if auths else ST_NO_SESSIONS
    return u16(tag) + u32(HEADER_SIZE + len(body)) + u32(cc) + body


@dataclass(frozen=True)
class Response:
    """A successful response split into its handle area and parameters."""

    handles: tuple[int, ...]
    params: bytes

    def reader(self) -> Reader:
        return Reader(self.params)


def parse_response(cc: CC, data: bytes) -> Response:
    """Check the header, raise TpmError on a non-zero code, split the areas."""
    r = Reader(data)
    tag = r.u16()
    size = r.u32()
    rc = r.u32()
    if tag not in (ST_NO_SESSIONS, ST_SESSIONS) and not (tag == 0x00C4 and rc):
        raise MalformedResponse(f"unexpected response tag 0x{tag:04x}")
    if size != len(data):
        raise MalformedResponse(f"header says {size} bytes, got {len(data)}")
    if rc:
        raise TpmError(rc, cc)
    handles = tuple(r.u32() for _ in range(SHAPES[cc].resp_handles))
    # with sessions, the authorization area follows the parameters; nothing to check there
    params = r.take(r.u32()) if tag == ST_SESSIONS else r.rest()
    return Response(handles, params)


def execute(
    transact: Transact,
    cc: CC,
    handles: Iterable[int] = (),
    params: bytes = b"",
    sessions: Iterable[PasswordSession] = (),
) -> Response:
    """Build, send and parse one command."""
    return parse_response(cc, transact(build_command(cc, handles, params, sessions)))


def _pw(auth: bytes) -> list[PasswordSession]:
    return [PasswordSession(auth)]


# --------------------------------------------------------------------------- structures


@dataclass(frozen=True)
class SymDef:
    """TPMT_SYM_DEF_OBJECT; algorithm NULL means "no symmetric key"."""

    algorithm: int = Alg.NULL
    key_bits: int = 0
    mode: int = Alg.NULL

    def marshal(self) -> bytes:
        if self.algorithm == Alg.NULL:
            return u16(Alg.NULL)
        if self.algorithm == Alg.XOR:
            return u16(self.algorithm) + u16(self.key_bits)  # key_bits holds the hash
        return u16(self.algorithm) + u16(self.key_bits) + u16(self.mode)

    @classmethod
    def read(cls, r: Reader) -> SymDef:
        alg = r.u16()
        if alg == Alg.NULL:
            return cls()
        if alg == Alg.XOR:
            return cls(alg, r.u16())
        return cls(alg, r.u16(), r.u16())


# Schemes whose details are empty; ECDAA adds a count after the hash.
_NO_DETAIL = {Alg.NULL, Alg.RSAES}


@dataclass(frozen=True)
class Scheme:
    """A signing/encryption/KDF scheme: the algorithm and, for most, a hash."""

    algorithm: int = Alg.NULL
    hash_alg: int = Alg.NULL
    count: int = 0

    def marshal(self) -> bytes:
        if self.algorithm in _NO_DETAIL:
            return u16(self.algorithm)
        out = u16(self.algorithm) + u16(self.hash_alg)
        if self.algorithm == Alg.ECDAA:
            out += u16(self.count)
        return out

    @classmethod
    def read(cls, r: Reader) -> Scheme:
        alg = r.u16()
        if alg in _NO_DETAIL:
            return cls(alg)
        h = r.u16()
        return cls(alg, h, r.u16() if alg == Alg.ECDAA else 0)


_HASHES: dict[int, str] = {
    Alg.SHA1: "sha1",
    Alg.SHA256: "sha256",
    Alg.SHA384: "sha384",
    Alg.SHA512: "sha512",
    Alg.SHA3_256: "sha3_256",
    Alg.SHA3_384: "sha3_384",
    Alg.SHA3_512: "sha3_512",
}


def hash_name(alg: int) -> str:
    """hashlib name of a TPM hash algorithm."""
    try:
        return _HASHES[alg]
    except KeyError:
        raise ValueError(f"unsupported hash algorithm 0x{alg:04x}") from None


@dataclass(frozen=True)
class Public:
    """TPMT_PUBLIC for RSA, ECC, KEYEDHASH and SYMCIPHER objects.

    Kept as plain fields so a template can be compared field by field with a
    key another tool created, without caring about the key itself.
    """

    type: int
    name_alg: int
    attributes: int
    auth_policy: bytes = b""
    symmetric: SymDef = field(default_factory=SymDef)
    scheme: Scheme = field(default_factory=Scheme)
    key_bits: int = 0
    """RSA modulus size."""
    exponent: int = 0
    """RSA public exponent; 0 means 65537."""
    curve: int = 0
    """ECC curve (TPM_ECC_CURVE)."""
    kdf: Scheme = field(default_factory=Scheme)
    """ECC KDF, or the KDF of a KEYEDHASH XOR scheme."""
    unique: bytes = b""
    """RSA modulus, or the KEYEDHASH/SYMCIPHER unique digest."""
    unique_x: bytes = b""
    unique_y: bytes = b""

    def marshal(self) -> bytes:
        out = u16(self.type) + u16(self.name_alg) + u32(self.attributes) + tpm2b(self.auth_policy)
        if self.type == Alg.RSA:
            out += self.symmetric.marshal() + self.scheme.marshal()
            out += u16(self.key_bits) + u32(self.exponent) + tpm2b(self.unique)
        elif self.type == Alg.ECC:
            out += self.symmetric.marshal() + self.scheme.marshal()
            out += u16(self.curve) + self.kdf.marshal()
            out += tpm2b(self.unique_x) + tpm2b(self.unique_y)
        elif self.type == Alg.KEYEDHASH:
            out += u16(self.scheme.algorithm)
            if self.scheme.algorithm == Alg.HMAC:
                out += u16(self.scheme.hash_alg)
            elif self.scheme.algorithm == Alg.XOR:
                out += u16(self.scheme.hash_alg) + u16(self.kdf.algorithm)
            out += tpm2b(self.unique)
        elif self.type == Alg.SYMCIPHER:
            out += self.symmetric.marshal() + tpm2b(self.unique)
        else:
            raise ValueError(f"unsupported object type 0x{self.type:04x}")
        return out

    @classmethod
    def read(cls, r: Reader) -> Public:
        typ, name_alg, attrs, policy = r.u16(), r.u16(), r.u32(), r.tpm2b()
        base = cls(typ, name_alg, attrs, policy)
        if typ == Alg.RSA:
            sym, sch = SymDef.read(r), Scheme.read(r)
            bits, exp = r.u16(), r.u32()
            return replace(
                base, symmetric=sym, scheme=sch, key_bits=bits, exponent=exp, unique=r.tpm2b()
            )
        if typ == Alg.ECC:
            sym, sch = SymDef.read(r), Scheme.read(r)
            curve, kdf = r.u16(), Scheme.read(r)
            x, y = r.tpm2b(), r.tpm2b()
            return replace(
                base, symmetric=sym, scheme=sch, curve=curve, kdf=kdf, unique_x=x, unique_y=y
            )
        if typ == Alg.KEYEDHASH:
            alg = r.u16()
            sch, kdf = Scheme(alg), Scheme()
            if alg == Alg.HMAC:
                sch = Scheme(alg, r.u16())
            elif alg == Alg.XOR:
                sch = Scheme(alg, r.u16())
                kdf = Scheme(r.u16())
            return replace(base, scheme=sch, kdf=kdf, unique=r.tpm2b())
        if typ == Alg.SYMCIPHER:
            return replace(base, symmetric=SymDef.read(r), unique=r.tpm2b())
        raise MalformedResponse(f"unsupported object type 0x{typ:04x}")

    @classmethod
    def parse(cls, data: bytes) -> Public:
        """Parse a marshaled TPMT_PUBLIC (no size prefix); trailing bytes are an error."""
        r = Reader(data)
        pub = cls.read(r)
        r.end()
        return pub

    def name(self) -> bytes:
        """The TPM Name: nameAlg followed by the hash of the public area."""
        return u16(self.name_alg) + hashlib.new(hash_name(self.name_alg), self.marshal()).digest()

    def template(self) -> Public:
        """The same object with the key removed, for comparing templates."""
        return replace(self, unique=b"", unique_x=b"", unique_y=b"")


def marshal_pcr_selection(selection: Mapping[int, Iterable[int]]) -> bytes:
    """TPML_PCR_SELECTION from {hash alg: PCR numbers}; at least 3 bitmap bytes."""
    out = u32(len(selection))
    for alg, pcrs in selection.items():
        nums = sorted(set(pcrs))
        size = max(3, (nums[-1] // 8 + 1) if nums else 0)
        bitmap = bytearray(size)
        for p in nums:
            bitmap[p // 8] |= 1 << (p % 8)
        out += u16(alg) + u8(size) + bytes(bitmap)
    return out


def read_pcr_selection(r: Reader) -> dict[int, list[int]]:
    """Inverse of marshal_pcr_selection (bank order is kept)."""
    out: dict[int, list[int]] = {}
    for _ in range(r.u32()):
        alg = r.u16()
        bitmap = r.take(r.u8())
        out[alg] = [i * 8 + b for i, byte in enumerate(bitmap) for b in range(8) if byte >> b & 1]
    return out


# --------------------------------------------------------------------------- commands


def build_startup(startup_type: int = SU_CLEAR) -> bytes:
    return build_command(CC.Startup, params=u16(startup_type))


def startup(transact: Transact, startup_type: int = SU_CLEAR) -> None:
    execute(transact, CC.Startup, params=u16(startup_type))


def build_shutdown(shutdown_type: int = SU_CLEAR) -> bytes:
    return build_command(CC.Shutdown, params=u16(shutdown_type))


def shutdown(transact: Transact, shutdown_type: int = SU_CLEAR) -> None:
    execute(transact, CC.Shutdown, params=u16(shutdown_type))


def build_get_random(count: int) -> bytes:
    return build_command(CC.GetRandom, params=u16(count))


def parse_get_random(data: bytes) -> bytes:
    r = parse_response(CC.GetRandom, data).reader()
    out = r.tpm2b()
    r.end()
    return out


def get_random(transact: Transact, count: int) -> bytes:
    """Exactly ``count`` random bytes (the TPM hands out at most a digest per call)."""
    out = b""
    while len(out) < count:
        chunk = parse_get_random(transact(build_get_random(min(count - len(out), 0xFFFF))))
        if not chunk:
            raise MalformedResponse("GetRandom returned no bytes")
        out += chunk
    return out


@dataclass(frozen=True)
class Capability:
    """One GetCapability answer: the raw list plus the decoded items."""

    capability: int
    more_data: bool
    handles: tuple[int, ...] = ()
    properties: tuple[tuple[int, int], ...] = ()
    pcrs: Mapping[int, list[int]] = field(default_factory=dict)
    raw: bytes = b""
    """The capability-specific list, for capabilities not decoded here."""


def build_get_capability(capability: int, prop: int, count: int) -> bytes:
    return build_command(CC.GetCapability, params=u32(capability) + u32(prop) + u32(count))


def parse_get_capability(data: bytes) -> Capability:
    r = parse_response(CC.GetCapability, data).reader()
    more = bool(r.u8())
    cap = r.u32()
    start = r.pos
    if cap == Cap.HANDLES:
        hs = tuple(r.u32() for _ in range(r.u32()))
        return Capability(cap, more, handles=hs, raw=r.data[start:])
    if cap == Cap.TPM_PROPERTIES:
        props = tuple((r.u32(), r.u32()) for _ in range(r.u32()))
        return Capability(cap, more, properties=props, raw=r.data[start:])
    if cap == Cap.PCRS:
        return Capability(cap, more, pcrs=read_pcr_selection(r), raw=r.data[start:])
    return Capability(cap, more, raw=r.rest())


def get_capability(transact: Transact, capability: int, prop: int, count: int) -> Capability:
    return parse_get_capability(transact(build_get_capability(capability, prop, count)))


def get_handles(transact: Transact, first: int) -> list[int]:
    """All handles of one type (the top byte of ``first``) from ``first`` on."""
    out: list[int] = []
    prop = first
    top = first & 0xFF000000
    while True:
        cap = get_capability(transact, Cap.HANDLES, prop, 254)
        hs = [h for h in cap.handles if h & 0xFF000000 == top]
        out.extend(hs)
        if not cap.more_data or not hs or len(hs) != len(cap.handles):
            return out
        prop = hs[-1] + 1


def get_properties(transact: Transact, first: int, count: int = 1) -> dict[int, int]:
    """TPM properties ``first`` … ``first+count-1`` that the TPM reports."""
    out: dict[int, int] = {}
    prop = first
    end = first + count
    while prop < end:
        cap = get_capability(transact, Cap.TPM_PROPERTIES, prop, end - prop)
        got = [(p, v) for p, v in cap.properties if first <= p < end]
        out.update(got)
        if not cap.more_data or not got:
            break
        prop = got[-1][0] + 1
    return out


def get_property(transact: Transact, prop: int) -> int | None:
    return get_properties(transact, prop).get(prop)


def get_pcr_banks(transact: Transact) -> dict[int, list[int]]:
    """{hash alg: active PCRs} as the TPM reports them (empty list = inactive bank)."""
    return dict(get_capability(transact, Cap.PCRS, 0, 1).pcrs)


@dataclass(frozen=True)
class ReadPublicResult:
    public: bytes
    """TPMT_PUBLIC bytes (without the TPM2B size)."""
    name: bytes
    qualified_name: bytes

    @property
    def area(self) -> Public:
        return Public.parse(self.public)


def build_read_public(handle: int) -> bytes:
    return build_command(CC.ReadPublic, [handle])


def parse_read_public(data: bytes) -> ReadPublicResult:
    r = parse_response(CC.ReadPublic, data).reader()
    res = ReadPublicResult(r.tpm2b(), r.tpm2b(), r.tpm2b())
    r.end()
    return res


def read_public(transact: Transact, handle: int) -> ReadPublicResult:
    return parse_read_public(transact(build_read_public(handle)))


@dataclass(frozen=True)
class CreatePrimaryResult:
    handle: int
    public: bytes
    """TPMT_PUBLIC bytes of the new key."""
    name: bytes

    @property
    def area(self) -> Public:
        return Public.parse(self.public)


def build_create_primary(
    hierarchy: int,
    template: Public | bytes,
    *,
    auth: bytes = b"",
    key_auth: bytes = b"",
    sensitive_data: bytes = b"",
    outside_info: bytes = b"",
    creation_pcrs: Mapping[int, Iterable[int]] | None = None,
) -> bytes:
    """``template`` is a Public or already-marshaled TPMT_PUBLIC bytes."""
    tpmt = template.marshal() if isinstance(template, Public) else template
    sensitive = tpm2b(key_auth) + tpm2b(sensitive_data)
    params = (
        tpm2b(sensitive)
        + tpm2b(tpmt)
        + tpm2b(outside_info)
        + marshal_pcr_selection(creation_pcrs or {})
    )
    return build_command(CC.CreatePrimary, [hierarchy], params, _pw(auth))


def parse_create_primary(data: bytes) -> CreatePrimaryResult:
    resp = parse_response(CC.CreatePrimary, data)
    r = resp.reader()
    public = r.tpm2b()
    r.tpm2b()  # creationData
    r.tpm2b()  # creationHash
    r.u16()  # creationTicket.tag
    r.u32()  # creationTicket.hierarchy
    r.tpm2b()  # creationTicket.digest
    name = r.tpm2b()
    r.end()
    return CreatePrimaryResult(resp.handles[0], public, name)


def create_primary(
    transact: Transact,
    hierarchy: int,
    template: Public | bytes,
    *,
    auth: bytes = b"",
    key_auth: bytes = b"",
    sensitive_data: bytes = b"",
    outside_info: bytes = b"",
    creation_pcrs: Mapping[int, Iterable[int]] | None = None,
) -> CreatePrimaryResult:
    cmd = build_create_primary(
        hierarchy,
        template,
        auth=auth,
        key_auth=key_auth,
        sensitive_data=sensitive_data,
        outside_info=outside_info,
        creation_pcrs=creation_pcrs,
    )
    return parse_create_primary(transact(cmd))


def build_evict_control(
    object_handle: int, persistent_handle: int, *, auth_handle: int = RH_OWNER, auth: bytes = b""
) -> bytes:
    return build_command(
        CC.EvictControl, [auth_handle, object_handle], u32(persistent_handle), _pw(auth)
    )


def evict_control(
    transact: Transact,
    object_handle: int,
    persistent_handle: int,
    *,
    auth_handle: int = RH_OWNER,
    auth: bytes = b"",
) -> None:
    """Persist a transient object, or (object == persistent handle) remove a persistent one."""
    execute(
        transact, CC.EvictControl, [auth_handle, object_handle], u32(persistent_handle), _pw(auth)
    )


def build_flush_context(handle: int) -> bytes:
    return build_command(CC.FlushContext, params=u32(handle))


def flush_context(transact: Transact, handle: int) -> None:
    execute(transact, CC.FlushContext, params=u32(handle))


@dataclass(frozen=True)
class NvPublic:
    """TPMS_NV_PUBLIC plus the index's Name."""

    index: int
    name_alg: int
    attributes: int
    auth_policy: bytes
    data_size: int
    name: bytes = b""

    def marshal(self) -> bytes:
        return (
            u32(self.index)
            + u16(self.name_alg)
            + u32(self.attributes)
            + tpm2b(self.auth_policy)
            + u16(self.data_size)
        )


def build_nv_define_space(
    public: NvPublic, *, auth_handle: int = RH_OWNER, auth: bytes = b"", index_auth: bytes = b""
) -> bytes:
    params = tpm2b(index_auth) + tpm2b(public.marshal())
    return build_command(CC.NV_DefineSpace, [auth_handle], params, _pw(auth))


def nv_define_space(
    transact: Transact,
    public: NvPublic,
    *,
    auth_handle: int = RH_OWNER,
    auth: bytes = b"",
    index_auth: bytes = b"",
) -> None:
    cmd = build_nv_define_space(public, auth_handle=auth_handle, auth=auth, index_auth=index_auth)
    parse_response(CC.NV_DefineSpace, transact(cmd))


def build_nv_undefine_space(
    nv_index: int, *, auth_handle: int = RH_OWNER, auth: bytes = b""
) -> bytes:
    return build_command(CC.NV_UndefineSpace, [auth_handle, nv_index], b"", _pw(auth))


def nv_undefine_space(
    transact: Transact, nv_index: int, *, auth_handle: int = RH_OWNER, auth: bytes = b""
) -> None:
    cmd = build_nv_undefine_space(nv_index, auth_handle=auth_handle, auth=auth)
    parse_response(CC.NV_UndefineSpace, transact(cmd))


def build_nv_read_public(nv_index: int) -> bytes:
    return build_command(CC.NV_ReadPublic, [nv_index])


def parse_nv_read_public(data: bytes) -> NvPublic:
    r = parse_response(CC.NV_ReadPublic, data).reader()
    inner = Reader(r.tpm2b())
    index, name_alg, attrs = inner.u32(), inner.u16(), inner.u32()
    policy, size = inner.tpm2b(), inner.u16()
    inner.end()
    name = r.tpm2b()
    r.end()
    return NvPublic(index, name_alg, attrs, policy, size, name)


def nv_read_public(transact: Transact, nv_index: int) -> NvPublic:
    return parse_nv_read_public(transact(build_nv_read_public(nv_index)))


def build_nv_write(
    nv_index: int,
    data: bytes,
    offset: int = 0,
    *,
    auth_handle: int | None = None,
    auth: bytes = b"",
) -> bytes:
    """One NV_Write; ``data`` must fit the TPM's NV buffer (see nv_write)."""
    ah = nv_index if auth_handle is None else auth_handle
    return build_command(CC.NV_Write, [ah, nv_index], tpm2b(data) + u16(offset), _pw(auth))


def _nv_chunk(transact: Transact, chunk: int | None) -> int:
    if chunk is not None:
        return chunk
    # 1024 is libtpms' value and a safe floor for any TPM that hides the property
    return get_property(transact, PT.NV_BUFFER_MAX) or 1024


def nv_write(
    transact: Transact,
    nv_index: int,
    data: bytes,
    offset: int = 0,
    *,
    auth_handle: int | None = None,
    auth: bytes = b"",
    chunk: int | None = None,
) -> None:
    """Write ``data`` in pieces no larger than the TPM's NV buffer."""
    step = _nv_chunk(transact, chunk)
    pos = 0
    while True:
        piece = data[pos : pos + step]
        cmd = build_nv_write(nv_index, piece, offset + pos, auth_handle=auth_handle, auth=auth)
        parse_response(CC.NV_Write, transact(cmd))
        pos += len(piece)
        if pos >= len(data):
            return


def build_nv_read(
    nv_index: int,
    size: int,
    offset: int = 0,
    *,
    auth_handle: int | None = None,
    auth: bytes = b"",
) -> bytes:
    ah = nv_index if auth_handle is None else auth_handle
    return build_command(CC.NV_Read, [ah, nv_index], u16(size) + u16(offset), _pw(auth))


def parse_nv_read(data: bytes) -> bytes:
    r = parse_response(CC.NV_Read, data).reader()
    out = r.tpm2b()
    r.end()
    return out


def nv_read(
    transact: Transact,
    nv_index: int,
    size: int | None = None,
    offset: int = 0,
    *,
    auth_handle: int | None = None,
    auth: bytes = b"",
    chunk: int | None = None,
) -> bytes:
    """Read ``size`` bytes (default: to the end of the index) in NV-buffer pieces."""
    if size is None:
        size = nv_read_public(transact, nv_index).data_size - offset
    step = _nv_chunk(transact, chunk)
    out = b""
    while len(out) < size:
        n = min(step, size - len(out))
        cmd = build_nv_read(nv_index, n, offset + len(out), auth_handle=auth_handle, auth=auth)
        piece = parse_nv_read(transact(cmd))
        if len(piece) != n:
            raise MalformedResponse(f"NV_Read returned {len(piece)} bytes, asked for {n}")
        out += piece
    return out


def build_nv_write_lock(
    nv_index: int, *, auth_handle: int | None = None, auth: bytes = b""
) -> bytes:
    ah = nv_index if auth_handle is None else auth_handle
    return build_command(CC.NV_WriteLock, [ah, nv_index], b"", _pw(auth))


def nv_write_lock(
    transact: Transact, nv_index: int, *, auth_handle: int | None = None, auth: bytes = b""
) -> None:
    cmd = build_nv_write_lock(nv_index, auth_handle=auth_handle, auth=auth)
    parse_response(CC.NV_WriteLock, transact(cmd))


@dataclass(frozen=True)
class PcrReadResult:
    update_counter: int
    selection: Mapping[int, list[int]]
    digests: tuple[bytes, ...]


def build_pcr_read(selection: Mapping[int, Iterable[int]]) -> bytes:
    return build_command(CC.PCR_Read, params=marshal_pcr_selection(selection))


def parse_pcr_read(data: bytes) -> PcrReadResult:
    r = parse_response(CC.PCR_Read, data).reader()
    counter = r.u32()
    sel = read_pcr_selection(r)
    digests = tuple(r.tpm2b() for _ in range(r.u32()))
    r.end()
    return PcrReadResult(counter, sel, digests)


def pcr_read(
    transact: Transact, selection: Mapping[int, Iterable[int]]
) -> dict[int, dict[int, bytes]]:
    """{hash alg: {pcr: digest}}; loops because the TPM returns at most 8 digests a call.

    PCRs of inactive banks are simply absent from the result.
    """
    pending = {alg: sorted(set(p)) for alg, p in selection.items()}
    out: dict[int, dict[int, bytes]] = {alg: {} for alg in pending}
    while any(pending.values()):
        res = parse_pcr_read(transact(build_pcr_read({a: p for a, p in pending.items() if p})))
        pairs = [(a, p) for a, ps in res.selection.items() for p in ps]
        if not pairs:
            break
        if len(pairs) != len(res.digests):
            raise MalformedResponse("PCR_Read: selection and digest counts differ")
        for (alg, pcr), digest in zip(pairs, res.digests, strict=True):
            out.setdefault(alg, {})[pcr] = digest
            if pcr in pending.get(alg, []):
                pending[alg].remove(pcr)
    return {alg: values for alg, values in out.items() if values}


def build_pcr_allocate(
    selection: Mapping[int, Iterable[int]], *, auth_handle: int = RH_PLATFORM, auth: bytes = b""
) -> bytes:
    return build_command(
        CC.PCR_Allocate, [auth_handle], marshal_pcr_selection(selection), _pw(auth)
    )


def pcr_allocate(
    transact: Transact,
    selection: Mapping[int, Iterable[int]],
    *,
    auth_handle: int = RH_PLATFORM,
    auth: bytes = b"",
) -> bool:
    """Choose the active PCR banks (effective after the next TPM reset); False if refused."""
    r = execute(
        transact, CC.PCR_Allocate, [auth_handle], marshal_pcr_selection(selection), _pw(auth)
    ).reader()
    ok = bool(r.u8())
    r.u32()  # maxPCR
    r.u32()  # sizeNeeded
    r.u32()  # sizeAvailable
    return ok
