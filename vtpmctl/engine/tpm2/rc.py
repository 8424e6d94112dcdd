"""TPM 2.0 response codes: names for humans and the exceptions that carry them."""

from __future__ import annotations

from enum import IntEnum

from vtpmctl.engine.tpm2.constants import CC
from vtpmctl.errors import EngineError, TpmResultError

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


class TpmError(TpmResultError):
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


class MalformedResponse(EngineError, ValueError):
    """The response bytes do not have the shape the command promises."""
