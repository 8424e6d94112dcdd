"""Robustness of our server's control and data sockets against hostile or broken clients.

Bounded and reproducible: a fixed seed and a few hundred cases. After every case the
server must have answered per the protocol spec or dropped only that connection; a fresh
control connection still gets the right capabilities and the data channel still answers
TPM2_GetRandom.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from rawsock import Reply, connect, read_exact, read_reply, send_with_fds

SEED = 0x5EED_7E57
RANDOM_CASES = 250
CAPS_REPLY = bytes.fromhex("00000000 0001ffff")
GET_RANDOM = bytes.fromhex("80010000000c0000017b0010")  # TPM2_GetRandom(16)
TPM2_STARTUP_CLEAR = bytes.fromhex("80010000000c000001440000")

# Success reply sizes per control code (docs/protocol.md#control-commands);
# None: variable (the header says).
SUCCESS_SIZE: dict[int, int | None] = {
    0x01: 8,
    0x02: 4,
    0x03: 4,
    0x04: 8,
    0x05: 4,
    0x06: 4,
    0x07: 4,
    0x08: 4,
    0x09: 4,
    0x0A: 4,
    0x0B: 4,
    0x0C: None,
    0x0D: 4,
    0x0E: 4,
    0x0F: 8,
    0x10: 4,
    0x11: 16,
    0x12: None,
    0x13: 4,
}
# Request bytes after the code that the server waits for (docs/protocol.md#socket-framing).
WAITS_FOR = {0x02: 4, 0x05: 1, 0x0B: 1, 0x0C: 12, 0x07: 4, 0x0D: 12}
SHUTDOWN = 0x03


def u32(value: int) -> bytes:
    return value.to_bytes(4, "big")


def reply_is_valid(code: int, data: bytes) -> bool:
    """``data`` is exactly one well-formed reply to control command ``code``."""
    if code not in SUCCESS_SIZE:
        return data == u32(0x0A)
    if code == 0x01:
        return data == CAPS_REPLY
    if len(data) < 4:
        return False
    rc = int.from_bytes(data[:4], "big")
    if rc >= 0x1000 and rc != 0x800:
        return False
    if code == 0x0C:
        if len(data) == 4:
            return rc in (0x03, 0x0A)
        if len(data) < 16:
            return False
        total, length = int.from_bytes(data[8:12], "big"), int.from_bytes(data[12:16], "big")
        return total == length == len(data) - 16 and (rc == 0 or length == 0)
    if code == 0x12 and rc == 0:
        return len(data) >= 12 and int.from_bytes(data[8:12], "big") == len(data) - 12
    if rc == 0:
        return len(data) == SUCCESS_SIZE[code]
    return len(data) == 4


def first_reply_length(code: int, data: bytes) -> int:
    """Length of the reply to ``code`` at the start of ``data`` (which may hold more)."""
    if len(data) < 4:
        return len(data)
    rc = int.from_bytes(data[:4], "big")
    if code not in SUCCESS_SIZE:
        return 4
    if code == 0x0C:
        return (
            4 if len(data) < 16 or rc in (0x03, 0x0A) else 16 + int.from_bytes(data[12:16], "big")
        )
    if code == 0x12 and rc == 0 and len(data) >= 12:
        return 12 + int.from_bytes(data[8:12], "big")
    size = SUCCESS_SIZE[code]
    return size if rc == 0 and size is not None else 4


def replies_are_valid(code: int, data: bytes, sent: int) -> bool:
    """One reply to ``code``; beyond the server's first read (4104 bytes) the rest of the
    message is read as further commands, whose replies are plain 4-byte results here."""
    n = first_reply_length(code, data)
    first, rest = data[:n], data[n:]
    if not reply_is_valid(code, first):
        return False
    if rest and sent <= 4104:
        return False
    return len(rest) % 4 == 0 and all(
        int.from_bytes(rest[i : i + 4], "big") < 0x1000 for i in range(0, len(rest), 4)
    )


def tpm_response_is_valid(data: bytes) -> bool:
    return (
        len(data) >= 10
        and data[:2] in (b"\x80\x01", b"\x80\x02", b"\x00\xc4")
        and int.from_bytes(data[2:6], "big") == len(data)
    )


@dataclass
class Case:
    """Bytes to send on a fresh control connection, and what to accept back."""

    name: str
    parts: list[bytes]
    fds: list[int] = field(default_factory=list)
    hang_up: bool = False  # close our end right after sending
    expect: bytes | None = None  # exact reply, when known
    code: int | None = None  # validate as one reply to this code (default: first 4 bytes)
    may_drop: bool = False  # the server may close the connection (with or without a reply)
    wait: float = 1.0


def control_cases(rng: random.Random) -> Iterator[Case]:
    known = [c for c in SUCCESS_SIZE if c != SHUTDOWN]
    # Unknown codes, with and without a body.
    for _ in range(30):
        code = rng.choice([0, 0x14, 0x15, 0xFF, 0x100, 0xFFFF, rng.getrandbits(32)])
        if code in SUCCESS_SIZE:
            continue
        yield Case(
            f"unknown-{code:x}", [u32(code) + rng.randbytes(rng.randrange(0, 40))], expect=u32(0x0A)
        )
    # Exact-length commands with extra bytes: TPM_BAD_PARAMETER.
    for code in (0x03, 0x04, 0x06, 0x08, 0x09, 0x0A, 0x0E, 0x0F):
        yield Case(f"extra-bytes-{code:x}", [u32(code) + b"\0" * rng.randrange(1, 9)], code=code)
    # Truncated bodies: the server waits up to 500 ms, then drops without a reply.
    for code, need in WAITS_FOR.items():
        yield Case(
            f"truncated-{code:x}",
            [u32(code) + b"\0" * rng.randrange(0, need)],
            expect=b"",
            may_drop=True,
        )
    # Truncated, and the client hangs up: nothing to answer.
    for code, need in WAITS_FOR.items():
        yield Case(f"hang-up-{code:x}", [u32(code) + b"\0" * rng.randrange(0, need)], hang_up=True)
    yield Case("hang-up-after-2-bytes", [b"\0\0"], hang_up=True)
    yield Case(
        "hang-up-mid-blob", [u32(0x0D) + u32(0) + u32(1) + u32(5000) + b"x" * 100], hang_up=True
    )
    yield Case("hang-up-mid-hash", [u32(0x07) + u32(100000) + b"x" * 5000], hang_up=True)
    # Oversized.
    yield Case(
        "set-stateblob-over-512k",
        [u32(0x0D) + u32(0) + u32(1) + u32(512 * 1024 + 1)],
        expect=u32(0x09),
        may_drop=True,
    )
    yield Case(
        "set-stateblob-4g",
        [u32(0x0D) + u32(0) + u32(1) + u32(0xFFFFFFFF)],
        expect=u32(0x09),
        may_drop=True,
    )
    yield Case(
        "hash-data-8k",
        [u32(0x06), u32(0x07) + u32(8192) + rng.randbytes(8192), u32(0x08)],
        code=0x08,
    )
    yield Case("hash-data-1m", [u32(0x07) + u32(1 << 20) + rng.randbytes(1 << 20)], code=0x07)
    yield Case("get-info-all-flags", [u32(0x12) + (0xFF).to_bytes(8, "big") + u32(0) + u32(0)])
    # Pipelined: the server answers the first command; the rest of that read is discarded.
    yield Case("pipelined-caps", [u32(0x01) * 3], expect=CAPS_REPLY)
    yield Case("pipelined-config-caps", [u32(0x0F) + u32(0x01)], expect=u32(0x03))
    yield Case("pipelined-locality-caps", [u32(0x05) + b"\0" + u32(0x01)], expect=u32(0))
    # Known codes with random bodies, and pure garbage.
    for i in range(RANDOM_CASES):
        if i % 2:
            body = rng.randbytes(rng.choice([0, 1, 3, 4, 8, 12, 16, 40, 300, 5000]))
            yield Case(f"random-known-{i}", [u32(rng.choice(known)) + body], may_drop=True)
        else:
            yield Case(f"garbage-{i}", [rng.randbytes(rng.randrange(1, 6000))], may_drop=True)


class Harness:
    """Our server with only a control socket; the data channel arrives by SET_DATAFD."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.data: socket.socket | None = None
        self.attach_data_channel()

    def ctrl(self, request: bytes, size: int, fds: list[int] | None = None) -> bytes:
        with connect(self.server.ctrl) as sock:
            send_with_fds(sock, request, fds or [])
            return read_exact(sock, size)

    def attach_data_channel(self) -> None:
        mine, theirs = socket.socketpair()
        deadline = time.monotonic() + 5
        while True:  # the server notices a closed channel in its own thread
            rc = self.ctrl(u32(0x10), 4, [theirs.fileno()])
            if rc != u32(0x1F) or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        theirs.close()
        assert rc == u32(0), rc.hex()
        self.data = mine

    def tpm(self, command: bytes) -> bytes:
        assert self.data is not None
        self.data.settimeout(5)
        self.data.sendall(command)
        head = read_exact(self.data, 10)
        return head + read_exact(self.data, int.from_bytes(head[2:6], "big") - 10)

    def assert_healthy(self) -> None:
        assert self.server.running, self.server.log_text()[-2000:]
        assert self.ctrl(u32(0x01), 8) == CAPS_REPLY
        resp = self.tpm(GET_RANDOM)
        assert tpm_response_is_valid(resp)
        if resp[6:10] != b"\0\0\0\0":  # a case stopped or re-initialised the TPM
            assert self.ctrl(u32(0x02) + u32(0), 4) == u32(0)
            assert self.tpm(TPM2_STARTUP_CLEAR)[6:10] == b"\0\0\0\0"
            resp = self.tpm(GET_RANDOM)
        assert resp[6:10] == b"\0\0\0\0" and len(resp) == 10 + 2 + 16


@pytest.fixture
def harness(
    vtpm_server: Callable[..., Any], manufactured: Callable[[bool, Path], Path], tmp_path: Path
) -> Harness:
    server = vtpm_server(
        manufactured(True, tmp_path / "state"), data=None, flags="not-need-init,startup-clear"
    )
    return Harness(server)


def run_case(h: Harness, case: Case) -> Reply:
    sock = connect(h.server.ctrl)
    try:
        for i, part in enumerate(case.parts):
            send_with_fds(sock, part, case.fds if i == 0 else [])
            if i < len(case.parts) - 1:
                reply = read_reply(sock, case.wait, idle=0.005)
                assert reply_is_valid(int.from_bytes(part[:4], "big"), reply.data), reply
        if case.hang_up:
            return Reply(b"", True)
        return read_reply(sock, case.wait, idle=0.005)
    finally:
        sock.close()


def check_reply(case: Case, reply: Reply) -> None:
    if case.expect is not None:
        assert reply.data == case.expect, (case.name, reply)
        assert reply.closed == case.may_drop or not reply.closed, (case.name, reply)
        return
    if case.hang_up:
        return
    code = (
        case.code
        if case.code is not None
        else int.from_bytes(case.parts[-1][:4].rjust(4, b"\0"), "big")
    )
    if (
        reply.closed
        and case.may_drop
        and (not reply.data or replies_are_valid(code, reply.data, len(case.parts[-1])))
    ):
        return
    assert not reply.closed, (case.name, reply)
    if len(case.parts[-1]) < 4:  # still waiting for a whole code: nothing to say
        assert reply.data == b"", (case.name, reply)
        return
    assert replies_are_valid(code, reply.data, len(case.parts[-1])), (case.name, reply)


def test_control_socket_fuzz(harness: Harness) -> None:
    rng = random.Random(SEED)
    started = time.monotonic()
    count = 0
    for case in control_cases(rng):
        reply = run_case(harness, case)
        check_reply(case, reply)
        harness.assert_healthy()
        count += 1
    assert count > 250
    assert time.monotonic() - started < 30


def test_set_datafd_variants(harness: Harness) -> None:
    """Without fd, with a channel already active, with two fds, with a non-socket fd."""
    a, b = socket.socketpair()
    assert harness.ctrl(u32(0x10), 4) == u32(0x1F)  # active channel is checked first
    assert harness.ctrl(u32(0x10), 4, [a.fileno()]) == u32(0x1F)
    assert harness.data is not None
    harness.data.close()
    harness.data = None
    deadline = time.monotonic() + 5
    while (rc := harness.ctrl(u32(0x10), 4)) == u32(0x1F) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rc == u32(0x03)  # no channel, no fd: TPM_BAD_PARAMETER
    r, w = os.pipe()
    assert harness.ctrl(u32(0x10), 4, [r]) == u32(0x1F)  # not a socket
    os.close(r)
    os.close(w)
    # Two fds: the first becomes the data channel, the second is closed by the server.
    first_mine, first_theirs = socket.socketpair()
    second_mine, second_theirs = socket.socketpair()
    assert harness.ctrl(u32(0x10), 4, [first_theirs.fileno(), second_theirs.fileno()]) == u32(0)
    first_theirs.close()
    second_theirs.close()
    second_mine.settimeout(5)
    assert second_mine.recv(1) == b""
    harness.data = first_mine
    harness.assert_healthy()
    for sock in (a, b, second_mine):
        sock.close()


# ---------------------------------------------------------------- data socket


def data_cases(rng: random.Random) -> Iterator[tuple[str, bytes, bool]]:
    """(name, bytes, hang up after sending)."""
    yield "short-header-hang-up", GET_RANDOM[:5], True
    yield "header-only", GET_RANDOM[:10], False
    yield "size-says-more", GET_RANDOM[:2] + u32(4000) + GET_RANDOM[6:], False
    yield "size-says-less", GET_RANDOM[:2] + u32(10) + GET_RANDOM[6:], False
    yield "size-zero", GET_RANDOM[:2] + u32(0) + GET_RANDOM[6:], False
    yield "oversized-5000", GET_RANDOM[:2] + u32(5000) + GET_RANDOM[6:] + bytes(4988), False
    yield "oversized-4105", GET_RANDOM[:2] + u32(4105) + GET_RANDOM[6:] + bytes(4093), False
    yield "oversized-hang-up", GET_RANDOM[:2] + u32(9000) + bytes(9000), True
    yield "tpm12-tag", bytes.fromhex("00c10000000a00000065"), False
    yield "send-command-frame-garbage", u32(8) + b"\x07" + u32(0xFFFFFFFF) + b"\0" * 5, False
    yield "vendor-set-locality", bytes.fromhex("80010000000b2000100003"), False
    for i in range(60):
        size = rng.choice([10, 11, 12, 20, 100, 1000, 4096, 4106, 8000, 8192])
        yield f"garbage-{i}", rng.randbytes(size), rng.random() < 0.3


def test_data_socket_fuzz(
    vtpm_server: Callable[..., Any], manufactured: Callable[[bool, Path], Path], tmp_path: Path
) -> None:
    server = vtpm_server(
        manufactured(True, tmp_path / "state"), flags="not-need-init,startup-clear"
    )
    rng = random.Random(SEED + 1)
    started = time.monotonic()
    for name, payload, hang_up in data_cases(rng):
        with connect(server.data) as sock:
            sock.sendall(payload)
            if not hang_up:
                reply = read_reply(sock, first_wait=2.0, idle=0.01)
                # Responses only ever come whole; an oversized command may get several.
                data = reply.data
                while data:
                    if data[:2] == b"\0\0":  # TPM_SEND_COMMAND framing: length, resp, 0
                        size = int.from_bytes(data[:4], "big")
                        assert data[4 + size : 8 + size] == bytes(4), (name, reply)
                        data = data[4 : 4 + size] + data[8 + size :]
                    size = int.from_bytes(data[2:6], "big")
                    assert tpm_response_is_valid(data[:size]), (name, reply)
                    data = data[size:]
        with connect(server.data) as sock:
            sock.sendall(GET_RANDOM)
            head = read_exact(sock, 10)
            assert head[6:10] == b"\0\0\0\0", (name, head.hex())
            read_exact(sock, int.from_bytes(head[2:6], "big") - 10)
        with connect(server.ctrl) as sock:
            sock.sendall(u32(0x01))
            assert read_exact(sock, 8) == CAPS_REPLY
    assert server.running
    assert time.monotonic() - started < 30


def test_hash_data_stream_is_not_buffered(
    vtpm_server: Callable[..., Any], manufactured: Callable[[bool, Path], Path], tmp_path: Path
) -> None:
    """A HASH_DATA that announces 4 GiB and streams 64 MiB: hashed as it comes, in
    constant memory and linear time (swtpm reads it in 4 KiB pieces)."""
    server = vtpm_server(
        manufactured(True, tmp_path / "state"), flags="not-need-init,startup-clear"
    )
    pid = server.proc.pid

    def rss_kib() -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    before = rss_kib()
    chunk = bytes(1 << 20)
    started = time.monotonic()
    with connect(server.ctrl) as sock:
        sock.sendall(u32(0x06))
        assert read_exact(sock, 4) == u32(0)
        sock.sendall(u32(0x07) + u32(0xFFFFFFFF))
        for _ in range(64):
            sock.sendall(chunk)
    elapsed = time.monotonic() - started
    with connect(server.ctrl) as sock:
        sock.sendall(u32(0x01))
        assert read_exact(sock, 8) == CAPS_REPLY
    assert rss_kib() - before < 16 * 1024
    assert elapsed < 15
