"""The zygote's request and reply (childproc.ZygoteRequest): no json, every str intact."""

from __future__ import annotations

import contextlib
import os
import random

import pytest

from vtpmctl.childproc import (
    ZYGOTE_PROTOCOL,
    ZYGOTE_REFUSED,
    ZYGOTE_STALE,
    ZygoteRequest,
    decode_zygote_reply,
    zygote_identity,
    zygote_reply,
)

AWKWARD = [
    "",
    " ",
    "a b",
    "=",
    "KEY=value=more",
    "line\nnext\r\n",
    "tab\there",
    "\x01\x7f",
    "é ü ٣ 中文 \U0001f600",
    os.fsdecode(b"\xff\xfe not utf-8 \x80"),  # surrogate escapes, as os.environ holds them
    "\udcc3\udca9",  # escapes of bytes that are UTF-8 together: still these two
    "\ud800 lone",  # a surrogate no codec makes; json carried it, so does this
    "-1",
    "0",
    "vtpmctl-zygote-1",
    "x" * 5000,
]


def _request(**change: object) -> ZygoteRequest:
    fields: dict[str, object] = {
        "argv": ["--state", "/s", "--ctrl", "type=unixio,path=/c"],
        "env": {"PATH": "/usr/bin", "HOME": "/root"},
        "umask": 0o022,
        "rlimits": {"NOFILE": (1024, 4096), "CORE": (0, -1)},
        "fds": [5, 9],
        "identity": zygote_identity(),
    }
    fields.update(change)
    return ZygoteRequest(**fields)  # type: ignore[arg-type]


def _same(a: ZygoteRequest, b: ZygoteRequest) -> bool:
    return all(getattr(a, n) == getattr(b, n) for n in ZygoteRequest.__slots__)


def test_a_request_comes_back_as_sent() -> None:
    request = _request()
    data = request.encode()
    assert data.startswith(ZYGOTE_PROTOCOL.encode() + b"\0") and data.endswith(b"\0")
    assert _same(ZygoteRequest.decode(data), request)


@pytest.mark.parametrize("text", AWKWARD)
def test_awkward_strings_come_back_exactly(text: str) -> None:
    request = _request(
        argv=[text, "--x", text, ""],
        env={text: text, "K": text, "E": ""},
        identity={"python": text, "cgroup": "0::/" + text},
    )
    back = ZygoteRequest.decode(request.encode())
    assert _same(back, request)
    assert back.argv == [text, "--x", text, ""]  # each exactly, not merely equal sets
    assert list(back.env) == list(request.env)  # and in order


def test_empty_and_extreme_values() -> None:
    request = _request(argv=[], env={}, umask=0, rlimits={}, fds=[], identity={})
    assert _same(ZygoteRequest.decode(request.encode()), request)
    big = _request(umask=0o777, rlimits={"AS": (-1, 2**63 - 1)}, fds=[2**31 - 1])
    assert _same(ZygoteRequest.decode(big.encode()), big)


@pytest.mark.parametrize(
    "change",
    [
        {"argv": ["a\0b"]},
        {"env": {"K": "v\0"}},
        {"env": {"K\0": "v"}},
        {"identity": {"root": "/\0"}},
    ],
)
def test_a_nul_cannot_be_sent(change: dict[str, object]) -> None:
    """No field can hold the separator; an exec refuses a NUL as well."""
    with pytest.raises(ValueError, match="NUL"):
        _request(**change).encode()


def test_every_truncation_is_refused() -> None:
    data = _request(argv=AWKWARD, env={s: s for s in AWKWARD}).encode()
    for n in range(len(data)):
        with pytest.raises(ValueError):
            ZygoteRequest.decode(data[:n])


def _fields(*items: bytes) -> bytes:
    return b"".join(i + b"\0" for i in items)


GOOD = [b"vtpmctl-zygote-1", b"1", b"a", b"1", b"K", b"v", b"18", b"0", b"0", b"0"]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\0",
        b"\0\0\0",
        b'{"argv": []}',
        _fields(b"vtpmctl-zygote-0", *GOOD[1:]),  # another layout
        _fields(*GOOD, b"extra"),  # a field past the end
        _fields(*GOOD) + b"tail",  # no NUL at the end
        _fields(*GOOD)[:-1],
        _fields(b"vtpmctl-zygote-1", b"2", b"a", b"1", b"K", b"v", b"18", b"0", b"0", b"0"),
        _fields(b"vtpmctl-zygote-1", b"99999999999", *GOOD[2:]),  # a length past the end
        _fields(b"vtpmctl-zygote-1", b"-1", *GOOD[2:]),
        _fields(b"vtpmctl-zygote-1", b"+1", *GOOD[2:]),
        _fields(b"vtpmctl-zygote-1", b" 1", *GOOD[2:]),
        _fields(b"vtpmctl-zygote-1", b"1_0", *GOOD[2:]),
        _fields(b"vtpmctl-zygote-1", "٣".encode(), *GOOD[2:]),
        _fields(b"vtpmctl-zygote-1", b"", *GOOD[2:]),
        _fields(*GOOD[:6], b"0x12", *GOOD[7:]),  # the umask
        _fields(*GOOD[:6], b"-", *GOOD[7:]),
        _fields(*GOOD[:6], b"1" * 21, *GOOD[7:]),
        _fields(*GOOD[:2], b"\xff\xfe", *GOOD[3:]),  # not UTF-8
        _fields(*GOOD[:3], b"2", b"K", b"v", b"K", b"w", *GOOD[6:]),  # a key twice
        _fields(*GOOD[:7], b"1", b"NOFILE", b"1", *GOOD[8:]),  # an rlimit cut short
        _fields(*GOOD[:8], b"1", b"x", *GOOD[9:]),  # an fd that is no number
    ],
)
def test_malformed_requests_raise_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        ZygoteRequest.decode(data)


def test_the_good_fields_above_are_a_request() -> None:
    """The malformed cases above each break this one well-formed request."""
    request = ZygoteRequest.decode(_fields(*GOOD))
    assert (request.argv, request.env, request.umask) == (["a"], {"K": "v"}, 18)
    assert (request.rlimits, request.fds, request.identity) == ({}, [], {})


def test_random_garbage_never_raises_anything_but_value_error() -> None:
    rng = random.Random(99)
    good = _request(argv=AWKWARD[:6]).encode()
    for _ in range(5000):
        data = bytearray(good)
        for _ in range(rng.randrange(1, 4)):
            at = rng.randrange(len(data))
            data[at] = rng.choice((0, rng.randrange(256), ord("1"), ord("-")))
        with contextlib.suppress(ValueError):
            ZygoteRequest.decode(bytes(data))


def test_replies() -> None:
    assert decode_zygote_reply(zygote_reply(1234)) == 1234
    for bad in (
        ZYGOTE_REFUSED,
        ZYGOTE_STALE,
        b"",
        b"pid\0",
        b"pid\x000\0",
        b"pid\0-5\0",
        b"pid\x0012",
        b"pid\x0012\0x\0",
        b'{"pid": 12}',
        zygote_reply(1234)[:-1],
    ):
        assert decode_zygote_reply(bad) is None, bad


MAX_MESSAGE = 1 << 16


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"garbage",
        b'{"argv": [], "env": {}, "umask": 18, "fds": []}',  # the old json request
        _fields(*GOOD)[:-3],
        b"\0" * (MAX_MESSAGE + 1),  # more than ZYGOTE_MAX_MESSAGE: cut short
        _fields(*GOOD),  # well formed, but of another installation (no identity)
        _request(fds=[]).encode()[:-1],
        _request(fds=[2]).encode(),  # a descriptor number the daemon's stdio takes
        _request(fds=[5]).encode(),  # a descriptor named but not sent
    ],
)
def test_the_zygote_refuses_a_bad_request_and_keeps_serving(
    message: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A malformed, truncated or foreign request is answered "bad request", the
    zygote goes on, and the descriptors that came with it are closed."""
    import socket

    from vtpmctl.device.server import zygote

    # Smaller than the real limit: a socket pair's buffer holds no more than ~200 KiB.
    monkeypatch.setattr(zygote, "ZYGOTE_MAX_MESSAGE", MAX_MESSAGE)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        socket.send_fds(ours, [message], [w, w])
        os.close(w)
        w = -1
        assert zygote._serve_one(ours, theirs, zygote_identity(), zygote._STAMPED) is True
        assert ours.recv(4096) == ZYGOTE_REFUSED
        assert os.read(r, 1) == b""  # EOF: the zygote kept no copy of the pipe
    finally:
        ours.close()
        os.close(r)
        if w >= 0:
            os.close(w)


def test_the_zygote_exits_on_a_good_request_once_its_code_changed() -> None:
    import socket

    from vtpmctl.device.server import zygote

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        socket.send_fds(ours, [_request(fds=[]).encode()], [1, 2])
        gone = (("/nonexistent/vtpmctl.py", 1, 1, 1),)
        assert zygote._serve_one(ours, theirs, zygote_identity(), gone) is False
        assert ours.recv(4096) == ZYGOTE_STALE
    finally:
        ours.close()
