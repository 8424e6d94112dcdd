"""The CUSE frontend without a kernel: wire layouts, chunk assembly, and the
request handling driven through a SOCK_SEQPACKET pair that stands in for
/dev/cuse (one message per read and per write, like the real channel)."""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vtpmctl.device.protocol import (
    CAPS_CUSE,
    MESSAGES,
    STATE_BLOB_CHUNK,
    TPM2_SHORT_WRITE_RESPONSE,
    BlobType,
    Cmd,
    Res,
    decode_ioctl_response,
    encode_ioctl_request,
    ioctl_sizes,
)
from vtpmctl.device.server.cuse import wire
from vtpmctl.device.server.cuse.blobs import BlobDownload, BlobUpload
from vtpmctl.device.server.cuse.server import is_long_command
from vtpmctl.device.server.cuse.wire import (
    CUSE_INIT_IN,
    CUSE_INIT_OUT,
    IN_HEADER,
    IOCTL_IN,
    OUT_HEADER,
    POLL_IN,
    RW_IN,
    CuseError,
    Op,
    ReplyError,
    device_name,
    encode_init_reply,
    lookup_ioctl,
)
from vtpmctl.engine import tpm2

# ---------------------------------------------------------------- pure parts


def test_struct_sizes_match_the_kernel() -> None:
    sizes = {
        n: getattr(wire, n).size
        for n in (
            "IN_HEADER",
            "OUT_HEADER",
            "CUSE_INIT_IN",
            "CUSE_INIT_OUT",
            "OPEN_IN",
            "OPEN_OUT",
            "RW_IN",
            "WRITE_OUT",
            "RELEASE_IN",
            "IOCTL_IN",
            "IOCTL_OUT",
            "POLL_IN",
            "POLL_OUT",
            "INTERRUPT_IN",
            "NOTIFY_POLL_OUT",
        )
    }
    assert sizes == {
        "IN_HEADER": 40,
        "OUT_HEADER": 16,
        "CUSE_INIT_IN": 16,
        "CUSE_INIT_OUT": 72,
        "OPEN_IN": 8,
        "OPEN_OUT": 16,
        "RW_IN": 40,
        "WRITE_OUT": 8,
        "RELEASE_IN": 24,
        "IOCTL_IN": 32,
        "IOCTL_OUT": 16,
        "POLL_IN": 24,
        "POLL_OUT": 8,
        "INTERRUPT_IN": 8,
        "NOTIFY_POLL_OUT": 8,
    }


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("x", "vtpm-x"),
        ("vtpm-x", "vtpm-x"),
        ("vm1.tpm_0", "vtpm-vm1.tpm_0"),
        ("vtpm-vtpm-a", "vtpm-vtpm-a"),
    ],
)
def test_device_name(name: str, expected: str) -> None:
    assert device_name(name) == expected


@pytest.mark.parametrize("name", ["", "vtpm-", "a/b", "../x", "-x", "a b", "x" * 64, "é"])
def test_device_name_rejects(name: str) -> None:
    with pytest.raises(CuseError):
        device_name(name)


def test_init_reply_layout() -> None:
    reply = encode_init_reply(7, 7, 38, "vtpm-x")
    info = b"DEVNAME=vtpm-x\0"
    length, error, unique = OUT_HEADER.unpack_from(reply)
    assert (length, error, unique) == (16 + 72 + len(info), 0, 7) == (len(reply), 0, 7)
    major, minor, _unused, flags, max_read, max_write, dmaj, dmin = CUSE_INIT_OUT.unpack_from(
        reply, 16
    )
    assert (major, minor, flags, dmaj, dmin) == (7, 31, 0, 0, 0)  # restricted, dynamic major
    assert max_read >= 4096 and max_write >= 4096
    assert reply[16 + 72 :] == info
    assert CUSE_INIT_OUT.unpack_from(encode_init_reply(1, 7, 20, "vtpm-x"), 16)[1] == 20
    with pytest.raises(CuseError):
        encode_init_reply(1, 7, 10, "vtpm-x")
    with pytest.raises(CuseError):
        encode_init_reply(1, 8, 38, "vtpm-x")


def test_ioctl_numbers_and_sizes() -> None:
    # Numbers from docs/protocol.md#cuse (x86-64), sizes from the _IOC encoding.
    assert MESSAGES[Cmd.GET_CAPABILITY].ioctl == 0x80085000
    assert ioctl_sizes(0x80085000) == (0, 8)
    assert ioctl_sizes(0xC0045001) == (4, 4)
    assert ioctl_sizes(0xCC10500B) == (3088, 3088)
    assert ioctl_sizes(0xCC0C500C) == (3084, 3084)
    assert ioctl_sizes(0xD0045006) == (4100, 4100)
    for msg in MESSAGES.values():
        if msg.cmd != Cmd.SET_DATAFD:
            assert lookup_ioctl(msg.ioctl, *ioctl_sizes(msg.ioctl)) == msg.cmd


@pytest.mark.parametrize(
    ("request_", "err"),
    [
        (0xC0045099, errno.ENOTTY),  # unknown nr
        (0x80085100, errno.ENOTTY),  # another magic
        (0xC0025001, errno.EINVAL),  # PTM_INIT with a 2-byte buffer
        (0x40045001, errno.EINVAL),  # PTM_INIT as _IOW
        (0xCC0C5011, errno.EINVAL),  # a 32-bit caller's GET_INFO
        (0x8004500F, errno.ENOTTY),  # SET_DATAFD: not on a device
    ],
)
def test_lookup_ioctl_errors(request_: int, err: int) -> None:
    with pytest.raises(ReplyError) as info:
        lookup_ioctl(request_, *ioctl_sizes(request_))
    assert info.value.errno == err


def test_long_commands() -> None:
    assert is_long_command(bytes.fromhex("8002 0000 0040 00000131"), True)
    assert not is_long_command(bytes.fromhex("8001 0000 000c 0000017b 0010"), True)
    assert is_long_command(bytes.fromhex("00c2 0000 0040 0000000d"), False)
    assert not is_long_command(b"\x80\x01", True)


def _chunks(blob: bytes) -> list[bytes]:
    """The chunks a CUSE client sends: 3072 each, then a short (maybe empty) one."""
    out = [blob[i : i + STATE_BLOB_CHUNK] for i in range(0, len(blob), STATE_BLOB_CHUNK)]
    if len(blob) % STATE_BLOB_CHUNK == 0:
        out.append(b"")
    return out


@pytest.mark.parametrize("size", [1, 100, 3071, 3072, 3073, 6143, 6144, 6145, 3 * 3072])
def test_upload_reassembles_chunks(size: int) -> None:
    blob = os.urandom(size)
    up = BlobUpload()
    results = [up.chunk(BlobType.PERMANENT, 0, c) for c in _chunks(blob)]
    assert results[:-1] == [None] * (len(results) - 1)
    assert results[-1] == blob
    assert not up.active


def test_upload_streaming_and_type_switch() -> None:
    up = BlobUpload()
    assert up.chunk(BlobType.VOLATILE, 0, b"") is None
    assert up.streaming
    up.write(b"abc")
    up.write(b"def")
    assert up.chunk(BlobType.VOLATILE, 0, b"") == b"abcdef"
    assert not up.streaming
    # A partial transfer of one type is dropped when another type begins.
    assert up.chunk(BlobType.PERMANENT, 0, b"x" * STATE_BLOB_CHUNK) is None
    assert up.chunk(BlobType.VOLATILE, 0, b"short") == b"short"


def test_download_chunks_and_read_mode() -> None:
    sent: list[int] = []
    blob = bytes(range(256)) * 25  # 6400 bytes
    d = BlobDownload(1, 1, blob, 0, after_send=lambda: sent.append(1))
    assert d.chunk(0) == blob[:3072] and d.read_pos == 3072
    assert d.take_after_send() is None
    assert d.read(1000) == blob[3072:4072] and d.read_pos == 4072
    assert d.read(4096) == blob[4072:] and d.read_pos is None  # short read ends the mode
    action = d.take_after_send()
    assert action is not None
    action()
    assert d.take_after_send() is None and sent == [1]
    d2 = BlobDownload(1, 1, blob, 0)
    assert d2.chunk(3072) == blob[3072:6144] and d2.chunk(6144) == blob[6144:]
    assert d2.read_pos is None and d2.sent_all


# ---------------------------------------------------------------- request handling


# The server runs in a child process: libtpms holds one TPM per process.
_CHILD = """
import sys
from pathlib import Path
from vtpmctl.device.server.cuse.server import CuseServer
from vtpmctl.engine.tpm import Engine, EngineConfig
from vtpmctl.store.statedir import StateDir
statedir = StateDir(Path(sys.argv[1]), tpm2=True)
statedir.ensure()
engine = Engine(statedir, EngineConfig(tpm2=True, transport="cuse"))
engine.start()
server = CuseServer(engine, "unit", fd=int(sys.argv[2]), wait_for_node=False)
try:
    server.serve_forever()
finally:
    engine.close()
print("exit_message:", server.exit_message, flush=True)
"""


class FakeKernel:
    """The kernel side of the CUSE channel, for one server on a real engine."""

    def __init__(self, state_dir: Path) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(60)
        self._unique = 100
        self.notified: list[int] = []
        self.sock.send(
            IN_HEADER.pack(56, Op.CUSE_INIT, 2, 0, 0, 0, 0, 0, 0) + CUSE_INIT_IN.pack(7, 38, 0, 1)
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(state_dir), str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        theirs.close()
        self.init_reply = self.sock.recv(65536)

    def send(self, opcode: int, body: bytes, unique: int | None = None) -> int:
        if unique is None:
            self._unique += 2
            unique = self._unique
        self.sock.send(IN_HEADER.pack(40 + len(body), opcode, unique, 0, 0, 0, 1, 0, 0) + body)
        return unique

    def recv(self) -> tuple[int, int, bytes]:
        """The next reply; poll notifications are collected on the way."""
        while True:
            msg = self.sock.recv(1 << 20)
            length, error, unique = OUT_HEADER.unpack_from(msg)
            assert length == len(msg)
            if unique:
                return unique, -error, msg[16:]  # the errno, positive
            assert error == 1  # FUSE_NOTIFY_POLL
            self.notified.append(struct.unpack("=Q", msg[16:])[0])

    def call(self, opcode: int, body: bytes) -> tuple[int, bytes]:
        unique = self.send(opcode, body)
        got, error, payload = self.recv()
        assert got == unique
        return error, payload

    # requests

    def open(self, flags: int = os.O_RDWR) -> tuple[int, int]:
        error, body = self.call(Op.OPEN, struct.pack("=II", flags, 0))
        return error, (struct.unpack_from("=Q", body)[0] if not error else 0)

    def release(self, fh: int) -> None:
        assert self.call(Op.RELEASE, struct.pack("=QIIQ", fh, 0, 0, 0))[0] == 0

    def write(self, fh: int, data: bytes) -> tuple[int, int]:
        error, body = self.call(Op.WRITE, RW_IN.pack(fh, 0, len(data), 0, 0, 0, 0) + data)
        return error, (struct.unpack("=II", body)[0] if not error else 0)

    def read_request(self, fh: int, size: int = 4096, flags: int = os.O_RDWR) -> int:
        return self.send(Op.READ, RW_IN.pack(fh, 0, size, 0, 0, flags, 0))

    def read(self, fh: int, size: int = 4096, flags: int = os.O_RDWR) -> tuple[int, bytes]:
        unique = self.read_request(fh, size, flags)
        got, error, body = self.recv()
        assert got == unique
        return error, body

    def ioctl(
        self, fh: int, request: int, buf: bytes | None = None, in_size: int | None = None
    ) -> tuple[int, bytes]:
        size_in, size_out = ioctl_sizes(request)
        if in_size is not None:
            size_in = in_size
        data = (buf or b"")[:size_in].ljust(size_in, b"\0")
        return self.call(Op.IOCTL, IOCTL_IN.pack(fh, 0, request, 0, size_in, size_out) + data)

    def ctl(
        self, fh: int, cmd: Cmd, fields: dict[str, int] | None = None, data: bytes = b""
    ) -> tuple[dict[str, int], bytes]:
        msg = MESSAGES[cmd]
        error, out = self.ioctl(fh, msg.ioctl, bytes(encode_ioctl_request(cmd, fields, data)))
        assert error == 0
        assert len(out) == wire.IOCTL_OUT.size + ioctl_sizes(msg.ioctl)[1]
        ioctl_out = wire.IOCTL_OUT.unpack_from(out)
        assert ioctl_out == (0, 0, 0, 0)
        payload = out[16:]
        return decode_ioctl_response(cmd, payload), payload[msg.ioctl_resp.size() :]

    def poll(self, fh: int, kh: int = 5, flags: int = 1) -> int:
        error, body = self.call(Op.POLL, POLL_IN.pack(fh, kh, flags, 0x5))
        assert error == 0
        return int(struct.unpack("=II", body)[0])

    def close(self) -> str:
        """End the server (as the kernel does when the device goes) and return its output."""
        self.sock.close()
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out.decode(errors="replace")


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[FakeKernel]:
    k = FakeKernel(tmp_path)
    try:
        yield k
    finally:
        output = k.close()
        assert k.proc.returncode == 0, output
        assert "Traceback" not in output, output


def _transact(k: FakeKernel, fh: int, cmd: bytes) -> bytes:
    assert k.write(fh, cmd) == (0, len(cmd))
    error, resp = k.read(fh)
    assert error == 0
    return resp


def _init_and_startup(k: FakeKernel, fh: int) -> None:
    fields, _ = k.ctl(fh, Cmd.INIT, {"init_flags": 0})
    assert fields["result"] == 0
    resp = _transact(k, fh, tpm2.build_startup())
    assert resp == bytes.fromhex("80010000000a00000000")


def test_handshake_registers_devname(kernel: FakeKernel) -> None:
    assert kernel.init_reply.endswith(b"DEVNAME=vtpm-unit\0")


def test_one_opener_and_data_path(kernel: FakeKernel) -> None:
    k = kernel
    err, fh = k.open()
    assert err == 0
    assert k.open()[0] == errno.EBUSY
    # Nothing written: non-blocking read -> EAGAIN, blocking read -> end of file.
    assert k.read(fh, flags=os.O_RDWR | os.O_NONBLOCK)[0] == errno.EAGAIN
    assert k.read(fh) == (0, b"")
    assert k.poll(fh, kh=9) & 0x1 == 0  # no POLLIN
    # Before INIT the TPM answers every command with the fatal error.
    assert _transact(k, fh, tpm2.build_get_random(8)) == bytes.fromhex("80010000000a00000101")
    assert k.notified == [9]  # the poller was woken by the response
    _init_and_startup(k, fh)
    assert k.write(fh, tpm2.build_get_random(16))[0] == 0
    assert k.poll(fh) & 0x1
    # Partial reads walk through one response.
    err, head = k.read(fh, 10)
    assert err == 0 and head[:2] == b"\x80\x01" and len(head) == 10
    total = int.from_bytes(head[2:6], "big")
    err, rest = k.read(fh, 4096)
    assert len(head + rest) == total and tpm2.parse_get_random(head + rest)
    assert k.read(fh, flags=os.O_NONBLOCK)[0] == errno.EAGAIN
    # A write shorter than a header gets TPM_RC_INSUFFICIENT.
    assert _transact(k, fh, b"\x80\x01\x00") == TPM2_SHORT_WRITE_RESPONSE
    # Longer than the TPM buffer: truncated, the TPM rejects the size.
    big = tpm2.build_get_random(8)[:2] + (5000).to_bytes(4, "big") + b"\0" * 4994
    resp = _transact(k, fh, big)
    assert resp[:2] == b"\x80\x01" and int.from_bytes(resp[6:10], "big") != 0
    k.release(fh)
    err, fh2 = k.open()
    assert err == 0 and fh2 != fh
    assert k.read(fh2, flags=os.O_NONBLOCK)[0] == errno.EAGAIN  # old response dropped


def test_ioctls(kernel: FakeKernel) -> None:
    k = kernel
    _, fh = k.open()
    fields, _ = k.ctl(fh, Cmd.GET_CAPABILITY)
    assert fields == {"caps": CAPS_CUSE}
    # Not running yet.
    assert k.ctl(fh, Cmd.GET_TPMESTABLISHED)[0]["result"] == Res.BAD_ORDINAL
    assert k.ctl(fh, Cmd.SET_LOCALITY, {"loc": 5})[0]["result"] == Res.BAD_LOCALITY
    assert k.ctl(fh, Cmd.SET_LOCALITY, {"loc": 0})[0]["result"] == 0
    q = k.ctl(fh, Cmd.SET_BUFFERSIZE, {"buffersize": 0})[0]
    assert q["result"] == 0 and q["buffersize"] == 4096
    info, data = k.ctl(fh, Cmd.GET_INFO, {"flags": 1, "offset": 0})
    assert info["result"] == 0 and data[: info["length"]].startswith(b'{"TPMSpecification"')
    assert info["totlength"] == info["length"]
    _init_and_startup(k, fh)
    assert k.ctl(fh, Cmd.GET_TPMESTABLISHED)[0] == {"result": 0, "bit": 0}
    assert k.ctl(fh, Cmd.HASH_START)[0]["result"] == 0
    assert k.ctl(fh, Cmd.HASH_DATA, {"length": 3}, b"abc")[0]["result"] == 0
    assert k.ctl(fh, Cmd.HASH_DATA, {"length": 4097})[0]["result"] == Res.FAIL
    assert k.ctl(fh, Cmd.HASH_END)[0]["result"] == 0
    assert k.ctl(fh, Cmd.GET_TPMESTABLISHED)[0] == {"result": 0, "bit": 1}
    assert k.ctl(fh, Cmd.RESET_TPMESTABLISHED, {"loc": 3})[0]["result"] == 0
    assert k.ctl(fh, Cmd.RESET_TPMESTABLISHED, {"loc": 7})[0]["result"] == Res.BAD_LOCALITY
    assert k.ctl(fh, Cmd.GET_CONFIG)[0] == {"result": 0, "flags": 0}
    assert k.ctl(fh, Cmd.STORE_VOLATILE)[0]["result"] == 0
    assert k.ctl(fh, Cmd.LOCK_STORAGE, {"retries": 0})[0]["result"] == 0
    assert k.ctl(fh, Cmd.CANCEL_TPM_CMD)[0]["result"] == 0
    # Bad requests get errnos, and the device keeps serving.
    assert k.ioctl(fh, 0xC0045099)[0] == errno.ENOTTY
    assert k.ioctl(fh, 0x8004500F)[0] == errno.ENOTTY
    assert k.ioctl(fh, 0xC0025001)[0] == errno.EINVAL
    assert k.ioctl(fh, 0xC0045001, in_size=2)[0] == errno.EINVAL
    assert k.call(Op.FLUSH, b"\0" * 24)[0] == errno.ENOSYS
    assert k.ctl(fh, Cmd.GET_CAPABILITY)[0] == {"caps": CAPS_CUSE}
    assert k.ctl(fh, Cmd.STOP)[0]["result"] == 0
    assert k.ctl(fh, Cmd.SET_BUFFERSIZE, {"buffersize": 4000})[0]["buffersize"] == 4000


def _save(k: FakeKernel, fh: int, blob_type: int) -> tuple[int, bytes]:
    parts: list[bytes] = []
    offset = 0
    while True:
        f, data = k.ctl(
            fh, Cmd.GET_STATEBLOB, {"state_flags": 1, "type": blob_type, "offset": offset}
        )
        if f["result"]:
            return f["result"], b""
        parts.append(data[: f["length"]])
        offset += f["length"]
        if offset >= f["totlength"] or not f["length"]:
            return 0, b"".join(parts)


def _load(k: FakeKernel, fh: int, blob_type: int, blob: bytes) -> int:
    for chunk in _chunks(blob):
        f, _ = k.ctl(
            fh,
            Cmd.SET_STATEBLOB,
            {"state_flags": 0, "type": blob_type, "length": len(chunk)},
            chunk,
        )
        if f["result"]:
            return f["result"]
    return 0


def test_state_blobs_by_ioctl_and_by_read_write(kernel: FakeKernel) -> None:
    k = kernel
    _, fh = k.open()
    _init_and_startup(k, fh)
    rc, perm = _save(k, fh, BlobType.PERMANENT)
    assert rc == 0 and perm
    assert _save(k, fh, BlobType.SAVESTATE)[0] == Res.RETRY  # TPM 2: no such blob
    rc, vol = _save(k, fh, BlobType.VOLATILE)
    assert rc == 0 and len(vol) > STATE_BLOB_CHUNK, len(vol)
    assert (
        k.ctl(fh, Cmd.GET_STATEBLOB, {"state_flags": 1, "type": 9})[0]["result"]
        == Res.BAD_PARAMETER
    )
    # The read() variant: the first chunk by ioctl, the rest by read.
    f, first = k.ctl(fh, Cmd.GET_STATEBLOB, {"state_flags": 1, "type": BlobType.VOLATILE})
    assert f["totlength"] > STATE_BLOB_CHUNK and f["length"] == STATE_BLOB_CHUNK
    assert k.poll(fh) & 0x1
    assert k.write(fh, b"x" * 12)[0] == errno.EIO  # a write leaves blob mode
    f, first = k.ctl(fh, Cmd.GET_STATEBLOB, {"state_flags": 1, "type": BlobType.VOLATILE})
    streamed = first[: f["length"]]
    while True:
        err, data = k.read(fh, 100)
        assert err == 0
        streamed += data
        if len(data) < 100:
            break
    assert len(streamed) == f["totlength"]
    # Loading needs a stopped TPM.
    assert _load(k, fh, BlobType.PERMANENT, perm) == Res.BAD_ORDINAL
    assert k.ctl(fh, Cmd.STOP)[0]["result"] == 0
    assert _load(k, fh, BlobType.PERMANENT, perm) == 0
    # The write() variant: an empty chunk opens the transfer, another commits it.
    f, _ = k.ctl(fh, Cmd.SET_STATEBLOB, {"state_flags": 0, "type": BlobType.VOLATILE, "length": 0})
    assert f["result"] == 0
    assert k.read(fh)[0] == errno.EIO
    for i in range(0, len(vol), 1000):
        assert k.write(fh, vol[i : i + 1000])[0] == 0
    f, _ = k.ctl(fh, Cmd.SET_STATEBLOB, {"state_flags": 0, "type": BlobType.VOLATILE, "length": 0})
    assert f["result"] == 0
    assert k.ctl(fh, Cmd.INIT, {"init_flags": 0})[0]["result"] == 0
    # Resumed from the volatile state: Startup(STATE) would fail after a clear start,
    # a command works at once.
    resp = _transact(k, fh, tpm2.build_get_random(8))
    assert int.from_bytes(resp[6:10], "big") == 0
    assert _load(k, fh, BlobType.PERMANENT, b"garbage") == Res.BAD_ORDINAL  # running
    k.ctl(fh, Cmd.STOP)
    assert _load(k, fh, BlobType.PERMANENT, b"garbage") not in (0,)
    f, _ = k.ctl(fh, Cmd.SET_STATEBLOB, {"state_flags": 0, "type": 1, "length": 3073})
    assert f["result"] == Res.BAD_PARAMETER


def _rsa_primary() -> bytes:
    attrs = (
        tpm2.ObjAttr.FIXED_TPM
        | tpm2.ObjAttr.FIXED_PARENT
        | tpm2.ObjAttr.SENSITIVE_DATA_ORIGIN
        | tpm2.ObjAttr.USER_WITH_AUTH
        | tpm2.ObjAttr.RESTRICTED
        | tpm2.ObjAttr.DECRYPT
    )
    template = tpm2.Public(
        type=tpm2.Alg.RSA,
        name_alg=tpm2.Alg.SHA256,
        attributes=attrs,
        symmetric=tpm2.SymDef(tpm2.Alg.AES, 128, tpm2.Alg.CFB),
        key_bits=3072,
        unique=os.urandom(8),
    )
    return tpm2.build_create_primary(tpm2.RH_OWNER, template)


def test_long_command_runs_on_the_worker(kernel: FakeKernel) -> None:
    k = kernel
    _, fh = k.open()
    _init_and_startup(k, fh)
    cmd = _rsa_primary()
    assert k.write(fh, cmd) == (0, len(cmd))
    # While it runs: capabilities answer, a second write is refused, reads wait.
    assert k.ctl(fh, Cmd.GET_CAPABILITY)[0] == {"caps": CAPS_CUSE}
    assert k.write(fh, tpm2.build_get_random(8))[0] == errno.EBUSY
    assert k.poll(fh, kh=77) & 0x1 == 0
    # An ioctl that needs the TPM waits for the command, and is answered before
    # the response is handed out.
    est = MESSAGES[Cmd.GET_TPMESTABLISHED].ioctl
    ioctl_unique = k.send(Op.IOCTL, IOCTL_IN.pack(fh, 0, est, 0, 0, 8))
    unique = k.read_request(fh)
    order = []
    replies = {}
    while unique not in replies:
        got, error, body = k.recv()
        order.append(got)
        replies[got] = (error, body)
    assert order == [ioctl_unique, unique]
    assert replies[ioctl_unique][0] == 0 and replies[ioctl_unique][1][16:20] == b"\0" * 4
    error, body = replies[unique]
    assert error == 0
    created = tpm2.parse_create_primary(body)
    assert created.handle >> 24 == 0x80
    assert k.ctl(fh, Cmd.GET_TPMESTABLISHED)[0]["result"] == 0
    assert k.notified == [77]  # the poller was woken too


def test_interrupt_answers_a_parked_read(kernel: FakeKernel) -> None:
    k = kernel
    _, fh = k.open()
    _init_and_startup(k, fh)
    assert k.write(fh, _rsa_primary())[0] == 0
    unique = k.read_request(fh)
    time.sleep(0.05)
    k.send(Op.INTERRUPT, struct.pack("=Q", unique), unique=unique | 1)
    got, error, body = k.recv()
    assert got == unique
    assert error in (errno.EINTR, 0)  # 0 if the key was ready before the interrupt
    # The next opener is served once the command has finished.
    k.release(fh)
    _, fh = k.open()
    deadline = time.monotonic() + 60
    while k.write(fh, tpm2.build_get_random(8))[0] == errno.EBUSY:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    err, resp = k.read(fh)
    assert err == 0
    assert int.from_bytes(resp[6:10], "big") == 0


def test_shutdown_ends_the_server(kernel: FakeKernel) -> None:
    k = kernel
    _, fh = k.open()
    assert k.ctl(fh, Cmd.SHUTDOWN)[0]["result"] == 0
    assert k.proc.wait(30) == 0
    assert "exit_message: None" in k.close()


def test_cancel_stops_a_key_generation(kernel: FakeKernel) -> None:
    k = kernel
    _, fh = k.open()
    _init_and_startup(k, fh)
    # libtpms looks at the cancel flag between prime candidates only, so a cancel
    # can come too late; one of a few tries must land.
    codes = []
    for _ in range(6):
        assert k.write(fh, _rsa_primary())[0] == 0
        time.sleep(0.01)
        assert k.ctl(fh, Cmd.CANCEL_TPM_CMD)[0]["result"] == 0
        err, resp = k.read(fh)
        assert err == 0
        codes.append(int.from_bytes(resp[6:10], "big"))
        if codes[-1] == 0:
            handle = tpm2.parse_create_primary(resp).handle
            assert _transact(k, fh, tpm2.build_flush_context(handle))[6:10] == b"\0" * 4
        else:
            break
    assert codes[-1] == 0x909, codes  # TPM_RC_CANCELED
