"""Big-endian marshalling and the command/response frame around every command."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from vtpmctl.engine.tpm2.constants import (
    CC,
    RS_PW,
    ST_NO_SESSIONS,
    ST_SESSIONS,
)
from vtpmctl.engine.tpm2.power import frame
from vtpmctl.engine.tpm2.rc import MalformedResponse, TpmError

Transact = Callable[[bytes], bytes]
"""Send one complete TPM command, return its complete response."""


@dataclass(frozen=True)
class Shape:
    """Where a command keeps its handles; the rest of the bytes are parameters.

    Here rather than in ``constants``, which the engine imports: no dataclass there.
    """

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
    return frame(ST_SESSIONS if auths else ST_NO_SESSIONS, cc, body)


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
